"""Read, parse and chunk changed files: in the driver, or as Ray tasks over the cluster's cores.

``prepare_files`` is the whole per-file step (read, sha256, parse PDF/HTML/text,
token-aware chunking). :class:`ReadPool` sends files to it in tasks of up to
``ingest.read_batch_files`` files / ``read_batch_bytes`` bytes, keeps at most
``read_workers`` x 2 tasks in flight, and hands results back strictly in the
order the files were submitted, so the commit order, chunk ids and resume are
exactly those of a single reader.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from shoal.workers.chunking import Chunk, InputSpec, chunk_with_ids, input_spec
from shoal.workers.embed import TokenBatch
from shoal.workers.scan import SkipFile, read_text_stat

_TOKENIZERS: dict[tuple[str, bool], Any] = {}  # one per worker process, loaded on its first task
_INPUTS: dict[tuple[str, bool, int], InputSpec] = {}
POLL_S = 0.05  # how often the driver looks for a finished read task between files
READER_NICENESS = 10  # default ingest.reader_niceness: readers run ahead (bounded), actors' torch threads first


@dataclass(frozen=True)
class ChunkSpec:
    model: str
    allow_download: bool
    tokens: int
    overlap: int
    max_file_bytes: int
    niceness: int = READER_NICENESS
    max_seq_length: int = 256  # model.max_seq_length: the chunks' input ids are cut there


@dataclass
class Prepared:
    """What reading one file gave: skipped (reason), the same bytes as committed (``same``), or chunks."""

    path: str
    digest: str = ""
    kind: str = ""
    chunks: Optional[list[Chunk]] = None
    tokens: Optional[TokenBatch] = None  # each chunk's model input ids (special tokens added)
    skip: Optional[tuple[str, str]] = None  # (reason, detail)
    same: bool = False
    seconds: float = 0.0
    size: int = -1  # size and mtime as read (the catalog records these: a write after the walk is seen next time)
    mtime_ns: int = -1


def tokenizer_for(model: str, allow_download: bool) -> Any:
    """The model's tokenizer for chunking: its tokenizer.json read by `tokenizers` (no transformers import,
    ~30 ms) where the model is a local folder that has one, else transformers' AutoTokenizer."""
    key = (model, allow_download)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from shoal.workers.embed import chunking_model_path

        path = chunking_model_path(model)
        if (Path(path) / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
        else:
            import transformers
            from transformers import AutoTokenizer

            transformers.utils.logging.set_verbosity_error()
            tok = AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir() or not allow_download)
        _TOKENIZERS[key] = tok
    return tok


def inputs_for(spec: ChunkSpec) -> InputSpec:
    """How this model's chunks become input ids: its template's special tokens, its input length."""
    from shoal.workers.embed import max_input_tokens

    key = (spec.model, spec.allow_download, spec.max_seq_length)
    got = _INPUTS.get(key)
    if got is None:
        tok = tokenizer_for(spec.model, spec.allow_download)
        got = _INPUTS[key] = input_spec(tok, max_input_tokens(spec.model, spec.max_seq_length, spec.allow_download))
    return got


def prepare_files(files: Sequence[tuple[str, Optional[str]]], spec: ChunkSpec) -> list[Prepared]:
    """(path, sha256 already committed or None) each -> Prepared, in order. Never raises for one bad file."""
    out = []
    for path, old_sha in files:
        t0 = time.perf_counter()
        try:
            text, kind, digest, st = read_text_stat(path, spec.max_file_bytes)
        except SkipFile as e:
            out.append(Prepared(path, skip=(e.reason, e.detail), seconds=time.perf_counter() - t0))
            continue
        if old_sha is not None and old_sha == digest:
            out.append(Prepared(path, digest, kind, same=True, seconds=time.perf_counter() - t0,
                                size=st.st_size, mtime_ns=st.st_mtime_ns))
            continue
        chunks, tokens = chunk_with_ids(text, tokenizer_for(spec.model, spec.allow_download), spec.tokens,
                                        spec.overlap, inputs_for(spec))
        out.append(Prepared(path, digest, kind, chunks, tokens, seconds=time.perf_counter() - t0,
                            size=st.st_size, mtime_ns=st.st_mtime_ns))
    return out




