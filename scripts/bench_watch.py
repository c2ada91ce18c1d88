#!/usr/bin/env python3
"""Freshness of `shoal ingest --watch`: from a file's write to the first /search that returns it.

    python scripts/bench_watch.py [--beir ../shared/data/cranfield] [--edits 50] [--spread-s 60]
                                  [--big 1000000] [--copy 10000] [--idle-s 60] [--json OUT]

One Ray head on 127.0.0.1 (scripts/start_cluster.sh); `shoal ingest DOCS --watch` and `shoal serve` join
it, as a user runs them. The documents are the collection's, one file each. Then:

- freshness: --edits edits spread over --spread-s seconds (half new files, half appends to existing
  documents), each with a word found nowhere else; after each write (closed) the script asks
  GET /search (keyword mode, k=1) every 20 ms until the edited file is the hit: p50 / p95 / max.
- idle: the watcher's CPU while nothing changes (its own process, its embedding actor, and the rest of
  Ray shown apart), over --idle-s seconds.
- a copy: --copy small files copied into a root at once: how many updates, seconds until the last is
  searchable.
- with --big N: the same edits again with N synthetic chunks in the catalog and the index (vectors of
  the right dimension, texts of one word, under a root that is not watched).

Defaults (ingest.watch_debounce_s 1.0). Only 127.0.0.1 is spoken to; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
ENV["PATH"] = f"{Path(sys.executable).parent}:{ENV.get('PATH', '')}"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoal(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal.cluster.cli", *args], cwd=ROOT, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, pred, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what}: not within {timeout_s:.0f} s")


def cpu_seconds(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK  # utime + stime, every thread


def ray_pids(temp_dir: str) -> dict[int, str]:
    """Processes of this Ray (its temp dir on their command line, or Ray's worker names)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd or cmd.startswith("ray::"):
            out[int(d)] = cmd[:80]
    return out


class Head:
    def __init__(self, work: Path) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="shoalray-", dir="/tmp")
        self.port, dash = free_port(), free_port()
        e = dict(ENV, SHOAL_RAY_PORT=str(self.port), SHOAL_DASHBOARD_PORT=str(dash),
                 SHOAL_METRICS_PORT=str(free_port()), SHOAL_RAY_TEMP=self.temp_dir)
        r = subprocess.run([str(ROOT / "scripts" / "start_cluster.sh"), "--num-cpus=2"], env=e, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise SystemExit("ray head did not start: " + r.stderr[-2000:])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def found(client: httpx.Client, word: str, path: str) -> Optional[str]:
    r = client.get("/search", params={"q": word, "k": 1, "mode": "keyword"})
    if r.status_code != 200:
        return None
    hits = r.json()["hits"]
    return r.json().get("generation") if hits and hits[0]["path"] == path else None


def edits(client: httpx.Client, docs: Path, n: int, spread_s: float, tag: str) -> list[float]:
    """n edits at even times over spread_s: even ones new files, odd ones appends to existing documents."""
    existing = sorted(docs.glob("*.txt"))[:n]
    lat: list[float] = []
    t_start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, t_start + i * spread_s / n - time.monotonic()))
        word = f"zq{tag}{i}xv"
        path = docs / f"edit_{tag}_{i}.txt" if i % 2 == 0 else existing[i]
        with open(path, "a") as f:
            f.write(f"\nnote {i}: the {word} measurement of wing flutter.\n")
        t0 = time.monotonic()
        deadline = t0 + 120
        while time.monotonic() < deadline and found(client, word, str(path)) is None:
            time.sleep(0.02)
        lat.append(time.monotonic() - t0)
        print(f"# edit {i}: {lat[-1]:.2f} s", file=sys.stderr)
    return lat


