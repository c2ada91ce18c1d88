"""`shoal ingest`: scan -> read/chunk -> embed on Ray actors -> commit per batch -> build.

The driver streams: it walks the roots, reads and chunks changed files, and
keeps at most ``embed.max_in_flight`` batches per actor queued (backpressure).
Each finished batch is committed at once (staged vectors + one SQLite
transaction), so a killed run loses only the batches in flight and a rerun
picks up where it stopped: committed files compare unchanged.
"""

from __future__ import annotations

import collections
import fcntl
import fnmatch
import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from shoal.cluster.catalog import Catalog, FileBatch
from shoal.cluster.config import Config
from shoal.index.errors import IndexMismatchError, ShoalError
from shoal.cluster.scan import Skipped, walk
from shoal.index import generations, staging
from shoal.index import layout

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    run_id: int
    resumed_from: Optional[int] = None
    files_seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: Counter = field(default_factory=Counter)
    chunks_added: int = 0
    chunks_removed: int = 0
    bytes_read: int = 0
    bytes_done: int = 0  # bytes of files finished: committed, unchanged or skipped (the progress measure)
    batches: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    generation: Optional[str] = None
    actors: list[dict[str, Any]] = field(default_factory=list)
    # where the time went, driver's view (seconds): startup (Ray, actors, model), read_chunk (reading and
    # chunking in the driver, or waiting for the read tasks), embed_wait (blocked on the embedding actors),
    # commit (catalog + staged vectors), build (the generation), scan (walking, everything else)
    stages: dict[str, float] = field(default_factory=dict)
    read_workers: int = 0
    read_task_seconds: float = 0.0  # reading + chunking inside the readers, all of them
    embed_busy_seconds: float = 0.0  # embedding inside the actors, all of them
    driver_cpu_seconds: float = 0.0
    first_commit_s: Optional[float] = None

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_added / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "skipped"}
        d["skipped"] = dict(self.skipped)
        d["chunks_per_s"] = round(self.chunks_per_s, 2)
        d["stages"] = {k: round(v, 3) for k, v in self.stages.items()}
        for k in ("embed_seconds", "seconds", "read_task_seconds", "embed_busy_seconds", "driver_cpu_seconds"):
            d[k] = round(d[k], 3)
        return d


