"""`shoal ingest --watch` in-process: real files, the real watcher (inotify), real Ray, and a real Serve app
following the generations over HTTP. Every wait is for an update or a generation, bounded in time."""

import hashlib
import os
import queue
import shutil
import threading
import time
from dataclasses import replace

import httpx
import pytest

from shoal.cluster.app import AppArgs, build_app, config_to_dict
from shoal.cluster.watch import Watch, choose_watch, mount_fstype
from shoal.index import layout
from shoal.workers.catalog import Catalog

from conftest import ROOT, cranfield_docs, write_docs

PORT = 18433
URL = f"http://127.0.0.1:{PORT}"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


class Watching:
    """A Watch in a thread; each update's result lands in a queue the tests wait on."""

    def __init__(self, cfg, roots):
        self.updates: "queue.Queue" = queue.Queue()
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.w = Watch(cfg, roots, self.lines.append, self.stop, self.updates.put)
        self.error: list[BaseException] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            self.w.run()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error.append(e)

    def first_pass(self, timeout_s=240):
        deadline = time.time() + timeout_s
        while time.time() < deadline and not any("first pass" in s for s in self.lines):
            assert not self.error, self.error
            time.sleep(0.2)
        assert any("first pass" in s for s in self.lines), self.lines[-20:]

    def until(self, pred, timeout_s=120):
        """Updates until one satisfies ``pred``; returns (that update, every update taken)."""
        taken, deadline = [], time.time() + timeout_s
        while time.time() < deadline:
            assert not self.error, self.error
            try:
                res = self.updates.get(timeout=0.5)
            except queue.Empty:
                continue
            taken.append(res)
            if pred(res, taken):
                return res, taken
        raise AssertionError(f"no such update in {timeout_s}s: {[u.report.as_dict() for u in taken]}; "
                             f"{self.lines[-10:]}")

    def close(self):
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive()


@pytest.fixture(scope="module")
def watched(tmp_path_factory, ray_local):
    from ray import serve

    from shoal.cluster.config import load_config

    tmp = tmp_path_factory.mktemp("watch")
    docs = cranfield_docs(40)
    write_docs(docs[:20], tmp / "docs")
    write_docs(docs[20:25], tmp / "other")  # a second root, deleted whole later
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    cfg = replace(cfg, ingest=replace(cfg.ingest, watch_debounce_s=0.5, read_workers=0),
                  embed=replace(cfg.embed, cpus_per_actor=0.5),
                  serve=replace(cfg.serve, port=PORT, reload_interval_s=0.3, num_cpus_encoder=0.2,
                                num_cpus_searcher=0.1, num_cpus_ingress=0.1, num_cpus_reranker=0.1))
    w = Watching(cfg, [str(tmp / "docs"), str(tmp / "other")])
    w.first_pass()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/", logging_config=QUIET)
    client = httpx.Client(base_url=URL, timeout=60)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield cfg, w, client, tmp, docs
    client.close()
    serve.delete("shoal")
    serve.shutdown()
    w.close()


