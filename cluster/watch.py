"""`shoal ingest PATH... --watch`: after the first pass, the index follows the folders until stopped.

One thread per root collects changed paths: filesystem events (inotify, through watchfiles) or, where
events cannot be trusted (a network filesystem, a tree with more folders than
fs.inotify.max_user_watches, or ``ingest.watch: poll``), a poll of the tree. The main loop debounces:
an update starts once the roots have been quiet for ``ingest.watch_debounce_s`` (or
``watch_max_delay_s`` after its first change), and is the incremental ingest of just the paths that
changed (:class:`~shoal.cluster.ingest.IngestRun` with ``only``), on actors that stay up between
updates, ending in one delta generation. A full pass every ``ingest.rescan_interval_s`` catches what
events missed. SIGTERM/SIGINT end the watch between two batches; the data-dir lock is held throughout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from shoal.cluster.config import Config
from shoal.cluster.ingest import IngestReport, IngestRun, Stopped, data_dir_lock, pool_spec, resolve_roots
from shoal.index import layout
from shoal.workers.catalog import Catalog
from shoal.workers.scan import display_path, ignore_matcher

log = logging.getLogger(__name__)

# filesystems whose changes made elsewhere (another client, the host of a bind mount) raise no inotify event
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "afs",
              "ceph", "glusterfs", "fuse.glusterfs", "lustre", "gpfs", "beegfs", "virtiofs", "vboxsf", "fuse.gcsfuse"}
MAX_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


# -- how a root is watched ------------------------------------------------------------------------
def mount_fstype(path: str, mounts: str = "/proc/mounts") -> Optional[str]:
    """The filesystem type of the mount that holds ``path`` (the longest mount point above it)."""
    best, fstype = "", None
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def count_dirs(root: str, limit: int) -> int:
    """Folders under ``root`` (inotify watches one each), counted up to ``limit`` + 1."""
    n = 0
    for _, dirnames, _ in os.walk(root):
        n += len(dirnames)
        if n > limit:
            break
    return n + 1


def max_user_watches() -> Optional[int]:
    try:
        return int(MAX_WATCHES.read_text().strip())
    except (OSError, ValueError):
        return None


def choose_watch(root: str, asked: str, fstype: Optional[str], dirs: int, limit: Optional[int]) -> tuple[str, str]:
    """(``events`` | ``poll``, why) for one root. ``auto`` polls where events cannot be trusted."""
    if asked != "auto":
        return asked, f"ingest.watch is {asked}"
    if fstype in NETWORK_FS:
        return "poll", (f"{display_path(root)} is on a {fstype} filesystem, which does not report changes made "
                        "on other machines: polling it (ingest.watch: events to trust it anyway)")
    if limit is not None and dirs > limit:
        return "poll", (f"{display_path(root)} has more than {limit} folders, past fs.inotify.max_user_watches "
                        f"({limit}): polling it; raise the limit (sudo sysctl fs.inotify.max_user_watches="
                        f"{max(2 * dirs, 524288)}, and in /etc/sysctl.d/ to keep it) for events")
    return "events", "inotify events"


# -- what changed ---------------------------------------------------------------------------------
class Changes:
    """Changed paths per root, from the watcher threads, taken by the main loop as one update."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paths: dict[str, set[str]] = {}
        self.first_at: Optional[float] = None  # monotonic time of the oldest change not yet taken
        self.last_at = 0.0

    def add(self, root: str, paths: Sequence[str]) -> None:
        if not paths:
            return
        with self.cond:
            now = time.monotonic()
            self.paths.setdefault(root, set()).update(paths)
            self.first_at = self.first_at if self.first_at is not None else now
            self.last_at = now
            self.cond.notify_all()

    def add_in_motion(self, paths: Sequence[str], roots: Sequence[str]) -> None:
        """Files that were written while read: queued again (each under its root), for once they are quiet."""
        for p in paths:
            root = max((r for r in roots if p == r or p.startswith(r.rstrip("/") + "/")), key=len, default=None)
            if root is not None:
                self.add(root, [p])

    def queued(self) -> int:
        with self.cond:
            return sum(len(v) for v in self.paths.values())

    def wait(self, quiet_s: float, max_delay_s: float, timeout_s: float,
             stop: threading.Event) -> tuple[dict[str, list[str]], Optional[float]]:
        """The next update's paths once the roots were quiet ``quiet_s`` (or ``max_delay_s`` after its first
        change), with the time of its first change; ({}, None) after ``timeout_s`` with nothing, or on stop."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not stop.is_set():
                now = time.monotonic()
                if self.first_at is not None:
                    due = min(self.last_at + quiet_s, self.first_at + max_delay_s)
                    if now >= due:
                        taken, first = self.paths, self.first_at
                        self.paths, self.first_at = {}, None
                        return {r: sorted(p) for r, p in taken.items()}, first
                    self.cond.wait(min(due - now, 0.5))
                    continue
                if now >= deadline:
                    return {}, None
                self.cond.wait(min(deadline - now, 0.5))
        return {}, None


def change_filter(root: str, cfg: Config) -> Callable[[Any, str], bool]:
    """Events worth an update: not under the data dir (its own builds), not matched by the ignore globs."""
    ignored = ignore_matcher(cfg.scan.ignore)
    data = str(cfg.data_path.resolve()).rstrip("/") + "/"
    base = root.rstrip("/") + "/"

    def keep(_change: Any, path: str) -> bool:
        if path.startswith(data) or path + "/" == data:
            return False
        if not path.startswith(base):
            return True
        parts = path[len(base):].split("/")
        return not any(ignored(p, "/".join(parts[:i + 1])) for i, p in enumerate(parts))

    return keep


@dataclass
class RootWatch:
    """One root's watcher thread: events or polling, pushing changed paths into ``changes``."""

    root: str
    mode: str
    why: str
    cfg: Config
    changes: Changes
    stop: threading.Event
    out: Callable[[str], None]
    thread: Optional[threading.Thread] = None
    failed: Optional[str] = None
    gone: bool = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"shoal-watch-{os.path.basename(self.root)}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import watchfiles

        keep = change_filter(self.root, self.cfg)
        while not self.stop.is_set():
            if not os.path.lexists(self.root):
                if not self.gone:  # the whole root went: one update removes its files; then wait for it
                    self.gone = True
                    self.changes.add(self.root, [self.root])
                self.stop.wait(self.cfg.ingest.watch_poll_interval_s)
                continue
            if self.gone:  # it came back: an update walks it again
                self.gone = False
                self.changes.add(self.root, [self.root])
            poll = self.mode == "poll"
            try:
                for got in watchfiles.watch(self.root, watch_filter=keep, debounce=400, step=50, stop_event=self.stop,
                                            rust_timeout=1000, force_polling=poll, raise_interrupt=False,
                                            poll_delay_ms=int(self.cfg.ingest.watch_poll_interval_s * 1000),
                                            ignore_permission_denied=True):
                    self.changes.add(self.root, [p for _, p in got])
                    if not os.path.lexists(self.root):
                        break
            except Exception as e:  # noqa: BLE001 - a watcher that fails falls back to polling, never ends the watch
                if not os.path.lexists(self.root):
                    continue
                msg = f"{type(e).__name__}: {e}"
                if not poll:
                    self.mode, self.why = "poll", f"events failed ({msg}): polling"
                    self.out(f"[watch] warning: {display_path(self.root)}: events failed ({msg}); polling it every "
                             f"{self.cfg.ingest.watch_poll_interval_s:g} s (raise fs.inotify.max_user_watches if "
                             "that is the cause)")
                else:
                    self.failed = msg
                    log.warning("polling %s failed: %s; retrying", self.root, msg)
                    self.stop.wait(self.cfg.ingest.watch_poll_interval_s)
                self.changes.add(self.root, [self.root])  # what happened meanwhile: a pass over the root


