"""Choosing, training and filling a FAISS index from a factory string."""

from __future__ import annotations

import logging
import math
import re

import faiss
import numpy as np

from shoal.index.errors import ConfigError

log = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
_IVF_RE = re.compile(r"^IVF(\d+)")
# From this many lists on, "auto" puts the centroids in an HNSW graph and trains them with two-level
# k-means: assigning a vector then costs ~log(nlist) distances instead of nlist, and training grows as
# sample * sqrt(nlist) instead of sample * nlist, so a build stays near n log n (BENCHMARKS.md, index
# at scale). Below it the flat quantizer is as fast and exact.
HNSW_MIN_NLIST = 8192
QUANTIZER_EF_ADD = 32  # HNSW efSearch when assigning vectors to lists at build time (99.8% exact at 8192 lists)
QUANTIZER_EF_SEARCH = 64  # HNSW efSearch for a query's nearest lists (at least 2 x nprobe)


def nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n), small enough for 39 training points per list."""
    if n < MIN_POINTS_PER_LIST * 2:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and n < MIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return nlist


def choose_factory(n: int, configured: str = "auto", flat_threshold: int = 20_000) -> str:
    """The factory string for ``n`` vectors: exact below the threshold, IVF above.

    ``IVF{nlist}`` in a configured string is filled in from ``n``.
    """
    if configured == "auto":
        if n < flat_threshold:
            return "Flat"
        nlist = nlist_for(n)
        return f"IVF{nlist}_HNSW32,Flat" if nlist >= HNSW_MIN_NLIST else f"IVF{nlist},Flat"
    if "{nlist}" in configured:
        return configured.replace("{nlist}", str(nlist_for(n)))
    return configured


def parse_nlist(factory: str) -> int:
    m = _IVF_RE.match(factory)
    return int(m.group(1)) if m else 0


def hnsw_quantizer(ivf: faiss.IndexIVF | None) -> faiss.IndexHNSW | None:
    """The IVF index's coarse quantizer if it is an HNSW graph, else None."""
    q = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return q if isinstance(q, faiss.IndexHNSW) else None


def split_refine(factory: str) -> tuple[str, bool]:
    """(the factory without a trailing refine stage, whether it had one): "IVF4096,PQ48,RFlat" ->
    ("IVF4096,PQ48", True). With on-disk lists the refine stage's vectors are kept on disk instead
    (LoadedGeneration's DiskRefine), so FAISS builds only the base."""
    parts = factory.split(",")
    if len(parts) > 1 and (parts[-1] == "RFlat" or parts[-1] == "Refine(Flat)"):
        return ",".join(parts[:-1]), True
    return factory, False


def make_index(factory: str, d: int) -> faiss.Index:
    """An empty index for inner product on normalised vectors, taking global ids."""
    try:
        if factory == "Flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            # polysemous training (the factory's default for "PQm") reorders codes for Hamming
            # pre-filtering, which shoal never searches with; it was ~80% of PQ training time
            faiss.downcast_index(ivf).do_polysemous_training = False
        if isinstance(index, faiss.IndexRefine):
            index = faiss.IndexIDMap2(index)  # IndexRefine has no add_with_ids of its own
    except RuntimeError as e:
        raise ConfigError(f"index.factory: FAISS cannot build {factory!r}: {str(e).splitlines()[-1]}") from e
    return index


def train_positions(n: int, factory: str, per_list: int = 64, seed: int = 1234) -> np.ndarray:
    """Sorted positions (of n vectors) of a random sample big enough to train ``factory``."""
    nlist = parse_nlist(factory)
    pq = re.search(r"PQ(\d+)", factory)
    need = max(nlist * per_list, 256 * 39 if pq else 0)
    if n <= need:
        if nlist and n < nlist * MIN_POINTS_PER_LIST:
            log.warning(
                "training %s on %d vectors: fewer than %d per list; recall may suffer "
                "(fewer lists or more data would help)", factory, n, MIN_POINTS_PER_LIST,
            )
        return np.arange(n)
    rs = np.random.default_rng(seed)
    return np.sort(rs.choice(n, need, replace=False))


def train_sample(xb: np.ndarray, factory: str, per_list: int = 64, seed: int = 1234) -> np.ndarray:
    """A random sample of ``xb`` big enough to train ``factory``: (ns, d)."""
    pos = train_positions(len(xb), factory, per_list, seed)
    return xb if len(pos) == len(xb) else xb[pos]


