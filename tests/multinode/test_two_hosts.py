"""shoal on two real test hosts (tests/multinode/hosts.py): host a holds the data dir and the Ray head,
host b is a worker that cannot see the data dir (an empty tmpfs covers it there). Each host has one
logical GPU (no card: FAISS and torch fall back to the CPU), so the plan's two shard groups land one
per host, as on a two-GPU, two-machine cluster.

One cluster serves the whole module (it takes ~15 s to start). The order matters: ingest, a deploy
that must fail, serve, new generations, ingress placement, node loss, replicas per group, a host lost
mid-ingest.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from hosts import TwoHosts, can_make_hosts, in_netns

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import cranfield_docs, write_docs  # noqa: E402

pytestmark = pytest.mark.skipif(can_make_hosts() is not None, reason=f"two test hosts: {can_make_hosts()}")

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ["wing in a propeller slipstream", "heat transfer in laminar boundary layers",
           "buckling of thin cylindrical shells", "helicopter rotor blade"]
TIMEOUT_S = 5.0  # serve.shard_timeout_s here


def write_config(path: Path, data: Path, cache: Path, **serve: object) -> Path:
    sv = {"host": "0.0.0.0", "port": 8000, "shard_timeout_s": TIMEOUT_S, "encoder_device": "cpu",
          "reload_interval_s": 1, "cache_dir": str(cache), "transfer_chunk_bytes": 65536, **serve}
    cfg = {"data_dir": str(data), "model": {"batch_size": 32}, "chunk": {"tokens": 128, "overlap_tokens": 16},
           "embed": {"batch_chunks": 16, "cpus_per_actor": 0.5},
           "index": {"flat_threshold": 100000, "keep_generations": 3,
                     "gpus": [{"name": "rtx4080", "memory": "16G"}, {"name": "p4000", "memory": "8G"}]},
           "serve": sv}
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return path


@pytest.fixture(scope="module")
def cluster():
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="shoalmn-", dir="/tmp"))
    data = tmp / "data"
    data.mkdir()
    net = TwoHosts(tmp, hidden_on_b=[data])
    docs = cranfield_docs(60)
    corpus = tmp / "corpus"
    paths = write_docs(docs[:50], corpus)
    cfg_path = write_config(tmp / "mn.yaml", data, tmp / "cache-b")
    try:
        net.start(cpus=(2, 2), gpus=(1, 1))
        yield {"net": net, "tmp": tmp, "data": data, "corpus": corpus, "cfg": cfg_path, "docs": docs,
               "paths": paths}
    finally:
        net.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def http(net: TwoHosts, method: str, url: str, **kw: object) -> httpx.Response:
    """An HTTP request from host a's network (the only place the app's addresses exist)."""
    def go() -> httpx.Response:
        with httpx.Client(timeout=kw.pop("timeout", 30.0)) as c:  # type: ignore[arg-type]
            return c.request(method, url, **kw)
    return in_netns(net.a.ns, go)


A = "http://198.18.0.1:8000"
B = "http://198.18.0.2:8000"


def local_cfg(c: dict):
    from shoal.cluster.config import load_config

    return load_config(c["cfg"])


def catalog_ids(data: Path) -> dict[tuple[str, int], int]:
    import sqlite3

    db = sqlite3.connect(f"file:{data / 'catalog.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT f.path, c.ordinal, c.id FROM chunks c JOIN files f ON f.id = c.file_id").fetchall()
    db.close()
    return {(Path(p).name, o): i for p, o, i in rows}


def wait_health(net: TwoHosts, url: str = A, within_s: float = 180, want: int = 200) -> dict:
    deadline = time.time() + within_s
    last = None
    while time.time() < deadline:
        try:
            r = http(net, "GET", url + "/healthz", timeout=10)
            last = (r.status_code, r.text[:300])
            if r.status_code == want:
                return r.json()
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(1)
    raise AssertionError(f"{url}/healthz not {want} within {within_s} s: {last}\n{net.logs()}")


# -- ingest ----------------------------------------------------------------------------------------
def test_ingest_embeds_on_both_hosts_with_single_node_ids(cluster, tmp_path):
    net, c = cluster["net"], cluster
    r = net.a.shoal("ingest", str(c["corpus"]), "--config", str(c["cfg"]), "--address", net.address, "--json",
                    timeout=400, check=True)
    report = report_json(r.stdout)
    nodes = {a["node_ip"]: a["batches"] for a in report["actors"]}
    assert set(nodes) == {"198.18.0.1", "198.18.0.2"}, report["actors"]
    assert all(b > 0 for b in nodes.values()), f"both hosts embed: {nodes}"
    # the same corpus on one node (a local Ray on this machine's loopback) gives the same ids
    ref = tmp_path / "ref"
    cfg1 = write_config(tmp_path / "one.yaml", ref, tmp_path / "cache")
    p = subprocess_shoal("ingest", str(c["corpus"]), "--config", str(cfg1))
    assert p.returncode == 0, p.stdout[-3000:]
    assert catalog_ids(c["data"]) == catalog_ids(ref)
    c["ref_ids"] = catalog_ids(ref)


def report_json(out: str) -> dict:
    """The `--json` report: the first JSON object in the output (Ray may print after it)."""
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


def subprocess_shoal(*args: str):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "shoal.cluster.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)


# -- a deploy that cannot succeed ------------------------------------------------------------------
def test_deploy_failure_is_one_line_exit_2_and_leaves_nothing(cluster):
    net, c = cluster["net"], cluster  # before the app of the tests below: nothing else is deployed
    blocker = c["tmp"] / "not-a-dir"
    blocker.write_text("a file where the worker's cache should go")
    cfg = write_config(c["tmp"] / "bad.yaml", c["data"], blocker, deploy_timeout_s=120)
    r = net.a.shoal("serve", "--config", str(cfg), "--address", net.address, "--detach", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(err) == 1, r.stderr[-3000:]
    assert "ShardSearcher" in err[0] and "198.18.0.2" in err[0] and "cache_dir" in err[0], err[0]
    left = net.a.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); "
                      "print(list(serve.status().applications))"], timeout=120)
    assert "shoal" not in left.stdout.strip().splitlines()[-1], left.stdout


# -- serving ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(cluster):
    net, c = cluster["net"], cluster
    r = net.a.shoal("serve", "--config", str(c["cfg"]), "--address", net.address, "--detach", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wait_health(net)
    return c


def test_two_groups_one_per_host_worker_copies_its_files(served):
    net = served["net"]
    st = http(net, "GET", A + "/stats").json()
    reps = {r["group"]: r for r in st["replicas"]}
    assert set(reps) == {0, 1}, st["replicas"]
    assert {reps[0]["node_ip"], reps[1]["node_ip"]} == {"198.18.0.1", "198.18.0.2"}
    on_b = next(r for r in reps.values() if r["node_ip"] == "198.18.0.2")
    on_a = next(r for r in reps.values() if r["node_ip"] == "198.18.0.1")
    assert on_b["source"].startswith("copied to "), on_b
    assert on_a["source"] == "in place", on_a
    # exactly the group's files travelled: its shard (not the other group's), nothing else of the data dir
    cache = Path(on_b["source"].removeprefix("copied to ")) / on_b["generation"]
    got = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert got == sorted(["manifest.json", *on_b["shards"]]), got
    # `shoal status --address` shows every replica: node, GPU, shards
    r = net.a.shoal("status", "--config", str(served["cfg"]), "--address", net.address, timeout=120, check=True)
    assert "198.18.0.2" in r.stdout and on_b["shards"][0] in r.stdout, r.stdout


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_results_equal_in_process(served, lm, mode):
    """Each mode, with and without feedback (the second pass asks both groups again, with vectors the data
    node read from staging), answers as one node does."""
    from shoal.cluster.search import Searcher

    net = served["net"]
    s = Searcher(local_cfg(served), lm=lm)
    try:
        for q in QUERIES:
            for fb in ("none", "dense"):
                r = http(net, "GET", A + "/search", params={"q": q, "k": 5, "mode": mode, "feedback": fb})
                assert r.status_code == 200, r.text
                [local] = s.search([q], k=5, mode=mode, feedback=fb)
                body = r.json()
                assert [h["id"] for h in body["hits"]] == [h.id for h in local], (q, fb)
                assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in local], atol=1e-4)
                assert body.get("feedback") == ("dense" if fb == "dense" and mode != "keyword" else None)
    finally:
        s.close()


def test_proxy_on_the_worker_host_answers_too(served):
    """A request that enters at host b's proxy reaches the ingress on the data node."""
    net = served["net"]
    a = http(net, "GET", A + "/search", params={"q": QUERIES[0], "k": 5}).json()
    b = http(net, "GET", B + "/search", params={"q": QUERIES[0], "k": 5})
    assert b.status_code == 200, b.text
    assert [h["id"] for h in b.json()["hits"]] == [h["id"] for h in a["hits"]]


