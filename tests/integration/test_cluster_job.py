"""A real `ray start --head` on 127.0.0.1 (2 logical GPUs, no card), `ray job submit`, resume after kills.

Every process here is real: the head, the job driver, the embedding actors; kills are SIGKILL.
"""

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ROOT, cranfield_docs, write_docs

pytestmark = pytest.mark.timeout(900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


class Head:
    """`scripts/start_cluster.sh --block` in its own process group, on free loopback ports."""

    def __init__(self, tmp: Path, num_gpus: int = 2) -> None:
        self.tmp = tmp
        self.ports = {k: free_port() for k in ("gcs", "dash", "metrics", "client", "agent")}
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="shoalray-", dir="/tmp")  # AF_UNIX paths stay < 108 bytes
        e = env()
        e.update(SHOAL_RAY_PORT=str(self.ports["gcs"]), SHOAL_DASHBOARD_PORT=str(self.ports["dash"]),
                 SHOAL_METRICS_PORT=str(self.ports["metrics"]), SHOAL_RAY_TEMP=self.temp_dir)
        self.log = open(tmp / "head.log", "w")
        self.p = subprocess.Popen(
            [str(ROOT / "scripts" / "start_cluster.sh"), "--num-cpus=2", f"--num-gpus={num_gpus}",
             f"--ray-client-server-port={self.ports['client']}",
             f"--dashboard-agent-listen-port={self.ports['agent']}", "--block"],
            env=e, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"127.0.0.1:{self.ports['gcs']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['dash']}"
        deadline = time.time() + 120
        while time.time() < deadline and self.p.poll() is None:
            try:
                if httpx.get(self.dashboard + "/api/version", timeout=2).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError("ray head did not start: " + (tmp / "head.log").read_text()[-2000:])

    def kill(self) -> None:
        """Like `ray stop --force`: SIGKILL every process of this cluster at once."""
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)

    def stop(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)  # `ray start --block` often outlives SIGTERM; what is left is killed below
        except subprocess.TimeoutExpired:
            pass
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        self.log.close()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


