#!/usr/bin/env python
"""shoal on two test hosts (network namespaces on this machine, tests/multinode/hosts.py): what
crossing a node costs. Needs root (ip netns, unshare).

    sudo .venv/bin/python scripts/bench_cluster.py [--ship-mb 1024] [--docs 400] [--seconds 20]

Rows:
- ship: seconds and MB/s to copy one generation file of --ship-mb MB from the data node (host a) to
  host b's cache through the DataNode deployment (bounded chunks through the object store) and
  verify its sha256 there: the path a ShardSearcher on another node takes.
- serve: p50/p90 ms and requests/s at concurrency 8 (dense /search), both shard groups on one host
  vs one group per host.
- ingest: chunks/s end to end for --docs Cranfield documents, one host vs two (one embedding actor
  per host).

Both "hosts" share this machine's cores, so two hosts add no compute here: the figures show what the
network hop and the transfer cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "multinode"))
sys.path.insert(0, str(ROOT / "tests"))

from hosts import TwoHosts, can_make_hosts, in_netns  # noqa: E402

PY = sys.executable


def write_cfg(path: Path, data: Path, cache: Path, embed_actors: int = 1) -> Path:
    cfg = {"data_dir": str(data), "model": {"batch_size": 32}, "chunk": {"tokens": 128, "overlap_tokens": 16},
           "embed": {"batch_chunks": 64, "cpus_per_actor": 0.5, "cpu_actors": embed_actors},
           "index": {"flat_threshold": 100000,
                     "gpus": [{"name": "rtx4080", "memory": "16G"}, {"name": "p4000", "memory": "8G"}]},
           "serve": {"host": "0.0.0.0", "port": 8000, "encoder_device": "cpu", "cache_dir": str(cache),
                     "shard_timeout_s": 10}}
    path.write_text(json.dumps(cfg))
    return path


SHIP = r"""
import json, sys, time, ray
from ray import serve
from shoal.workers.datanode import DataNode, node_of_this_process
from shoal.workers.serving import datanode_reader
from shoal.index.sync import GenerationCache
ray.init(logging_level="ERROR")
me = node_of_this_process()
serve.start(http_options={"host": "127.0.0.1", "port": 8011})
cfg = json.load(open(sys.argv[1]))
h = serve.run(DataNode.options(ray_actor_options={"num_cpus": 0.1, "resources": {f"node:{me['ip']}": 0.001}})
              .bind(cfg), name="ship", route_prefix=None)
gen, cache_dir, chunk = sys.argv[2], sys.argv[3], int(sys.argv[4])
raw = h.current.remote().result()["manifest"]

@ray.remote(num_cpus=0.1, resources={"node:198.18.0.2": 0.001})
def fetch(raw, gen, cache_dir, chunk):
    import json, os, time
    from ray import serve
    from shoal.index.sync import GenerationCache
    from shoal.workers.serving import datanode_reader
    m = json.loads(raw)
    h = serve.get_deployment_handle("DataNode", app_name="ship")
    cache = GenerationCache(cache_dir, "bench")
    t0 = time.perf_counter()
    got = cache.fetch(gen, raw, ["shard_00.index"], datanode_reader(h, gen, m, chunk), chunk_bytes=chunk)
    return time.perf_counter() - t0, got.bytes, ray.util.get_node_ip_address()

