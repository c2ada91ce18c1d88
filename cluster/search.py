"""In-process search over the live generation: embed, search, look up, format."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from cluster.catalog import Catalog
from cluster.config import Config
from cluster.errors import CorruptFileError, IndexMismatchError, ShoalError
from index import generations
from index.fusion import fuse
from index.search import LoadedGeneration

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_QUERY_CHARS = 4096


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    path: str
    kind: str
    start: int
    end: int
    text: str

    def snippet(self, chars: int = 200) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= chars else flat[:chars].rstrip() + "…"

    def as_dict(self, snippet_chars: Optional[int] = 200) -> dict[str, Any]:
        d = asdict(self)
        if snippet_chars is not None:
            d["text"] = self.snippet(snippet_chars)
        return d


def validate_query(q: Any, k: Any) -> tuple[str, int]:
    if not isinstance(q, str):
        raise ShoalError(f"query must be a string, got {type(q).__name__}")
    q = q.strip()
    if not q:
        raise ShoalError("empty query: type some words to search for")
    if len(q) > MAX_QUERY_CHARS:
        raise ShoalError(f"query too long: {len(q)} characters (max {MAX_QUERY_CHARS})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ShoalError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return q, k


class Searcher:
    """Loads the live generation and the model once; answers many queries."""

    def __init__(self, cfg: Config, *, lm: Any = None) -> None:
        self.cfg = cfg
        data = cfg.data_path
        self.gen_dir, self.manifest = generations.open_current(data)
        generations.verify(self.gen_dir, self.manifest)
        try:
            self.index = LoadedGeneration(self.gen_dir, self.manifest, k_factor=cfg.index.refine_k_factor)
        except RuntimeError as e:
            raise CorruptFileError(f"cannot read the index in {self.gen_dir}: {str(e).splitlines()[-1]}") from e
        if lm is None:
            from workers.embed import load_model

            m = cfg.model
            lm = load_model(m.name, device=m.device, max_seq_length=m.max_seq_length,
                            allow_download=m.allow_download)
        self.lm = lm
        want = self.manifest["model"]["fingerprint"]
        if lm.fingerprint != want:
            raise IndexMismatchError(
                f"the index was built with model {self.manifest['model']['name']} ({want}); "
                f"this query would use {lm.name} ({lm.fingerprint}). Set model.name to match or re-ingest."
            )
        self.catalog = Catalog(data / "catalog.sqlite", readonly=True)
        from index.keyword import KeywordIndex

        self.keyword = KeywordIndex.open(self.gen_dir, self.manifest)
        self._reranker: Any = None

    @property
    def generation(self) -> str:
        return str(self.manifest["generation"])

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        from workers.embed import encode

        return encode(list(queries), self.lm, self.cfg.model.batch_size)

    def search_vectors(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of size (nq, k) from the index (ids may include deleted chunks)."""
        return self.index.search(xq, k, nprobe=nprobe)

    def hits(self, D: np.ndarray, I: np.ndarray, k: int) -> list[list[Hit]]:
        """Map ids to catalog rows; ids no longer in the catalog are dropped."""
        rows = self.catalog.lookup(np.unique(I[I >= 0]).tolist())
        out = []
        for drow, irow in zip(D, I):
            hs: list[Hit] = []
            for score, i in zip(drow, irow):
                c = rows.get(int(i))
                if c is None:
                    continue
                hs.append(Hit(len(hs) + 1, float(score), c.id, c.path, c.kind, c.start, c.end, c.text))
                if len(hs) == k:
                    break
            out.append(hs)
        return out

    def search(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None,
               mode: Optional[str] = None, rerank: bool = False) -> list[list[Hit]]:
        """Top-k hits per query: ``mode`` dense (vectors), keyword (BM25) or hybrid (both fused).

        ``rerank``: the top serve.rerank_candidates are re-scored by the
        cross-encoder in serve.rerank_model (an error where none is configured).
        """
        qs = [validate_query(q, k)[0] for q in queries]
        if not qs:
            return []
        if rerank and self._reranker is None:
            from workers.rerank import load_reranker

            self._reranker = load_reranker(self.cfg)
        fetch = max(k, self.cfg.serve.rerank_candidates) if rerank else k
        D, I = self.search_ids(qs, fetch + 16, nprobe, mode)  # +16: ids the catalog no longer knows are dropped
        out = self.hits(D, I, fetch)
        if rerank:
            out = [self._rerank(q, hs) for q, hs in zip(qs, out)]
        return [hs[:k] for hs in out]

    def _rerank(self, q: str, hits: list[Hit]) -> list[Hit]:
        from dataclasses import replace

        from workers.rerank import rerank_order

        n = min(len(hits), self.cfg.serve.rerank_candidates)
        scores = self._reranker.score(q, [h.text for h in hits[:n]])
        head = [replace(hits[i], score=float(scores[i])) for i in rerank_order(scores)]
        return [replace(h, rank=r) for r, h in enumerate(head + hits[n:], 1)]

    def search_ids(self, qs: Sequence[str], k: int, nprobe: Optional[int] = None,
                   mode: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of size (nq, k) for already validated queries."""
        q = self.cfg.query
        mode = mode or q.mode
        if mode not in ("dense", "keyword", "hybrid"):
            raise ShoalError(f"mode must be dense, keyword or hybrid, got {mode!r}")
        if mode != "dense" and self.keyword is None:
            if mode == "keyword":
                raise ShoalError(f"generation {self.generation} has no keyword index (index.keyword is false)")
            mode = "dense"
        if mode == "dense":
            return self.search_vectors(self.embed(qs), k, nprobe)
        if mode == "keyword":
            return self.keyword.search(qs, k)
        n = max(k, q.fusion_candidates)
        return fuse(self.search_vectors(self.embed(qs), n, nprobe), self.keyword.search(qs, n), k, q)

    def close(self) -> None:
        self.catalog.close()