def shoal(*args, extra_env: dict | None = None, **kw):
    return subprocess.Popen([sys.executable, "-m", "shoal.cluster.cli", *args], cwd=ROOT, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def chunk_map(data: Path) -> dict[tuple[str, int], int]:
    """(file name, ordinal) -> chunk id, from the catalog."""
    db = sqlite3.connect(f"file:{data / 'catalog.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT f.path, c.ordinal, c.id FROM chunks c JOIN files f ON f.id = c.file_id").fetchall()
    db.close()
    return {(Path(p).name, o): i for p, o, i in rows}


def rows(data: Path, table: str) -> int:
    """Rows of one catalog table, read-only (0 while there is no catalog yet)."""
    try:
        db = sqlite3.connect(f"file:{data / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1)
        n = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        db.close()
        return n
    except sqlite3.Error:
        return 0


def parts(data: Path) -> int:
    return rows(data, "parts")


def index_ids(data: Path) -> np.ndarray:
    from shoal.index import generations
    from shoal.index.search import LoadedGeneration

    return LoadedGeneration(*generations.open_current(data)).live_ids()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    write_docs(cranfield_docs(80), tmp / "docs")
    return tmp


@pytest.fixture(scope="module")
def reference(corpus):
    """The uninterrupted run every resumed run must equal; the driver reads every file itself
    (ingest.read_workers 0), the runs compared with it read in Ray tasks (configs/test.yaml)."""
    import yaml

    data = corpus / "ref"
    cfg = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    cfg["ingest"] = {"read_workers": 0}
    (corpus / "driver_reads.yaml").write_text(yaml.safe_dump(cfg))
    p = shoal("ingest", str(corpus / "docs"), "--config", str(corpus / "driver_reads.yaml"), "--data-dir", str(data))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return chunk_map(data)


def check_same(data: Path, reference: dict) -> None:
    got = chunk_map(data)
    assert got == reference  # same chunks, same ids: nothing lost, nothing twice
    ids = np.array(sorted(got.values()))
    assert len(set(ids)) == len(ids)
    assert np.array_equal(index_ids(data), ids)


def test_resume_after_driver_sigkill(corpus, reference, tmp_path):
    data = tmp_path / "data"
    args = ("ingest", str(corpus / "docs"), "--config", "configs/test.yaml", "--data-dir", str(data))
    p = shoal(*args)
    deadline = time.time() + 300
    while time.time() < deadline and parts(data) < 2 and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(chunk_map(data))
    assert 0 < n_before < len(reference)
    p = shoal(*args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "did not finish; resuming" in out
    check_same(data, reference)


def test_embedding_actor_killed_mid_batch(corpus, reference, tmp_path):
    data = tmp_path / "data"
    p = shoal("ingest", str(corpus / "docs"), "--config", "configs/test.yaml", "--data-dir", str(data), "-v")
    pid, lines = None, []
    deadline = time.time() + 300
    while time.time() < deadline and pid is None:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"embed actor pid (\d+)", line)
        if m:
            pid = int(m.group(1))
    assert pid, "".join(lines)[-2000:]
    while time.time() < deadline and parts(data) < 1:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # mid-run: the pool's next batches are in flight on this actor
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    check_same(data, reference)


def test_resume_after_ray_stop_mid_run(corpus, reference, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "h1").mkdir()
    head = Head(tmp_path / "h1", num_gpus=0)
    try:
        args = ("ingest", str(corpus / "docs"), "--config", "configs/test.yaml", "--data-dir", str(data),
                "--address", head.address)
        # Ray's driver waits 60 s for a lost GCS to come back before it gives up; 5 s here says the same
        p = shoal(*args, extra_env={"RAY_gcs_rpc_server_reconnect_timeout_s": "5"})
        deadline = time.time() + 300
        while time.time() < deadline and parts(data) < 1 and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, "the driver ended before its head was killed:\n" + p.communicate()[0][-3000:]
        head.kill()  # the whole cluster goes away under the driver
        out, _ = p.communicate(timeout=300)
        assert p.returncode != 0, "the driver finished although its head was killed:\n" + out[-3000:]
    finally:
        head.stop()
    done = len(chunk_map(data))
    assert 0 < done < len(reference), (done, len(reference), out[-3000:])
    (tmp_path / "h2").mkdir()
    head = Head(tmp_path / "h2", num_gpus=0)
    try:
        p = shoal(*args[:-1], head.address)
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    finally:
        head.stop()
    check_same(data, reference)


def file_count(data: Path) -> int:
    return rows(data, "files")


def wait_for(what, pred, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One `ray start --head` with 2 logical GPUs for the tests that submit to a cluster: the job, the watcher
    and the Serve app (each in its own data dir; the job goes first, so its counts are the head's)."""
    h = Head(tmp_path_factory.mktemp("head"))
    yield h
    h.stop()


def submit(head, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit [--no-wait] -- shoal ARGS` as a user runs it: this checkout as the working dir, the
    runtime env the README gives."""
    return subprocess.run(["ray", "job", "submit", *([] if wait else ["--no-wait"]), "--address", head.dashboard,
                           "--working-dir", ".", "--runtime-env", "configs/runtime_env.yaml", "--", "shoal", *args],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600 if wait else 300)


@pytest.fixture(scope="module")
def submitted(corpus, head, tmp_path_factory):
    """`ray job submit -- shoal ingest` with the suite's settings plus an IVF index over two GPUs sized
    16G and 8G; the Serve test below serves what it built."""
    import yaml

    tmp = tmp_path_factory.mktemp("submitted")
    cfg = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    port = free_port()
    cfg["index"] = dict(cfg["index"], factory="IVF8,Flat",
                        gpus=[{"name": "rtx4080", "memory": "16G"}, {"name": "p4000", "memory": "8G"}])
    cfg["serve"] = {"port": port, "num_cpus_encoder": 0.3, "num_cpus_searcher": 0.1, "num_cpus_ingress": 0.1,
                    "num_cpus_reranker": 0.1}
    (tmp / "two_gpus.yaml").write_text(yaml.safe_dump(cfg))
    data = tmp / "data"
    r = submit(head, "ingest", str(corpus / "docs"), "--config", str(tmp / "two_gpus.yaml"), "--data-dir", str(data))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    return {"log": log, "data": data, "cfg": tmp / "two_gpus.yaml", "port": port}


def test_job_submit_two_logical_gpus_and_metrics(corpus, reference, head, submitted):
    log, data = submitted["log"], submitted["data"]
    assert "succeeded" in log
    # one actor per logical GPU, each told its device by Ray, computing on the CPU
    visible = sorted(set(re.findall(r"CUDA_VISIBLE_DEVICES='(\d)'", log)))
    assert visible == ["0", "1"], log[-3000:]
    assert log.count("no card answers; embedding on the CPU") == 2
    assert re.search(r"\[ingest\].*100%", log)  # plain progress lines in the job log
    assert sorted(chunk_map(data).values()) == sorted(reference.values())
    # the README's `ray job` commands, as written there (with --address)
    [job_id] = set(re.findall(r"raysubmit_\w+", log))
    for cmd in (["ray", "job", "list", "--address", head.dashboard],
                ["ray", "job", "logs", "--address", head.dashboard, "--follow", job_id]):
        r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        assert job_id in r.stdout if cmd[2] == "list" else "[ingest]" in r.stdout
    # embedding actors named after their device slot and run (the dashboard's Actors page)
    r = subprocess.run(["ray", "list", "actors", "--address", head.dashboard, "--detail", "--format", "json",
                        "--filter", "class_name=EmbedActor"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(a["name"] for a in json.loads(r.stdout))
    assert names == ["shoal-embed-gpu0-run1", "shoal-embed-gpu1-run1"], names
    q = shoal("query", "experimental investigation of the aerodynamics of a wing in a slipstream",
              "-k", "1", "--data-dir", str(data))
    out, _ = q.communicate(timeout=120)
    assert q.returncode == 0 and f"{corpus / 'docs' / '1.txt'}" in out, out
    # shoal's own metrics on the head's Prometheus endpoint, non-zero
    metrics, deadline = "", time.time() + 60
    while time.time() < deadline:
        metrics = httpx.get(f"http://127.0.0.1:{head.ports['metrics']}/metrics", timeout=10).text
        if "ray_shoal_files_scanned_total" in metrics and "ray_shoal_chunks_embedded_total" in metrics:
            break
        time.sleep(2)

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", metrics, re.M))

    assert total("ray_shoal_files_scanned_total") == 80
    assert total("ray_shoal_chunks_embedded_total") == len(reference)
    assert total("ray_shoal_embed_batch_latency_s_count") > 0
    assert total("ray_shoal_bytes_read_total") > 0


def test_watch_as_a_ray_job_polls_stops_on_job_stop_and_resumes_after_sigkill(corpus, reference, head, tmp_path):
    """`ray job submit -- shoal ingest --watch` (polling): the first pass equals a plain ingest, a new file is
    found by polling, `ray job stop` ends it cleanly (lock released, nothing half-done); then a watcher
    SIGKILLed mid-update resumes on its next start with no chunk lost or doubled, and SIGTERM stops it."""
    import yaml

    docs = tmp_path / "docs"
    shutil.copytree(corpus / "docs", docs)
    cfg = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    cfg["ingest"] = dict(cfg["ingest"], watch="poll", watch_poll_interval_s=0.5, watch_debounce_s=0.5)
    cfg["embed"] = dict(cfg["embed"], batch_chunks=8)
    (tmp_path / "watch.yaml").write_text(yaml.safe_dump(cfg))
    data = tmp_path / "data"
    args = ("ingest", str(docs), "--watch", "--config", str(tmp_path / "watch.yaml"), "--data-dir", str(data))
    r = submit(head, *args, wait=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [job] = set(re.findall(r"raysubmit_\w+", r.stdout + r.stderr))

    def logs() -> str:
        return subprocess.run(["ray", "job", "logs", "--address", head.dashboard, job], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=120).stdout

    wait_for("the first pass", lambda: "[watch] first pass" in logs())
    assert "(poll)" in logs()
    check_same(data, reference)  # the first pass is a plain ingest
    (docs / "polled.txt").write_text("a file that only a poll of the folder can find: beryllium heat shield")
    wait_for("the polled file", lambda: file_count(data) == 81, 120)
    assert "ingest --watch" in (data / "write.lock").read_text()
    r = subprocess.run(["ray", "job", "stop", "--address", head.dashboard, job], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    wait_for("the job to stop", lambda: "stopped after" in logs(), 60)
    assert "SIGTERM: stopping" in logs()
    assert (data / "write.lock").read_text() == ""  # released: the next writer may start

    # SIGKILL mid-update: 40 new files in, killed once some of their batches are committed
    p = shoal(*args, "--address", head.address)
    lines: list[str] = []
    while not any("[watch] first pass" in s for s in lines):
        line = p.stdout.readline()
        assert line, "".join(lines)[-3000:]
        lines.append(line)
    before = parts(data)
    for i, d in enumerate(cranfield_docs(120)[80:120]):
        (docs / f"new{i}.txt").write_text(d["title"] + "\n\n" + d["text"])
    wait_for("a committed batch of the update", lambda: parts(data) >= before + 2, 120)
    assert file_count(data) < 121, "the update finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    p = shoal(*args, "--address", head.address)
    wait_for("the resumed pass", lambda: file_count(data) == 121, 300)
    wait_for("its generation", lambda: len(index_ids(data)) == len(chunk_map(data)), 120)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "did not finish; resuming" in out and "stopped after" in out, out[-3000:]
    got = chunk_map(data)
    assert {k: v for k, v in got.items() if k in reference} == reference  # the first 80: untouched
    ids = np.array(sorted(got.values()))
    assert len(set(ids)) == len(ids) and np.array_equal(index_ids(data), ids)  # none lost, none twice


def test_serve_shard_groups_on_two_logical_gpus(corpus, reference, head, submitted):
    """`shoal serve --address` on a head with 2 logical GPUs, over the job's index: one ShardSearcher per GPU,
    answers from the CPU. Last on the shared head: the app stays up until the head stops."""
    data, cfg, port = submitted["data"], submitted["cfg"], submitted["port"]
    p = shoal("serve", "--config", str(cfg), "--data-dir", str(data), "--address", head.address, "--detach")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and f"127.0.0.1:{port}" in out, out[-3000:]
    url = f"http://127.0.0.1:{port}"
    st = httpx.get(url + "/stats", timeout=60).json()
    groups = sorted(st["shard_groups"], key=lambda g: g["group"])
    assert len(groups) == 2
    assert sorted(g["cuda_visible_devices"] for g in groups) == ["0", "1"]  # one logical GPU each
    assert all(g["devices"] == ["cpu"] for g in groups)  # no card answers: searched on the CPU
    assert [g["ntotal"] for g in groups] == [round(len(reference) * 2 / 3), len(reference) - round(len(reference) * 2 / 3)]
    r = httpx.get(url + "/search", params={"q": "experimental investigation of the aerodynamics of a wing in a "
                                                "slipstream", "k": 1, "mode": "dense"}, timeout=60).json()
    assert r["hits"][0]["path"] == str(corpus / "docs" / "1.txt")