# -- the watch ------------------------------------------------------------------------------------
@dataclass
class UpdateResult:
    report: IngestReport
    paths: int
    first_change: Optional[float]  # monotonic
    seconds_to_generation: Optional[float]


@dataclass
class Watch:
    """The first pass, then one update per debounced burst of changes, until ``stop`` is set."""

    cfg: Config
    roots: list[str]
    out: Callable[[str], None]
    stop: threading.Event = field(default_factory=threading.Event)
    on_update: Optional[Callable[[UpdateResult], None]] = None
    signals: bool = False  # SIGTERM/SIGINT set ``stop`` (installed once Ray is up: ray.init installs its own)
    updates: int = 0

    def run(self) -> int:
        with data_dir_lock(self.cfg.data_path, f"shoal ingest --watch {' '.join(self.roots)}"):
            cat = Catalog(layout.catalog(self.cfg.data_path))
            try:
                return self._run(cat)
            finally:
                cat.close()

    def _run(self, cat: Catalog) -> int:
        from shoal.cluster.ray_env import init_ray
        from shoal.workers.pool import EmbedPool

        init_ray(self.cfg.ray.address, num_cpus=self.cfg.ray.num_cpus, num_gpus=self.cfg.ray.num_gpus)
        if self.signals:
            stop_on_signals(self.stop, self.out)
        pool = EmbedPool(pool_spec(self.cfg), run="watch")
        changes = Changes()
        watchers = [self._watcher(r, changes) for r in self.roots]
        try:
            for w in watchers:  # before the first pass: a change made during it is the first update's
                w.start()
            pool.start()
            first = self._pass(cat, pool, None, None)
            if first is None:
                return 0
            self.out(f"[watch] first pass: {self._summary(first.report)}; generation {first.report.generation}; "
                     f"watching {len(self.roots)} root(s) ({', '.join(w.mode for w in watchers)})")
            self._loop(cat, pool, changes)
        finally:
            self.stop.set()
            for w in watchers:
                if w.thread is not None:
                    w.thread.join(timeout=5)
            if pool.actors:
                pool.shutdown()
        self.out(f"[watch] stopped after {self.updates} update(s); what was committed stays, the next start resumes")
        return 0

    def _watcher(self, root: str, changes: Changes) -> RootWatch:
        asked = self.cfg.ingest.watch
        limit = max_user_watches()
        dirs = count_dirs(root, limit) if asked == "auto" and limit is not None and os.path.isdir(root) else 0
        mode, why = choose_watch(root, asked, mount_fstype(root), dirs, limit)
        if mode == "poll" and asked == "auto":
            self.out(f"[watch] warning: {why}")
        log.info("watching %s: %s (%s)", root, mode, why)
        return RootWatch(root, mode, why, self.cfg, changes, self.stop, self.out)

    def _loop(self, cat: Catalog, pool: Any, changes: Changes) -> None:
        ing = self.cfg.ingest
        rescan_every = ing.rescan_interval_s or float("inf")
        next_rescan = time.monotonic() + rescan_every
        metrics = _WatchMetrics()
        while not self.stop.is_set():
            metrics.queue(changes.queued())
            only, first = changes.wait(ing.watch_debounce_s, ing.watch_max_delay_s,
                                       max(0.0, min(next_rescan - time.monotonic(), 60.0)), self.stop)
            if self.stop.is_set():
                return
            if not only and time.monotonic() < next_rescan:
                continue
            if not only:  # the periodic full pass
                next_rescan = time.monotonic() + rescan_every
            res = self._pass(cat, pool, only or None, first)
            if res is None:
                return
            metrics.update(res, changes.queued())
            if res.report.in_motion:  # written while read: read again once they are quiet
                changes.add_in_motion(res.report.in_motion, self.roots)
            if self.on_update is not None:
                self.on_update(res)

    def _pass(self, cat: Catalog, pool: Any, only: Optional[dict[str, list[str]]],
              first: Optional[float]) -> Optional[UpdateResult]:
        """One ingest over the roots (``only``: the changed paths); None where a stop ended it."""
        t0 = time.perf_counter()
        roots = self.roots if only is None else [r for r in self.roots if r in only]
        try:
            rep = IngestRun(self.cfg, cat, roots, self.out if only is None else (lambda s: None), t0, pool=pool,
                            only=only, stop=self.stop.is_set).run(build=True)
        except Stopped:
            return None
        took = time.monotonic() - first if first is not None else None
        res = UpdateResult(rep, sum(len(v) for v in (only or {}).values()), first, took)
        if only is not None:
            self.updates += 1
            fresh = f"; {took:.1f} s from the first change to generation {rep.generation}" if took is not None else ""
            self.out(f"[watch] update {self.updates}: {res.paths} changed path(s): {self._summary(rep)}{fresh}")
        for root in rep.roots_missing:
            self.out(f"[watch] warning: root {display_path(root)} is gone: its files were removed from the index; "
                     "watching for it to come back")
        return res

    @staticmethod
    def _summary(r: IngestReport) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(r.skipped.items())) or "none"
        copies = f", {r.copies} copied or renamed (no embedding)" if r.copies else ""
        return (f"{r.new} new, {r.changed} changed, {r.deleted} deleted{copies}; skipped: {skipped}; chunks +"
                f"{r.chunks_added} embedded, +{r.chunks_copied} reused, -{r.chunks_removed}")


