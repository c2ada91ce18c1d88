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

from shoal.workers.catalog import Catalog, FileBatch, FileRow
from shoal.cluster.config import Config
from shoal.index import generations, layout, staging
from shoal.index.errors import IndexMismatchError, ShoalError

from shoal.workers.embed import EmbedSpec, TokenBatch
from shoal.workers.pool import EmbedPool, PoolSpec
from shoal.workers.reader import ChunkSpec, Prepared, ReadPool, auto_workers
from shoal.workers.scan import IN_MOTION, FileEntry, Skipped, display_path, ignore_matcher, walk

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
    chunks_added: int = 0  # embedded
    chunks_removed: int = 0
    chunks_copied: int = 0  # not embedded: the vectors of another file with the same bytes (a rename, a copy)
    copies: int = 0  # files whose vectors came from such a file
    in_motion: list[str] = field(default_factory=list)  # written or replaced while read: read again next time
    roots_missing: list[str] = field(default_factory=list)  # gone from disk: their files left the index
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
    embed_prep_cpu_seconds: float = 0.0  # the actors' CPU seconds outside the forward pass (padding, copying)
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
        for k in ("embed_seconds", "seconds", "read_task_seconds", "embed_busy_seconds", "driver_cpu_seconds",
                  "embed_prep_cpu_seconds"):
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
def data_dir_lock(data: Path, holder: str = "shoal ingest") -> Iterator[None]:
    """One writer per data dir: a second ingest/build fails fast instead of interleaving. The holder
    writes who it is (pid, what, since when) into the lock file, and the error names it."""
    data.mkdir(parents=True, exist_ok=True)
    with open(layout.lock(data), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            who = f.read().strip() or "another shoal ingest or build"
            hint = "; stop it first (`ray job stop`, or SIGTERM)" if "--watch" in who else "; wait for it to finish"
            raise ShoalError(f"{who} holds {layout.lock(data)}{hint}") from e
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{holder} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)