def idle_cpu(watcher: int, temp_dir: str, seconds: float) -> dict[str, float]:
    """% of one core over ``seconds`` with nothing changing: the watcher, its actor, the rest of Ray."""
    pids = ray_pids(temp_dir)
    actors = [p for p, c in pids.items() if c.startswith("ray::EmbedActor")]
    others = [p for p in pids if p not in actors and p != watcher]

    def total(ps: list[int]) -> float:
        s = 0.0
        for p in ps:
            try:
                s += cpu_seconds(p)
            except OSError:
                pass
        return s

    a0, w0, o0 = total(actors), cpu_seconds(watcher), total(others)
    time.sleep(seconds)
    return {"watcher": 100 * (cpu_seconds(watcher) - w0) / seconds, "actor": 100 * (total(actors) - a0) / seconds,
            "ray": 100 * (total(others) - o0) / seconds}


def add_synthetic(data: Path, n: int, d: int) -> float:
    """n synthetic chunks (files under /synthetic, not on disk and not watched) with clustered vectors,
    appended to a catalog that holds a real ingest (the real model's meta)."""
    from scripts.bench_index import clustered_block
    from shoal.index import staging

    t0 = time.perf_counter()
    db = sqlite3.connect(data / "catalog.sqlite")
    db.execute("PRAGMA synchronous=OFF")
    next_file = db.execute("SELECT max(id) FROM files").fetchone()[0] + 1
    next_chunk = max(db.execute("SELECT max(id) FROM chunks").fetchone()[0],
                     (db.execute("SELECT seq FROM sqlite_sequence WHERE name='chunks'").fetchone() or [0])[0]) + 1
    per_file, block = 100, 250_000
    with db:
        db.executemany("INSERT INTO files (id, path, root, size, mtime_ns, sha256, kind, status, n_chunks, "
                       "indexed_at) VALUES (?, ?, '/synthetic', 1, 0, ?, 'text', 'indexed', ?, 0)",
                       ((next_file + f, f"/synthetic/f{f:07d}.txt", f"syn{f}", min(per_file, n - f * per_file))
                        for f in range((n + per_file - 1) // per_file)))
    for i0 in range(0, n, block):
        m = min(block, n - i0)
        ids = np.arange(next_chunk + i0, next_chunk + i0 + m, dtype=np.int64)
        with db:
            db.executemany("INSERT INTO chunks (id, file_id, ordinal, char_start, char_end, text) "
                           "VALUES (?, ?, ?, 0, 5, ?)",
                           ((int(c), next_file + (i0 + j) // per_file, (i0 + j) % per_file, f"w{(i0 + j) % 5000}")
                            for j, c in enumerate(ids)))
        name = staging.write_part(data / "staging", ids, clustered_block(m, d, max(100, n // 1000), seed=i0),
                                  "float16")
        with db:
            db.execute("INSERT INTO parts (name, n, min_id, max_id, created_at) VALUES (?, ?, ?, ?, 0)",
                       (name, m, int(ids[0]), int(ids[-1])))
    db.close()
    return time.perf_counter() - t0


def updates_in(log: Path) -> int:
    return len(re.findall(r"^\[watch\] update \d+", log.read_text(), re.M))


def copy_in(client: httpx.Client, docs: Path, n: int, log: Path, work: Path) -> dict:
    src = work / "to_copy"
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"c{i:05d}.txt").write_text(f"copied note {i}: the zc{i}w probe reading at station {i % 97}\n")
    before = updates_in(log)
    t0 = time.monotonic()
    shutil.copytree(src, docs / "copied")
    last = docs / "copied" / f"c{n - 1:05d}.txt"
    first = docs / "copied" / "c00000.txt"
    wait_for("the copy", lambda: found(client, f"zc{n - 1}w", str(last)) and found(client, "zc0w", str(first)), 3600)
    return {"files": n, "seconds": time.monotonic() - t0, "updates": updates_in(log) - before}


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--beir", default=str(ROOT.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--spread-s", type=float, default=60.0)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--copy", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=0, help="synthetic chunks behind the edits in a second phase")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from scripts.bench_ingest import load_docs, write_text_corpus

    work = Path(a.work or tempfile.mkdtemp(prefix="shoal-bench-watch-"))
    docs, data = work / "docs", work / "data"
    shutil.rmtree(docs, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    n_docs = write_text_corpus(load_docs(Path(a.beir)), docs)
    port = free_port()
    cfg = work / "bench.yaml"
    cfg.write_text(f"serve: {{port: {port}}}\n")  # every other key at its default
    head = Head(work)
    out: dict = {"documents": n_docs}
    procs: list[subprocess.Popen] = []
    try:
        wlog, slog = work / "watch.log", work / "serve.log"
        watcher = shoal("ingest", str(docs), "--watch", "--config", str(cfg), "--data-dir", str(data), "--address",
                        head.address, log=wlog)
        procs.append(watcher)
        wait_for("the first pass", lambda: "[watch] first pass" in wlog.read_text(), 3600)
        server = shoal("serve", "--config", str(cfg), "--data-dir", str(data), "--address", head.address, log=slog)
        procs.append(server)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def healthy() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("shoal serve", healthy, 600)
        out["freshness"] = edits(client, docs, a.edits, a.spread_s, "a")
        time.sleep(10)
        out["idle_cpu_pct"] = idle_cpu(watcher.pid, head.temp_dir, a.idle_s)
        if a.copy:
            out["copy"] = copy_in(client, docs, a.copy, wlog, work)
        if a.big:  # the watcher is stopped for the synthetic rows (it holds the data dir), then restarted
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(120)
            out["big_insert_s"] = add_synthetic(data, a.big, 384)
            t0 = time.perf_counter()
            b = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "build", "--config", str(cfg),
                                "--data-dir", str(data)], cwd=ROOT, env=ENV, capture_output=True, text=True)
            if b.returncode != 0:
                raise SystemExit("build failed: " + b.stderr[-2000:])
            out["big_build_s"] = time.perf_counter() - t0
            watcher = shoal("ingest", str(docs), "--watch", "--config", str(cfg), "--data-dir", str(data),
                            "--address", head.address, log=work / "watch_big.log")
            procs.append(watcher)
            wait_for("the first pass", lambda: "[watch] first pass" in (work / "watch_big.log").read_text(), 3600)
            out["freshness_big"] = edits(client, docs, a.edits, a.spread_s, "b")
            out["chunks_big"] = client.get("/stats").json().get("catalog", {}).get("chunks")
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        head.stop()
    print_table(out, a)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def print_table(r: dict, a: argparse.Namespace) -> None:
    print(f"\n### `shoal ingest --watch`: {r['documents']} files (Cranfield), defaults (debounce 1 s), one Ray head "
          f"on 127.0.0.1, `shoal serve` following; {a.edits} edits over {a.spread_s:.0f} s\n")
    print("| catalog behind the edits | p50 s | p95 s | max s | goal |\n| --- | ---: | ---: | ---: | --- |")
    rows = [(f"Cranfield ({r['documents']} files)", r["freshness"])]
    if "freshness_big" in r:
        rows.append((f"+ {a.big:,} synthetic chunks ({r.get('chunks_big')} in all)", r["freshness_big"]))
    for name, v in rows:
        print(f"| {name} | {statistics.median(v):.2f} | {pct(v, 95):.2f} | {max(v):.2f} | p50 <= 5 s |")
    c = r["idle_cpu_pct"]
    print(f"\nIdle, {a.idle_s:.0f} s with nothing changing (% of one core): the watcher {c['watcher']:.2f} "
          f"(goal < 1), its embedding actor {c['actor']:.2f}, the rest of Ray {c['ray']:.2f}")
    if "copy" in r:
        cp = r["copy"]
        print(f"\n{cp['files']:,} files copied in at once: {cp['updates']} update(s), all searchable after "
              f"{cp['seconds']:.1f} s")
    if "big_build_s" in r:
        print(f"\nThe synthetic catalog: rows written in {r['big_insert_s']:.0f} s, its generation built in "
              f"{r['big_build_s']:.0f} s (before the second round of edits)")


if __name__ == "__main__":
    sys.exit(main())
