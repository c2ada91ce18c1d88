#!/usr/bin/env python
"""The keyword index at scale: a full build of N synthetic chunks, then delta builds for a few changed files.

    python scripts/bench_keyword.py [--chunks 1M] [--changed-files 10] [--dir /tmp/shoal-kwbench] [--keep]

The catalog gets N chunk rows (10 per file) of ~120 words: words drawn from
Cranfield's own word frequencies (real English, Zipf-like) plus one in ten from a
synthetic long tail of 500,000 rare terms, so the vocabulary grows as a real
corpus's does. Then, on that catalog, exactly as `shoal ingest`'s build does it
(the generation folder, its checksums with hard-linked files reusing the last
manifest's, CURRENT switched):
- a full build (every chunk analysed, segments of 250,000);
- a delta build after ``--changed-files`` files changed (their chunks deleted, new
  chunk rows under new ids), three times: median and max seconds;
- the same delta as a full rebuild would see it: top-10 of 100 Cranfield queries
  compared (scores to 1e-4), and query latency.
Peak RSS is the process's (ru_maxrss) after each step.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import sqlite3
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_catalog import parse_count  # noqa: E402

CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield"


def vocabulary() -> tuple[np.ndarray, np.ndarray, list[str]]:
    words: Counter = Counter()
    docs = [json.loads(line) for line in open(CRANFIELD / "corpus.jsonl", encoding="utf-8")]
    for d in docs:
        words.update(re.findall(r"[a-z]+", f"{d.get('title', '')} {d['text']}".lower()))
    vocab = np.array(list(words), dtype=object)
    p = np.array([words[w] for w in vocab], dtype=np.float64)
    queries = [json.loads(line)["text"] for line in open(CRANFIELD / "queries.jsonl", encoding="utf-8")][:100]
    return vocab, p / p.sum(), queries


def texts(n: int, seed: int, vocab: np.ndarray, p: np.ndarray) -> list[str]:
    rs = np.random.default_rng(seed)
    words = vocab[rs.choice(len(vocab), size=(n, 120), p=p)]
    rare = rs.zipf(1.3, size=(n, 12)) % 500_000
    out = []
    for w, r in zip(words, rare):
        out.append(" ".join(w.tolist()) + " " + " ".join(f"tail{x}" for x in r.tolist()))
    return out


def make_catalog(path: Path, n: int, vocab: np.ndarray, p: np.ndarray, per_file: int = 10) -> float:
    from shoal.workers.catalog import Catalog

    t0 = time.perf_counter()
    Catalog(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    with db:
        db.executemany(
            "INSERT INTO files (id, path, root, size, mtime_ns, sha256, kind, status, n_chunks, indexed_at) "
            "VALUES (?, ?, '/corpus', 4096, 0, 'x', 'text', 'indexed', ?, 0)",
            ((f + 1, f"/corpus/d{f % 100:02d}/f{f:08d}.txt", per_file) for f in range(n // per_file)))
    block = 100_000
    for c0 in range(0, n, block):
        m = min(block, n - c0)
        tx = texts(m, c0, vocab, p)
        with db:
            db.executemany("INSERT INTO chunks (id, file_id, ordinal, char_start, char_end, text) "
                           "VALUES (?, ?, ?, 0, ?, ?)",
                           ((c0 + i + 1, (c0 + i) // per_file + 1, (c0 + i) % per_file, len(t), t)
                            for i, t in enumerate(tx)))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - t0


def change_files(path: Path, files: int, step: int, vocab: np.ndarray, p: np.ndarray, per_file: int = 10) -> None:
    """``files`` files changed: their chunk rows replaced by new rows (new ids), as an ingest commits them."""
    db = sqlite3.connect(path)
    rs = np.random.default_rng(1000 + step)
    n_files = db.execute("SELECT max(id) FROM files").fetchone()[0]
    fids = rs.choice(n_files, files, replace=False) + 1
    with db:
        for f in fids.tolist():
            db.execute("DELETE FROM chunks WHERE file_id=?", (f,))
            for o, t in enumerate(texts(per_file, 77 * step + f, vocab, p)):
                db.execute("INSERT INTO chunks (file_id, ordinal, char_start, char_end, text) VALUES (?, ?, 0, ?, ?)",
                           (f, o, len(t), t))
    db.close()


def build(data: Path, analysis, base: bool) -> tuple[float, dict, str]:
    from shoal.workers.catalog import Catalog
    from shoal.index import generations
    from shoal.index.keyword import SEGMENT_DOCS, write_keyword

    t0 = time.perf_counter()
    cat = Catalog(data / "catalog.sqlite")
    live = cat.chunk_ids()
    base_dir = base_m = None
    if base:
        base_dir, base_m = generations.open_current(data)
    tmp = generations.begin(data)
    entry = write_keyword(tmp, analysis, live=live, texts_for=cat.chunk_texts_for,
                          text_blocks=lambda: cat.chunk_text_blocks(SEGMENT_DOCS),
                          base_dir=base_dir, base=(base_m or {}).get("keyword"))
    name = generations.commit(data, tmp, {"keyword": entry}, (base_dir, base_m) if base_m else None)
    cat.close()
    return time.perf_counter() - t0, entry, name


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="1M")
    ap.add_argument("--changed-files", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/shoal-kwbench")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    from shoal.index import generations
    from shoal.index.keyword import KeywordIndex, analysis_for, build_keyword_index

    n = parse_count(a.chunks)
    data = Path(a.dir)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    vocab, p, queries = vocabulary()
    analysis = analysis_for("english")
    t_cat = make_catalog(data / "catalog.sqlite", n, vocab, p)
    print(f"# catalog: {n:,} chunk rows in {t_cat:.0f} s", file=sys.stderr)
    t_full, e_full, g_full = build(data, analysis, base=False)
    rss_full = rss_gb()
    disk = sum(f.stat().st_size for f in (generations.generations_dir(data) / g_full).rglob("*") if f.is_file())
    print(f"# full build {t_full:.1f} s, {len(e_full['segments'])} segments", file=sys.stderr)
    deltas = []
    for step in range(a.repeat):
        change_files(data / "catalog.sqlite", a.changed_files, step, vocab, p)
        t, e, g = build(data, analysis, base=True)
        deltas.append((t, e, g))
        print(f"# delta {step}: {t:.2f} s, analysed {e['analysed']}, {len(e['segments'])} segments", file=sys.stderr)
    gen_dir = generations.generations_dir(data) / deltas[-1][2]
    inc = KeywordIndex(gen_dir, analysis)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        inc.search([q], 10)
        times.append(time.perf_counter() - t0)
    D, I = inc.search(queries, 10)
    # the same live chunks, every one analysed again: what the delta must equal
    from shoal.workers.catalog import Catalog

    cat = Catalog(data / "catalog.sqlite")
    t0 = time.perf_counter()
    ref_dir = data / "reference"
    ids, tx = np.empty(0, np.int64), []
    blocks = list(cat.chunk_text_blocks(250_000))
    ids = np.concatenate([b[0] for b in blocks])
    tx = [t for b in blocks for t in b[1]]
    build_keyword_index(tx, ids, ref_dir, analysis)
    t_ref = time.perf_counter() - t0
    del blocks, tx
    Dr, Ir = KeywordIndex(ref_dir, analysis).search(queries, 10)
    same_scores = float(np.abs(D - Dr).max())
    same_top = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(I, Ir)]))
    dt = [d[0] for d in deltas]
    print(f"\n### Keyword index at {n:,} chunks ({a.changed_files} changed files per delta), "
          f"{len(vocab):,} Cranfield words + 500,000-term tail\n")
    print("| step | seconds | chunks analysed | segments | notes |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| full build | {t_full:.1f} | {e_full['analysed']:,} | {len(e_full['segments'])} | "
          f"{disk / 1e9:.2f} GB on disk, peak RSS {rss_full:.2f} GB |")
    print(f"| delta build, {a.changed_files} files changed (median of {len(dt)}) | {statistics.median(dt):.2f} "
          f"(max {max(dt):.2f}) | {deltas[-1][1]['analysed']} | {len(deltas[-1][1]['segments'])} | "
          f"generation published (checksums, CURRENT) |")
    print(f"| full rebuild of the same live chunks (reference) | {t_ref:.1f} | {len(ids):,} | - | "
          f"top-10 overlap with the delta {same_top:.4f}, max score difference {same_scores:.1e} |")
    print(f"\nQuery latency, one query at a time over {n:,} chunks: median "
          f"{statistics.median(times) * 1e3:.1f} ms, p90 {np.percentile(times, 90) * 1e3:.1f} ms. "
          f"Peak RSS of the whole run {rss_gb():.2f} GB.")
    if not a.keep:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
