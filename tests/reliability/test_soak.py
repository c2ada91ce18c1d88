"""Bounded soak on loopback: concurrent clients while an incremental ingest switches the generation.

Slow (minutes): run by hand with `scripts/test.sh tests/reliability/test_soak.py --run-slow -s`.
Knobs: SHOAL_SOAK_CLIENTS (32), SHOAL_SOAK_SECONDS (60).
"""

import asyncio
import os
import time
from dataclasses import replace

import httpx
import numpy as np
import psutil
import pytest

from shoal.cluster.app import AppArgs, build_app, config_to_dict
from shoal.cluster.ingest import ingest

from conftest import ROOT, cranfield_docs, write_docs

PORT = 18633
URL = f"http://127.0.0.1:{PORT}"


def replica_rss(client) -> dict[str, int]:
    st = client.get("/stats").json()
    pids = {f"ShardSearcher{g['group']}": g["pid"] for g in st["shard_groups"] if "pid" in g}
    pids["QueryEncoder"] = st["encoder"]["pid"]
    return {k: psutil.Process(p).memory_info().rss for k, p in pids.items()}


@pytest.mark.slow
def test_soak_with_ingest_and_switch(tmp_path, ray_local):
    from ray import serve

    from shoal.cluster.config import load_config

    clients = int(os.environ.get("SHOAL_SOAK_CLIENTS", 32))
    seconds = float(os.environ.get("SHOAL_SOAK_SECONDS", 60))
    docs = cranfield_docs(400)
    tmp = tmp_path
    write_docs(docs[:300], tmp / "docs")
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    cfg = replace(cfg, serve=replace(cfg.serve, port=PORT, reload_interval_s=1.0, num_cpus_encoder=0.3,
                                     num_cpus_searcher=0.1, num_cpus_ingress=0.1, num_cpus_reranker=0.1))
    ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    client = httpx.Client(base_url=URL, timeout=60)
    while client.get("/healthz").status_code != 200:
        time.sleep(0.5)
    queries = [d["text"].split(" . ")[0] for d in docs]
    for q in queries[:20]:
        client.get("/search", params={"q": q})
    rss_before = replica_rss(client)
    lat, codes = [], []

    async def worker(i):
        async with httpx.AsyncClient(base_url=URL, timeout=60) as c:
            end = time.perf_counter() + seconds
            j = i
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await c.get("/search", params={"q": queries[j % len(queries)], "k": 10})
                lat.append((time.perf_counter() - t0) * 1000)
                codes.append(r.status_code)
                j += clients

    async def main():
        load = asyncio.gather(*(worker(i) for i in range(clients)))
        await asyncio.sleep(seconds / 4)
        write_docs(docs[300:], tmp / "docs")
        rep = await asyncio.to_thread(ingest, [str(tmp / "docs")], cfg, out=lambda s: None)
        await load
        return rep

    rep = asyncio.run(main())
    rss_after = replica_rss(client)
    st = client.get("/stats").json()
    serve.delete("shoal")
    serve.shutdown()
    failed = sum(1 for c in codes if c != 200)
    print(f"\nsoak: {clients} clients x {seconds:.0f}s: {len(codes)} requests, {failed} failed, "
          f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, "
          f"{len(codes) / seconds:.1f} req/s; generation {st['generation']} (ingest built {rep.generation})")
    for k in rss_before:
        print(f"  {k}: RSS {rss_before[k] / 1e6:.0f} MB -> {rss_after[k] / 1e6:.0f} MB")
    assert failed == 0
    assert st["generation"] == rep.generation != "000001"
    for k in rss_before:  # a new generation is loaded beside the old one for a moment, then the old is freed
        assert rss_after[k] < rss_before[k] * 1.5 + 200e6, (k, rss_before[k], rss_after[k])