class _WatchMetrics:
    """ray_shoal_watch_*: updates, files per update, seconds from the first change to the generation, queue."""

    def __init__(self) -> None:
        from shoal.workers.metrics import watch_metrics

        self.m = watch_metrics()

    def queue(self, n: int) -> None:
        self.m.queue.set(n)

    def update(self, res: UpdateResult, queued: int) -> None:
        r = res.report
        self.m.updates.inc()
        self.m.files_per_update.observe(r.new + r.changed + r.deleted)
        if res.seconds_to_generation is not None:
            self.m.freshness_s.observe(res.seconds_to_generation)
        self.m.queue.set(queued)


def stop_on_signals(stop: threading.Event, out: Callable[[str], None]) -> None:
    """SIGTERM (`ray job stop`, systemd, docker stop) and SIGINT (Ctrl-C) set ``stop``: the watch ends
    between two batches. A second SIGINT stops at once (KeyboardInterrupt); what is committed stays."""
    import signal

    def ask_stop(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        out(f"[watch] {signal.Signals(signum).name}: stopping after the batch in flight")
        stop.set()

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)


def watch(paths: Sequence[str], cfg: Config, out: Callable[[str], None],
          stop: Optional[threading.Event] = None,
          on_update: Optional[Callable[[UpdateResult], None]] = None, signals: bool = False) -> int:
    """`shoal ingest PATH... --watch`: the first pass, then follow the roots until ``stop`` is set
    (``signals``: by SIGTERM/SIGINT too)."""
    w = Watch(cfg, resolve_roots(paths), out, stop or threading.Event(), on_update, signals)
    return w.run()