def train_index(factory: str, xt: np.ndarray) -> faiss.Index:
    """Train an empty index of ``factory`` on xt (ns, d): the coarse quantizer (and PQ) on the GPUs if any."""
    index = make_index(factory, xt.shape[1])
    if not index.is_trained:
        nlist = parse_nlist(factory)
        if nlist and len(xt) < nlist:
            raise ConfigError(
                f"index.factory: {factory!r} needs at least {nlist} training vectors, only {len(xt)} staged; "
                "use fewer lists or 'auto'"
            )
        from shoal.index.gpu import num_gpus, use_gpu_clustering

        xt = np.ascontiguousarray(xt, dtype=np.float32)
        ivf = faiss.try_extract_index_ivf(index)
        hnsw = hnsw_quantizer(ivf)
        on_gpu = False
        if ivf is not None and (hnsw is not None or ivf.nlist >= HNSW_MIN_NLIST):
            # the centroids first (IVF.train then sees a full quantizer and trains only the rest, e.g. PQ)
            ivf.quantizer.add(two_level_kmeans(xt, ivf.nlist, gpu=num_gpus() > 0,
                                               spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT))
        else:
            on_gpu = use_gpu_clustering(index)  # k-means on the GPUs where FAISS sees any
        index.train(xt)
        if hnsw is not None:
            hnsw.hnsw.efSearch = QUANTIZER_EF_ADD
        if on_gpu:  # drop the reference to the temporary GPU clustering index
            index = faiss.deserialize_index(faiss.serialize_index(index))
    return index


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` centroids over groups of ``counts`` points: proportional, each non-empty group at
    least 1 and at most its point count (sum(counts) >= total)."""
    ideal = counts * (total / counts.sum())
    alloc = np.minimum(np.maximum(np.floor(ideal).astype(np.int64), (counts > 0).astype(np.int64)), counts)
    while alloc.sum() < total:  # largest shortfall first, where points remain
        room = np.where(alloc < counts, ideal - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > total:  # the floor of 1 overshot: take from the most over-served
        over = np.where(alloc > 1, alloc - ideal, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    return alloc


def two_level_kmeans(xt: np.ndarray, nlist: int, niter: int = 10, seed: int = 1234,
                     gpu: bool = False, spherical: bool = True) -> np.ndarray:
    """``nlist`` centroids (nlist, d) of xt by two-level k-means: ~sqrt(nlist) coarse clusters, then each
    coarse cluster split into centroids in proportion to its points.

    The cost is ~len(xt) * 2 sqrt(nlist) distance computations per iteration instead of len(xt) * nlist
    (FAISS's contrib.clustering.two_level_clustering, here with guards for tiny clusters). ``spherical``:
    unit-norm centroids, as IndexIVF trains them for inner product (an IP quantizer over raw k-means
    means would favour the longer ones).
    """
    n, d = xt.shape
    if n < nlist:
        raise ConfigError(f"index.factory: {nlist} lists need at least {nlist} training vectors, only {n} staged")
    nc1 = max(1, min(int(round(math.sqrt(nlist))), nlist))
    km = faiss.Kmeans(d, nc1, niter=niter, seed=seed, max_points_per_centroid=2000, gpu=gpu, spherical=spherical)
    km.train(xt)
    _, a = km.index.search(xt, 1)
    a = a.ravel()
    counts = np.bincount(a, minlength=nc1)
    alloc = _allocate(counts, nlist)
    order = np.argsort(a, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for c in range(nc1):
        k = int(alloc[c])
        if k == 0:
            continue
        sub = xt[order[starts[c]:starts[c + 1]]]
        if k >= len(sub):  # as many centroids as points: the points are the centroids
            out.append(sub[:k] / np.maximum(np.linalg.norm(sub[:k], axis=1, keepdims=True), 1e-12)
                       if spherical else sub[:k])
            continue
        # min_points_per_centroid 1: a proportional split keeps ~len(xt)/nlist points per centroid anyway
        km2 = faiss.Kmeans(d, k, niter=niter, seed=seed + 1 + c, gpu=gpu, min_points_per_centroid=1,
                           spherical=spherical)
        km2.train(sub)
        out.append(km2.centroids)
    cents = np.ascontiguousarray(np.vstack(out), dtype=np.float32)
    assert cents.shape == (nlist, d), cents.shape
    return cents


def add_in_blocks(index: faiss.Index, xb: np.ndarray, ids: np.ndarray, bs: int = 65536) -> None:
    """add_with_ids in blocks so the float32 copy stays small."""
    for i0 in range(0, len(xb), bs):
        index.add_with_ids(np.ascontiguousarray(xb[i0:i0 + bs], dtype=np.float32), ids[i0:i0 + bs])


def search_params(index: faiss.Index, nprobe: int, k_factor: float = 0,
                  sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """Per-call search parameters for ``index``: IVF nprobe, refine k_factor, an IDSelector.

    Nothing on the index changes, so concurrent searches with different
    settings never see each other's (Ray Serve runs sync methods in a thread
    pool). IndexShards and IndexIDMap2 pass the parameters on to every shard;
    the shards of a generation share one structure, so the first one decides.
    A selector is only honoured by CPU indexes without a refine stage: the
    caller passes one only there (see LoadedGeneration.search).
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexShards, faiss.IndexReplicas)) and inner.count():
        inner = faiss.downcast_index(inner.at(0))
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    refine = isinstance(inner, faiss.IndexRefine)
    base = faiss.downcast_index(inner.base_index) if refine else inner
    is_ivf = faiss.try_extract_index_ivf(base) is not None or (
        hasattr(faiss, "GpuIndexIVF") and isinstance(base, faiss.GpuIndexIVF))
    p: faiss.SearchParameters | None = None
    if is_ivf:
        p = faiss.SearchParametersIVF(nprobe=int(nprobe))
        if hnsw_quantizer(faiss.try_extract_index_ivf(base)) is not None:
            qp = faiss.SearchParametersHNSW(efSearch=max(QUANTIZER_EF_SEARCH, 2 * int(nprobe)))
            p.quantizer_params = qp
            p._qp = qp  # keep the quantizer's parameters alive as long as the wrapper
    if refine:
        rp = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or inner.k_factor), base_index_params=p)
        rp._base = p  # keep the base parameters alive as long as the wrapper
        p = rp
    if sel is not None:
        p = p if p is not None else faiss.SearchParameters()
        p.sel = sel
        p._sel = sel  # keep the selector alive as long as the params
    return p


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in ``index`` (IDMap, IVF, or shards of them), sorted."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    if isinstance(index, faiss.IndexPreTransform):
        return index_ids(index.index)
    if isinstance(index, faiss.IndexShards):
        parts = [index_ids(index.at(i)) for i in range(index.count())]
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise TypeError(f"cannot list the ids of a {type(index).__name__}")
    inv = ivf.invlists
    parts = []
    for lno in range(ivf.nlist):
        n = inv.list_size(lno)
        if n:
            ptr = inv.get_ids(lno)
            parts.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64).copy())
            inv.release_ids(lno, ptr)
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
