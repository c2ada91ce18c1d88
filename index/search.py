"""Searching a generation: main shards + a small delta index, minus deleted ids."""

from __future__ import annotations

import faiss
import numpy as np
from shoal.index import layout


class DiskRefine:
    """Exact re-scoring of candidates from vectors on disk: the refine stage of IVF-PQ with on-disk lists.

    Each shard keeps its vectors (``shard_NN.vectors.npy``, float32 or float16) in the order of its
    sorted ids (``shard_NN.vector_ids.npy``); both are memory-mapped, so a search reads only the rows
    of its candidates (k x k_factor per query) and serving holds no copy in anonymous memory.
    Shards hold disjoint, contiguous id ranges (the plan splits the sorted ids).
    """

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.parts = [(ids, vec) for ids, vec in parts if len(ids)]
        self.starts = np.array([ids[0] for ids, _ in self.parts], dtype=np.int64)

    @classmethod
    def open(cls, gen_dir, shards: list[dict]) -> "DiskRefine | None":
        files = [(s["refine_ids"], s["refine_vectors"]) for s in shards if s.get("refine_vectors")]
        if not files:
            return None
        return cls([(np.load(gen_dir / i, mmap_mode="r"), np.load(gen_dir / v, mmap_mode="r")) for i, v in files])

    def rescore(self, xq: np.ndarray, I: np.ndarray) -> np.ndarray:
        """Exact inner products (nq, m) of xq with the vectors of ids I (nq, m); -inf where I is -1
        (or an id no shard holds)."""
        nq, m = I.shape
        D = np.full(nq * m, -np.inf, dtype=np.float32)
        flat = I.reshape(-1)
        qrow = np.repeat(np.arange(nq), m)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        ok = (flat >= 0) & (which >= 0)
        for s, (ids, vec) in enumerate(self.parts):
            sel = np.nonzero(ok & (which == s))[0]
            if not len(sel):
                continue
            pos = np.minimum(np.searchsorted(ids, flat[sel]), len(ids) - 1)
            hit = ids[pos] == flat[sel]
            sel, pos = sel[hit], pos[hit]
            order = np.argsort(pos, kind="stable")  # read the mapped rows in file order
            sel, pos = sel[order], pos[order]
            rows = np.asarray(vec[pos], dtype=np.float32)
            D[sel] = np.einsum("ij,ij->i", rows, xq[qrow[sel]])
        return D.reshape(nq, m)


