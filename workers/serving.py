"""Ray Serve deployments that do the query work: encode, search a shard group, re-rank.

Each one loads what it needs itself (model from its directory, shards from the
data dir); nothing large goes through ``.bind()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from ray import serve

log = logging.getLogger(__name__)


class MicroBatcher:
    """Concurrent single calls share one pass of ``fn`` (a list in, a list out, in order), run on a thread
    of its own. A lone call runs at once; the calls that come in while a pass runs wait, and all of them
    (up to ``max_batch``) make the next pass. (``@serve.batch`` forms a new batch as soon as it hands one
    to the function, so with no wait every query ran alone; with a wait, a lone query pays it.)
    ``wait_s`` > 0 also holds a pass that far for company."""

    def __init__(self, fn: Any, max_batch: int = 32, wait_s: float = 0.0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-batch")

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def run(self, items: list[Any]) -> list[Any]:
        """A whole list in one pass of its own (a batch request), on the same thread as the others."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.fn, items)

    async def _drain(self) -> None:
        try:
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                try:
                    out = await self.run([item for item, _ in batch])
                except BaseException as e:  # noqa: BLE001 - every caller of the pass gets its error
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), result in zip(batch, out):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self.running = False


class BatchedEncoder:
    """Embeds queries with a model of its own: concurrent single queries share one forward pass
    (:class:`MicroBatcher`), run off the event loop. Lives in the Ingress (``serve.encoder: ingress``) or in
    the QueryEncoder deployment; the same code either way."""

    def __init__(self, model_name: str, max_seq_length: int, device: str, allow_download: bool,
                 threads: int = 0, runtime: str = "auto") -> None:
        from shoal.workers.query_model import load_query_model

        self.qm = load_query_model(model_name, max_seq_length=max_seq_length, allow_download=allow_download,
                                   threads=threads, runtime=runtime, device=device)  # type: ignore[arg-type]
        self.batch_sizes: deque[int] = deque(maxlen=2000)
        self.forward_ms: deque[float] = deque(maxlen=2000)  # each pass, tokenizing included, on its thread
        self.passes = 0  # forward passes run (a test counts them)
        self.batcher = MicroBatcher(self._encode)

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Batch size and wait time change without a redeploy."""
        self.batcher.max_batch, self.batcher.wait_s = int(max_batch_size), float(batch_wait_timeout_s)

    def _encode(self, texts: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        xq = self.qm.encode(texts, batch_size=max(len(texts), 1))
        self.forward_ms.append((time.perf_counter() - t0) * 1000)
        self.batch_sizes.append(len(texts))
        self.passes += 1
        return xq

    async def encode_one(self, text: str) -> np.ndarray:
        """(d,) for one query; concurrent calls share a pass."""
        return await self.batcher(text)

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """One forward pass for a whole batch request: (n, d)."""
        return await self.batcher.run(list(texts))

    def info(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {"model": self.qm.name, "fingerprint": self.qm.fingerprint, "device": self.qm.device,
                "runtime": self.qm.runtime, "dim": self.qm.dim, "pid": os.getpid(), "passes": self.passes,
                "mean_batch": float(np.mean(sizes)) if sizes else 0.0, "batches": len(sizes),
                "forward_ms": percentiles(list(self.forward_ms))}


@serve.deployment(name="QueryEncoder")
class QueryEncoder:
    """The query encoder as a deployment of its own: where it gets a GPU (``serve.encoder: deployment``)."""

    def __init__(self, model_name: str, max_seq_length: int, device: str, allow_download: bool,
                 threads: int = 0, runtime: str = "auto") -> None:
        self.enc = BatchedEncoder(model_name, max_seq_length, device, allow_download, threads, runtime)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.enc.configure(user_config.get("max_batch_size", 32), user_config.get("batch_wait_timeout_s", 0.0))

    async def encode_one(self, text: str) -> np.ndarray:
        return await self.enc.encode_one(text)

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        return await self.enc.encode_many(texts)

    def info(self) -> dict[str, Any]:
        return {"where": "deployment", **self.enc.info()}


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """Holds shard group ``group`` of the live generation, on whatever node Serve put it.

    The data node announces generations (``datanode``, the DataNode deployment):
    where this node sees the data dir at the same path the files are used in
    place; elsewhere exactly this group's files are copied into the node-local
    cache (serve.cache_dir) in bounded chunks and checked against the manifest.
    A new generation is loaded completely, then one reference is swapped:
    requests in flight finish on the old one, none is dropped, and a generation
    whose files do not verify is refused while the old one keeps serving.
    Without ``datanode`` (a single process) it follows CURRENT in the data dir.
    """

    def __init__(self, data_dir: str, group: int, n_groups: int, reload_interval_s: float,
                 refine_k_factor: float, omp_threads: int = 1, datanode: Any = None,
                 cache_dir: Optional[str] = None, chunk_bytes: int = 8 << 20) -> None:
        import faiss

        from shoal.workers.datanode import where

        faiss.omp_set_num_threads(max(1, omp_threads))
        self.data = Path(data_dir)
        self.group, self.n_groups = group, n_groups
        self.refine_k_factor = refine_k_factor
        self.datanode, self.cache_dir, self.chunk_bytes = datanode, cache_dir, int(chunk_bytes)
        self.reload_interval_s = reload_interval_s
        self.where = where()
        self.name = f"ShardSearcher{group}"
        self.current: Optional[tuple[str, Any, dict[str, Any]]] = None  # (name, LoadedGeneration, manifest)
        self.load_error: Optional[str] = None
        self.source = ""  # "in place" or the cache folder it was copied to
        self.last_copy: dict[str, Any] = {}
        self.refused: tuple[str, float] = ("", 0.0)  # a generation whose files did not verify, and when
        self._cache: Any = None
        if datanode is None:
            self._reload_local()
        else:
            ann = _off_loop(lambda: datanode.current.remote().result(timeout_s=120))
            _off_loop(lambda: self._apply(ann))
        if self.current is None:
            raise RuntimeError(f"{self.name} on node {self.where['node_ip']}: {self.load_error}")
        if reload_interval_s > 0:
            threading.Thread(target=self._watch if datanode is not None else self._poll_local,
                             daemon=True).start()

    # -- following the data node -----------------------------------------------------------
    def _apply(self, ann: dict[str, Any]) -> bool:
        """Load the announced generation (in place, or copied and verified); keep serving on failure."""
        import json

        from shoal.index import generations
        from shoal.index.search import LoadedGeneration
        from shoal.index.sync import group_files, visible_in_place

        name = ann.get("generation")
        if name is None:
            self.load_error = f"the data node ({ann.get('data_dir')}) has no index generation yet"
            return False
        if self.current is not None and self.current[0] == name:
            return False
        try:
            manifest = json.loads(ann["manifest"])
            files = group_files(manifest, self.group, self.n_groups)
            gen_dir = visible_in_place(self.data, name, ann["manifest_sha256"])
            if gen_dir is not None:
                generations.verify(gen_dir, manifest, files)
                source = "in place"
            else:
                cache = self._the_cache(ann)
                cache.prune({name} | ({self.current[0]} if self.current else set()))
                got = cache.fetch(name, ann["manifest"], files, self._reader(name, manifest),
                                  chunk_bytes=self.chunk_bytes)
                gen_dir, source = got.gen_dir, f"copied to {got.gen_dir.parent}"
                self.last_copy = {"generation": name, "files": len(files), "bytes": got.bytes,
                                  "seconds": round(got.seconds, 3), "copied": got.copied}
            gen = LoadedGeneration(gen_dir, manifest, group=self.group, n_groups=self.n_groups,
                                   k_factor=self.refine_k_factor)
        except Exception as e:  # keep serving the last good generation
            from shoal.index.errors import ShoalError

            kind = "" if isinstance(e, ShoalError) else f"{type(e).__name__}: "  # ours name the problem already
            self.load_error = f"cannot load generation {name}: {kind}{str(e)[:300]}"
            self.refused = (name, time.monotonic())
            log.error("%s: %s; still serving %s", self.name, self.load_error, self.current[0] if self.current else None)
            return False
        old = self.current
        self.current = (name, gen, manifest)
        self.source, self.load_error, self.refused = source, None, ("", 0.0)
        if self._cache is not None:
            self._cache.prune({name} | ({old[0]} if old else set()))
        log.info("%s now serves generation %s (%s, %s)", self.name, name, source, gen.devices)
        return True

    def _the_cache(self, ann: dict[str, Any]) -> Any:
        from shoal.index.sync import GenerationCache, data_key
        from shoal.workers.datanode import cache_root

        if self._cache is None:
            self._cache = GenerationCache(cache_root(self.cache_dir), data_key(ann["data_node"], ann["data_dir"]))
        return self._cache

    def _reader(self, name: str, manifest: dict[str, Any]) -> Any:
        return datanode_reader(self.datanode, name, manifest, self.chunk_bytes)

    def _watch(self) -> None:
        """Long-poll the data node for the next generation (it announces; this never reads its files)."""
        while True:
            try:
                known = self.current[0] if self.current else None
                name, when = self.refused
                if name and time.monotonic() - when < 30:
                    known = name  # a refused generation is tried again after 30 s, or when a newer one comes
                ann = self.datanode.wait_generation.remote(known, 10.0, self._report()).result(timeout_s=40)
                if ann.get("generation") not in (None, known):
                    self._apply(ann)
            except Exception as e:  # noqa: BLE001 - the data node may be restarting: try again
                log.warning("%s: no announcement from the data node: %s", self.name, str(e)[:200])
                time.sleep(max(self.reload_interval_s, 1.0))

    # -- a single process: follow CURRENT ---------------------------------------------------
    def _reload_local(self) -> bool:
        from shoal.index import generations
        from shoal.index.search import LoadedGeneration

        try:
            name = generations.current_name(self.data)
            if name is None:
                raise FileNotFoundError(f"no generation in {self.data}")
            if self.current is not None and self.current[0] == name:
                return False
            gen_dir, m = generations.open_current(self.data)
            generations.verify(gen_dir, m)
            gen = LoadedGeneration(gen_dir, m, group=self.group, n_groups=self.n_groups,
                                   k_factor=self.refine_k_factor)
        except Exception as e:  # keep serving the last good generation
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("shard group %d: cannot load the new generation, still serving %s: %s", self.group,
                      self.current[0] if self.current else None, self.load_error)
            return False
        self.current = (m["generation"], gen, m)
        self.source, self.load_error = "in place", None
        log.info("shard group %d now serves generation %s (%s)", self.group, m["generation"], gen.devices)
        return True

    def _poll_local(self) -> None:
        while True:
            time.sleep(self.reload_interval_s)
            self._reload_local()

    # -- serving ---------------------------------------------------------------------------
    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError(f"shard group {self.group} has no generation loaded")

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, str]:
        """D, I of size (nq, k) from this group, and the generation that answered."""
        if self.current is None:
            raise RuntimeError(f"shard group {self.group} has no generation loaded")
        name, gen, _m = self.current  # one reference read: a swap mid-request cannot mix generations
        D, I = gen.search(xq, k, allowed, nprobe=nprobe)  # per-call parameters: safe in Serve's thread pool
        return D, I, name

    def _report(self) -> dict[str, Any]:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve
            replica = str(os.getpid())
        name, gen, _m = self.current if self.current else (None, None, None)
        return {"deployment": self.name, "replica": replica, "group": self.group, "generation": name,
                "shards": gen.shard_files if gen else [], "devices": gen.devices if gen else [],
                "source": self.source, "load_error": self.load_error, **self.where}

    def info(self) -> dict[str, Any]:
        name, gen, m = self.current  # type: ignore[misc]
        return {"group": self.group, "generation": name, "nprobe": gen.nprobe, "shards": gen.shard_files,
                "devices": gen.devices,
                "ntotal": int(gen.main.ntotal), "delta": int(gen.delta.ntotal) if gen.delta is not None else 0,
                "deleted": int(len(gen.deleted)), "pid": os.getpid(), "load_error": self.load_error,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "source": self.source, "last_copy": self.last_copy, **self.where}


def datanode_reader(datanode: Any, name: str, manifest: dict[str, Any], chunk: int, depth: int = 4) -> Any:
    """read(file, offset, size) over the DataNode deployment, ``depth`` chunks requested ahead (the
    object store carries them while the previous one is hashed and written)."""
    sizes = {f: int(m["bytes"]) for f, m in manifest["files"].items()}
    pending: dict[tuple[str, int], Any] = {}

    def read(fname: str, offset: int, size: int) -> bytes:
        for j in range(depth):
            o = offset + j * chunk
            if o >= sizes[fname]:
                break
            if (fname, o) not in pending:
                pending[(fname, o)] = datanode.read.remote(name, fname, o, min(chunk, sizes[fname] - o))
        return pending.pop((fname, offset)).result(timeout_s=120)

    return read


def _off_loop(fn: Any) -> Any:
    """Run ``fn`` where blocking on a DeploymentHandle is allowed: not on a thread running an event loop
    (a replica's constructor may run on one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(fn).result()


@serve.deployment(name="Reranker")
class Reranker:
    """Re-scores (query, chunk) pairs with the cross-encoder in serve.rerank_model (deployed only then)."""

    def __init__(self, cross_encoder: str, allow_download: bool, device: str = "auto") -> None:
        from shoal.workers.rerank import CrossEncoder

        self.ce = CrossEncoder(cross_encoder, allow_download=allow_download, device=device)

    def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        """A score per text, higher is better."""
        return self.ce.score(query, texts) if texts else []

    def info(self) -> dict[str, Any]:
        return {"model": self.ce.name, "device": self.ce.device, "pid": os.getpid()}


class GroupHealth:
    """Which shard groups answer, as the Ingress last saw them.

    A call to a group that fails or times out marks it down at once: the next
    requests skip it (a 503 naming it, or a partial answer) instead of waiting
    out ``serve.shard_timeout_s`` again; a background probe marks it up as soon
    as a replica answers. Times are wall clock (shown by /healthz and /stats).
    """

    def __init__(self, n_groups: int) -> None:
        now = time.time()
        self.state: list[dict[str, Any]] = [{"group": g, "state": "up", "since": now, "reason": ""}
                                            for g in range(n_groups)]

    def down(self) -> list[int]:
        return [s["group"] for s in self.state if s["state"] == "down"]

    def mark_down(self, group: int, reason: str) -> None:
        s = self.state[group]
        if s["state"] != "down":
            s.update(state="down", since=time.time(), reason=reason[:300])
            log.warning("shard group %d marked down: %s", group, reason[:300])
        else:
            s["reason"] = reason[:300]

    def mark_up(self, group: int) -> None:
        s = self.state[group]
        if s["state"] != "up":
            log.info("shard group %d is up again (down %.1f s)", group, time.time() - s["since"])
            s.update(state="up", since=time.time(), reason="")

    def why(self, group: int) -> str:
        s = self.state[group]
        return f"marked down {time.time() - s['since']:.1f} s ago ({s['reason']})"

    def report(self) -> list[dict[str, Any]]:
        now = time.time()
        return [dict(s, for_s=round(now - s["since"], 1)) for s in self.state]


async def probe_groups(health: GroupHealth, calls: Sequence[Any], interval_s: float, timeout_s: float) -> None:
    """Forever: every ``interval_s`` ask each group that is marked down for its info (``calls[g]()``, at
    most ``timeout_s``), and mark it up when a replica answers."""
    while True:
        await asyncio.sleep(interval_s)
        down = health.down()
        if not down:
            continue
        got = await gather_groups([calls[g] for g in down], timeout_s)
        for g, r in zip(down, got):
            if not isinstance(r, BaseException):
                health.mark_up(g)


async def gather_groups(calls: Sequence[Any], timeout_s: float, retry_after_s: float = 0.05) -> list[Any]:
    """Await every group's response together, all within ``timeout_s``; an exception stands in for a
    group that failed. ``calls`` are zero-argument functions making the call: one that fails because
    its replica died is made again while time is left (Serve then routes it to another replica), each
    retry bounded to a few seconds so a retry stuck on a dead replica does not use up the rest."""
    from ray.exceptions import RayActorError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def one(make: Any) -> Any:
        err: BaseException = TimeoutError(f"no answer within {timeout_s:g} s")
        pause, first = retry_after_s, True
        while (left := deadline - loop.time()) > 0:
            try:
                return await bounded(make(), left if first else min(left, max(1.0, timeout_s / 4)))
            except TimeoutError as e:
                err = e
                if first:
                    return TimeoutError(f"no answer within {timeout_s:g} s")
            except Exception as e:  # noqa: BLE001 - reported per group by the caller
                if not isinstance(e, RayActorError):
                    return e  # the replica answered with an error: asking again would not change it
                err = e
            first = False
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 4, 1.0)
        return err

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def bounded(awaitable: Any, timeout_s: float) -> Any:
    """``await awaitable`` for at most ``timeout_s``: unlike asyncio.wait_for, it does not wait for the
    cancelled call to wind down (a call to a dead replica may take long to)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception was never retrieved"
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "n": 0}
    a = np.asarray(samples)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": int(len(a))}

