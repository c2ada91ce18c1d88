"""Ray Serve deployments that do the query work: encode, search a shard group, re-rank.

Each one loads what it needs itself (model from its directory, shards from the
data dir); nothing large goes through ``.bind()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from ray import serve

log = logging.getLogger(__name__)


@serve.deployment(name="QueryEncoder")
class QueryEncoder:
    """Embeds queries; concurrent single queries share one forward pass (@serve.batch)."""

    def __init__(self, model_name: str, max_seq_length: int, device: str, allow_download: bool,
                 threads: int = 0) -> None:
        from shoal.workers.embed import load_model

        self.lm = load_model(model_name, device=device, max_seq_length=max_seq_length,
                             allow_download=allow_download, threads=threads)
        self.batch_sizes: deque[int] = deque(maxlen=2000)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size and wait time change without a redeploy."""
        self.encode_one.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self.encode_one.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_one(self, texts: list[str]) -> list[np.ndarray]:
        from shoal.workers.embed import encode

        self.batch_sizes.append(len(texts))
        return list(encode(texts, self.lm, batch_size=max(len(texts), 1)))

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """One forward pass for a whole batch request: (n, d)."""
        from shoal.workers.embed import encode

        self.batch_sizes.append(len(texts))
        return encode(list(texts), self.lm, batch_size=64)

    def info(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {"model": self.lm.name, "fingerprint": self.lm.fingerprint, "device": self.lm.device,
                "dim": self.lm.dim, "pid": os.getpid(),
                "mean_batch": float(np.mean(sizes)) if sizes else 0.0, "batches": len(sizes)}


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """Holds shard group ``group`` of the live generation; follows CURRENT to new generations.

    A background thread loads a new generation completely, then swaps one
    reference: requests in flight finish on the old one, none is dropped.
    """

    def __init__(self, data_dir: str, group: int, n_groups: int, reload_interval_s: float,
                 refine_k_factor: float, omp_threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, omp_threads))
        self.data = Path(data_dir)
        self.group, self.n_groups = group, n_groups
        self.refine_k_factor = refine_k_factor
        self.current: Optional[tuple[str, Any, dict[str, Any]]] = None  # (name, LoadedGeneration, manifest)
        self.load_error: Optional[str] = None
        self._reload()
        if self.current is None:
            raise RuntimeError(f"shard group {group}: {self.load_error}")
        if reload_interval_s > 0:
            threading.Thread(target=self._watch, args=(reload_interval_s,), daemon=True).start()

    def _reload(self) -> bool:
        from shoal.index import generations
        from shoal.index.search import LoadedGeneration

        try:
            name = generations.current_name(self.data)
            if name is None:
                raise FileNotFoundError(f"no generation in {self.data}")
            if self.current is not None and self.current[0] == name:
                return False
            gen_dir, m = generations.open_current(self.data)
            generations.verify(gen_dir, m)
            gen = LoadedGeneration(gen_dir, m, group=self.group, n_groups=self.n_groups,
                                   k_factor=self.refine_k_factor)
        except Exception as e:  # keep serving the last good generation
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("shard group %d: cannot load the new generation, still serving %s: %s", self.group,
                      self.current[0] if self.current else None, self.load_error)
            return False
        self.current = (m["generation"], gen, m)
        self.load_error = None
        log.info("shard group %d now serves generation %s (%s)", self.group, m["generation"], gen.devices)
        return True

    def _watch(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self._reload()

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError(f"shard group {self.group} has no generation loaded")

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, str]:
        """D, I of size (nq, k) from this group, and the generation that answered."""
        if self.current is None:
            raise RuntimeError(f"shard group {self.group} has no generation loaded")
        name, gen, _m = self.current  # one reference read: a swap mid-request cannot mix generations
        D, I = gen.search(xq, k, allowed, nprobe=nprobe)  # per-call parameters: safe in Serve's thread pool
        return D, I, name

    def info(self) -> dict[str, Any]:
        name, gen, m = self.current  # type: ignore[misc]
        return {"group": self.group, "generation": name, "nprobe": gen.nprobe, "shards": gen.shard_files,
                "devices": gen.devices,
                "ntotal": int(gen.main.ntotal), "delta": int(gen.delta.ntotal) if gen.delta is not None else 0,
                "deleted": int(len(gen.deleted)), "pid": os.getpid(), "load_error": self.load_error,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


@serve.deployment(name="Reranker")
class Reranker:
    """Re-scores (query, chunk) pairs with the cross-encoder in serve.rerank_model (deployed only then)."""

    def __init__(self, cross_encoder: str, allow_download: bool, device: str = "auto") -> None:
        from shoal.workers.rerank import CrossEncoder

        self.ce = CrossEncoder(cross_encoder, allow_download=allow_download, device=device)

    def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        """A score per text, higher is better."""
        return self.ce.score(query, texts) if texts else []

    def info(self) -> dict[str, Any]:
        return {"model": self.ce.name, "device": self.ce.device, "pid": os.getpid()}


async def gather_groups(calls: Sequence[Any], timeout_s: float) -> list[Any]:
    """Await every shard group's response together; an exception stands in for a failed group."""
    async def one(c: Any) -> Any:
        try:
            return await asyncio.wait_for(c, timeout_s)
        except Exception as e:  # noqa: BLE001 - reported per group by the caller
            return e

    return list(await asyncio.gather(*(one(c) for c in calls)))


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "n": 0}
    a = np.asarray(samples)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": int(len(a))}