def search_merged(main: faiss.Index, delta: faiss.Index | None, deleted: np.ndarray, xq: np.ndarray,
                  k: int, allowed: np.ndarray | None = None, params: faiss.SearchParameters | None = None,
                  selected: bool = False, refine: DiskRefine | None = None,
                  k_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """D, I of size (nq, k), inner product (larger is better), deleted ids never returned.

    ``main`` and ``delta`` are searched for k + len(deleted) candidates (capped)
    so that masking deleted ids still leaves k hits; results are merged with
    FAISS's ResultHeap. Missing hits are (-inf, -1). ``allowed`` (sorted ids)
    restricts the hits: inside FAISS where ``params`` carries an IDSelector
    (``selected``), and by over-fetching and filtering otherwise, so a
    non-matching id is never returned on any path. ``params`` (nprobe,
    k_factor) apply to ``main``; the delta index is exact. With ``refine``, main is searched for
    k x ``k_factor`` candidates whose scores are then replaced by exact ones from disk.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = len(xq)
    fetch = k + min(len(deleted), 1024)
    if allowed is not None and not selected:
        fetch = max(fetch, 8 * k)  # selector-less path (IndexShards, GPU): over-fetch, then filter
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for index in (main, delta):
        if index is None or index.ntotal == 0:
            continue
        want = fetch
        if index is main and refine is not None:
            want = max(fetch, int(np.ceil(k * max(k_factor, 1.0))) + (fetch - k))
        D, I = index.search(xq, min(want, index.ntotal), params=params if index is main else None)
        dead = np.isin(I, deleted) if len(deleted) else np.zeros(I.shape, bool)
        if allowed is not None:
            dead |= ~np.isin(I, allowed)
        if dead.any():
            I = np.where(dead, -1, I)
            D = np.where(dead, -np.inf, D).astype(np.float32)
        if index is main and refine is not None:
            D = refine.rescore(xq, I)
            I = np.where(np.isfinite(D), I, -1)
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
    heap.finalize()
    D, I = heap.D, heap.I
    I[~np.isfinite(D)] = -1
    return D, I


class LoadedGeneration:
    """A generation opened for search: main shards (IndexShards), delta, deleted ids.

    Each shard goes where the plan put it: to its GPU when the plan says "gpu"
    and FAISS sees that card, else it stays on the CPU (on-disk lists are
    always searched by CPU threads). Where each one ended up is in ``devices``.
    """

    def __init__(self, gen_dir, manifest, *, use_gpu: bool = True, group: int = 0, n_groups: int = 1,
                 k_factor: float = 0) -> None:
        import logging

        from shoal.index.gpu import num_gpus, to_gpu
        from shoal.index.ondisk import read_ondisk

        log = logging.getLogger(__name__)
        self.manifest = manifest
        self.nprobe = int(manifest.get("nprobe", 1))  # defaults for a search that names none
        self.k_factor = float(k_factor)
        self.devices: list[str] = []
        shards = []
        n_gpu = num_gpus() if use_gpu else 0
        mine = [s for i, s in enumerate(manifest["shards"]) if i % n_groups == group]
        for s in mine:
            path = gen_dir / s["file"]
            idx = read_ondisk(path) if s.get("ondisk") else faiss.read_index(str(path))
            gid = s.get("gpu_id")
            if s.get("placement") == "gpu" and gid is not None and n_gpu > 0:
                gid = gid if gid < n_gpu else gid % n_gpu  # inside a Ray actor the one GPU it got is device 0
                idx = to_gpu(idx, gid)
                self.devices.append(f"gpu:{gid}")
            else:
                if s.get("placement") == "gpu":
                    log.warning("shard %s was planned for GPU %s but FAISS sees %d GPU(s): searching it on the CPU",
                                s["file"], gid, n_gpu)
                self.devices.append("cpu-ondisk" if s.get("ondisk") else "cpu")
            shards.append(idx)
        self.shard_files = [s["file"] for s in mine]
        if not shards:
            self.main = faiss.IndexIDMap2(faiss.IndexFlatIP(manifest["dim"]))  # a group with nothing to hold
        elif len(shards) == 1:
            self.main = shards[0]
        else:
            self.main = faiss.IndexShards(manifest["dim"], True, False)  # threaded; global ids kept as stored
            for idx in shards:
                self.main.add_shard(idx)
        self._shards = shards  # keep the Python owners alive
        self.refine = DiskRefine.open(gen_dir, mine)  # exact vectors on disk for a PQ + refine factory
        has_delta = group == 0 and (gen_dir / layout.DELTA).exists()
        self.delta = faiss.read_index(str(gen_dir / layout.DELTA)) if has_delta else None
        self.deleted = (np.load(gen_dir / layout.DELETED, allow_pickle=False)
                        if (gen_dir / layout.DELETED).exists() else np.empty(0, np.int64))

    @property
    def ntotal(self) -> int:
        return int(self.main.ntotal + (self.delta.ntotal if self.delta is not None else 0) - len(self.deleted))

    def _selector(self, allowed: np.ndarray) -> faiss.IDSelector | None:
        """An IDSelector where FAISS honours one (a single CPU shard, no refine, no delta), else None."""
        if len(self._shards) != 1 or not self.devices[0].startswith("cpu") or self.delta is not None:
            return None
        inner = faiss.downcast_index(self.main)
        if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexRefine):
            return None
        return faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               nprobe: int | None = None, k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of size (nq, k); ``allowed`` (sorted ids) filters the hits.

        nprobe and k_factor (defaults: the manifest's nprobe, the configured
        k_factor) go into per-call SearchParameters: the loaded index is never
        changed by a search, so concurrent searches cannot disturb each other.
        """
        from shoal.index.factory import search_params

        sel = self._selector(allowed) if allowed is not None else None
        params = search_params(self.main, nprobe or self.nprobe, k_factor or self.k_factor, sel)
        return search_merged(self.main, self.delta, self.deleted, np.ascontiguousarray(xq, dtype=np.float32),
                             k, allowed, params, selected=sel is not None, refine=self.refine,
                             k_factor=k_factor or self.k_factor)

    def live_ids(self) -> np.ndarray:
        """Every id a search can return, sorted (for consistency checks)."""
        from shoal.index.factory import index_ids

        ids = index_ids(self.main)
        if self.delta is not None:
            ids = np.concatenate([ids, index_ids(self.delta)])
        return np.sort(np.setdiff1d(ids, self.deleted))
