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
- outage: host b (one shard group) SIGKILLed under load from 4 clients (2 strict, 2 allow_partial)
  for --down-s, then back: answers/s and p50/p99 latency healthy, during the loss after the first
  request that found the group gone, and until the first full answer after the host returned.
  ``--only outage`` runs this alone.

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
                     "reload_interval_s": 1}}  # shard_timeout_s: the default
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
              .bind(cfg["data_dir"]), name="ship", route_prefix=None)
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


class Clients:
    """``n`` clients querying host a's proxy from its network until stopped (50 ms between requests), half
    of them with allow_partial: (start, seconds, status, partial) per request."""

    def __init__(self, net: TwoHosts, n: int = 4) -> None:
        self.log: list[tuple[float, float, int, bool]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=lambda i=i: in_netns(net.a.ns, lambda: self._run(i)), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        import httpx

        qs = ["wing in a propeller slipstream", "heat transfer in laminar boundary layers",
              "buckling of thin cylindrical shells", "helicopter rotor blade"]
        with httpx.Client(timeout=60) as c:
            j = i
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    r = c.get("http://198.18.0.1:8000/search", params={"q": qs[j % 4], "k": 10,
                                                                      "allow_partial": str(i % 2 == 1).lower()})
                    status, partial = r.status_code, bool(r.json().get("partial")) if r.status_code == 200 else False
                except Exception:  # noqa: BLE001 - counted: a connection error or a hang is a failure
                    status, partial = -1, False
                self.log.append((t0, time.time() - t0, status, partial))
                j += 1
                time.sleep(0.05)  # as the suite's clients: back to back they starve the GCS on 2 shared cores

    def finish(self) -> list[tuple[float, float, int, bool]]:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return sorted(self.log)


def phase(log: list[tuple[float, float, int, bool]], t0: float, t1: float) -> dict:
    """Answers of the requests started in [t0, t1): per second, p50/p99 seconds, status counts."""
    got = [x for x in log if t0 <= x[0] < t1]
    d = sorted(x[1] for x in got)
    codes: dict[str, int] = {}
    for _, _, s, p in got:
        key = f"{s}{' partial' if p else ''}"
        codes[key] = codes.get(key, 0) + 1
    pct = (lambda q: d[min(len(d) - 1, int(q * len(d)))]) if d else (lambda q: float("nan"))
    return {"n": len(got), "per_s": len(got) / max(1e-9, t1 - t0), "p50": pct(0.5), "p99": pct(0.99),
            "max": d[-1] if d else float("nan"), "codes": codes}


def outage(net: TwoHosts, tmp: Path, corpus: Path, down_s: float, healthy_s: float = 15) -> dict:
    """One shard group per host, host b SIGKILLed under load for ``down_s``, then back."""
    cfg = write_cfg(tmp / "outage.json", tmp / "d3", tmp / "cache-o", 1)
    ingest(net, corpus, cfg)
    serve_up(net, cfg)
    clients = Clients(net)
    time.sleep(healthy_s)
    t_kill = time.time()
    net.b.kill()
    time.sleep(down_s)
    t_back = time.time()
    net.b.start(False, 2, 1)
    net.wait_nodes(2, 120)
    t_joined = time.time()
    t_replica = wait_replica_on_b(net, t_back)
    wait_healthy(net, 240)
    t_healthy = time.time()
    time.sleep(5)
    log = clients.finish()
    t_end = log[-1][0] if log else time.time()
    gone = [x for x in log if x[0] >= t_kill and (x[2] == 503 or x[3])]  # answered without group 1
    t_found = min((x[0] + x[1] for x in gone), default=t_kill)  # the first such answer, as it came back
    first_full = min((x[0] + x[1] for x in log if x[0] >= t_back and x[2] == 200 and not x[3]), default=float("nan"))
    return {"healthy": phase(log, t_kill - healthy_s + 2, t_kill), "finding": phase(log, t_kill, t_found),
            "down": phase(log, t_found, t_back), "back": phase(log, t_back, t_end),
            "found_after_s": t_found - t_kill, "full_after_back_s": first_full - t_back,
            "joined_after_back_s": t_joined - t_back, "replica_after_back_s": t_replica - t_back,
            "healthy_after_back_s": t_healthy - t_back,
            "errors": sum(1 for x in log if x[2] in (-1, 500))}


def wait_replica_on_b(net: TwoHosts, since: float, within: float = 240) -> float:
    """When a ShardSearcher replica on host b reported to the data node after ``since`` (its generation
    loaded), by /stats's replica reports."""
    import httpx

    def poll() -> float:
        deadline = time.time() + within
        while time.time() < deadline:
            try:
                reps = httpx.get("http://198.18.0.1:8000/stats", timeout=15).json().get("replicas", [])
                if any(r.get("node_ip") == "198.18.0.2" and r.get("generation") and
                       time.time() - r.get("seen_s_ago", 1e9) > since for r in reps):
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return float("nan")

    return in_netns(net.a.ns, poll)


def print_outage(o: dict, down_s: float) -> None:
    print(f"\n### Node loss: host b (shard group 1) SIGKILLed for {down_s:.0f} s under 4 clients "
          f"(2 strict, 2 allow_partial), serve.shard_timeout_s default\n")
    print("| phase | answers | answers/s | p50 s | p99 s | max s | status |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    names = {"healthy": "healthy (before the kill)", "finding": "kill -> first answer without group 1",
             "down": "group 1 marked down, host away", "back": "host back (until healthy + 5 s)"}
    for k, name in names.items():
        p = o[k]
        codes = ", ".join(f"{c} x{n}" for c, n in sorted(p["codes"].items()))
        print(f"| {name} | {p['n']} | {p['per_s']:.1f} | {p['p50']:.3f} | {p['p99']:.3f} | {p['max']:.3f} | {codes} |")
    h, d = o["healthy"], o["down"]
    print(f"\nHost b back: its raylet in the cluster after {o['joined_after_back_s']:.1f} s, its ShardSearcher "
          f"replica reporting after {o['replica_after_back_s']:.1f} s, /healthz 200 after {o['healthy_after_back_s']:.1f} s.")
    print(f"First answer without group 1: {o['found_after_s']:.1f} s after the kill; first full answer "
          f"{o['full_after_back_s']:.1f} s after the host came back (goal <= 10); 500s or connection errors: "
          f"{o['errors']}; while down: p99 {d['p99']:.3f} s (goal <= 0.5), answers/s {d['per_s'] / h['per_s']:.2f}x "
          "the healthy rate (goal >= 0.5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ship-mb", type=int, default=1024)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--down-s", type=float, default=20, help="how long host b stays away in the outage phase")
    ap.add_argument("--only", choices=("all", "outage"), default="all")
    args = ap.parse_args()
    why = can_make_hosts()
    if why:
        raise SystemExit(f"bench_cluster: {why}")
    from conftest import cranfield_docs, write_docs

    tmp = Path(tempfile.mkdtemp(prefix="shoalbc-", dir="/tmp"))
    corpus = tmp / "corpus"
    write_docs(cranfield_docs(args.docs), corpus)
    if args.only == "outage":
        net = TwoHosts(tmp, hidden_on_b=[tmp / "d3"], prefix="shoalbc")
        try:
            net.start(cpus=(2, 2), gpus=(1, 1))
            o = outage(net, tmp, corpus, args.down_s)
        finally:
            net.stop()
            if not os.environ.get("SHOAL_BENCH_KEEP"):
                shutil.rmtree(tmp, ignore_errors=True)
        print_outage(o, args.down_s)
        return
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
    net = TwoHosts(tmp, hidden_on_b=[tmp / "d1", tmp / "d2", tmp / "d3"], prefix="shoalbc")
    try:
        net.start(cpus=(2, 2), gpus=(1, 1))
        ship_r = ship(net, tmp, args.ship_mb, args.chunk_mb << 20)
        ing2 = ingest(net, corpus, write_cfg(tmp / "two.json", tmp / "d2", tmp / "cache", 2))
        serve_up(net, tmp / "two.json")
        srv2 = load(net, args.seconds)
        o = outage_on(net, tmp, corpus, args.down_s)
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
    print_outage(o, args.down_s)


def outage_on(net: TwoHosts, tmp: Path, corpus: Path, down_s: float) -> dict:
    """The outage phase on a cluster that already serves another app: that app goes first."""
    r = net.a.run([PY, "-c", f"import ray; from ray import serve; ray.init(address='{net.address}', "
                   "logging_level='ERROR'); serve.shutdown()"], timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"serve shutdown failed: {r.stderr[-1000:]}")
    return outage(net, tmp, corpus, down_s)


if __name__ == "__main__":
    main()
