"""In-process search over the live generation: the query core with a local backend.

The CLI (`shoal query`, `shoal search`) and the evaluator use this; the Serve app
uses the same core (:mod:`shoal.cluster.query`) with its deployments as the backend.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Sequence

import numpy as np

from shoal.cluster.config import Config
from shoal.index.errors import CorruptFileError, IndexMismatchError
from shoal.cluster.query import MAX_K, MAX_QUERY_CHARS, DenseResult, Hit, QueryCore, SearchOptions, validate
from shoal.index import generations
from shoal.index.search import LoadedGeneration

log = logging.getLogger(__name__)

__all__ = ["Searcher", "Hit", "MAX_K", "MAX_QUERY_CHARS"]


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
        from shoal.workers.query_model import load_query_model

        m = cfg.model
        self.qm = load_query_model(m.name, max_seq_length=m.max_seq_length, allow_download=m.allow_download,
                                   runtime=m.query_runtime, device=m.device, lm=lm)
        self.lm = lm = self.qm.lm
        want = self.manifest["model"]["fingerprint"]
        if lm.fingerprint != want:
            raise IndexMismatchError(
                f"the index was built with model {self.manifest['model']['name']} ({want}); "
                f"this query would use {lm.name} ({lm.fingerprint}). Set model.name to match or re-ingest."
            )
        self.core = QueryCore(cfg, self, offload=False)  # one caller at a time: no threads to pay for
        self.core.catalog()  # a missing or torn catalog is an error now, not at the first query
        self._reranker: Any = None

    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:  # the evaluator swaps query settings on a live searcher
        self._cfg = cfg
        if hasattr(self, "core"):
            self.core.cfg = cfg

    @property
    def catalog(self) -> Any:
        return self.core.catalog()

    @property
    def keyword(self) -> Any:
        return self.core.keyword_index(self.generation)

    # -- the Backend the core calls -----------------------------------------------------------
    @property
    def generation(self) -> str:
        return str(self.manifest["generation"])

    def serving_generation(self) -> Optional[str]:
        return self.generation

    async def encode(self, queries: list[str]) -> np.ndarray:
        return self.embed(queries)

    async def dense(self, xq: np.ndarray, k: int, opts: SearchOptions,
                    allowed: Optional[np.ndarray]) -> DenseResult:
        D, I = self.index.search(xq, k, allowed, nprobe=opts.nprobe)
        return DenseResult(D, I, self.generation)

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        if self._reranker is None:
            from shoal.workers.rerank import load_reranker

            self._reranker = load_reranker(self.cfg)
        return self._reranker.score(query, texts)

    # -- the API the CLI and the evaluator use ---------------------------------------------------
    def embed(self, queries: Sequence[str]) -> np.ndarray:
        return self.qm.encode(list(queries), self.cfg.model.batch_size)

    def search(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None,
               mode: Optional[str] = None, rerank: bool = False, path_prefix: Optional[str] = None,
               file_type: Optional[list[str]] = None, group: str = "chunk",
               feedback: Optional[str] = None) -> list[list[Hit]]:
        """Top-k hits per query: ``mode`` dense (vectors), keyword (BM25) or hybrid (both fused).

        ``rerank``: the top serve.rerank_candidates are re-scored by the
        cross-encoder in serve.rerank_model (a Conflict error where none is configured).
        ``group`` "file": k files, each hit a file's best passage with its other passages.
        """
        if not queries:
            return []
        req = validate(queries, k=k, nprobe=nprobe, mode=mode, rerank=rerank, path_prefix=path_prefix,
                       file_type=file_type, group=group, feedback=feedback)
        return asyncio.run(self.core.search(req.queries, req)).hits

    def search_ids(self, qs: Sequence[str], k: int, nprobe: Optional[int] = None,
                   mode: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of size (nq, k) of one side, unfused, for already validated queries (the fusion tuner)."""
        if mode == "keyword":
            return self.keyword.search(list(qs), k)
        return self.index.search(self.embed(qs), k, nprobe=nprobe)

    def hits(self, D: np.ndarray, I: np.ndarray, k: int) -> list[list[Hit]]:
        """Map ids to catalog rows (inside the ingested roots); ids no longer in the catalog are dropped."""
        return self.core.reader.hits(D, I, k)

    def close(self) -> None:
        self.core.close()