class Stages:
    """Seconds per stage of the driver's time; ``with stages("commit"): ...``."""

    def __init__(self, into: dict[str, float]) -> None:
        self.d = into

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.d[name] = self.d.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def data_dir_lock(data: Path) -> Iterator[None]:
    """One writer per data dir: a second ingest/build fails fast instead of interleaving."""
    data.mkdir(parents=True, exist_ok=True)
    with open(layout.lock(data), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ShoalError(f"another shoal ingest or build holds {data / 'write.lock'}; wait for it to finish") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_roots(paths: Sequence[str]) -> list[str]:
    if not paths:
        raise ShoalError("no path given: shoal ingest PATH [PATH ...]")
    roots = []
    for p in paths:
        if not os.path.exists(p):
            raise ShoalError(f"path not found: {p}")
        if not os.access(p, os.R_OK):
            raise ShoalError(f"path not readable: {p}")
        roots.append(os.path.realpath(p))
    return roots


class EmbedPool:
    """Embedding actors, one per GPU (else N CPU actors), fed with bounded queues.

    Actors are started lazily, on the first batch, so an ingest with nothing to
    embed never starts Ray.
    """

    def __init__(self, cfg: Config, run: str = "") -> None:
        self.cfg = cfg
        self.run, self.job = run, ""
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []
        self.inflight: dict[Any, tuple[int, Any, float, int, list[str]]] = {}  # ref -> (actor, payload, t0, seq, texts)
        self.lost: set[int] = set()  # actors whose node or process went away: no new work for them
        self.resubmitted = 0
        self.batches: Counter = Counter()  # batches each actor finished
        self.done: dict[int, tuple[Any, np.ndarray, float]] = {}  # finished early, waiting for their turn
        self.next_submit = 0
        self.next_commit = 0
        self.load = Counter()
        self._info_refs: list[Any] = []
        self.actor_cpus = 0.0  # CPUs the embedding actors hold (set by start)

    def start(self) -> None:
        import ray

        from shoal.workers.actors import EmbedActor
        from shoal.workers.embed import torch_threads_for

        self.ensure_ray()
        m, e = self.cfg.model, self.cfg.embed
        n_gpus = self.gpus_to_use()
        self.actor_cpus = (n_gpus or e.cpu_actors) * e.cpus_per_actor
        if n_gpus > 0:
            opts = [dict(num_gpus=1, num_cpus=e.cpus_per_actor)] * n_gpus
            threads, device, batch = 1, m.device, e.gpu_batch_size
            log.info("embedding on %d GPU actor(s), one per GPU", n_gpus)
        else:
            opts = [dict(num_cpus=e.cpus_per_actor, scheduling_strategy=s) for s in spread_over_nodes(e.cpu_actors)]
            threads = torch_threads_for(e.cpu_actors, e.threads_per_actor)
            device, batch = "cpu", m.batch_size
            log.info("no GPU in the Ray cluster: embedding on %d CPU actor(s), %d threads each", e.cpu_actors, threads)
        job = self.job = ray.get_runtime_context().get_job_id()
        kind = "gpu" if n_gpus > 0 else "cpu"
        self.actors = [  # named per slot and run; the card each one got is in its repr and labels
            EmbedActor.options(name=f"shoal-embed-{kind}{i}-run{self.run or job}", **o).remote(
                m.name, device, m.max_seq_length, batch, threads, m.allow_download, self.run, job)
            for i, o in enumerate(opts)
        ]
        self._info_refs = [a.info.remote() for a in self.actors]  # the models load while files are read

    def ensure_ray(self) -> None:
        from shoal.cluster.ray_env import init_ray

        init_ray(self.cfg.ray.address, num_cpus=self.cfg.ray.num_cpus, num_gpus=self.cfg.ray.num_gpus)

    def gpus_to_use(self) -> int:
        """The cluster's GPUs not held by other work (a running `shoal serve`): one actor each."""
        import ray

        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        free = int(ray.available_resources().get("GPU", 0))
        if 0 < n_gpus and free < n_gpus:
            log.warning("%d of the cluster's %d GPU(s) are held by other work (a running `shoal serve`?): "
                        "embedding on %s", n_gpus - free, n_gpus,
                        f"the {free} free one(s)" if free else "the CPU")
            n_gpus = free
        return n_gpus

    def ready(self) -> None:
        """Wait until every actor has loaded its model; check they agree."""
        import ray

        if self.info or not self.actors:
            return
        self.info = ray.get(self._info_refs)
        fps = {i["fingerprint"] for i in self.info}
        if len(fps) != 1:
            raise IndexMismatchError(f"embedding actors loaded different models: {sorted(fps)}")

    def busy(self) -> list[dict[str, Any]]:
        import ray

        try:
            return ray.get([a.stats.remote() for a in self.actors], timeout=30)
        except Exception:  # a lost actor: its figures are gone
            return [{"busy_s": 0.0, "embedded": 0} for _ in self.actors]

    @property
    def fingerprint(self) -> str:
        return self.info[0]["fingerprint"]

    def full(self) -> bool:
        if not self.actors:
            return False
        return len(self.inflight) + len(self.done) >= len(self.actors) * self.cfg.embed.max_in_flight

    def submit(self, texts: list[str], payload: Any) -> None:
        if not self.actors:
            self.start()
        self._send(texts, payload, self.next_submit)
        self.next_submit += 1
        self._gauge()

    def _send(self, texts: list[str], payload: Any, seq: int, avoid: Optional[int] = None) -> None:
        live = [j for j in range(len(self.actors)) if j not in self.lost and j != avoid]
        i = min(live or [avoid if avoid is not None else 0], key=lambda j: self.load[j])
        ref = self.actors[i].embed.remote(texts)
        self.load[i] += 1
        self.inflight[ref] = (i, payload, time.perf_counter(), seq, texts)

    def _gauge(self) -> None:
        from shoal.workers.metrics import ingest_metrics

        ingest_metrics().inflight_batches.set(len(self.inflight) + len(self.done),
                                              tags={"job": self.job, "run": self.run})

    def pending(self) -> bool:
        return bool(self.inflight or self.done)

    def wait_one(self) -> tuple[Any, np.ndarray, float]:
        """The next batch in submission order: (payload, xb, seconds).

        Actors finish out of order (a faster card, a restarted actor's retried
        batch); committing in submission order keeps chunk ids a function of the
        file order alone, so a resumed run gets the same ids as an uninterrupted one.
        """
        import ray

        from ray.exceptions import RayActorError

        while self.next_commit not in self.done:
            [ref], _ = ray.wait(list(self.inflight), num_returns=1)
            i, payload, t0, seq, texts = self.inflight.pop(ref)
            self.load[i] -= 1
            try:
                self.done[seq] = (payload, ray.get(ref), time.perf_counter() - t0)
                self.batches[i] += 1
            except RayActorError as e:  # its process or its node is gone: the batch goes to another actor
                self.lost.add(i)
                self.resubmitted += 1
                log.warning("embedding actor %d lost (%s): batch %d sent to another actor", i,
                            type(e).__name__, seq)
                self._send(texts, payload, seq, avoid=i)
        self.ready()
        out = self.done.pop(self.next_commit)
        self.next_commit += 1
        self._gauge()
        return out

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def spread_over_nodes(n: int) -> list[Any]:
    """Scheduling strategies for ``n`` CPU actors: one per node first, round-robin over the alive nodes
    with CPUs (soft: an actor goes elsewhere when its node is full). Ray's SPREAD is best effort and
    may put two on one node while another is idle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((nd for nd in ray.nodes() if nd.get("Alive") and nd.get("Resources", {}).get("CPU", 0) > 0),
                   key=lambda nd: (not nd.get("Resources", {}).get("node:__internal_head__"), nd["NodeManagerAddress"]))
    if len(nodes) < 2:
        return ["DEFAULT"] * n
    return [NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)]["NodeID"], soft=True) for i in range(n)]


class Progress:
    """A bar with rate and ETA on a terminal; plain lines every few seconds elsewhere (`ray job logs`).

    The fraction done is work, not scanning: the bytes of files whose chunks are
    committed (embedded), or that needed no embedding (unchanged, skipped), over
    the bytes under the roots. The ETA follows from it.
    """

    def __init__(self, out: Callable[[str], None], total_files: int = 0, total_bytes: int = 0,
                 every_s: float = 5.0, tty: Optional[bool] = None) -> None:
        self.out, self.total, self.t0, self.last = out, total_files, time.perf_counter(), 0.0
        self.total_bytes = total_bytes
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every_s = 0.2 if self.tty else every_s
        self.pushed: Optional[dict[str, Any]] = None

    def tick(self, r: IngestReport, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        self.pushed = push_metrics(r, self.pushed)
        el = now - self.t0
        rate = r.chunks_added / el if el else 0.0
        if self.total_bytes:
            frac = min(1.0, r.bytes_done / self.total_bytes)
        else:
            frac = min(1.0, r.files_seen / self.total) if self.total else 0.0
        if force and r.generation is not None:
            frac = 1.0
        eta = (el / frac - el) if frac > 0 else float("nan")
        eta_s = f"{eta:5.0f}s" if eta == eta else "    ?"
        counts = (f"embedded {r.chunks_added} chunks ({rate:.1f}/s); scanned {r.files_seen}/{self.total or '?'} "
                  f"files (new {r.new}, changed {r.changed}, unchanged {r.unchanged}, "
                  f"skipped {sum(r.skipped.values())})")
        if self.tty:
            bar = "#" * int(frac * 24)
            sys.stderr.write(f"\r[{bar:<24}] {frac:4.0%} {counts} ETA {eta_s} ")
            sys.stderr.flush()
            if force:
                sys.stderr.write("\n")
        else:
            self.out(f"[ingest] {el:6.1f}s {frac:4.0%} {counts} ETA {eta_s}")


def _check_model(cat: Catalog, pool: EmbedPool, cfg: Config) -> None:
    info = pool.info[0]
    meta = {
        "name": info["model"], "fingerprint": info["fingerprint"], "dim": info["dim"],
        "max_seq_length": info["max_seq_length"],
        "chunk_tokens": cfg.chunk.tokens, "chunk_overlap_tokens": cfg.chunk.overlap_tokens,
    }
    raw = cat.get_meta("model")
    if raw is not None:
        old = json.loads(raw)
        if old["fingerprint"] != meta["fingerprint"] and cat.counts()["chunks"] > 0:
            raise IndexMismatchError(
                f"this data dir was embedded with model {old['name']} ({old['fingerprint']}); the config asks for "
                f"{meta['name']} ({meta['fingerprint']}). Use another --data-dir for a different model."
            )
    cat.set_meta("model", json.dumps(meta))


def ingest(paths: Sequence[str], cfg: Config, *, build: bool = True,
           out: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> IngestReport:
    """Bring the catalog and index in line with the files under ``paths``."""
    t0 = time.perf_counter()
    roots = resolve_roots(paths)
    data = cfg.data_path
    with data_dir_lock(data):
        cat = Catalog(layout.catalog(data))
        try:
            return _ingest_locked(roots, cfg, cat, build, out, t0)
        finally:
            cat.close()


def _ingest_locked(roots: list[str], cfg: Config, cat: Catalog, build: bool,
                   out: Callable[[str], None], t0: float) -> IngestReport:
    from shoal.workers.reader import ChunkSpec, Prepared, ReadPool, auto_workers

    data = cfg.data_path
    cpu0 = time.process_time()
    stage = layout.staging(data)
    orphans = staging.remove_orphans(stage, cat.part_names())
    if orphans:
        log.info("removed %d uncommitted vector parts left by an interrupted run", len(orphans))
    run_id, prev = cat.start_run(roots)
    report = IngestReport(run_id=run_id, resumed_from=prev)
    timed = Stages(report.stages)
    if prev is not None:
        out(f"[ingest] run {prev} did not finish; resuming (committed files are kept)")
    pool = EmbedPool(cfg, run=str(run_id))
    sizes = [count_files(r, cfg, data) for r in roots]
    progress = Progress(out, sum(n for n, _ in sizes), sum(b for _, b in sizes))
    spec = ChunkSpec(cfg.model.name, cfg.model.allow_download, cfg.chunk.tokens, cfg.chunk.overlap_tokens,
                     int(cfg.scan.max_file_bytes), cfg.ingest.reader_niceness)
    reader: Optional[ReadPool] = None
    pending: list[FileBatch] = []
    pending_chunks = 0

    def get_reader() -> ReadPool:
        """Started on the first file to read, with the embedding actors: their models load while files are read."""
        nonlocal reader
        if reader is None:
            workers = 0
            with timed("startup"):
                pool.start()
                if cfg.ingest.read_workers:
                    workers = auto_workers(cfg.ingest.read_workers, pool.actor_cpus)
            report.read_workers = workers
            log.info("reading and chunking %s", f"in {workers} Ray task(s) at a time" if workers else "in the driver")
            reader = ReadPool(spec, workers, cfg.ingest.read_batch_files, int(cfg.ingest.read_batch_bytes))
        return reader

    def commit(payload: tuple[list[FileBatch], np.ndarray], xb_unique: np.ndarray, secs: float) -> None:
        with timed("commit"):
            files, inverse = payload
            xb = xb_unique[inverse]
            if report.batches == 0 or cat.get_meta("model") is None:
                _check_model(cat, pool, cfg)
            cat.commit_files(files, write_part=lambda ids: staging.write_part(stage, ids, xb, cfg.index.staging_dtype))
            report.bytes_done += sum(fb.size for fb in files)
            report.batches += 1
            report.chunks_added += len(xb)
            report.embed_seconds += secs
            if report.first_commit_s is None:
                report.first_commit_s = round(time.perf_counter() - t0, 3)
        progress.tick(report)

    def wait_commit() -> None:
        with timed("embed_wait"):
            got = pool.wait_one()
        commit(*got)

    def flush() -> None:
        nonlocal pending, pending_chunks
        if not pending:
            return
        while pool.full():
            wait_commit()
        texts = [c.text for fb in pending for c in fb.chunks]
        if cfg.embed.dedup:  # identical chunks (boilerplate, copies, repeated lines) embed once
            uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
            pool.submit(list(uniq), (pending, inverse))
        else:
            pool.submit(texts, (pending, np.arange(len(texts))))
        pending, pending_chunks = [], 0

    status = "failed"
    try:
        for root in roots:
            known = cat.files_under(root)
            seen: set[str] = set()
            skips: list[Skipped] = []
            waiting: collections.deque = collections.deque()  # (entry, committed record) in read order

            def take(p: Prepared) -> None:
                nonlocal pending_chunks
                item, old = waiting.popleft()
                assert item.path == p.path, (item.path, p.path)
                if p.skip is not None:
                    seen.discard(item.path)
                    skips.append(Skipped(item.path, *p.skip))
                    report.skipped[p.skip[0]] += 1
                    report.bytes_done += item.size
                    return
                report.bytes_read += item.size
                if p.same:
                    cat.touch_file(item.path, item.size, item.mtime_ns)
                    report.unchanged += 1
                    report.bytes_done += item.size
                    return
                chunks = p.chunks or []
                if old is None:
                    report.new += 1
                else:
                    report.changed += 1
                    report.chunks_removed += old.n_chunks
                if not chunks:
                    skips.append(Skipped(item.path, "empty", "no text content"))
                    seen.discard(item.path)
                    report.bytes_done += item.size
                    return
                pending.append(FileBatch(item.path, item.root, item.size, item.mtime_ns, p.digest, p.kind, chunks))
                pending_chunks += len(chunks)
                if pending_chunks >= cfg.embed.batch_chunks:
                    flush()

            for item in walk([root], ignore=cfg.scan.ignore, max_file_bytes=cfg.scan.max_file_bytes,
                             follow_symlinks=cfg.scan.follow_symlinks, exclude_dirs=[str(data)]):
                report.files_seen += 1
                if isinstance(item, Skipped):
                    skips.append(item)
                    report.skipped[item.reason] += 1
                    report.bytes_done += _size(item.path)
                    continue
                seen.add(item.path)
                old = known.get(item.path)
                if old is not None and old.size == item.size and old.mtime_ns == item.mtime_ns:
                    report.unchanged += 1
                    report.bytes_done += item.size
                    continue
                rd = get_reader()
                waiting.append((item, old))
                with timed("read_chunk"):
                    rd.submit(item.path, old.sha256 if old is not None else None, item.size)
                    done = list(rd.results())
                for p in done:
                    take(p)
                progress.tick(report)
            if reader is not None:
                with timed("read_chunk"):
                    done = list(reader.results(block=True))
                for p in done:
                    take(p)
            flush()
            while pool.pending():
                wait_commit()
            # never delete what sits under a folder we could not read this time
            blind = [s.path.rstrip("/") + "/" for s in skips if s.reason == "unreadable-dir"]
            gone = [p for p in known if p not in seen and not p.startswith(tuple(blind))]
            skipped_now = {s.path for s in skips}
            report.deleted += sum(1 for p in gone if p not in skipped_now)
            report.chunks_removed += cat.delete_files(gone)
            cat.clear_skipped(root)
            cat.record_skipped(skips, root, run_id)
        if pool.actors:
            pool.ready()
            busy = pool.busy()
            report.embed_busy_seconds = sum(b["busy_s"] for b in busy)
            report.actors = [dict(a, batches=pool.batches[i], lost=i in pool.lost, busy_s=busy[i]["busy_s"])
                             for i, a in enumerate(pool.info)]
        if reader is not None:
            report.read_task_seconds = reader.task_seconds
        changed = report.chunks_added or report.chunks_removed or report.deleted
        live = generations.current_name(data)
        if build and live is not None and not changed:
            from shoal.cluster.build import keyword_stale

            changed = keyword_stale(cfg, generations.read_manifest(generations.generations_dir(data) / live))
        needs_build = build and (changed or live is None)
        if needs_build and cat.get_meta("model") is not None:
            from shoal.cluster.build import build_generation

            with timed("build"):
                report.generation = build_generation(cfg, cat)
        else:
            report.generation = generations.current_name(data)
        status = "done"
    finally:
        report.seconds = time.perf_counter() - t0
        report.stages["scan"] = max(0.0, report.seconds - sum(v for k, v in report.stages.items() if k != "scan"))
        report.driver_cpu_seconds = time.process_time() - cpu0
        if pool.actors:
            pool.shutdown()
        cat.finish_run(run_id, status, report.as_dict())
    progress.tick(report, force=True)
    return report


def count_files(root: str, cfg: Config, data: Path) -> tuple[int, int]:
    """A quick (files, bytes) under ``root`` for the progress bar (names and sizes only, no reads)."""
    n = nbytes = 0
    if not os.path.isdir(root):
        return 1, _size(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(data)
                       and not any(fnmatch.fnmatch(d, p) for p in cfg.scan.ignore)]
        for f in filenames:
            if not any(fnmatch.fnmatch(f, p) for p in cfg.scan.ignore):
                n += 1
                nbytes += _size(os.path.join(dirpath, f))
    return n, nbytes


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def push_metrics(r: IngestReport, pushed: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Add what the report counted since the last push to the Ray counters.

    Ray starts lazily (on the first batch to embed), so the driver keeps its
    counts in the report and pushes deltas whenever Ray is up: the totals stay exact.
    """
    import ray

    if not ray.is_initialized():
        return pushed
    from shoal.workers.metrics import ingest_metrics

    m = ingest_metrics()
    p = pushed or {"files": 0, "bytes": 0, "skipped": Counter()}
    if r.files_seen > p["files"]:
        m.files_scanned.inc(r.files_seen - p["files"])
    if r.bytes_read > p["bytes"]:
        m.bytes_read.inc(r.bytes_read - p["bytes"])
    for reason, n in r.skipped.items():
        if n > p["skipped"][reason]:
            m.files_skipped.inc(n - p["skipped"][reason], tags={"reason": reason})
    return {"files": r.files_seen, "bytes": r.bytes_read, "skipped": Counter(r.skipped)}