secs, nbytes, where = ray.get(fetch.remote(raw, gen, cache_dir, chunk))
print(json.dumps({"seconds": secs, "bytes": nbytes, "node": where}))
serve.shutdown()  # Serve keeps its first HTTP options: leave none behind for `shoal serve`
"""


def ship(net: TwoHosts, tmp: Path, mb: int, chunk: int) -> dict:
    """A generation folder holding one --ship-mb MB file, shipped to host b and verified there."""
    data = tmp / "ship-data"
    gen = data / "generations" / "000001"
    gen.mkdir(parents=True)
    h = hashlib.sha256()
    with open(gen / "shard_00.index", "wb") as f:
        for _ in range(mb):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    manifest = {"format": 1, "generation": "000001", "files": {
        "shard_00.index": {"sha256": h.hexdigest(), "bytes": mb << 20}}, "shards": [{"file": "shard_00.index"}]}
    (gen / "manifest.json").write_text(json.dumps(manifest))
    (data / "CURRENT").write_text("000001\n")
    cfgp = write_cfg(tmp / "ship.json", data, tmp / "cache-b")
    script = tmp / "ship.py"
    script.write_text(SHIP)
    from shoal.cluster.app import config_to_dict
    from shoal.cluster.config import load_config

    (tmp / "ship-cfg.json").write_text(json.dumps(config_to_dict(load_config(cfgp))))
    r = net.a.run([PY, str(script), str(tmp / "ship-cfg.json"), "000001", str(tmp / "ship-cache"), str(chunk)],
                  timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"ship failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith('{"seconds"')))
    shutil.rmtree(data)
    shutil.rmtree(tmp / "ship-cache", ignore_errors=True)
    return out


def load(net: TwoHosts, seconds: float, conc: int = 8) -> dict:
    import httpx

    qs = ["wing in a propeller slipstream", "heat transfer in laminar boundary layers",
          "buckling of thin cylindrical shells", "helicopter rotor blade", "supersonic flow past a cone"]
    lat: list[float] = []
    errors = [0]
    stop = time.time() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            j = i
            while time.time() < stop:
                t0 = time.perf_counter()
                r = c.get("http://198.18.0.1:8000/search", params={"q": qs[j % len(qs)], "k": 10, "mode": "dense"})
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors[0] += 1
                j += 1

    def run() -> None:
        for q in qs:  # warm up
            httpx.get("http://198.18.0.1:8000/search", params={"q": q, "k": 10}, timeout=60)
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        lat.append(-(time.time() - t0))  # marker: elapsed

    in_netns(net.a.ns, run)
    elapsed = -lat.pop()
    s = sorted(lat)
    return {"p50": statistics.median(s), "p90": s[int(0.9 * (len(s) - 1))], "rps": len(s) / elapsed,
            "n": len(s), "errors": errors[0]}


def wait_healthy(net: TwoHosts, within: float = 240) -> None:
    from conftest import wait_healthy as healthy  # the suite's poller, run from host a's network

    if not in_netns(net.a.ns, lambda: healthy("http://198.18.0.1:8000", within)):
        raise SystemExit("the app did not become healthy")


def ingest(net: TwoHosts, corpus: Path, cfg: Path) -> dict:
    r = net.a.shoal("ingest", str(corpus), "--config", str(cfg), "--address", net.address, "--json", timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"ingest failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    return {"chunks": rep["chunks_added"], "seconds": rep["seconds"], "chunks_per_s": rep["chunks_per_s"],
            "nodes": sorted({a.get("node_ip") for a in rep["actors"]})}


def serve_up(net: TwoHosts, cfg: Path) -> None:
    r = net.a.shoal("serve", "--config", str(cfg), "--address", net.address, "--detach", timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"serve failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    wait_healthy(net)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ship-mb", type=int, default=1024)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    why = can_make_hosts()
    if why:
        raise SystemExit(f"bench_cluster: {why}")
    from conftest import cranfield_docs, write_docs

    tmp = Path(tempfile.mkdtemp(prefix="shoalbc-", dir="/tmp"))
    corpus = tmp / "corpus"
    write_docs(cranfield_docs(args.docs), corpus)
    rows = []
    # one host: both logical GPUs (shard groups) and the embedding actor on host a
    net = TwoHosts(tmp, hidden_on_b=[tmp / "d1", tmp / "d2"], prefix="shoalbc")
    try:
        net.a.start(True, 2, 2)
        net.wait_nodes(1, 90)
        ing1 = ingest(net, corpus, write_cfg(tmp / "one.json", tmp / "d1", tmp / "cache", 1))
        serve_up(net, tmp / "one.json")
        srv1 = load(net, args.seconds)
        print("one host:", ing1, srv1, flush=True)
    finally:
        net.stop()
    net = TwoHosts(tmp, hidden_on_b=[tmp / "d1", tmp / "d2"], prefix="shoalbc")
    try:
        net.start(cpus=(2, 2), gpus=(1, 1))
        ship_r = ship(net, tmp, args.ship_mb, args.chunk_mb << 20)
        ing2 = ingest(net, corpus, write_cfg(tmp / "two.json", tmp / "d2", tmp / "cache", 2))
        serve_up(net, tmp / "two.json")
        srv2 = load(net, args.seconds)
    finally:
        net.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    mb = ship_r["bytes"] / 1e6
    rows.append(("ship + verify a generation to host b", f"{mb:,.0f} MB in {ship_r['seconds']:.1f} s",
                 f"{mb / ship_r['seconds']:,.0f} MB/s", f"chunks of {args.chunk_mb} MiB, 4 in flight"))
    rows.append(("serve c=8, one host", f"p50 {srv1['p50']:.1f} ms, p90 {srv1['p90']:.1f} ms",
                 f"{srv1['rps']:.1f} req/s", f"{srv1['n']} ok, {srv1['errors']} errors"))
    rows.append(("serve c=8, two hosts", f"p50 {srv2['p50']:.1f} ms, p90 {srv2['p90']:.1f} ms",
                 f"{srv2['rps']:.1f} req/s", f"{srv2['n']} ok, {srv2['errors']} errors; ratio "
                 f"{srv2['rps'] / srv1['rps']:.2f}"))
    rows.append(("ingest, one host", f"{ing1['chunks']} chunks in {ing1['seconds']:.1f} s",
                 f"{ing1['chunks_per_s']:.1f} chunks/s", f"actors on {ing1['nodes']}"))
    rows.append(("ingest, two hosts", f"{ing2['chunks']} chunks in {ing2['seconds']:.1f} s",
                 f"{ing2['chunks_per_s']:.1f} chunks/s", f"actors on {ing2['nodes']}; ratio "
                 f"{ing2['chunks_per_s'] / ing1['chunks_per_s']:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"{'what':<{w[0]}} | {'measured':<{w[1]}} | {'rate':<{w[2]}} | note")
    print("-" * (sum(w) + 12))
    for r in rows:
        print(f"{r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:<{w[2]}} | {r[3]}")


if __name__ == "__main__":
    main()