def lock_holder(data: Path) -> Optional[str]:
    """Who holds the data dir's write lock now (what it wrote there), or None where nobody does."""
    path = layout.lock(data)
    if not path.is_file():
        return None
    with open(path, "r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another shoal process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


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

def pool_spec(cfg: Config) -> PoolSpec:
    """The embedding actors' part of the config, as the plain data ``workers/`` takes."""
    m, e = cfg.model, cfg.embed
    return PoolSpec(EmbedSpec(m.name, m.device, m.max_seq_length, m.allow_download, m.batch_size, 0, e.gpu_dtype,
                              e.gpu_min_cosine, e.gpu_batch_tokens, e.gpu_batch_size),
                    e.cpu_actors, e.cpus_per_actor, e.threads_per_actor, e.max_in_flight)

def chunk_spec(cfg: Config) -> ChunkSpec:
    return ChunkSpec(cfg.model.name, cfg.model.allow_download, cfg.chunk.tokens, cfg.chunk.overlap_tokens,
                     int(cfg.scan.max_file_bytes), cfg.ingest.reader_niceness, cfg.model.max_seq_length)

def _check_model(cat: Catalog, pool: EmbedPool, cfg: Config) -> None:
    """The data dir's model is the actors' (or none yet); record it, with every dtype its vectors were made in."""
    info = pool.info[0]
    meta = {
        "name": info["model"], "fingerprint": info["fingerprint"], "dim": info["dim"],
        "max_seq_length": info["max_seq_length"],
        "chunk_tokens": cfg.chunk.tokens, "chunk_overlap_tokens": cfg.chunk.overlap_tokens,
    }
    raw = cat.get_meta("model")
    dtypes = set(pool.dtypes)
    if raw is not None:
        old = json.loads(raw)
        if old["fingerprint"] != meta["fingerprint"] and cat.counts()["chunks"] > 0:
            raise IndexMismatchError(
                f"this data dir was embedded with model {old['name']} ({old['fingerprint']}); the config asks for "
                f"{meta['name']} ({meta['fingerprint']}). Use another --data-dir for a different model."
            )
        if old["fingerprint"] == meta["fingerprint"] and cat.counts()["chunks"] > 0:
            dtypes |= set(old.get("dtypes", ["float32"]))  # written before dtypes were recorded: fp32
    meta["dtypes"] = sorted(dtypes)
    cat.set_meta("model", json.dumps(meta))

def ingest(paths: Sequence[str], cfg: Config, *, build: bool = True,
           out: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> IngestReport:
    """Bring the catalog and index in line with the files under ``paths``."""
    t0 = time.perf_counter()
    roots = resolve_roots(paths)
    with data_dir_lock(cfg.data_path):
        cat = Catalog(layout.catalog(cfg.data_path))
        try:
            return IngestRun(cfg, cat, roots, out, t0).run(build)
        finally:
            cat.close()

@dataclass
class RootPass:
    """One root's walk: what the catalog knew under it, what is there now, what was skipped, and the
    files sent to the readers whose results have not come back (in read order)."""

    root: str
    known: dict[str, FileRow]
    scope: Optional[list[str]] = None  # an update's paths under the root (None: all of it)
    seen: set[str] = field(default_factory=set)
    skips: list[Skipped] = field(default_factory=list)
    waiting: collections.deque = field(default_factory=collections.deque)  # (entry, committed row or None)

@dataclass
class Pending:
    """Files read and chunked, waiting to be embedded together: the next batch."""

    files: list[FileBatch] = field(default_factory=list)
    tokens: list[TokenBatch] = field(default_factory=list)
    chunks: int = 0

class Stopped(ShoalError):
    """A stop was asked for (SIGTERM, SIGINT): the run ends between two batches; what is committed stays."""


class IngestRun:
    """One ingest, as the pipeline's steps: walk each root -> read and chunk what changed (Ray tasks) ->
    embed in batches (the actors) -> commit each batch in order -> remove what is gone -> build.

    ``only`` (root -> paths under it): a watcher's update, which walks just those paths (a file, or a
    folder and what is under it) and removes only what is gone from under them. ``pool``: actors that
    outlive the run (the watcher's), else the run starts its own and stops them. ``stop``: asked between
    files and batches; true ends the run (Stopped) with nothing half-committed."""

    def __init__(self, cfg: Config, cat: Catalog, roots: list[str], out: Callable[[str], None], t0: float, *,
                 pool: Optional[EmbedPool] = None, only: Optional[dict[str, list[str]]] = None,
                 stop: Callable[[], bool] = lambda: False) -> None:
        self.cfg, self.cat, self.roots, self.out, self.t0 = cfg, cat, roots, out, t0
        self.only, self.stop = only, stop
        self.cpu0 = time.process_time()
        self.data = cfg.data_path
        self.stage = layout.staging(self.data)
        orphans = staging.remove_orphans(self.stage, cat.part_names())
        if orphans:
            log.info("removed %d uncommitted vector parts left by an interrupted run", len(orphans))
        run_id, prev = cat.start_run(roots)
        self.report = IngestReport(run_id=run_id, resumed_from=prev)
        self.timed = Stages(self.report.stages)
        if prev is not None:
            out(f"[ingest] run {prev} did not finish; resuming (committed files are kept)")
        self.own_pool = pool is None
        self.pool = EmbedPool(pool_spec(cfg), run=str(run_id)) if pool is None else pool
        sizes = [count_files(r, cfg, self.data) for r in roots] if only is None else []  # an update: no count
        self.progress = Progress(out, sum(n for n, _ in sizes), sum(b for _, b in sizes))
        self._reader: Optional[ReadPool] = None
        self._staged: Optional[staging.PartVectors] = None
        self.pending = Pending()

    # -- the pipeline --------------------------------------------------------------------------
    def run(self, build: bool) -> IngestReport:
        r = self.report
        status = "failed"
        try:
            for root in self.roots:
                self.ingest_root(root)
            self.collect_figures()
            r.generation = self.build() if build else generations.current_name(self.data)
            status = "done"
        except Stopped:
            status = "stopped"
            raise
        finally:
            r.seconds = time.perf_counter() - self.t0
            r.stages["scan"] = max(0.0, r.seconds - sum(v for k, v in r.stages.items() if k != "scan"))
            r.driver_cpu_seconds = time.process_time() - self.cpu0
            if self.own_pool and self.pool.actors:
                self.pool.shutdown()
            self.cat.finish_run(r.run_id, status, r.as_dict())
        self.progress.tick(r, force=True)
        return r

    def ingest_root(self, root: str) -> None:
        """Walk one root (or, for an update, the paths under it that changed): unchanged files are kept,
        changed ones read, embedded and committed; then the files that are gone leave the catalog and the
        skipped ones are recorded."""
        scope = None if self.only is None else self.only.get(root, [])
        if scope == []:
            return
        known: dict[str, FileRow] = {}
        for p in scope or [root]:
            known.update(self.cat.files_under(p))
        rp = RootPass(root, known, scope=scope)
        if not os.path.lexists(root):  # the whole root was deleted: its files are treated as deleted
            self.report.roots_missing.append(root)
            self.out(f"[ingest] {display_path(root)} is gone; its {len(known)} files leave the index")
            self.remove_gone(rp)
            return
        for item in walk([root], ignore=self.cfg.scan.ignore, max_file_bytes=self.cfg.scan.max_file_bytes,
                         follow_symlinks=self.cfg.scan.follow_symlinks, exclude_dirs=[str(self.data)], only=scope):
            if self.stop():
                raise Stopped("stopped while walking")
            self.walked(rp, item)
            self.progress.tick(self.report)
        if self._reader is not None:
            with self.timed("read_chunk"):
                done = list(self._reader.results(block=True))
            for p in done:
                self.take(rp, p)
        self.embed_pending()
        while self.pool.pending():
            self.wait_commit()
        self.remove_gone(rp)

    def walked(self, rp: RootPass, item: FileEntry | Skipped) -> None:
        """One entry of the walk: skipped, unchanged by size and mtime, or sent to the readers."""
        r = self.report
        r.files_seen += 1
        if isinstance(item, Skipped):
            rp.skips.append(item)
            r.skipped[item.reason] += 1
            r.bytes_done += _size(item.path)
            return
        rp.seen.add(item.path)
        old = rp.known.get(item.path)
        if old is not None and old.size == item.size and old.mtime_ns == item.mtime_ns:
            r.unchanged += 1
            r.bytes_done += item.size
            return
        reader = self.reader()
        rp.waiting.append((item, old))
        with self.timed("read_chunk"):
            reader.submit(item.path, old.sha256 if old is not None else None, item.size)
            done = list(reader.results())
        for p in done:
            self.take(rp, p)

    def take(self, rp: RootPass, p: Prepared) -> None:
        """A file the readers are done with: skipped, the same bytes as committed, or chunks to embed."""
        r = self.report
        item, old = rp.waiting.popleft()
        assert item.path == p.path, (item.path, p.path)
        if p.skip is not None:
            r.skipped[p.skip[0]] += 1
            r.bytes_done += item.size
            if p.skip[0] in IN_MOTION:  # never half-indexed: the committed version stays until a clean read
                r.in_motion.append(item.path)
                return
            rp.seen.discard(item.path)
            rp.skips.append(Skipped(item.path, *p.skip))
            return
        r.bytes_read += item.size
        size, mtime_ns = (p.size, p.mtime_ns) if p.size >= 0 else (item.size, item.mtime_ns)
        if p.same:
            self.cat.touch_file(item.path, size, mtime_ns)
            r.unchanged += 1
            r.bytes_done += item.size
            return
        if old is None:
            r.new += 1
        else:
            r.changed += 1
            r.chunks_removed += old.n_chunks
        if not p.chunks:
            rp.skips.append(Skipped(item.path, "empty", "no text content"))
            rp.seen.discard(item.path)
            r.bytes_done += item.size
            return
        assert p.tokens is not None
        fb = FileBatch(item.path, item.root, size, mtime_ns, p.digest, p.kind, p.chunks)
        if self.copied(fb):
            return
        self.pending.files.append(fb)
        self.pending.tokens.append(p.tokens)
        self.pending.chunks += len(p.chunks)
        if self.pending.chunks >= self.cfg.embed.batch_chunks:
            self.embed_pending()

    def copied(self, fb: FileBatch) -> bool:
        """A file with the same bytes as one already committed (a rename, a copy) takes that file's staged
        vectors: committed now, nothing embedded. False where there is none (or its vectors are not all
        found)."""
        ids = self.cat.chunks_with_digest(fb.sha256, len(fb.chunks), fb.path)
        if ids is None:
            return False
        if self._staged is None:
            self._staged = staging.PartVectors(self.stage, self.cat.parts())
        got, xb = self._staged.get(ids)
        if len(got) != len(ids):  # committed by this run, after the parts were listed
            self._staged = staging.PartVectors(self.stage, self.cat.parts())
            got, xb = self._staged.get(ids)
        if len(got) != len(ids):
            return False
        r = self.report
        with self.timed("commit"):
            dtype = self.cfg.index.staging_dtype
            self.cat.commit_files([fb], write_part=lambda new: staging.write_part(self.stage, new, xb, dtype))
        r.copies += 1
        r.chunks_copied += len(ids)
        r.bytes_done += fb.size
        return True

    def embed_pending(self) -> None:
        """Send the pending files' chunks to the actors as one batch of input ids (waiting for a free slot
        first: at most embed.max_in_flight batches per actor). Identical chunk texts are embedded once."""
        if not self.pending.files:
            return
        if self.stop():
            raise Stopped("stopped before the next batch")
        while self.pool.full():
            self.wait_commit()
        files, tokens = self.pending.files, TokenBatch.concat(self.pending.tokens)
        self.pending = Pending()
        if self.cfg.embed.dedup:  # identical chunks (boilerplate, copies, repeated lines) embed once
            texts = np.asarray([c.text for fb in files for c in fb.chunks], dtype=object)
            _, first, inverse = np.unique(texts, return_index=True, return_inverse=True)
            self.pool.submit(tokens.take(first), (files, inverse))
        else:
            self.pool.submit(tokens, (files, np.arange(len(tokens))))

    def wait_commit(self) -> None:
        with self.timed("embed_wait"):
            got = self.pool.wait_one()
        self.commit(*got)

    def commit(self, payload: tuple[list[FileBatch], np.ndarray], xb_unique: np.ndarray, secs: float) -> None:
        """The next batch in submission order: its chunk rows and vectors in one transaction."""
        r = self.report
        with self.timed("commit"):
            files, inverse = payload
            xb = xb_unique[inverse]
            if r.batches == 0 or self.cat.get_meta("model") is None:
                _check_model(self.cat, self.pool, self.cfg)
            dtype = self.cfg.index.staging_dtype
            self.cat.commit_files(files, write_part=lambda ids: staging.write_part(self.stage, ids, xb, dtype))
            r.bytes_done += sum(fb.size for fb in files)
            r.batches += 1
            r.chunks_added += len(xb)
            r.embed_seconds += secs
            if r.first_commit_s is None:
                r.first_commit_s = round(time.perf_counter() - self.t0, 3)
        self.progress.tick(r)

    def remove_gone(self, rp: RootPass) -> None:
        """Files the catalog had under the root that the walk did not find leave it (never what lies under a
        folder that could not be read this time); the root's skipped files are recorded afresh."""
        blind = tuple(s.path.rstrip("/") + "/" for s in rp.skips if s.reason == "unreadable-dir")
        moving = set(self.report.in_motion)
        gone = [p for p in rp.known if p not in rp.seen and p not in moving and not p.startswith(blind)]
        skipped_now = {s.path for s in rp.skips}
        self.report.deleted += sum(1 for p in gone if p not in skipped_now)
        self.report.chunks_removed += self.cat.delete_files(gone)
        self.cat.clear_skipped(rp.root, keep=moving, under=rp.scope)
        self.cat.record_skipped(rp.skips, rp.root, self.report.run_id)

    def build(self) -> Optional[str]:
        """A new generation where the catalog changed (or the keyword analysis did, or there is none yet)."""
        r, live = self.report, generations.current_name(self.data)
        changed = bool(r.chunks_added or r.chunks_copied or r.chunks_removed or r.deleted)
        if live is not None and not changed:
            from shoal.cluster.build import keyword_stale

            changed = keyword_stale(self.cfg, generations.read_manifest(generations.generations_dir(self.data) / live))
        if (changed or live is None) and self.cat.get_meta("model") is not None:
            from shoal.cluster.build import build_generation

            with self.timed("build"):
                return build_generation(self.cfg, self.cat)
        return live

    # -- helpers -------------------------------------------------------------------------------
    def reader(self) -> ReadPool:
        """Started on the first file to read, with the embedding actors: their models load while files are read."""
        if self._reader is None:
            from shoal.cluster.ray_env import init_ray

            workers = 0
            with self.timed("startup"):
                init_ray(self.cfg.ray.address, num_cpus=self.cfg.ray.num_cpus, num_gpus=self.cfg.ray.num_gpus)
                if not self.pool.actors:  # a watcher's pool is up already
                    self.pool.start()
                if self.cfg.ingest.read_workers:
                    workers = auto_workers(self.cfg.ingest.read_workers, self.pool.actor_cpus)
            self.report.read_workers = workers
            log.info("reading and chunking %s", f"in {workers} Ray task(s) at a time" if workers else "in the driver")
            self._reader = ReadPool(chunk_spec(self.cfg), workers, self.cfg.ingest.read_batch_files,
                                    int(self.cfg.ingest.read_batch_bytes))
        return self._reader

    def collect_figures(self) -> None:
        """What the actors and readers measured, into the report."""
        r = self.report
        if self.pool.actors:
            self.pool.ready()
            busy = self.pool.busy()
            r.embed_busy_seconds = sum(b["busy_s"] for b in busy)
            r.embed_prep_cpu_seconds = sum(b.get("prep_cpu_s", 0.0) for b in busy)
            r.actors = [dict(a, batches=self.pool.batches[i], lost=i in self.pool.lost, busy_s=busy[i]["busy_s"],
                             prep_cpu_s=busy[i].get("prep_cpu_s", 0.0))
                        for i, a in enumerate(self.pool.info)]
        if self._reader is not None:
            r.read_task_seconds = self._reader.task_seconds

def count_files(root: str, cfg: Config, data: Path) -> tuple[int, int]:
    """A quick (files, bytes) under ``root`` for the progress bar (names and sizes only, no reads)."""
    n = nbytes = 0
    if not os.path.isdir(root):
        return 1, _size(root)
    ignored = ignore_matcher(cfg.scan.ignore)
    for dirpath, dirnames, filenames in os.walk(root):
        rel = dirpath[len(root.rstrip(os.sep)) + 1:]
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(data)
                       and not ignored(d, os.path.join(rel, d) if rel else d)]
        for f in filenames:
            if not ignored(f, os.path.join(rel, f) if rel else f):
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
