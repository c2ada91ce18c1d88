"""Generations travelling to replicas on other nodes: which files a shard group needs, and a node-local
cache that takes them in bounded chunks, checks every byte against the manifest, and keeps only the
serving generation and the incoming one.

No Ray here: the transport is a ``read(name, offset, size) -> bytes`` callable (the data node's
deployment in the app, a local file in the tests).

    CACHE_DIR/<data key>/000007/            manifest.json + the group's files, all verified
    CACHE_DIR/<data key>/.incoming-000008/  a copy in progress (never served)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from shoal.index import layout
from shoal.index.errors import CorruptFileError, ShoalError

ReadFn = Callable[[str, int, int], bytes]  # (file name, offset, size) -> at most size bytes


def manifest_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def group_files(manifest: dict[str, Any], group: int, n_groups: int) -> list[str]:
    """Exactly the files shard group ``group`` of ``n_groups`` serves from: its shards (and their
    .ivfdata and refine vectors), the delta index (group 0 holds it) and the deleted ids (every group masks them)."""
    files = manifest["files"]
    want: list[str] = []
    for i, s in enumerate(manifest["shards"]):
        if i % n_groups != group:
            continue
        want.append(s["file"])
        ivf = str(Path(s["file"]).with_suffix(".ivfdata"))
        if ivf in files:
            want.append(ivf)
        want += [s[k] for k in ("refine_vectors", "refine_ids") if s.get(k)]
    if group == 0 and layout.DELTA in files:
        want.append(layout.DELTA)
    if layout.DELETED in files:
        want.append(layout.DELETED)
    missing = [f for f in want if f not in files]
    if missing:
        raise CorruptFileError(f"manifest of generation {manifest.get('generation')} lists no checksum for {missing}")
    return want


def visible_in_place(data_dir: Path, name: str, manifest_sha: str) -> Optional[Path]:
    """The generation folder where this node sees the data dir at the same path (one node, a shared
    filesystem) with the very manifest the data node announced; None where it must be copied."""
    gen_dir = layout.generations(data_dir) / name
    try:
        raw = (gen_dir / layout.MANIFEST).read_bytes()
    except OSError:
        return None
    return gen_dir if manifest_sha256(raw) == manifest_sha else None


@dataclass
class Fetched:
    gen_dir: Path
    files: list[str]
    bytes: int
    seconds: float
    copied: bool  # False: already complete in the cache


class GenerationCache:
    """One data dir's generations on this node, under ``root/<key>``."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = Path(root).expanduser().absolute() / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex[:6]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ShoalError(f"serve.cache_dir {root} is not a writable folder on this node: {e}") from e

    def complete(self, name: str, manifest_sha: str, files: list[str]) -> Optional[Path]:
        """The cached copy of ``name`` if it is complete for ``files`` and came from this manifest."""
        d = self.dir / name
        try:
            if manifest_sha256((d / layout.MANIFEST).read_bytes()) != manifest_sha:
                return None
            done = json.loads((d / ".complete").read_text())
        except (OSError, ValueError):
            return None
        return d if set(files) <= set(done) else None

    def fetch(self, name: str, manifest_raw: bytes, files: list[str], read: ReadFn, *,
              chunk_bytes: int = 8 << 20) -> Fetched:
        """Copy ``files`` of generation ``name`` into the cache, verify each against the manifest, and
        publish the folder only when every file is whole. A file whose bytes do not match is refused
        (CorruptFileError naming it) and nothing of this generation is published."""
        sha = manifest_sha256(manifest_raw)
        have = self.complete(name, sha, files)
        if have is not None:
            return Fetched(have, files, 0, 0.0, False)
        manifest = json.loads(manifest_raw)
        t0 = time.perf_counter()
        tmp = self.dir / f".incoming-{name}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        total = 0
        try:
            for fname in files:
                meta = manifest["files"][fname]
                total += self._copy(fname, meta, tmp / fname, read, chunk_bytes)
            (tmp / layout.MANIFEST).write_bytes(manifest_raw)
            (tmp / ".complete").write_text(json.dumps(sorted(files)))
            final = self.dir / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Fetched(final, files, total, time.perf_counter() - t0, True)

    @staticmethod
    def _copy(fname: str, meta: dict[str, Any], dst: Path, read: ReadFn, chunk_bytes: int) -> int:
        size, want = int(meta["bytes"]), meta["sha256"]
        h = hashlib.sha256()
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            off = 0
            while off < size:
                part = read(fname, off, min(chunk_bytes, size - off))
                if not part:
                    raise CorruptFileError(f"{fname}: the data node sent {off} of {size} bytes (file shorter "
                                           "than its manifest says)")
                h.update(part)
                f.write(part)
                off += len(part)
            f.flush()
            os.fsync(f.fileno())
        if off != size or h.hexdigest() != want:
            raise CorruptFileError(f"{fname}: received {off} bytes with sha256 {h.hexdigest()[:12]}, the manifest "
                                   f"says {size} bytes with {want[:12]}: refused, not served")
        return size

    def prune(self, keep: set[str]) -> list[str]:
        """Delete cached generations not in ``keep`` (the serving one, the incoming one) and stale copies."""
        gone = []
        for p in self.dir.iterdir():
            if p.name in keep:
                continue
            if p.is_dir() and (p.name.isdigit() or p.name.startswith(".incoming-")):
                if p.name.startswith(".incoming-") and any(p.name.startswith(f".incoming-{k}-") for k in keep):
                    continue
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        return gone

    def listing(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())


def data_key(data_node: str, data_dir: str) -> str:
    """The cache folder of one data dir on one data node (its host name or address)."""
    return hashlib.sha1(f"{data_node}:{data_dir}".encode()).hexdigest()[:12]


def read_local(gen_dir: Path) -> ReadFn:
    """A ReadFn over a generation folder on this node (the data node's side of the transfer)."""
    def read(fname: str, offset: int, size: int) -> bytes:
        with open(gen_dir / fname, "rb") as f:
            f.seek(offset)
            return f.read(size)

    return read
