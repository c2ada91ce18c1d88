"""Staged vector parts: (ids, xb) written per committed batch, read back at build time.

A part is a ``.npz`` of two arrays, ``ids`` (n,) int64 and ``xb`` (n, d)
float32 (or float16: ``index.staging_dtype``; read back as float32), written to a temp name and renamed into place; it only counts once
the catalog has registered it in the same transaction as its chunk rows.
Parts are read with ``allow_pickle=False``: nothing executable is loaded.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from shoal.index.errors import CorruptFileError


def write_part(staging: Path, ids: np.ndarray, xb: np.ndarray, dtype: str = "float32") -> str:
    """Write one part durably (vectors stored as ``dtype``: float32 or float16); returns its file name."""
    if len(ids) != len(xb):
        raise ValueError(f"ids and xb disagree: {len(ids)} ids, {len(xb)} vectors")
    staging.mkdir(parents=True, exist_ok=True)
    name = f"part-{int(ids.min()):012d}-{uuid.uuid4().hex[:8]}.npz"
    tmp = staging / (name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=ids.astype(np.int64), xb=np.ascontiguousarray(xb, dtype=np.dtype(dtype)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / name)
    return name


def read_part(staging: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (n,), xb (n, d)."""
    path = staging / name
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, xb = z["ids"], z["xb"]
    except FileNotFoundError as e:
        raise CorruptFileError(f"staged vector part missing: {path}") from e
    except (ValueError, OSError, KeyError) as e:
        raise CorruptFileError(f"staged vector part {path} is damaged: {e}") from e
    if ids.ndim != 1 or xb.ndim != 2 or len(ids) != len(xb):
        raise CorruptFileError(f"staged vector part {path} has bad shapes {ids.shape}, {xb.shape}")
    return ids, xb


def iter_sorted(staging: Path, parts: Sequence[tuple[str, int, int]], live: np.ndarray,
                block: int = 200_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``live`` ids' vectors (float32) in ascending id order, ``block`` rows at a time, never all in RAM.

    ``parts``: (name, min_id, max_id) of every registered part. Only parts whose id range meets
    [live[0], live[-1]] are read; parts whose ranges overlap are read together and sorted (a part is at
    most one commit batch or one compaction block). Blocks are views into the part being read where they
    can be: memory stays about one part plus one block.
    """
    if not len(live):
        return
    rest_i: Optional[np.ndarray] = None  # fewer than ``block`` rows carried to the next part
    rest_x: Optional[np.ndarray] = None
    for ids, xb in _sorted_runs(staging, parts, live):
        pos = 0
        if rest_i is not None and rest_x is not None:
            take = min(block - len(rest_i), len(ids))
            rest_i = np.concatenate([rest_i, ids[:take]])
            rest_x = np.concatenate([rest_x, xb[:take].astype(np.float32, copy=False)])
            pos = take
            if len(rest_i) < block:
                continue
            yield rest_i, rest_x
            rest_i = rest_x = None
        while len(ids) - pos >= block:
            yield ids[pos:pos + block], np.ascontiguousarray(xb[pos:pos + block], dtype=np.float32)
            pos += block
        if pos < len(ids):
            rest_i, rest_x = ids[pos:].copy(), xb[pos:].astype(np.float32)  # copies: the part can go
    if rest_i is not None and rest_x is not None:
        yield rest_i, rest_x


def _sorted_runs(staging: Path, parts: Sequence[tuple[str, int, int]],
                 live: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, xb as stored) per part, or per group of parts whose id ranges overlap, restricted to ``live``."""
    lo, hi = int(live[0]), int(live[-1])
    todo = sorted((p for p in parts if p[2] >= lo and p[1] <= hi), key=lambda p: (p[1], p[2]))
    i = 0
    while i < len(todo):
        run, run_hi = [todo[i]], todo[i][2]
        i += 1
        while i < len(todo) and todo[i][1] <= run_hi:  # overlapping ranges: one sorted run
            run.append(todo[i])
            run_hi = max(run_hi, todo[i][2])
            i += 1
        ids_l, xb_l = [], []
        for name, _, _ in run:
            ids, xb = read_part(staging, name)
            keep = np.isin(ids, live, assume_unique=True)
            if keep.all():
                ids_l.append(ids)
                xb_l.append(xb)
            elif keep.any():
                ids_l.append(ids[keep])
                xb_l.append(xb[keep])
            del ids, xb
        if not ids_l:
            continue
        if len(ids_l) == 1:
            ids, xb = ids_l[0], xb_l[0]
        else:
            ids, xb = np.concatenate(ids_l), np.concatenate([x.astype(np.float32, copy=False) for x in xb_l])
        del ids_l, xb_l
        if np.any(np.diff(ids) < 0):
            order = np.argsort(ids, kind="stable")
            ids, xb = ids[order], xb[order]
        yield ids, xb


def gather(staging: Path, parts: Sequence[tuple[str, int, int]], ids: np.ndarray, d: int,
           block: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of ``ids`` (sorted; a sample, a delta) as float32, read part by part: (got ids, xb)."""
    got_l, xb_l = [], []
    for got, xb in iter_sorted(staging, parts, ids, block):
        got_l.append(got)
        xb_l.append(xb)
    if not got_l:
        return np.empty(0, np.int64), np.empty((0, d), np.float32)
    return np.concatenate(got_l), np.concatenate(xb_l)


def remove_orphans(staging: Path, registered: Iterable[str]) -> list[str]:
    """Delete part files the catalog never registered (a crash before COMMIT)."""
    if not staging.is_dir():
        return []
    keep = set(registered)
    removed = []
    for p in staging.iterdir():
        if p.name not in keep:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed
