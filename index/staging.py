"""Staged vector parts: (ids, xb) written per committed batch, read back at build time.

A part is a ``.npz`` of two arrays, ``ids`` (n,) int64 and ``xb`` (n, d)
float32, written to a temp name and renamed into place; it only counts once
the catalog has registered it in the same transaction as its chunk rows.
Parts are read with ``allow_pickle=False``: nothing executable is loaded.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from shoal.index.errors import CorruptFileError


def write_part(staging: Path, ids: np.ndarray, xb: np.ndarray) -> str:
    """Write one part durably; returns its file name."""
    if len(ids) != len(xb):
        raise ValueError(f"ids and xb disagree: {len(ids)} ids, {len(xb)} vectors")
    staging.mkdir(parents=True, exist_ok=True)
    name = f"part-{int(ids.min()):012d}-{uuid.uuid4().hex[:8]}.npz"
    tmp = staging / (name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=ids.astype(np.int64), xb=np.ascontiguousarray(xb, dtype=np.float32))
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


def iter_live(staging: Path, names: Iterable[str], live: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids, xb) of each part restricted to the ``live`` ids (sorted int64)."""
    for name in names:
        ids, xb = read_part(staging, name)
        keep = np.isin(ids, live, assume_unique=True)
        if keep.any():
            yield ids[keep], xb[keep]


def load_live(staging: Path, names: Iterable[str], live: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """All live vectors: ids (n,), xb (n, d), sorted by id."""
    pairs = list(iter_live(staging, names, live))
    if not pairs:
        return np.empty(0, np.int64), np.empty((0, d), np.float32)
    ids = np.concatenate([p[0] for p in pairs])
    xb = np.concatenate([p[1] for p in pairs])
    order = np.argsort(ids, kind="stable")
    return ids[order], xb[order]


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
