"""The Ray Serve app over real HTTP on 127.0.0.1: answers, bad input, faults, hot swap, token."""

import os
import signal
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest

from shoal.cluster.app import AppArgs, build_app, config_to_dict
from shoal.cluster.ingest import ingest
from shoal.cluster.search import Searcher

from conftest import cranfield_docs, write_docs

PORT = 18431
QUIET = {"log_level": "WARNING", "enable_access_log": False}
URL = f"http://127.0.0.1:{PORT}"


def wait_healthy(client, timeout_s=120):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            last = client.get("/healthz")
            if last.status_code == 200:
                return last.json()
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"service not healthy after {timeout_s}s: {last}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local):
    from ray import serve

    from shoal.cluster.config import load_config
    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("serve")
    docs = cranfield_docs(60)
    paths = write_docs(docs[:40], tmp / "docs")
    (tmp / "docs" / "notes.md").write_text("# Rotor notes\n\nhelicopter rotor blade flapping in forward flight .")
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    from conftest import tiny_cross_encoder

    cfg = replace(cfg, serve=replace(cfg.serve, port=PORT, shard_groups=2, reload_interval_s=0.5,
                                     num_cpus_encoder=0.3, num_cpus_searcher=0.1, num_cpus_ingress=0.1,
                                     num_cpus_reranker=0.1, max_batch_queries=8, max_body_bytes=4096,
                                     rerank_model=str(tiny_cross_encoder(tmp / "cross-encoder"))))
    ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/", logging_config=QUIET)
    client = httpx.Client(base_url=URL, timeout=60)
    wait_healthy(client)
    yield cfg, client, paths, docs, tmp
    client.close()
    serve.delete("shoal")
    serve.shutdown()


QUERIES = ["wing in a propeller slipstream", "heat transfer in laminar boundary layers",
           "buckling of thin cylindrical shells", "helicopter rotor blade"]


def test_results_equal_in_process(served, lm):
    cfg, client, paths, _, _ = served
    s = Searcher(cfg, lm=lm)
    try:
        for q in QUERIES:
            r = client.get("/search", params={"q": q, "k": 5})
            assert r.status_code == 200, r.text
            body = r.json()
            [local] = s.search([q], k=5)
            assert [h["id"] for h in body["hits"]] == [h.id for h in local]
            assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in local], atol=1e-4)
            assert body["generation"] == s.generation
    finally:
        s.close()
    r = client.post("/search", json={"q": QUERIES[0], "k": 3, "full": True})
    h = r.json()["hits"][0]
    assert h["path"] == str(paths["1"]) and paths["1"].read_text()[h["start"]:h["end"]] == h["text"]


def test_feedback_over_http_answers_as_in_process(served, lm):
    """feedback none and dense per request, hybrid: the same ids and scores as the in-process core, the
    response says where the query looked twice, and looking twice changes some answer."""
    cfg, client, _, _, _ = served
    s = Searcher(cfg, lm=lm)
    answers = {}
    try:
        for q in QUERIES:
            for fb in ("none", "dense"):
                body = client.post("/search", json={"q": q, "k": 5, "feedback": fb}).json()
                [local] = s.search([q], k=5, feedback=fb)
                assert [h["id"] for h in body["hits"]] == [h.id for h in local], (q, fb)
                assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in local], atol=1e-4)
                assert body.get("feedback") == ("dense" if fb == "dense" else None)
                answers[q, fb] = [h["id"] for h in body["hits"]]
    finally:
        s.close()
    assert any(answers[q, "none"] != answers[q, "dense"] for q in QUERIES)
    r = client.get("/search", params={"q": QUERIES[0], "feedback": "twice"})
    assert r.status_code == 422 and "feedback" in r.text


def test_batch_equals_singles(served):
    _, client, _, _, _ = served
    r = client.post("/search/batch", json={"queries": QUERIES, "k": 4})
    assert r.status_code == 200, r.text
    batch = r.json()["results"]
    for q, res in zip(QUERIES, batch):
        single = client.post("/search", json={"q": q, "k": 4}).json()["hits"]
        assert [h["id"] for h in res["hits"]] == [h["id"] for h in single]


