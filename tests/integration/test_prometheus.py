"""A real Prometheus scrapes a real Ray head through an ingest and queries; the Grafana dashboard's PromQL returns data.

Prometheus comes from Debian's `prometheus` package (installed here where it is
missing; the test fails, loudly, if it cannot be). Everything listens on 127.0.0.1.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, cranfield_docs, wait_healthy, write_docs
from test_cluster_job import Head, free_port, shoal

pytestmark = pytest.mark.timeout(600)


def prometheus_binary() -> str:
    exe = shutil.which("prometheus")
    if exe is None:  # the test's own set-up: Debian's package, as root (CI runs as root)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                           capture_output=True, text=True, timeout=600,
                           env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail(f"cannot install Debian's prometheus package: {r.stderr[-1000:]}")
    return exe


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        cfg = tmp / "prometheus.yml"
        cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(tmp / "prometheus.log", "w")
        self.p = subprocess.Popen([prometheus_binary(), f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{self.port}"],
                                  stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("prometheus did not start: " + (tmp / "prometheus.log").read_text()[-2000:])

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at else {})
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 2) -> list[dict]:
        """What a Grafana panel asks for: the expression over a time range."""
        r = httpx.get(self.url + "/api/v1/query_range",
                      params={"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}s"},
                      timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return [s for s in body["data"]["result"] if s["values"]]

    def value(self, expr: str, at: float | None = None) -> float:
        res = self.query(expr, at)
        return float(res[0]["value"][1]) if res else float("nan")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    head = Head(tmp, num_gpus=0)
    prom = None
    try:
        prom = Prometheus(tmp, f"127.0.0.1:{head.ports['metrics']}")
        write_docs(cranfield_docs(40), tmp / "docs")
        (tmp / "docs" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # skipped: binary
        data = tmp / "data"
        p = shoal("ingest", str(tmp / "docs"), "--address", head.address, "--data-dir", str(data),
                  "--config", "configs/test.yaml", "--json")
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        report = json.loads(out[out.index("{"):])
        t_ingest = time.time()
        port = free_port()
        p = shoal("serve", "--address", head.address, "--data-dir", str(data), "--config", "configs/test.yaml",
                  "--port", str(port), "--detach")
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=60)
        with httpx.Client(base_url=url, timeout=60) as c:
            qs = ("wing in a propeller slipstream", "heat transfer", "shock waves", "buckling") * 3
            codes = [c.get("/search", params={"q": q, "k": 3}).status_code for q in qs]
            codes += [c.get("/search", params={"q": ""}).status_code, c.post("/search", json={"k": 2}).status_code]
        assert codes[:12] == [200] * 12 and codes[12:] == [422, 422]
        yield prom, report, t_ingest - float(report["seconds"]) - 10
    finally:
        if prom is not None:
            prom.stop()
        head.stop()


def wait_for(prom: Prometheus, expr: str, want, timeout: float = 90, at: float | None = None) -> float:
    """Poll until the query's value satisfies ``want`` (Ray flushes metrics every few seconds)."""
    deadline = time.time() + timeout
    v = float("nan")
    while time.time() < deadline:
        v = prom.value(expr, at)
        if v == v and want(v):
            return v
        time.sleep(2)
    names = sorted({m["metric"]["__name__"] for m in prom.query('{__name__=~"ray_(shoal|serve)_.*"}')})
    raise AssertionError(f"{expr} = {v}; series present: {names}")


def test_prometheus_sees_the_ingest_and_the_queries(observed):
    prom, report, _ = observed
    embedded = wait_for(prom, "sum(ray_shoal_chunks_embedded_total)", lambda v: v >= report["chunks_added"])
    assert embedded == report["chunks_added"]  # 40 distinct documents: nothing de-duplicated
    batches = wait_for(prom, "sum(ray_shoal_embed_batch_latency_s_count)", lambda v: v >= report["batches"])
    assert batches == report["batches"]
    assert wait_for(prom, 'sum(ray_shoal_files_skipped_total{reason="binary"})', lambda v: v >= 1) == 1
    assert wait_for(prom, "sum(ray_shoal_files_scanned_total)", lambda v: v >= 41) == 41
    # labels: run (the catalog's run id), job (Ray's), actor and card
    [series] = prom.query("ray_shoal_chunks_embedded_total")
    labels = series["metric"]
    assert labels["run"] == str(report["run_id"]) and labels["card"] == "cpu" and labels["job"]
    assert labels["actor"] == report["actors"][0]["tag"]
    # serving: 12 good /search requests (and the health checks) and 2 bad ones at the proxy, latency observed
    ok = 'sum(ray_serve_num_http_requests_total{route="/search",method="GET",status_code="200"})'
    assert wait_for(prom, ok, lambda v: v >= 12) == 12
    assert wait_for(prom, 'sum(ray_serve_num_http_requests_total{route="/search",status_code="422"})',
                    lambda v: v >= 2) == 2
    assert wait_for(prom, "sum(ray_serve_http_request_latency_ms_count)", lambda v: v >= 14) >= 14
    assert wait_for(prom, 'sum(ray_serve_deployment_request_counter_total{deployment="ShardSearcher0"})',
                    lambda v: v >= 12) >= 12


def test_every_dashboard_query_parses_and_returns_data(observed):
    """Each panel's PromQL, asked as Grafana asks it (a range query over the time since the ingest began)."""
    prom, _, t_start = observed
    dash = json.loads((ROOT / "configs" / "grafana" / "shoal.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 6 and dash["__inputs"][0]["pluginId"] == "prometheus"
    for e in exprs:
        deadline = time.time() + 60
        while not prom.query_range(e, t_start, time.time()) and time.time() < deadline:
            time.sleep(2)
        assert prom.query_range(e, t_start, time.time()), f"no data for {e}"
