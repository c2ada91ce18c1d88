"""Inverted lists on NVMe: add in blocks to RAM indexes, merge into one .ivfdata per shard.

FAISS's maintainers advise against adding to on-disk lists in place: build in
RAM, then ``merge_ondisk``. The merged index stores the absolute path of its
.ivfdata, so it is opened with IO_FLAG_ONDISK_SAME_DIR (the generation folder is
renamed after the build); serving adds IO_FLAG_READ_ONLY. IO_FLAG_MMAP on a
merged on-disk index segfaults at search in faiss 1.15.1: never use it here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from shoal.index.factory import add_in_blocks

READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def write_ondisk_shard(trained: faiss.Index, xb: np.ndarray, ids: np.ndarray, out_dir: Path,
                       stem: str, block: int = 200_000) -> list[str]:
    """Write ``stem``.index + ``stem``.ivfdata holding (xb, ids); returns the file names."""
    return write_ondisk_shard_blocks(trained, ((ids[i0:i0 + block], xb[i0:i0 + block])
                                               for i0 in range(0, len(xb), block)), out_dir, stem)


def write_ondisk_shard_blocks(trained: faiss.Index, blocks: Iterable[tuple[np.ndarray, np.ndarray]],
                              out_dir: Path, stem: str, timings: Optional[dict[str, float]] = None) -> list[str]:
    """The same from (ids, xb) blocks as they stream in: one block's index in RAM at a time.

    ``timings`` (if given) gains seconds spent reading blocks (``read_s``), assigning and adding
    (``add_s``), writing block files (``write_s``) and merging them (``merge_s``)."""
    t = timings if timings is not None else {}
    for key in ("read_s", "add_s", "write_s", "merge_s"):
        t.setdefault(key, 0.0)
    written: list[str] = []
    try:
        it = iter(blocks)
        b = 0
        while True:
            t0 = time.perf_counter()
            nxt = next(it, None)
            t1 = time.perf_counter()
            t["read_s"] += t1 - t0
            if nxt is None:
                break
            ids_b, xb_b = nxt
            idx = faiss.clone_index(trained)
            add_in_blocks(idx, xb_b, ids_b)
            t2 = time.perf_counter()
            fn = out_dir / f"{stem}.block{b:04d}.tmp"
            faiss.write_index(idx, str(fn))
            written.append(str(fn))
            del idx
            t["add_s"] += t2 - t1
            t["write_s"] += time.perf_counter() - t2
            b += 1
        t0 = time.perf_counter()
        merged = faiss.clone_index(trained)
        merge_ondisk(merged, written, str(out_dir / f"{stem}.ivfdata"))
        faiss.write_index(merged, str(out_dir / f"{stem}.index"))
        del merged  # unmaps the .ivfdata
        t["merge_s"] += time.perf_counter() - t0
    finally:
        for fn in written:
            Path(fn).unlink(missing_ok=True)
    return [f"{stem}.index", f"{stem}.ivfdata"]


def read_ondisk(path: Path) -> faiss.Index:
    """Open a merged on-disk index the way production serves it."""
    return faiss.read_index(str(path), READ_FLAGS)
