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


def _mapped_member(path: Path, member: str) -> np.ndarray:
    """One array of an ``.npz`` part, memory-mapped: np.savez stores members uncompressed, so each is a
    plain ``.npy`` at an offset of the zip file (read in full only where one is compressed)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            with z.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths say where the data is
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class PartVectors:
    """Vectors of any live ids straight from the staged parts, memory-mapped: a few rows read per call, for
    the query side (feedback takes the exact vectors of a query's top hits from here)."""

    def __init__(self, staging: Path, parts: Sequence[tuple[str, int, int]]) -> None:
        self.staging = staging
        self.parts = sorted(parts, key=lambda p: (p[1], p[0]))
        self.lo = np.array([p[1] for p in self.parts], dtype=np.int64)
        self.hi = np.array([p[2] for p in self.parts], dtype=np.int64)
        self._open: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        got = self._open.get(name)
        if got is None:
            path = self.staging / name
            try:
                got = (_mapped_member(path, "ids.npy"), _mapped_member(path, "xb.npy"))
            except (OSError, KeyError, ValueError) as e:
                raise CorruptFileError(f"staged vector part {path} cannot be read: {e}") from e
            if len(self._open) > 64:
                self._open.clear()
            self._open[name] = got
        return got

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found ids, their vectors as float32) in the order of ``ids``; ids in no part are left out."""
        found, rows = [], []
        for i in np.asarray(ids, dtype=np.int64):
            for j in np.flatnonzero((self.lo <= i) & (self.hi >= i)):
                pid, xb = self._part(self.parts[j][0])
                pos = int(np.searchsorted(pid, i))
                if pos < len(pid) and pid[pos] == i:
                    found.append(int(i))
                    rows.append(np.asarray(xb[pos], dtype=np.float32))
                    break
        d = 0 if not rows else len(rows[0])
        return np.asarray(found, dtype=np.int64), np.asarray(rows, dtype=np.float32).reshape(len(rows), d)


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