def test_new_generation_reaches_the_worker_and_a_corrupt_one_is_refused(served):
    net, c = served["net"], served
    before = wait_health(net)["generation"]
    write_docs(c["docs"][50:60], c["corpus"])
    net.a.shoal("ingest", str(c["corpus"]), "--config", str(c["cfg"]), "--address", net.address,
                timeout=400, check=True)
    from shoal.index import generations

    new = generations.current_name(c["data"])
    assert new != before
    deadline = time.time() + 60
    while time.time() < deadline:
        reps = http(net, "GET", A + "/stats").json()["replicas"]
        if all(r["generation"] == new and r["seen_s_ago"] < 15 for r in reps) and len(reps) == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not every replica serves {new}: {reps}")
    # the generation after it arrives damaged: group 1's shard differs from its manifest
    gdir = generations.generations_dir(c["data"])
    bad = generations.next_name(c["data"])
    shutil.copytree(gdir / new, gdir / bad)
    m = json.loads((gdir / bad / "manifest.json").read_text())
    m["generation"] = bad
    (gdir / bad / "manifest.json").write_text(json.dumps(m))
    shard1 = m["shards"][1]["file"]
    raw = bytearray((gdir / bad / shard1).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (gdir / bad / shard1).write_bytes(bytes(raw))
    generations.set_current(c["data"], bad)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            g1 = next(r for r in http(net, "GET", A + "/stats").json()["replicas"] if r["group"] == 1)
            if g1.get("load_error"):
                break
            time.sleep(1)
        assert shard1 in g1["load_error"] and g1["generation"] == new, g1
        r = http(net, "GET", A + "/search", params={"q": QUERIES[1], "k": 5})
        assert r.status_code == 200 and r.json()["hits"], r.text
    finally:
        generations.set_current(c["data"], new)
        shutil.rmtree(gdir / bad)
    wait_health(net)


# -- node loss -------------------------------------------------------------------------------------
class Load:
    """Queries from host a's network until stopped: (time, status, seconds, body) per request."""

    def __init__(self, net: TwoHosts, allow_partial: bool) -> None:
        self.net, self.allow_partial = net, allow_partial
        self.log: list[tuple[float, int, float, dict]] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=lambda: in_netns(net.a.ns, self._run), daemon=True)
        self.t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=3 * TIMEOUT_S + 10) as c:
            i = 0
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    r = c.get(A + "/search", params={"q": QUERIES[i % 4], "k": 5,
                                                     "allow_partial": str(self.allow_partial).lower()})
                    status, body = r.status_code, r.json()
                except httpx.HTTPError as e:
                    status, body = -1, {"error": repr(e)}
                self.log.append((t0, status, time.time() - t0, body))
                i += 1
                time.sleep(0.05)

    def finish(self) -> list[tuple[float, int, float, dict]]:
        self.stop.set()
        self.t.join(60)
        return self.log


