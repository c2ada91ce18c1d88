"""Generations on disk: one folder per build, a manifest with checksums, CURRENT switched atomically.

    DATA_DIR/generations/000007/  manifest.json, shard_00.index, ...
    DATA_DIR/CURRENT              "000007\\n"

A build writes into ``generations/.tmp-XXXX``, fsyncs, renames the folder to
its number, then replaces CURRENT; a crash at any point leaves the previous
generation live. Nothing is loaded from the data dir without its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from shoal.index.errors import CorruptFileError, ShoalError
from shoal.index import layout

FORMAT_VERSION = 1
MANIFEST = layout.MANIFEST


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generations_dir(data_dir: Path) -> Path:
    return layout.generations(data_dir)


def current_name(data_dir: Path) -> Optional[str]:
    p = layout.current(data_dir)
    try:
        name = p.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{p} is unreadable: {e}") from e
    if not name.isdigit():
        raise CorruptFileError(f"{p} does not name a generation (got {name[:40]!r})")
    return name


def list_generations(data_dir: Path) -> list[str]:
    g = generations_dir(data_dir)
    if not g.is_dir():
        return []
    return sorted(p.name for p in g.iterdir() if p.is_dir() and p.name.isdigit())


def next_name(data_dir: Path) -> str:
    names = list_generations(data_dir)
    return f"{(int(names[-1]) + 1) if names else 1:06d}"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a generation shares unchanged files with the last), or copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def begin(data_dir: Path) -> Path:
    """A fresh temp folder to build the next generation in."""
    tmp = generations_dir(data_dir) / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit(data_dir: Path, tmp: Path, manifest: dict[str, Any],
           base: Optional[tuple[Path, dict[str, Any]]] = None) -> str:
    """Checksum the files in ``tmp``, write the manifest, publish, switch CURRENT.

    A file hard-linked from ``base`` (the last generation's folder and manifest: the same inode and size)
    keeps the checksum that manifest lists, so a delta build does not re-read unchanged shards.
    Returns the new generation's name.
    """
    files = {}
    base_dir, base_files = (base[0], base[1].get("files", {})) if base is not None else (None, {})
    for p in sorted(tmp.rglob("*")):
        if p.name == MANIFEST or not p.is_file():
            continue
        rel = str(p.relative_to(tmp))
        st = p.stat()
        old = base_files.get(rel)
        if old is not None and base_dir is not None and old["bytes"] == st.st_size:
            try:
                bst = (base_dir / rel).stat()
            except OSError:
                bst = None
            if bst is not None and (bst.st_ino, bst.st_dev) == (st.st_ino, st.st_dev):
                files[rel] = {"sha256": old["sha256"], "bytes": st.st_size}
                continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[rel] = {"sha256": sha256_file(p), "bytes": st.st_size}
    name = next_name(data_dir)
    manifest = dict(manifest, format=FORMAT_VERSION, generation=name, created_at=time.time(), files=files)
    mpath = tmp / MANIFEST
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = generations_dir(data_dir) / name
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    set_current(data_dir, name)
    return name


def set_current(data_dir: Path, name: str) -> None:
    cur = layout.current(data_dir)
    tmp = data_dir / f".CURRENT.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cur)
    _fsync_dir(data_dir)


def read_manifest(gen_dir: Path) -> dict[str, Any]:
    p = gen_dir / MANIFEST
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CorruptFileError(f"manifest missing: {p}") from e
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"manifest {p} is damaged: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_VERSION or "files" not in m:
        raise CorruptFileError(f"manifest {p} is not a shoal manifest of format {FORMAT_VERSION}")
    return m


def verify(gen_dir: Path, manifest: dict[str, Any], names: Optional[list[str]] = None) -> None:
    """Check each listed file's size and sha256 against the manifest."""
    for fname, meta in manifest["files"].items():
        if names is not None and fname not in names:
            continue
        p = gen_dir / fname
        if not p.is_file():
            raise CorruptFileError(f"index file missing: {p}")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise CorruptFileError(f"index file {p} failed its checksum (torn or modified); rebuild with `shoal build`")


def open_current(data_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(generation folder, manifest) of the live generation; ShoalError if none."""
    name = current_name(data_dir)
    if name is None:
        raise ShoalError(f"no index yet in {data_dir}: run `shoal ingest PATH` first")
    gen_dir = generations_dir(data_dir) / name
    return gen_dir, read_manifest(gen_dir)


def gc(data_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` generations (never CURRENT) and stale temp folders."""
    cur = current_name(data_dir)
    names = list_generations(data_dir)
    doomed = [n for n in names[:-keep] if n != cur] if keep > 0 else [n for n in names if n != cur]
    g = generations_dir(data_dir)
    for n in doomed:
        shutil.rmtree(g / n, ignore_errors=True)
    if g.is_dir():
        for p in g.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
    return doomed
