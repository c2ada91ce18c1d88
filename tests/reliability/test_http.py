"""Hostile HTTP: a bounded property-based fuzz of every endpoint from the app's own OpenAPI schema,
loopback-only binding, and no path outside the ingested roots."""

import json
import socket
from dataclasses import replace

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.cluster.app import AppArgs, build_app, config_to_dict
from shoal.cluster.ingest import ingest

from conftest import ROOT, cranfield_docs, wait_healthy, write_docs

PORT = 18532
URL = f"http://127.0.0.1:{PORT}"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_local):
    from ray import serve

    from shoal.cluster.config import load_config

    tmp = tmp_path_factory.mktemp("http")
    write_docs(cranfield_docs(20), tmp / "docs")
    outside = tmp / "outside.txt"
    outside.write_text("secret text about wings and slipstreams that lives outside the roots")
    (tmp / "docs" / "link.txt").symlink_to(outside)
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    cfg = replace(cfg, serve=replace(cfg.serve, port=PORT, num_cpus_encoder=0.3, num_cpus_searcher=0.1,
                                     num_cpus_ingress=0.1, num_cpus_reranker=0.1, max_body_bytes=8192,
                                     max_batch_queries=8))
    ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/", logging_config=QUIET)
    client = httpx.Client(base_url=URL, timeout=60)
    wait_healthy(URL)
    yield client, tmp
    client.close()
    serve.delete("shoal")
    serve.shutdown()


def schema_fields(client, name):
    spec = client.get("/openapi.json").json()
    return spec["components"]["schemas"][name]["properties"]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)


def value_for(prop):
    """Mostly plausible values for a schema property, plus arbitrary JSON."""
    t = prop.get("type") or next((a.get("type") for a in prop.get("anyOf", []) if a.get("type") != "null"), None)
    plausible = {
        "string": st.text(max_size=80) | st.sampled_from(["wing", "  ", "", "../../etc/passwd", "x" * 5000]),
        "integer": st.integers(-5, 2000) | st.sampled_from([0, 1, 10, 1000, 1001, 2**63]),
        "boolean": st.booleans(),
        "array": st.lists(st.text(max_size=20) | st.sampled_from(["pdf", "code", "text"]), max_size=40),
    }.get(t, JSONISH)
    return plausible | JSONISH


def bodies(props):
    return st.fixed_dictionaries({}, optional={k: value_for(v) for k, v in props.items()}) | st.dictionaries(
        st.text(max_size=10), JSONISH, max_size=5)


def check(r):
    assert r.status_code in (200, 400, 404, 405, 409, 413, 422), (r.status_code, r.text[:300])  # never a 5xx
    body = r.json()  # every answer, error or not, is JSON
    if r.status_code != 200:
        assert "detail" in body


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("path,schema", [("/search", "SearchRequest"), ("/search/batch", "BatchRequest")])
def test_fuzz_post_bodies(app, path, schema):
    client, _ = app
    props = schema_fields(client, schema)

    @FUZZ
    @given(bodies(props))
    def run(body):
        check(client.post(path, json=body))

    run()


def test_fuzz_get_search_and_raw_bodies(app):
    client, _ = app
    params = {p["name"] for p in client.get("/openapi.json").json()["paths"]["/search"]["get"]["parameters"]}
    assert {"q", "k", "nprobe", "mode", "path_prefix", "file_type"} <= params

    @FUZZ
    @given(st.dictionaries(st.sampled_from(sorted(params | {"zzz"})), st.text(max_size=40), max_size=6),
           st.binary(max_size=200))
    def run(query, raw):
        check(client.get("/search", params=query))
        check(client.post("/search", content=raw, headers={"content-type": "application/json"}))

    run()
    for path in ("/healthz", "/stats"):
        check(client.get(path))
    r = client.post("/search", content=b"[" * 20000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "detail" in r.json()


def test_bound_to_loopback_only(app):
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for addr in others:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((addr, PORT)) != 0, f"port {PORT} answers on {addr}"
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == PORT]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


def test_no_path_outside_the_roots(app):
    client, tmp = app
    for prefix in (None, "/", "/etc", str(tmp / "docs" / ".." / ".."), str(tmp)):
        body = {"q": "secret text about wings and slipstreams", "k": 50, "full": True}
        if prefix:
            body["path_prefix"] = prefix
        r = client.post("/search", json=body)
        assert r.status_code == 200
        for h in r.json()["hits"]:
            assert h["path"].startswith(str(tmp / "docs") + "/"), h["path"]
            assert "outside the roots" not in h["text"]
    st_ = client.get("/stats").json()
    assert "outside" not in json.dumps(st_)