def served_paths(client, q, generation, k=10, timeout_s=30):
    """The paths /search returns for ``q`` once the server serves ``generation`` (or a later one)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        body = client.get("/search", params={"q": q, "k": k, "mode": "keyword"}).json()
        if body.get("generation", "") >= generation:
            return [h["path"] for h in body["hits"]]
        time.sleep(0.1)
    raise AssertionError(f"the server did not reach generation {generation} in {timeout_s}s")


def catalog_files(cfg):
    with Catalog(layout.catalog(cfg.data_path), readonly=True) as cat:
        return cat.files_under("/")


def test_create_modify_delete_reach_the_server(watched):
    cfg, w, client, tmp, _ = watched
    new = tmp / "docs" / "fresh.md"
    new.write_text("# Fresh\n\nzirconium whiskers reinforce the nozzle throat lining")
    res, _ = w.until(lambda r, _: r.report.new >= 1)
    assert res.report.chunks_added >= 1 and res.report.generation
    assert str(new) in served_paths(client, "zirconium whiskers", res.report.generation)
    new.write_text("# Fresh\n\nmolybdenum vanes replace the old lining")  # modified
    res, _ = w.until(lambda r, _: r.report.changed >= 1)
    assert str(new) in served_paths(client, "molybdenum vanes", res.report.generation)
    assert str(new) not in served_paths(client, "zirconium whiskers", res.report.generation)
    new.unlink()
    res, _ = w.until(lambda r, _: r.report.deleted >= 1)
    assert str(new) not in served_paths(client, "molybdenum vanes", res.report.generation)
    assert str(new) not in catalog_files(cfg)


def test_rename_costs_no_embedding(watched):
    cfg, w, client, tmp, _ = watched
    before = catalog_files(cfg)
    src = tmp / "docs" / "3.txt"
    n = before[str(src)].n_chunks
    dst = tmp / "docs" / "renamed" / "three.txt"
    dst.parent.mkdir()
    os.rename(src, dst)
    res, _ = w.until(lambda r, _: r.report.deleted >= 1 and r.report.copies >= 1)
    r = res.report
    assert r.chunks_added == 0 and r.chunks_copied == n  # nothing embedded: the vectors moved with the bytes
    after = catalog_files(cfg)
    assert str(src) not in after and after[str(dst)].sha256 == before[str(src)].sha256
    # the moved vectors are the old ones: the renamed file answers as the old one did
    q = open(dst).read().split("\n\n", 1)[1][:200]
    assert str(dst) in served_paths(client, q, r.generation, k=3)


def test_a_burst_of_500_files_is_a_few_updates(watched):
    cfg, w, client, tmp, _ = watched
    burst = tmp / "docs" / "burst"
    burst.mkdir()
    for i in range(500):
        (burst / f"b{i:03d}.txt").write_text(f"burst note {i} tantalum{i} shroud")
    res, taken = w.until(lambda r, t: sum(u.report.new for u in t) >= 500, timeout_s=240)
    assert len(taken) <= 3, [u.report.new for u in taken]  # one or a few updates, not 500
    files = catalog_files(cfg)
    assert sum(1 for p in files if p.startswith(str(burst) + "/")) == 500
    assert str(burst / "b499.txt") in served_paths(client, "tantalum499", res.report.generation, k=3)


def test_a_file_rewritten_while_read_ends_indexed_whole(watched):
    """A file appended to for ~3 s: each update reads a whole version or skips it as in motion (never half);
    once the writer stops, the index holds the last bytes."""
    cfg, w, client, tmp, _ = watched
    path = tmp / "docs" / "growing.txt"
    stop_at = time.time() + 3
    with open(path, "w") as f:
        i = 0
        while time.time() < stop_at:
            f.write(f"line {i} of the growing log about hafnium carbide\n")
            f.flush()
            i += 1
            time.sleep(0.02)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    res, taken = w.until(lambda r, _: catalog_files(cfg).get(str(path)) is not None and
                         catalog_files(cfg)[str(path)].sha256 == want, timeout_s=120)
    for u in taken:  # every version committed on the way was whole: its chunks cover its own text
        assert not (set(u.report.in_motion) - {str(path)})


def test_a_deleted_root_leaves_the_index(watched):
    cfg, w, client, tmp, _ = watched
    other = tmp / "other"
    assert any(p.startswith(str(other) + "/") for p in catalog_files(cfg))
    shutil.rmtree(other)
    res, _ = w.until(lambda r, _: str(other) in r.report.roots_missing)
    assert not any(p.startswith(str(other) + "/") for p in catalog_files(cfg))
    assert any("is gone" in s for s in w.lines)
    body = client.get("/search", params={"q": "boundary layer", "k": 50}).json()
    assert not any(h["path"].startswith(str(other) + "/") for h in body["hits"])


def test_a_second_writer_is_refused_naming_the_watcher(watched):
    from shoal.cluster.ingest import ingest
    from shoal.index.errors import ShoalError

    cfg, w, client, tmp, _ = watched
    with pytest.raises(ShoalError, match=r"shoal ingest --watch .*pid %d" % os.getpid()):
        ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    from shoal.cluster.cli import status_dict

    assert "shoal ingest --watch" in status_dict(cfg)["writer"]  # `shoal status` names it too


def test_events_or_polling_is_chosen_per_root():
    assert choose_watch("/d", "auto", "ext4", 10, 8192)[0] == "events"
    mode, why = choose_watch("/d", "auto", "nfs4", 10, 8192)
    assert mode == "poll" and "nfs4" in why
    mode, why = choose_watch("/d", "auto", "ext4", 9000, 8192)
    assert mode == "poll" and "fs.inotify.max_user_watches" in why and "sysctl" in why
    assert choose_watch("/d", "poll", "ext4", 1, 8192)[0] == "poll"
    assert choose_watch("/d", "events", "nfs", 1, 8192)[0] == "events"  # the user said so
    assert mount_fstype("/") is not None
