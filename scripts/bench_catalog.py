#!/usr/bin/env python
"""The catalog at scale: a synthetic catalog.sqlite of N chunk rows (10 per file, 100 top-level
folders), then the reads the query path and `shoal status` make.

    python scripts/bench_catalog.py [--chunks 10M] [--dir /tmp/shoal-catbench] [--keep]

Rows (median of --repeat runs, warm page cache):
- lookup of 100 random ids (what every query's hits cost);
- path-prefix filter matching 1% of the rows (`path_prefix`), the ids sorted;
- `shoal status` (status_dict: counts, skipped by reason, roots, last run);
- the ingested roots (the query core asks every 5 s).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def build(path: Path, n_chunks: int, per_file: int = 10, folders: int = 100) -> float:
    from shoal.workers.catalog import Catalog

    t0 = time.perf_counter()
    Catalog(path).close()  # the schema (and its indexes) as shoal creates it
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    n_files = n_chunks // per_file
    now = time.time()
    text = "synthetic chunk text of a plausible length for a snippet row"
    with db:
        db.executemany(
            "INSERT INTO files (id, path, root, size, mtime_ns, sha256, kind, status, n_chunks, indexed_at) "
            "VALUES (?, ?, '/corpus', 4096, 0, 'x', 'text', 'indexed', ?, ?)",
            ((f + 1, f"/corpus/d{f % folders:02d}/sub{(f // folders) % 50:02d}/f{f:08d}.txt", per_file, now)
             for f in range(n_files)))
    block = 1_000_000
    for c0 in range(0, n_chunks, block):
        with db:
            db.executemany(
                "INSERT INTO chunks (id, file_id, ordinal, char_start, char_end, text) VALUES (?, ?, ?, ?, ?, ?)",
                ((c + 1, c // per_file + 1, c % per_file, 0, len(text), text)
                 for c in range(c0, min(n_chunks, c0 + block))))
    with db:
        db.execute("INSERT INTO runs (started_at, finished_at, status, roots, stats) "
                   "VALUES (?, ?, 'done', '[\"/corpus\"]', '{}')", (now, now))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - t0


def timed(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="10M")
    ap.add_argument("--dir", default="/tmp/shoal-catbench")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic catalog")
    args = ap.parse_args()
    from dataclasses import replace

    from shoal.workers.catalog import Catalog
    from shoal.cluster.cli import status_dict
    from shoal.cluster.config import Config

    n = parse_count(args.chunks)
    data = Path(args.dir) / f"data-{n}"
    cat_path = data / "catalog.sqlite"
    built = None
    if not cat_path.exists():
        data.mkdir(parents=True, exist_ok=True)
        built = build(cat_path, n)
    else:  # an older schema gets the indexes a newer Catalog adds when it opens it
        Catalog(cat_path).close()
    cfg = replace(Config(), data_dir=str(data))
    rng = random.Random(0)
    rows = []
    with Catalog(cat_path, readonly=True) as cat:
        ms, got = timed(lambda: cat.lookup(rng.sample(range(1, n + 1), 100)), args.repeat)
        assert len(got) == 100
        rows.append(("lookup 100 random ids", ms, "100 rows"))
        ms, ids = timed(lambda: cat.ids_matching("/corpus/d42/"), args.repeat)
        rows.append(("path-prefix filter, 1% of rows", ms, f"{len(ids):,} ids"))
        ms, roots = timed(cat.roots, args.repeat)
        rows.append(("ingested roots", ms, f"{roots}"))
    ms, st = timed(lambda: status_dict(cfg), args.repeat)
    rows.append(("shoal status (status_dict)", ms, f"{st['counts']['chunks']:,} chunks"))
    size = sum(p.stat().st_size for p in data.iterdir() if p.is_file())
    print(f"catalog: {n:,} chunk rows, {n // 10:,} files, {size / 1e9:.2f} GB on disk"
          + (f", built in {built:.0f} s" if built else " (reused)"))
    print(f"{'read':<32} | {'median ms':>10} | result")
    print("-" * 64)
    for what, ms, res in rows:
        print(f"{what:<32} | {ms:>10.2f} | {res}")
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