@pytest.mark.parametrize("method,path,kw,field", [
    ("get", "/search", {"params": {"q": ""}}, "q"),
    ("get", "/search", {"params": {"q": "x" * 5000}}, "q"),
    ("get", "/search", {"params": {"q": "x", "k": 0}}, "k"),
    ("get", "/search", {"params": {"q": "x", "k": 1001}}, "k"),
    ("get", "/search", {"params": {"q": "x", "k": "ten"}}, "k"),
    ("get", "/search", {"params": {"q": "x", "colour": "red"}}, "colour"),
    ("get", "/search", {"params": {}}, "q"),
    ("post", "/search", {"json": {"q": "   "}}, "q"),
    ("post", "/search", {"json": {"q": "x", "unknown": 1}}, "unknown"),
    ("post", "/search", {"json": {"q": 5}}, "q"),
    ("post", "/search", {"json": {"q": "x", "file_type": ["exe"]}}, "file_type.0"),
    ("post", "/search", {"json": {"q": "x", "nprobe": -1}}, "nprobe"),
    ("post", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, ""),
    ("post", "/search/batch", {"json": {"queries": []}}, "queries"),
    ("post", "/search/batch", {"json": {"queries": ["a", ""]}}, "queries"),
    ("post", "/search/batch", {"json": {"queries": ["q"] * 9}}, "queries"),
    ("post", "/search/batch", {"json": {"queries": "not a list"}}, "queries"),
])
def test_bad_requests_are_422_naming_the_field(served, method, path, kw, field):
    _, client, _, _, _ = served
    r = getattr(client, method)(path, **kw)
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    if field:
        assert any(d["field"] == field for d in detail), detail


def test_body_over_limit_is_413(served):
    _, client, _, _, _ = served
    r = client.post("/search", json={"q": "x" * 5000})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]


def test_filters_never_return_non_matching(served):
    _, client, paths, _, tmp = served
    prefix = str(tmp / "docs" / "1")  # 1.txt, 10.txt ... 19.txt
    for q in QUERIES:
        r = client.post("/search", json={"q": q, "k": 20, "path_prefix": prefix})
        hits = r.json()["hits"]
        assert hits and all(h["path"].startswith(prefix) for h in hits)
        r = client.post("/search", json={"q": q, "k": 10, "file_type": ["markdown"]})
        hits = r.json()["hits"]
        assert [h["path"] for h in hits] == [str(tmp / "docs" / "notes.md")]


