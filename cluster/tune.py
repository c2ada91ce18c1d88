"""`shoal tune`: the smallest nprobe that reaches a target recall@k on the user's own vectors.

The result is published as a new generation (the same files, hard-linked, and a
manifest with the new nprobe), so running replicas, which follow CURRENT, pick
it up like any other new generation.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from shoal.workers.catalog import Catalog
from shoal.cluster.config import Config
from shoal.index.errors import ShoalError
from shoal.index import generations, staging
from shoal.index.search import LoadedGeneration
from shoal.index import layout


@dataclass(frozen=True)
class TunePoint:
    nprobe: int
    recall: float
    ms_per_query: float


def recall_at_k(I: np.ndarray, Igt: np.ndarray, k: int) -> float:
    """Mean |I[i, :k] ∩ Igt[i, :k]| / k over the queries (FAISS's knn_intersection_measure)."""
    from faiss.contrib.evaluation import knn_intersection_measure

    return float(knn_intersection_measure(I[:, :k], Igt[:, :k]))


def nprobe_candidates(nlist: int) -> list[int]:
    out, p = [], 1
    while p < nlist:
        out.append(p)
        p *= 2
    return out + [nlist]


def sweep(gen: LoadedGeneration, xq: np.ndarray, Igt: np.ndarray, k: int, nlist: int,
          target: float) -> list[TunePoint]:
    """Recall@k for growing nprobe until ``target`` is reached (or nlist)."""
    points = []
    for nprobe in nprobe_candidates(nlist):
        t0 = time.perf_counter()
        _, I = gen.search(xq, k, nprobe=nprobe)
        ms = (time.perf_counter() - t0) * 1000 / len(xq)
        points.append(TunePoint(nprobe, recall_at_k(I, Igt, k), ms))
        if points[-1].recall >= target:
            break
    return points


def exact_top_k(data: Path, xq: np.ndarray, k: int) -> np.ndarray:
    """The ids of the exact top-k of xq over every live staged vector, streamed from staging one block
    at a time (FAISS's knn_ground_truth), so the corpus is never held in RAM."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    with Catalog(layout.catalog(data), readonly=True) as cat:
        live, parts = cat.chunk_ids(), cat.parts()
    ids_seen: list[np.ndarray] = []

    def blocks():
        for ids, xb in staging.iter_sorted(layout.staging(data), parts, live, 262_144):
            ids_seen.append(ids)
            yield xb

    _, pos = knn_ground_truth(xq, blocks(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    order = np.concatenate(ids_seen) if ids_seen else np.empty(0, np.int64)  # stream positions -> ids
    return np.where(pos >= 0, order[np.maximum(pos, 0)], -1) if len(order) else np.full(pos.shape, -1)


def ground_truth(data: Path, k: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(xq, Igt): ``nq`` live vectors drawn at random as queries and their exact top-k ids."""
    with Catalog(layout.catalog(data), readonly=True) as cat:
        live, parts = cat.chunk_ids(), cat.parts()
    if len(live) == 0:
        raise ShoalError("no vectors to tune on")
    rs = np.random.default_rng(seed)
    qids = np.sort(rs.choice(live, min(nq, len(live)), replace=False))
    xq = staging.gather(layout.staging(data), parts, qids, 0)[1]
    return xq, exact_top_k(data, xq, k)


def tune(cfg: Config, target: float = 0.95, k: int = 10, nq: int = 500, seed: int = 0) -> tuple[int, list[TunePoint]]:
    """Measure, then publish the chosen nprobe as a new generation. Returns (nprobe, sweep)."""
    if not 0 < target <= 1:
        raise ShoalError(f"--target-recall must be in (0, 1], got {target}")
    data = cfg.data_path
    gen_dir, m = generations.open_current(data)
    if not m.get("nlist"):
        raise ShoalError(f"generation {m['generation']} is an exact {m['factory']} index: nothing to tune")
    gen = LoadedGeneration(gen_dir, m)
    xq, Igt = ground_truth(data, k, nq, seed)
    points = sweep(gen, xq, Igt, k, int(m["nlist"]), target)
    best = next((p.nprobe for p in points if p.recall >= target), points[-1].nprobe)
    m = dict(m, nprobe=best, tuned={"target_recall": target, "k": k, "nq": len(xq), "at": time.time(),
                                    "sweep": [p.__dict__ for p in points], "from_generation": m["generation"]})
    publish(data, gen_dir, m)
    return best, points


def publish(data: Path, gen_dir: Path, m: dict) -> str:
    """A new generation: ``gen_dir``'s files hard-linked (copied across filesystems) under manifest ``m``."""
    tmp = generations.begin(data)
    try:
        for rel in m["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            generations.link_or_copy(gen_dir / rel, tmp / rel)
        keep = {k: v for k, v in m.items() if k not in ("generation", "files", "created_at", "format")}
        return generations.commit(data, tmp, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
