"""The keyword index beside the vectors: BM25 (bm25s) over the live chunks, per generation.

bm25s builds a static sparse index; each generation rebuilds it from the
catalog's chunk texts (deleted chunks are simply not in it). Saved without
pickles (``allow_pickle=False``) in ``bm25/`` with the chunk ids in ``bm25_ids.npy``.

Text analysis (lower-casing, stop words, a Snowball stemmer from PyStemmer) is
an :class:`Analysis` recorded in the generation's manifest; queries against a
generation are analysed exactly as its chunks were, whatever the config says now.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from shoal.index import layout

log = logging.getLogger(__name__)

# stop-word lists bm25s ships, by the Snowball language names PyStemmer uses
_STOPWORDS = {"english": "en", "german": "de", "dutch": "nl", "french": "fr", "spanish": "es",
              "portuguese": "pt", "italian": "it", "russian": "ru", "swedish": "sv", "norwegian": "no",
              "danish": "da", "turkish": "tr"}


@dataclass(frozen=True)
class Analysis:
    """How text becomes BM25 terms: a Snowball stemmer language and a stop-word list (None: off)."""

    stemmer: Optional[str] = "english"
    stopwords: Optional[str] = "en"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Analysis":
        """The analysis a generation was built with (generations before it was recorded: stop words only)."""
        a = (manifest.get("keyword") or {}).get("analysis")
        return cls(**a) if a is not None else cls(stemmer=None, stopwords="en")


def stemmer_languages() -> list[str]:
    import Stemmer  # PyStemmer

    return sorted(Stemmer.algorithms())


def analysis_for(language: str, stopwords: str = "auto") -> Analysis:
    """``index.keyword_language`` / ``index.keyword_stopwords`` -> Analysis.

    language: a Snowball language ("english", "german", ...) or "none" (no stemming);
    stopwords: "auto" (the language's list, none for "none"), a language name, or "none".
    """
    lang = language.lower()
    if lang != "none" and lang not in stemmer_languages():
        raise ValueError(f"no Snowball stemmer for {language!r}; one of: none, {', '.join(stemmer_languages())}")
    sw = stopwords.lower()
    if sw == "auto":
        sw = lang
    if sw == "none":
        return Analysis(None if lang == "none" else lang, None)
    if sw not in _STOPWORDS:
        raise ValueError(f"no stop-word list for {stopwords!r}; one of: auto, none, {', '.join(sorted(_STOPWORDS))}")
    return Analysis(None if lang == "none" else lang, _STOPWORDS[sw])


def _tokenize(texts: Sequence[str], analysis: Analysis) -> Any:
    import bm25s

    stemmer = None
    if analysis.stemmer:
        import Stemmer

        stemmer = Stemmer.Stemmer(analysis.stemmer)
    return bm25s.tokenize(list(texts), stopwords=analysis.stopwords or [], stemmer=stemmer, show_progress=False)


def build_keyword_index(texts: Sequence[str], ids: np.ndarray, out_dir: Path, analysis: Analysis) -> None:
    """Index ``texts`` (chunk i has global id ids[i]) into out_dir/bm25 + out_dir/bm25_ids.npy."""
    import bm25s

    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    tokens = _tokenize(texts, analysis) if len(texts) else None
    if tokens is None or not tokens.vocab or all(len(t) == 0 for t in tokens.ids):
        # no indexable term at all (no chunks, or only one-letter words): a placeholder that never matches
        tokens, ids = _tokenize(["placeholder"], Analysis(None, None)), np.array([-1])
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(out_dir / layout.BM25), allow_pickle=False, show_progress=False)
    np.save(out_dir / layout.BM25_IDS, np.asarray(ids, dtype=np.int64))


class KeywordIndex:
    def __init__(self, gen_dir: Path, analysis: Analysis) -> None:
        import bm25s

        self.analysis = analysis
        self.retriever = bm25s.BM25.load(str(gen_dir / layout.BM25), allow_pickle=False, show_progress=False,
                                         verbosity=0)
        self.ids = np.load(gen_dir / layout.BM25_IDS, allow_pickle=False)

    @staticmethod
    def exists(gen_dir: Path) -> bool:
        return (gen_dir / layout.BM25_IDS).is_file()

    @classmethod
    def open(cls, gen_dir: Path, manifest: dict[str, Any]) -> Optional["KeywordIndex"]:
        """The generation's keyword index with the analysis it was built with; None if it has none."""
        return cls(gen_dir, Analysis.from_manifest(manifest)) if cls.exists(gen_dir) else None

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """D (BM25 scores), I (chunk ids) of size (nq, k); missing hits are (0, -1)."""
        nq = len(queries)
        D = np.zeros((nq, k), np.float32)
        I = np.full((nq, k), -1, np.int64)
        kk = min(k, len(self.ids))
        if kk == 0:
            return D, I
        docs, scores = self.retriever.retrieve(_tokenize(queries, self.analysis), k=kk, show_progress=False,
                                               n_threads=1)
        ids = self.ids[docs]
        ok = (scores > 0) & (ids >= 0)  # a chunk sharing no term with the query is not a keyword hit
        I[:, :kk] = np.where(ok, ids, -1)
        D[:, :kk] = np.where(ok, scores, 0)
        return D, I
