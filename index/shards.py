"""The shard plan: which device holds which id range, and why.

Pure functions of (devices, vector count, factory): tested on the CPU, used
unchanged on a GPU box. A 16 GB and an 8 GB card take 2:1. A shard goes to GPU
memory when it fits there; otherwise, with on-disk lists, it stays on NVMe and
is searched by CPU threads (a GPU cannot search lists left on disk, faiss#3493);
otherwise the plan is refused with the numbers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

from shoal.index.errors import ShoalError

Placement = Literal["gpu", "cpu", "ondisk"]


@dataclass(frozen=True)
class Device:
    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int
    gpu_id: Optional[int] = None


@dataclass(frozen=True)
class ShardSpec:
    shard: int
    device: str
    gpu_id: Optional[int]
    placement: Placement
    i0: int  # position range in the id-sorted vectors
    i1: int
    est_bytes: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlanError(ShoalError):
    """No placement of the vectors fits the devices."""


def bytes_per_vector(factory: str, d: int) -> int:
    """Estimated resident bytes per vector for ``factory`` (codes + id + refine copy)."""
    base = factory.split(",")
    per = 8  # the int64 id in the inverted list or id map
    codec = base[1] if len(base) > 1 and base[0].startswith(("IVF", "IMI")) else base[0]
    if codec in ("Flat", "IDMap2"):
        per += 4 * d
    elif (m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|np)?", codec)):
        bits = int(m.group(2) or 8)
        per += (int(m.group(1)) * bits + 7) // 8
    elif codec == "SQfp16" or codec == "SQbf16":
        per += 2 * d
    elif codec in ("SQ8", "SQ8_direct"):
        per += d
    elif codec == "SQ4":
        per += (d + 1) // 2
    else:
        per += 4 * d  # unknown codec: assume flat, the safe side
    if any(p.startswith("RFlat") or p == "Refine(Flat)" for p in base[1:]):
        per += 4 * d
    return per


def shard_ranges(n: int, weights: Sequence[float]) -> Iterator[tuple[int, int, int]]:
    """Split [0, n) into len(weights) contiguous ranges proportional to weights: (shard, i0, i1)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    acc = 0.0
    i0 = 0
    for s, w in enumerate(weights):
        acc += w
        i1 = n if s == len(weights) - 1 else int(round(n * acc / total))
        yield s, i0, i1
        i0 = i1


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def plan_shards(
    n: int,
    d: int,
    factory: str,
    gpus: Sequence[Device],
    *,
    cpu_memory_bytes: int,
    ondisk: bool = False,
    gpu_reserve_fraction: float = 0.2,
) -> list[ShardSpec]:
    """Shards for ``n`` vectors of dim ``d``: one per GPU weighted by memory, or one on the CPU."""
    per = bytes_per_vector(factory, d)
    need = n * per
    if not gpus:
        if ondisk and factory.startswith("IVF"):
            return [ShardSpec(0, "cpu", None, "ondisk", 0, n, need,
                              "no GPU: inverted lists on NVMe, searched by CPU threads")]
        if need > cpu_memory_bytes:
            raise PlanError(
                f"{n} vectors x {per} bytes = {_gb(need)} does not fit the {_gb(cpu_memory_bytes)} of RAM "
                f"planned for the index; use a PQ factory (e.g. IVF{{nlist}},PQ32: {bytes_per_vector('IVF1,PQ32', d)} "
                "bytes/vector) or index.ondisk: true"
            )
        return [ShardSpec(0, "cpu", None, "cpu", 0, n, need, "no GPU: index in RAM, searched by CPU threads")]
    usable = [int(g.memory_bytes * (1 - gpu_reserve_fraction)) for g in gpus]
    specs = []
    for s, i0, i1 in shard_ranges(n, [g.memory_bytes for g in gpus]):
        g, est = gpus[s], (i1 - i0) * per
        if est <= usable[s]:
            specs.append(ShardSpec(s, g.name, g.gpu_id, "gpu", i0, i1, est,
                                   f"fits in {g.name}: {_gb(est)} of {_gb(usable[s])} usable"))
        elif ondisk and factory.startswith("IVF"):
            specs.append(ShardSpec(s, "cpu", g.gpu_id, "ondisk", i0, i1, est,
                                   f"{_gb(est)} exceeds {_gb(usable[s])} usable on {g.name}: "
                                   "lists stay on NVMe, searched by CPU threads"))
        else:
            raise PlanError(
                f"shard {s} on {g.name}: {i1 - i0} vectors x {per} bytes = {_gb(est)} > {_gb(usable[s])} usable "
                f"({_gb(g.memory_bytes)} less {gpu_reserve_fraction:.0%} reserve); use a PQ factory "
                f"(IVF{{nlist}},PQ32: {bytes_per_vector('IVF1,PQ32', d)} bytes/vector) or index.ondisk: true"
            )
    return specs