def niced_call(fn: Any, niceness: int) -> Any:
    """``fn()`` in a short-lived thread at ``niceness`` more than this one; the calling thread keeps its own.

    Linux keeps the nice value per thread. A read task runs in a pooled Ray worker that Ray may later
    hand an embedding actor: nicing the worker's main thread (os.nice) would leave that actor's torch
    threads at the readers' priority for good (seen: model loads of minutes under load). A thread of
    its own, niced, ends with the task.
    """
    if niceness <= 0:
        return fn()

    def run() -> Any:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        except OSError:
            pass
        return fn()

    with ThreadPoolExecutor(1, thread_name_prefix="shoal-reader") as pool:
        return pool.submit(run).result()  # an error in fn is raised here, as if called here


def _remote_prepare(files: Sequence[tuple[str, Optional[str]]], spec: ChunkSpec) -> list[Prepared]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # readers run ahead of the embedders (bounded): their thread gives way to an actor's torch threads
    return niced_call(lambda: prepare_files(files, spec), spec.niceness)


class ReadPool:
    """Files in, Prepared out in submission order; ``workers`` == 0 reads in the calling process."""

    def __init__(self, spec: ChunkSpec, workers: int, batch_files: int = 64, batch_bytes: int = 8 << 20,
                 num_cpus: float = 0.0) -> None:
        # Read tasks ask Ray for no CPU: ``workers`` bounds them (two each in flight), and a node whose
        # CPUs the embedding actors hold (2 cards, 2 cores) would otherwise never run one.
        self.spec, self.workers = spec, workers
        self.batch_files, self.batch_bytes = batch_files, batch_bytes
        self.num_cpus = num_cpus
        self.batch: list[tuple[str, Optional[str]]] = []
        self.batch_size = 0
        self.inflight: collections.deque = collections.deque()  # refs (or local results) in submission order
        self.ready: collections.deque = collections.deque()
        self.wait_seconds = 0.0  # the caller blocked on a result
        self.task_seconds = 0.0  # read + chunk time inside the readers (all of them)
        self.tasks = 0
        self._remote: Any = None
        self._polled = 0.0

    def submit(self, path: str, old_sha: Optional[str], size: int) -> None:
        self.batch.append((path, old_sha))
        self.batch_size += size
        if len(self.batch) >= self.batch_files or self.batch_size >= self.batch_bytes:
            self._send()

    def _send(self) -> None:
        if not self.batch:
            return
        files, self.batch, self.batch_size = self.batch, [], 0
        self.tasks += 1
        if self.workers == 0:
            res = prepare_files(files, self.spec)
            self.task_seconds += sum(p.seconds for p in res)
            self.ready.extend(res)
            return
        if self._remote is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # the files are paths on this node (the data node): readers run where they can open them
            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self._remote = ray.remote(num_cpus=self.num_cpus, max_retries=2)(_remote_prepare).options(
                scheduling_strategy=here)
        while len(self.inflight) >= 2 * self.workers:  # bounded: wait for the oldest
            self._take_oldest()
        self.inflight.append(self._remote.remote(files, self.spec))

    def _take_oldest(self) -> None:
        import ray

        t0 = time.perf_counter()
        res = ray.get(self.inflight.popleft())
        self.wait_seconds += time.perf_counter() - t0
        self.task_seconds += sum(p.seconds for p in res)
        self.ready.extend(res)

    def results(self, block: bool = False) -> Iterator[Prepared]:
        """Results in submission order: those already done (``block``: every submitted file)."""
        if block:
            self._send()
        while True:
            while self.ready:
                yield self.ready.popleft()
            if not self.inflight:
                return
            if not block:
                now = time.perf_counter()
                if now - self._polled < POLL_S:  # a ray.wait per file would cost the driver more than reading
                    return
                self._polled = now
                import ray

                done, _ = ray.wait([self.inflight[0]], num_returns=1, timeout=0)
                if not done:
                    return
            self._take_oldest()


def auto_workers(requested: int, embed_cpus: float) -> int:
    """``ingest.read_workers`` -> a count: -1 is this node's CPUs (readers run beside the files) minus the
    embedding actors' (at least 1)."""
    if requested >= 0:
        return requested
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), None)
    cpus = float((node or {}).get("Resources", {}).get("CPU", 0) or ray.cluster_resources().get("CPU", 1))
    return max(1, int(cpus - embed_cpus))