def test_worker_host_lost_under_load_then_back(served):
    net = served["net"]
    on_b = [r["group"] for r in http(net, "GET", A + "/stats").json()["replicas"] if r["node_ip"] == "198.18.0.2"]
    assert len(on_b) == 1, on_b
    strict, partial = Load(net, False), Load(net, True)
    time.sleep(3)
    t_kill = time.time()
    net.b.kill()  # every process of host b, SIGKILLed at once
    time.sleep(TIMEOUT_S + 1.5)  # the first requests wait out the timeout, then the group is marked down
    t0 = time.time()
    health = http(net, "GET", A + "/healthz", timeout=30)
    health_s = time.time() - t0
    time.sleep(8 - (time.time() - t_kill) if time.time() - t_kill < 8 else 0)
    net.b.start(False, 2, 1)  # the machine comes back: a new raylet joins the same cluster
    net.wait_nodes(2, 90)
    back = wait_health(net, within_s=180)
    t_back = time.time()
    time.sleep(2)
    logs = {"strict": strict.finish(), "partial": partial.finish()}
    summary = {}
    for name, log in logs.items():
        after = [x for x in log if x[0] + x[2] >= t_kill]  # every request answered after the kill
        codes = sorted({s for _, s, _, _ in after})
        summary[name] = {"codes": codes, "n": len(after), "max_s": max(d for _, _, d, _ in after)}
        assert 500 not in codes and -1 not in codes, (name, [x for x in after if x[1] in (500, -1)][:3])
        assert set(codes) <= {200, 503}, codes
        assert summary[name]["max_s"] <= TIMEOUT_S + 3, summary[name]  # an answer within shard_timeout_s
        for _, s, _, body in after:
            if s == 503:
                assert body.get("missing_shards") == on_b, body
    lost = [b for _, s, _, b in logs["partial"] if s == 200 and b.get("partial")]
    assert lost and all(b["missing_shards"] == on_b for b in lost), "allow_partial answers flag the lost group"
    assert 503 in summary["strict"]["codes"], summary
    # known to be gone: once a request has found group b missing, the next ones skip it at once
    found = min(t + d for t, s, d, b in logs["strict"] + logs["partial"]
                if t >= t_kill and (s == 503 or b.get("partial")))
    t_return = t_kill + 8
    quick = [d for t, s, d, _ in logs["strict"] + logs["partial"] if found + 0.2 <= t < t_return - 0.5]
    assert len(quick) >= 10, (found - t_kill, len(quick))
    assert sorted(quick)[len(quick) // 2] <= 0.5 and max(quick) <= 2.0, sorted(quick)[-5:]
    assert health.status_code == 503 and health_s < 2.0, (health.status_code, health_s)
    down = [g for g in health.json()["shard_groups"] if g["state"] == "down"]
    assert [g["group"] for g in down] == on_b and down[0]["reason"], health.json()
    assert back["status"] == "ok"
    assert all(g["state"] == "up" for g in back["shard_groups"]), back  # marked up again, no redeploy
    first_ok = min((t for t, s, _, b in logs["strict"] if t > t_kill + 8 and s == 200), default=None)
    print(f"\nnode loss: {summary}; group b found gone {found - t_kill:.1f} s after the kill, then p50 "
          f"{sorted(quick)[len(quick) // 2]:.3f} s / max {max(quick):.3f} s over {len(quick)} answers; healthy again "
          f"{t_back - t_kill:.1f} s after the kill, first full answer "
          f"{(first_ok - t_kill) if first_ok else float('nan'):.1f} s after it (host back at +8 s)")


def redeploy(c: dict, name: str, **serve: object) -> None:
    net = c["net"]
    cfg = write_config(c["tmp"] / f"{name}.yaml", c["data"], c["tmp"] / "cache-b", **serve)
    r = net.a.shoal("serve", "--config", str(cfg), "--address", net.address, "--detach", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wait_health(net)


def test_ingress_on_the_worker_host_reads_the_catalog_through_the_data_node(served, lm):
    from shoal.cluster.search import Searcher

    net = served["net"]
    redeploy(served, "ingress-b", ingress="198.18.0.2")
    st = http(net, "GET", A + "/stats").json()
    assert st["ingress"]["node_ip"] == "198.18.0.2" and st["ingress"]["reads_catalog"] == "through DataNode", st
    assert st["catalog"]["chunks"] > 0
    s = Searcher(local_cfg(served), lm=lm)
    try:
        for mode in ("dense", "keyword", "hybrid"):  # feedback's vectors come through the DataNode too
            r = http(net, "GET", A + "/search", params={"q": QUERIES[2], "k": 5, "mode": mode, "feedback": "dense"})
            assert r.status_code == 200, r.text
            [local] = s.search([QUERIES[2]], k=5, mode=mode, feedback="dense")
            assert [h["id"] for h in r.json()["hits"]] == [h.id for h in local], mode
        prefix = str(served["paths"]["1"])
        r = http(net, "GET", A + "/search", params={"q": QUERIES[0], "k": 5, "path_prefix": prefix})
        assert r.status_code == 200 and {h["path"] for h in r.json()["hits"]} == {prefix}, r.text
    finally:
        s.close()


def test_two_replicas_per_group_lose_no_shard_with_a_node(served):
    net = served["net"]
    redeploy(served, "replicas2", shard_groups=1, replicas_per_group=2)
    deadline = time.time() + 45  # the replaced deployment's replicas stop reporting within a poll or two
    while time.time() < deadline:
        reps = [r for r in http(net, "GET", A + "/stats").json()["replicas"] if r["seen_s_ago"] < 11]
        if sorted(r["node_ip"] for r in reps) == ["198.18.0.1", "198.18.0.2"] and {r["group"] for r in reps} == {0}:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"group 0's two replicas are not on two nodes: {reps}")
    load = Load(net, False)
    time.sleep(2)
    t_kill = time.time()
    net.b.kill()
    time.sleep(8)
    log = [x for x in load.finish() if x[0] + x[2] >= t_kill]  # every request answered after the kill
    net.b.start(False, 2, 1)
    codes = sorted({s for _, s, _, _ in log})
    assert log and codes == [200], [(s, b) for _, s, _, b in log if s != 200][:3]
    assert not any(b.get("partial") for _, _, _, b in log)
    assert max(d for _, _, d, _ in log) <= TIMEOUT_S + 3
    net.wait_nodes(2, 90)


# -- a host lost mid-ingest ------------------------------------------------------------------------
def test_host_lost_mid_ingest_batches_move_and_ids_match(cluster, tmp_path):
    import sqlite3
    import subprocess

    net, c = cluster["net"], cluster
    assert "ref_ids" in c, "needs the ids of the single-node run (the first test)"
    # host b came back in the test before: wait until the Serve replicas it gets again are up, so its CPUs are
    # settled when the embedding actors are placed (one per host; else Ray puts both on host a)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            reps = http(net, "GET", A + "/stats").json().get("replicas", [])
            if any(r["node_ip"] == "198.18.0.2" and r["seen_s_ago"] < 5 for r in reps):
                break
        except Exception:  # noqa: BLE001 - the app may be between deployments; keep asking
            pass
        time.sleep(1)
    time.sleep(2)
    data = tmp_path / "d2"
    cfg = write_config(tmp_path / "small-batches.yaml", data, tmp_path / "cache")
    raw = json.loads(cfg.read_text())
    # serving holds the GPUs: 2 CPU actors; batches of 2 chunks, so most of the run is still ahead when host b
    # goes (reading runs ahead in Ray tasks now: with batches of 4 the whole ingest once ended before the kill)
    raw["embed"].update(batch_chunks=2, max_in_flight=1, cpu_actors=2)
    cfg.write_text(json.dumps(raw))
    corpus = tmp_path / "corpus"
    write_docs(c["docs"][:50], corpus)  # the corpus of the first test, so its single-node ids apply
    p = net.a.popen([sys.executable, "-m", "shoal.cluster.cli", "ingest", str(corpus), "--config", str(cfg),
                     "--address", net.address, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    chunks = 0
    while time.time() < deadline and p.poll() is None:
        try:
            db = sqlite3.connect(f"file:{data / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1)
            chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            db.close()
        except sqlite3.Error:
            pass
        if chunks >= 2:
            break
        time.sleep(0.1)
    assert p.poll() is None, "the ingest finished before host b could be lost"
    net.b.kill()
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    report = report_json(out)
    lost = [a for a in report["actors"] if a["lost"]]
    assert [a["node_ip"] for a in lost] == ["198.18.0.2"], [(a["node_ip"], a["batches"], a["lost"])
                                                           for a in report["actors"]]
    assert catalog_ids(data) == c["ref_ids"]
