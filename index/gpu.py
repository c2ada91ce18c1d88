"""The thin GPU layer: detect cards, move an index to one, train on them.

Always branch on the GPU count: with faiss-gpu on a machine without a card,
``get_num_gpus()`` is 0 and ``index_cpu_to_all_gpus`` silently returns an
empty index. Everything else (the shard plan, fallbacks) is plain CPU logic.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import faiss

from shoal.index.shards import Device

log = logging.getLogger(__name__)
_RESOURCES: dict[int, Any] = {}


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def cuda_cards() -> list[Device]:
    """The CUDA cards torch sees, each with its free memory (``torch.cuda.mem_get_info``)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devs = []
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        devs.append(Device(torch.cuda.get_device_name(i), "gpu", int(free), i))
    return devs


def detect_gpus(configured: Sequence[Any] = ()) -> list[Device]:
    """GPUs for the shard plan: the configured ones (name, memory), else the cards FAISS can use."""
    if configured:
        return [Device(g.name, "gpu", int(g.memory), i) for i, g in enumerate(configured)]
    if num_gpus() == 0:
        return []
    return cuda_cards()[:num_gpus()]


def resources(gpu_id: int) -> Any:
    """One StandardGpuResources per device for the process (temp memory is per resource)."""
    if gpu_id not in _RESOURCES:
        _RESOURCES[gpu_id] = faiss.StandardGpuResources()
    return _RESOURCES[gpu_id]


def flatten_quantizer(index: faiss.Index) -> faiss.Index:
    """Give an IVF index with an HNSW coarse quantizer a flat one holding the same centroids, in place.

    FAISS's GPU cloner has no HNSW (it would keep the quantizer on the CPU at best), and a GPU searches
    a few thousand centroids by brute force faster than a graph walk. Returns ``index``.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        return index
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    old = ivf.quantizer
    if ivf.own_fields:
        old.this.own(True)  # the Python proxy frees the graph when it goes
    ivf.quantizer = flat
    flat.this.disown()
    ivf.own_fields = True
    return index


def to_gpu(index: faiss.Index, gpu_id: int) -> faiss.Index:
    """Copy a CPU index to GPU ``gpu_id`` (lists included); the caller checked num_gpus()."""
    flatten_quantizer(index)
    co = faiss.GpuClonerOptions()
    co.useFloat16 = False  # storage precision comes from the factory (SQfp16), not from here
    return faiss.index_cpu_to_gpu(resources(gpu_id), gpu_id, index, co)


def use_gpu_clustering(index: faiss.Index) -> bool:
    """Train the IVF coarse quantizer on the GPUs when there are any; returns whether it did."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or num_gpus() == 0:
        return False
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    log.info("training the coarse quantizer on %d GPU(s)", num_gpus())
    return True
