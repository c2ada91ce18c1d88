"""The keyword index beside the vectors: BM25 (bm25s) over the live chunks, per generation.

bm25s builds a static sparse index; each generation rebuilds it from the
catalog's chunk texts (deleted chunks are simply not in it). Saved without
pickles (``allow_pickle=False``) in ``bm25/`` with the chunk ids in ``bm25_ids.npy``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

STOPWORDS = "en"


def _tokenize(texts: Sequence[str]) -> object:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, show_progress=False)


def build_keyword_index(texts: Sequence[str], ids: np.ndarray, out_dir: Path) -> None:
    """Index ``texts`` (chunk i has global id ids[i]) into out_dir/bm25 + out_dir/bm25_ids.npy."""
    import bm25s

    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    tokens = _tokenize(texts) if len(texts) else None
    if tokens is None or not tokens.vocab or all(len(t) == 0 for t in tokens.ids):
        # no indexable term at all (no chunks, or only one-letter words): a placeholder that never matches
        tokens, ids = _tokenize(["placeholder"]), np.array([-1])
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(out_dir / "bm25"), allow_pickle=False, show_progress=False)
    np.save(out_dir / "bm25_ids.npy", np.asarray(ids, dtype=np.int64))


class KeywordIndex:
    def __init__(self, gen_dir: Path) -> None:
        import bm25s

        self.retriever = bm25s.BM25.load(str(gen_dir / "bm25"), allow_pickle=False, show_progress=False,
                                         verbosity=0)
        self.ids = np.load(gen_dir / "bm25_ids.npy", allow_pickle=False)

    @staticmethod
    def exists(gen_dir: Path) -> bool:
        return (gen_dir / "bm25_ids.npy").is_file()

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """D (BM25 scores), I (chunk ids) of size (nq, k); missing hits are (0, -1)."""
        nq = len(queries)
        D = np.zeros((nq, k), np.float32)
        I = np.full((nq, k), -1, np.int64)
        kk = min(k, len(self.ids))
        if kk == 0:
            return D, I
        docs, scores = self.retriever.retrieve(_tokenize(queries), k=kk, show_progress=False, n_threads=1)
        ids = self.ids[docs]
        ok = (scores > 0) & (ids >= 0)  # a chunk sharing no term with the query is not a keyword hit
        I[:, :kk] = np.where(ok, ids, -1)
        D[:, :kk] = np.where(ok, scores, 0)
        return D, I