def test_rerank_with_a_cross_encoder(served, lm):
    """Over HTTP the cross-encoder re-orders the top candidates exactly as the in-process path does."""
    cfg, client, _, _, _ = served
    r = client.post("/search", json={"q": QUERIES[0], "k": 5, "rerank": True})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and all("first_stage_score" in h for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    s = Searcher(cfg, lm=lm)
    try:
        [local] = s.search([QUERIES[0]], k=5, rerank=True)
    finally:
        s.close()
    assert [h["id"] for h in hits] == [h.id for h in local]
    assert np.allclose([h["score"] for h in hits], [h.score for h in local], atol=1e-4)


def test_stats_and_health(served):
    _, client, _, _, _ = served
    st = client.get("/stats").json()
    assert len(st["shard_groups"]) == 2 and st["generation"] == "000001"
    assert sum(g["ntotal"] for g in st["shard_groups"]) == st["catalog"]["chunks"]
    assert st["encoder"]["model"] == "all-MiniLM-L6-v2" and st["latency_ms"]["n"] > 0
    assert all(g["devices"] == ["cpu"] or g["devices"] == [] for g in st["shard_groups"])
    assert client.get("/docs").status_code == 200
    assert "/search/batch" in client.get("/openapi.json").json()["paths"]


def test_http_answers_score_the_same_as_in_process(served, lm):
    """nDCG@10 over HTTP equals the in-process query path (the corpus here is Cranfield's first 40 docs)."""
    import sys

    from conftest import CRANFIELD, ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_beir

    cfg, _, _, _, _ = served
    _, queries, qrels = eval_beir.load_beir(CRANFIELD, 40)
    queries = dict(list(queries.items())[:40])
    qrels = {q: qrels[q] for q in queries}
    local = eval_beir.in_process_runs(cfg, queries, ["dense", "hybrid"], searcher=Searcher(cfg, lm=lm))
    remote = eval_beir.http_runs(URL, queries, ["dense", "hybrid"], batch=8)
    for mode in ("dense", "hybrid"):
        a = eval_beir.mean(eval_beir.evaluate(qrels, local[mode]))["ndcg_cut_10"]
        b = eval_beir.mean(eval_beir.evaluate(qrels, remote[mode]))["ndcg_cut_10"]
        assert abs(a - b) <= 0.005, (mode, a, b)


def test_hot_swap_under_load(served):
    cfg, client, paths, docs, tmp = served
    stop = threading.Event()
    codes: list[int] = []

    def hammer():
        with httpx.Client(base_url=URL, timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = c.get("/search", params={"q": QUERIES[i % len(QUERIES)], "k": 3})
                codes.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        write_docs(docs[40:60], tmp / "docs")
        r = ingest([str(tmp / "docs")], cfg, out=lambda s: None)
        assert r.generation == "000002"
        deadline = time.time() + 60
        while time.time() < deadline and client.get("/stats").json()["generation"] != "000002":
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert client.get("/stats").json()["generation"] == "000002"
    assert codes and all(c == 200 for c in codes), {c: codes.count(c) for c in set(codes)}
    new_doc = docs[45]
    r = client.get("/search", params={"q": new_doc["text"].split(" . ")[0], "k": 1})
    assert r.json()["hits"][0]["path"].endswith(f"/{new_doc['_id']}.txt")


def test_per_file_answers_count_files(served):
    """group: file -> k files, each once, ranked by its best passage (the highest score among its chunks),
    its other matching passages listed with ids, offsets and scores; chunk answers unchanged by default."""
    _, client, _, _, _ = served
    q = "wing in a propeller slipstream"
    for k in (3, 8):
        # the chunks a per-file answer of k files looks at: k x 8 (at least 50), as the query core plans it
        chunks = client.post("/search", json={"q": q, "k": max(8 * k, 50)}).json()["hits"]
        assert "passages" not in chunks[0] and "highlights" not in chunks[0]  # existing clients see no change
        files = client.post("/search", json={"q": q, "k": k, "group": "file"}).json()["hits"]
        paths = [h["path"] for h in files]
        assert len(files) == k and len(set(paths)) == k and [h["rank"] for h in files] == list(range(1, k + 1))
        first = {}
        for c in chunks:
            first.setdefault(c["path"], c)
        assert paths == list(first)[:k]  # files in the order of their best chunk
        for h in files:
            assert h["id"] == first[h["path"]]["id"] and h["score"] == first[h["path"]]["score"]
            mine = [c for c in chunks if c["path"] == h["path"]]
            assert [p["id"] for p in h["passages"]] == [c["id"] for c in mine[1:]]
            assert all(p["score"] <= h["score"] for p in h["passages"]) and isinstance(h["highlights"], list)
        assert any(h["highlights"] for h in files)  # the query's words, where the best passage has them
    multi = [h for h in client.post("/search", json={"q": q, "k": 8, "group": "file"}).json()["hits"]
             if h["passages"]]
    assert multi, "some file has more than one matching chunk"
    r = client.get("/search", params={"q": q, "k": 2, "group": "file", "highlight": "true"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2


def test_concurrent_single_queries_share_forward_passes(served):
    """16 single queries at once: the encoder inside the Ingress runs far fewer than 16 forward passes."""
    from concurrent.futures import ThreadPoolExecutor

    _, client, _, _, _ = served
    before = client.get("/stats").json()["encoder"]
    assert before["where"] == "ingress" and before["runtime"] == "onnx", before
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: httpx.get(URL + "/search", params={"q": f"{QUERIES[i % 4]} {i}", "k": 3},
                                                  timeout=120).status_code, range(16)))
    after = client.get("/stats").json()["encoder"]
    assert codes == [200] * 16
    passes = after["passes"] - before["passes"]
    assert 1 <= passes <= 8, passes  # the first runs alone, those that came meanwhile share the next


def test_stage_timings_add_up(served):
    """The query core's sequential stages (filter, encode, dense, keyword, fuse, catalog, rerank) add up to each
    request's time in the core: over every request so far, their sums equal the sum of the totals."""
    _, client, _, _, _ = served
    for q in QUERIES:
        assert client.get("/search", params={"q": q, "k": 3, "path_prefix": "/"}).status_code == 200
    st = client.get("/stats").json()["stages_ms"]
    parts = sum(v["sum_ms"] for k, v in st.items() if k != "total" and not v["overlapped"])
    assert st["keyword_search"]["overlapped"] and {"encode", "dense", "keyword", "catalog", "filter"} <= set(st)
    assert abs(parts - st["total"]["sum_ms"]) <= 0.01 * st["total"]["sum_ms"] + 1.0, (parts, st["total"])


def test_a_group_that_stops_answering_is_marked_down_then_up(served):
    """A shard group that hangs (its replica SIGSTOPped) costs one request the timeout; the next ones are
    answered at once without it (503 naming it, or partial), /healthz says so at once, and when it answers
    again the probe marks it up: full answers, the same replica, no redeploy."""
    cfg, client, _, _, _ = served
    timeout_s = cfg.serve.shard_timeout_s
    pid = next(g["pid"] for g in client.get("/stats").json()["shard_groups"] if g["group"] == 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        first = client.post("/search", json={"q": QUERIES[0], "k": 3})
        first_s = time.time() - t0
        assert first.status_code == 503 and first.json()["missing_shards"] == [1], first.text
        assert timeout_s - 0.5 <= first_s <= timeout_s + 3, first_s
        quick = []
        for i in range(6):
            t0 = time.time()
            r = client.post("/search", json={"q": QUERIES[i % 4], "k": 3, "allow_partial": i % 2 == 1})
            quick.append(time.time() - t0)
            if i % 2:
                assert r.status_code == 200 and r.json()["partial"] is True and r.json()["missing_shards"] == [1]
            else:
                assert r.status_code == 503 and "marked down" in r.json()["detail"], r.text
        assert max(quick) < 1.5, quick  # the Ingress knew: nobody waited out the timeout again
        t0 = time.time()
        h = client.get("/healthz")
        assert h.status_code == 503 and time.time() - t0 < 1.5
        g1 = h.json()["shard_groups"][1]
        assert g1["state"] == "down" and "TimeoutError" in g1["reason"] and g1["for_s"] >= 0
    finally:
        os.kill(pid, signal.SIGCONT)
    back = wait_healthy(client, timeout_s=60)
    assert [g["state"] for g in back["shard_groups"]] == ["up", "up"]
    r = client.post("/search", json={"q": QUERIES[0], "k": 3})
    assert r.status_code == 200 and "partial" not in r.json()
    assert next(g["pid"] for g in client.get("/stats").json()["shard_groups"] if g["group"] == 1) == pid


def test_killed_shard_replica_gives_503_then_recovers(served):
    _, client, _, _, _ = served
    st = client.get("/stats").json()
    pid = next(g["pid"] for g in st["shard_groups"] if g["group"] == 1)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    r = client.post("/search", json={"q": QUERIES[0], "k": 3})
    if r.status_code == 503:  # the replica is gone: which shard is named
        assert r.json()["missing_shards"] == [1]
        p = client.post("/search", json={"q": QUERIES[0], "k": 3, "allow_partial": True})
        if p.status_code == 200:
            assert p.json()["partial"] is True and p.json()["missing_shards"] == [1]
    else:  # Serve already replaced the replica
        assert r.status_code == 200
    wait_healthy(client, timeout_s=120)
    r = client.post("/search", json={"q": QUERIES[0], "k": 3})
    assert r.status_code == 200 and "partial" not in r.json()


def test_tuned_nprobe_reaches_the_running_server(served):
    """`shoal tune` publishes a generation; the running replicas switch to it and search with its nprobe."""
    from shoal.cluster.build import build_generation
    from shoal.workers.catalog import Catalog
    from shoal.cluster.tune import tune
    from shoal.index import generations

    cfg, client, _, _, _ = served
    ivf = replace(cfg, index=replace(cfg.index, factory="IVF4,Flat", nprobe=1))
    with Catalog(ivf.data_path / "catalog.sqlite") as cat:
        build_generation(ivf, cat)

    def served_as(gen: str, timeout_s: float = 60) -> list[dict]:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            groups = client.get("/stats").json()["shard_groups"]
            if all(g.get("generation") == gen for g in groups):
                return groups
            time.sleep(0.5)
        raise AssertionError(f"replicas still on {groups}, want {gen}")

    assert {g["nprobe"] for g in served_as(generations.current_name(cfg.data_path))} == {1}
    best, _ = tune(ivf, target=1.0, nq=40)
    assert best > 1
    groups = served_as(generations.current_name(cfg.data_path))
    assert {g["nprobe"] for g in groups} == {best}
    assert client.get("/search", params={"q": QUERIES[0], "k": 3}).status_code == 200


def test_concurrent_mixed_requests_equal_alone(served):
    """64 requests at once (nprobe 1/4, dense/keyword/hybrid, with and without a filter) over HTTP each get
    exactly what the same request gets alone: no request changes another's search settings."""
    from concurrent.futures import ThreadPoolExecutor

    from shoal.index import generations

    cfg, client, paths, _, _ = served
    _, m = generations.open_current(cfg.data_path)
    assert m["nlist"] == 4  # the IVF generation of the test above: nprobe matters
    prefix = str(paths["1"].parent / "1")  # files 1.txt, 10.txt, ...
    reqs = [{"q": QUERIES[i % 4], "k": 5, "nprobe": (1, 4)[(i // 12) % 2], "mode": ("dense", "keyword", "hybrid")[i % 3],
             **({"path_prefix": prefix} if i % 5 == 0 else {})} for i in range(64)]

    def ask(body: dict) -> list[tuple[int, float]]:
        r = httpx.post(URL + "/search", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [(h["id"], h["score"]) for h in r.json()["hits"]]

    alone = [ask(b) for b in reqs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, reqs))
    for b, a, t in zip(reqs, alone, together):
        assert [i for i, _ in a] == [i for i, _ in t], b
        assert np.allclose([s for _, s in a], [s for _, s in t], atol=1e-5), b
    # the settings change the answers, so the test could fail: i and i + 12 differ only in nprobe (1 / 4)
    assert any(alone[i] != alone[i + 12] for i in range(52) if i % 5 and (i + 12) % 5)


def test_token_required_when_configured(served):
    from ray import serve

    cfg, client, _, _, _ = served
    tok = replace(cfg, serve=replace(cfg.serve, token="s3cret-token"))
    serve.run(build_app(AppArgs(cfg=config_to_dict(tok))), name="shoal", route_prefix="/", logging_config=QUIET)
    deadline = time.time() + 120
    while time.time() < deadline and client.get("/search", params={"q": "wing"}).status_code != 401:
        time.sleep(0.5)
    r = client.get("/search", params={"q": "wing"})
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert client.get("/search", params={"q": "wing"}, headers={"authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/search", params={"q": "wing"}, headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes need no token
