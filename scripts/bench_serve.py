#!/usr/bin/env python3
"""Serving benchmark against `shoal serve` on loopback, with the in-process search as baseline.

    python scripts/bench_serve.py --data-dir DIR [--queries queries.jsonl] [--seconds 10]

DIR must hold an ingested index (e.g. `shoal ingest` of the Cranfield documents).
The script starts `shoal serve` itself on 127.0.0.1 twice, with dynamic batching
(serve.max_batch_size 32) and without (1), and for each measures p50/p99 latency
and requests/s at concurrency 1, 8 and 32: single queries (GET /search) and
batches of 32 (POST /search/batch). Every load phase is bounded in time and only
talks to 127.0.0.1. The same queries run in-process (Searcher: no HTTP, no Serve)
in the same run, so the serving overhead is a ratio. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_QUERIES = ROOT.parent / "shared" / "data" / "cranfield" / "queries.jsonl"


def load_queries(path: Path, limit: int = 200) -> list[str]:
    if path.is_file():
        qs = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    else:
        qs = ["explain neural networks", "how are files chunked", "wing in a slipstream", "heat transfer"]
    return qs[:limit]


def start_server(data_dir: str, port: int, batch: int, log_path: Path) -> subprocess.Popen:
    cfg = {"serve": {"port": port, "max_batch_size": batch, "batch_wait_timeout_s": 0.005 if batch > 1 else 0.0}}
    cfg_path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen([sys.executable, "-m", "shoal.cluster.cli", "serve", "--config", str(cfg_path),
                          "--data-dir", data_dir], cwd=ROOT, env=env, stdout=open(log_path, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"shoal serve exited ({p.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(1)
    p.terminate()
    raise SystemExit(f"shoal serve did not become healthy; see {log_path}")


def stop_server(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


async def load(url: str, queries: list[str], concurrency: int, seconds: float, batch: int) -> dict:
    """``concurrency`` clients send requests back to back for ``seconds``; returns latency stats."""
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(cid: int) -> None:
        nonlocal errors
        i = cid
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if batch == 1:
                    r = await c.get("/search", params={"q": queries[i % len(queries)], "k": 10})
                else:
                    qs = [queries[(i + j) % len(queries)] for j in range(batch)]
                    r = await c.post("/search/batch", json={"queries": qs, "k": 10})
                if r.status_code != 200:
                    errors += 1
                lat.append((time.perf_counter() - t0) * 1000)
                i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"n": len(lat), "errors": errors, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "rps": len(lat) / wall, "qps": len(lat) * batch / wall}


def in_process(data_dir: str, queries: list[str]) -> dict:
    from shoal.cluster.config import load_config
    from shoal.cluster.search import Searcher

    s = Searcher(load_config(None, data_dir=data_dir))
    s.search(queries[:5], k=10)  # warm up
    lat = []
    t_all = time.perf_counter()
    for q in queries:
        t0 = time.perf_counter()
        s.search([q], k=10)
        lat.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - t_all
    t0 = time.perf_counter()
    for i in range(0, len(queries), 32):
        s.search(queries[i:i + 32], k=10)
    bwall = time.perf_counter() - t0
    s.close()
    return {"p50": statistics.median(lat), "p99": float(np.percentile(lat, 99)), "qps": len(lat) / wall,
            "batch_qps": len(queries) / bwall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--queries", default=str(DEFAULT_QUERIES))
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    queries = load_queries(Path(a.queries))
    base = in_process(a.data_dir, queries)
    print(f"# in-process: p50 {base['p50']:.2f} ms, {base['qps']:.1f} q/s single, {base['batch_qps']:.1f} q/s "
          "in batches of 32", file=sys.stderr)
    rows = []
    stages: dict = {}
    for batching in (32, 1):
        log_path = Path(tempfile.mkstemp(suffix=".log")[1])
        p = start_server(a.data_dir, a.port, batching, log_path)
        try:
            url = f"http://127.0.0.1:{a.port}"
            asyncio.run(load(url, queries, 4, 2.0, 1))  # warm up
            for batch in (1, 32):
                for conc in (1, 8, 32):
                    r = asyncio.run(load(url, queries, conc, a.seconds, batch))
                    r.update(batching=batching, batch=batch, concurrency=conc)
                    rows.append(r)
                    print(f"# batching {batching} batch {batch} conc {conc}: p50 {r['p50']:.1f} ms "
                          f"p99 {r['p99']:.1f} ms {r['rps']:.1f} req/s errors {r['errors']}", file=sys.stderr)
                    if batching == 32 and batch == 1 and conc == 1:  # hop by hop, without queueing
                        stages = httpx.get(url + "/stats", timeout=30).json().get("stages_ms", {})
        finally:
            stop_server(p)
    print(f"\n### Serving benchmark: {len(queries)} queries, loopback, {a.seconds:.0f} s per phase\n")
    print("| server batching (max_batch_size) | request | concurrency | requests | errors | p50 ms | p99 ms | "
          "requests/s | queries/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        kind = "GET /search" if r["batch"] == 1 else "POST /search/batch (32)"
        print(f"| {r['batching']} | {kind} | {r['concurrency']} | {r['n']} | {r['errors']} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['rps']:.1f} | {r['qps']:.1f} |")
    print(f"| in-process (no HTTP, no Serve) | Searcher.search, 1 query | 1 | {len(queries)} | 0 | "
          f"{base['p50']:.1f} | {base['p99']:.1f} | {base['qps']:.1f} | {base['qps']:.1f} |")
    print(f"| in-process | Searcher.search, 32 queries | 1 | {len(queries) // 32} | 0 | - | - | "
          f"{base['batch_qps'] / 32:.1f} | {base['batch_qps']:.1f} |")
    one = next(r for r in rows if r["batching"] == 32 and r["batch"] == 1 and r["concurrency"] == 1)
    on32 = next(r for r in rows if r["batching"] == 32 and r["batch"] == 1 and r["concurrency"] == 32)
    off32 = next(r for r in rows if r["batching"] == 1 and r["batch"] == 1 and r["concurrency"] == 32)
    ratios = [("HTTP requests/s at c=32 / in-process batched queries/s", ">= 0.7", on32["rps"] / base["batch_qps"]),
              ("HTTP p50 at c=1 / in-process p50", "<= 1.5", one["p50"] / base["p50"]),
              ("with dynamic batching / without, requests/s at c=32", ">= 2", on32["rps"] / off32["rps"])]
    print("\n| ratio | goal | measured |\n| --- | --- | ---: |")
    for name, goal, v in ratios:
        print(f"| {name} | {goal} | {v:.2f} |")
    print("\nWhere a GET /search spends its time in the Ingress at concurrency 1 (p50 / p99 ms per stage, from "
          "/stats after that phase; encode and dense include the hop to their deployment):\n\n"
          "| stage | p50 ms | p99 ms | n |\n| --- | ---: | ---: | ---: |")
    for stage, v in stages.items():
        print(f"| {stage} | {v['p50']:.2f} | {v['p99']:.2f} | {v['n']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "in_process": base, "stages_ms": stages}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
