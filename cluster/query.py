"""One query path for the CLI, the HTTP app and the evaluator.

validate -> encode -> dense / keyword / hybrid -> fuse -> filter -> hits (-> re-rank)

:class:`QueryCore` does all of it once; what differs between the in-process
searcher and the Serve app is behind a small :class:`Backend` (encode the
queries, search the vectors, re-rank), so the two paths cannot drift apart.
The core is async: blocking work (SQLite, BM25, fusion) runs in threads, so an
HTTP ingress only ever awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, Optional, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from shoal.cluster.config import Config
from shoal.index.errors import Conflict, NotFound, QueryError, ShoalError, Unavailable  # noqa: F401 - the core's errors
from shoal.workers.catalog import CatalogReader, Hit, group_by_file

MAX_K = 1000
MAX_QUERY_CHARS = 4096
MAX_NPROBE = 65536
FileType = Literal["text", "markdown", "rst", "code", "data", "html", "pdf"]
Mode = Literal["dense", "keyword", "hybrid"]
Group = Literal["chunk", "file"]
MAX_GROUP_CHUNKS = 2000  # chunks looked at for a per-file answer, at most


# -- the request model: the one contract of the CLI, the HTTP API and the evaluator ---------------
def _json_int(v: Any) -> Any:
    """JSON Schema's integer: 10 and 10.0, not "10" (the model is strict otherwise)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def json_int(ge: int, le: int) -> Any:
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_json_int)]


class SearchOptions(BaseModel):
    """What a single and a batch search share."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "10" is not a number: what the schema says
    k: json_int(1, MAX_K) = Field(10, description="hits to return")  # type: ignore[valid-type]
    nprobe: Optional[json_int(1, MAX_NPROBE)] = Field(  # type: ignore[valid-type]
        None, description="IVF lists to visit (default: the index's)")
    rerank: bool = Field(False, description="re-score the top candidates with the cross-encoder (serve.rerank_model)")
    path_prefix: Optional[str] = Field(None, max_length=4096,
                                       description="only files whose path starts with this (empty: no filter)")
    file_type: Optional[list[FileType]] = Field(None, description="only these kinds of file")
    allow_partial: bool = Field(False, description="answer from the shard groups that respond, flagged partial")
    full: bool = Field(False, description="whole chunk texts instead of snippets")
    mode: Optional[Mode] = Field(None, description="dense, keyword or hybrid (default: query.mode)")
    group: Group = Field("chunk", description="chunk: k passages; file: k files, each with its best passage "
                                              "and its other matching passages (ids, offsets, scores)")
    highlight: bool = Field(False, description="where the query's terms are in each text (always with group file)")
    feedback: Optional[Literal["none", "dense"]] = Field(
        None, description="dense: look twice, the query vector moved toward the first answer's top chunks "
                          "(default: query.feedback)")


# "Blank" as JSON Schema means it: ECMA-262's whitespace, spelled out so that the schema's pattern,
# pydantic's Rust regex and this strip agree (each engine's own \s differs, e.g. on U+0085).
ECMA_SPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = r"[^\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def _clean(q: Any, where: str) -> Any:
    """Strip a query before the constraints apply; a blank one is refused by name (other types fall through)."""
    if not isinstance(q, str):
        return q
    s = q.strip(ECMA_SPACE)
    if not s:
        raise ValueError(f"empty query in {where}: type some words to search for")
    return s


QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK)]


class SearchRequest(SearchOptions):
    q: QueryText = Field(description="the query (not blank)")

    @field_validator("q", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return _clean(v, "q")


class BatchRequest(SearchOptions):
    queries: list[QueryText] = Field(min_length=1, description="the queries (each not blank)")

    @field_validator("queries", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return [_clean(q, f"queries[{i}]") for i, q in enumerate(v)] if isinstance(v, list) else v


SEARCH_PARAMS = set(SearchRequest.model_fields)


def field_errors(e: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as the API's 422 items: {field, msg, type}."""
    return [{"field": ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query")),
             "msg": err.get("msg", ""), "type": err.get("type", "")} for err in e.errors()]


def validate(queries: Sequence[str], **opts: Any) -> BatchRequest:
    """The request model, from plain arguments (the CLI and the evaluator); QueryError names the field."""
    try:
        return BatchRequest(queries=list(queries), **{k: v for k, v in opts.items() if v is not None})
    except ValidationError as e:
        raise QueryError(field_errors(e)) from None


# -- results ---------------------------------------------------------------------------------------
@dataclass
class DenseResult:
    """D, I of size (nq, k) merged over the shard groups that answered; the generation; groups missing."""

    D: np.ndarray
    I: np.ndarray
    generation: Optional[str]
    missing: list[int] = field(default_factory=list)


@dataclass
class Answer:
    hits: list[list[Hit]]
    mode: str
    generation: Optional[str]
    missing: list[int] = field(default_factory=list)
    feedback: Optional[str] = None  # "dense" where some query looked twice

    @property
    def partial(self) -> bool:
        return bool(self.missing)


class Backend(Protocol):
    """Where the in-process searcher and the Serve app differ."""

    async def encode(self, queries: list[str]) -> np.ndarray: ...

    async def dense(self, xq: np.ndarray, k: int, opts: SearchOptions,
                    allowed: Optional[np.ndarray]) -> DenseResult: ...

    async def rerank(self, query: str, texts: list[str]) -> list[float]: ...

    def serving_generation(self) -> Optional[str]:
        """The generation this backend answers from; None: whatever CURRENT names."""
        ...


# -- the core --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How many candidates a request needs: ``want`` hits (more where a re-ranker re-scores them), ``fetch``
    from the fused list (ids the catalog dropped are skipped), ``side`` from each side before fusing."""

    mode: str
    want: int
    fetch: int
    side: int

    @classmethod
    def of(cls, opts: SearchOptions, cfg: Config, widen: int = 1) -> "Plan":
        """``widen``: a per-file answer that found fewer than k files asks again for that many times more."""
        mode = opts.mode or cfg.query.mode
        want = max(opts.k, cfg.serve.rerank_candidates) if opts.rerank else opts.k
        if opts.group == "file":  # k files: some chunks of each, so many more chunks than k
            want = min(MAX_GROUP_CHUNKS, max(want, opts.k * 8, 50) * widen)
        fetch = want + 16
        return cls(mode, want, fetch, max(fetch, cfg.query.fusion_candidates) if mode == "hybrid" else fetch)


OVERLAPPED = ("keyword_search",)  # stages that run beside others: not part of a request's sum


class StageTimes:
    """Where queries' time goes (/stats): the last 2,000 of each stage, and running sums of every stage and
    of the whole (``total``), so that the sequential stages can be checked to add up."""

    def __init__(self) -> None:
        self.recent: dict[str, deque[float]] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def record(self, stage: str, ms: float) -> None:
        self.recent.setdefault(stage, deque(maxlen=2000)).append(ms)
        self.sums[stage] = self.sums.get(stage, 0.0) + ms
        self.counts[stage] = self.counts.get(stage, 0) + 1


class Clock:
    """A request's time cut into stages that follow each other: ``clock("dense")`` books the time since the
    last mark; ``clock.done()`` books the whole as ``total``. The stages of one request add up to it."""

    def __init__(self, times: StageTimes) -> None:
        self.times, self.t0 = times, time.perf_counter()
        self.t = self.t0

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.times.record(stage, (now - self.t) * 1000)
        self.t = now

    def done(self) -> None:
        self.times.record("total", (time.perf_counter() - self.t0) * 1000)


class QueryCore:
    """validate -> encode -> dense / keyword / hybrid -> fuse -> filter -> hits, for any Backend.

    The catalog (SQLite) and the keyword index are read here, on the data
    node, from threads; one lock keeps the catalog connection to one user at a time.
    """

    def __init__(self, cfg: Config, backend: Backend, *, offload: bool = True, remote: Any = None) -> None:
        """``offload``: run blocking work in threads (a server's event loop must not block); the CLI
        runs it inline, where a fresh thread per call would only rebuild torch's and FAISS's thread teams.
        ``remote``: a handle to the DataNode deployment, for a core that is not on the data node."""
        self.cfg, self.backend, self.offload, self.remote = cfg, backend, offload, remote
        self.reader = CatalogReader(cfg.data_path)
        self.stages = StageTimes()  # where a query's time goes, hop by hop (/stats)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args) if self.offload else fn(*args)

    def stage_percentiles(self) -> dict[str, dict[str, Any]]:
        """Per stage: p50/p99/mean of the last 2,000, the running sum (ms) and count, and whether it overlaps
        others."""
        out: dict[str, dict[str, Any]] = {}
        for stage, d in self.stages.recent.items():
            a = np.asarray(d)
            out[stage] = {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
                          "mean": round(float(a.mean()), 3), "n": int(len(a)),
                          "sum_ms": round(self.stages.sums[stage], 3), "count": self.stages.counts[stage],
                          "overlapped": stage in OVERLAPPED}
        return out

    # the catalog and the keyword index: read here (on the data node) or through the DataNode deployment
    def catalog(self) -> Any:
        return self.reader.catalog()

    def keyword_index(self, generation: Optional[str]) -> Any:
        return self.reader.keyword_index(generation)[1]

    async def _ids_matching(self, prefix: Optional[str], types: Any) -> np.ndarray:
        if self.remote is not None:
            return await self.remote.ids_matching.remote(prefix, types)
        return await self._run(self.reader.ids_matching, prefix, types)

    async def _keyword(self, generation: Optional[str], queries: list[str],
                       n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
        if self.remote is not None:
            return await self.remote.keyword_search.remote(generation, queries, n)
        return await self._run(self.reader.keyword_search, generation, queries, n)

    async def _hits(self, D: np.ndarray, I: np.ndarray, n: int) -> list[list[Hit]]:
        if self.remote is not None:
            return await self.remote.hits.remote(D, I, n)
        return await self._run(self.reader.hits, D, I, n)

    async def counts(self) -> dict[str, Any]:
        if self.remote is not None:
            return await self.remote.counts.remote()
        return await self._run(self.reader.counts)

    async def data_health(self) -> dict[str, Any]:
        """Can the catalog and the keyword index of the live generation answer? Raises if not."""
        if self.remote is not None:
            return await self.remote.health.remote()
        return await self._run(self.reader.health)

    # the path
    async def search(self, queries: list[str], opts: SearchOptions) -> Answer:
        """Hits for already validated queries (a SearchRequest/BatchRequest did that):
        filter -> (encode -> dense) beside keyword -> fuse -> catalog -> re-rank."""
        if opts.rerank and not self.cfg.serve.rerank_model:
            from shoal.workers.rerank import RERANK_OFF

            raise Conflict(RERANK_OFF)
        clock = Clock(self.stages)
        allowed = None
        if opts.path_prefix or opts.file_type:
            allowed = await self._ids_matching(opts.path_prefix or None, opts.file_type)
            clock("filter")
        widen = 1
        while True:
            plan = Plan.of(opts, self.cfg, widen)
            dense, kw, mode, xq = await self._sides(queries, opts, plan, allowed, clock)
            D, I = await self._fused(dense, kw, plan, allowed, clock)
            looked = False
            if (opts.feedback or self.cfg.query.feedback) == "dense" and dense is not None and xq is not None:
                D, I, dense, looked = await self._look_twice(xq, dense, kw, D, I, plan, opts, allowed, clock)
            hits = await self._hits(D, I, plan.want)
            clock("catalog")
            if opts.group == "file":  # files, ranked by their best chunk (the re-ranker then orders files)
                short = [hs for hs in hits if len(hs) == plan.want and len({h.path for h in hs}) < opts.k]
                if short and plan.want < MAX_GROUP_CHUNKS:  # fewer than k files among the candidates: more
                    widen *= 4
                    continue
                n_files = max(opts.k, self.cfg.serve.rerank_candidates) if opts.rerank else opts.k
                hits = [group_by_file(hs, n_files) for hs in hits]
                clock("group")
            if opts.rerank:
                hits = [await self._rerank(qq, hs) for qq, hs in zip(queries, hits)]
                clock("rerank")
            hits = [hs[:opts.k] for hs in hits]
            break
        generation = dense.generation if dense is not None else kw[2] if kw is not None else None
        if opts.highlight or opts.group == "file":
            hits = await self._highlighted(generation, queries, hits)
            clock("highlight")
        clock.done()
        return Answer(hits, mode, generation, dense.missing if dense else [], feedback="dense" if looked else None)

    async def _look_twice(self, xq: np.ndarray, dense: DenseResult, kw: Optional[tuple[np.ndarray, np.ndarray, str]],
                          D: np.ndarray, I: np.ndarray, plan: "Plan", opts: SearchOptions,
                          allowed: Optional[np.ndarray], clock: "Clock") -> tuple[np.ndarray, np.ndarray, DenseResult, bool]:
        """Pseudo-relevance feedback: the query vector moves toward the exact vectors (from staging) of the
        first answer's top ``query.feedback_docs`` chunks, the shard groups are asked again, and the new dense
        side is fused again with the same keyword side. Only the queries the rule picks look twice."""
        from shoal.index.feedback import looks_twice, rocchio, top_ids

        q = self.cfg.query
        source = I if q.feedback_source == "hybrid" or kw is None else dense.I
        pick = looks_twice(q.feedback_when, dense.I, kw[1] if kw is not None else None, q.feedback_docs)
        if not pick.any():
            return D, I, dense, False
        tops = top_ids(source, q.feedback_docs)
        wanted = np.unique(np.concatenate([t for t, p in zip(tops, pick) if p]))
        got_ids, got_x = await self._vectors(wanted)
        row = {int(i): j for j, i in enumerate(got_ids)}
        fb = [got_x[[row[int(i)] for i in t if int(i) in row]] if p else got_x[:0] for t, p in zip(tops, pick)]
        clock("feedback_vectors")
        sel = np.flatnonzero(pick)
        again = await self.backend.dense(rocchio(xq[sel], [fb[i] for i in sel], q.feedback_weight), plan.side, opts,
                                         allowed)
        clock("feedback_dense")
        D2, I2 = dense.D.copy(), dense.I.copy()
        D2[sel], I2[sel] = again.D, again.I
        dense = DenseResult(D2, I2, again.generation, sorted(set(dense.missing) | set(again.missing)))
        D, I = await self._fused(dense, kw, plan, allowed, clock)
        return D, I, dense, True

    async def _vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact vectors of these chunk ids, from staging (the source of every build), on the data node."""
        if self.remote is not None:
            return await self.remote.vectors.remote(ids)
        return await self._run(self.reader.vectors, ids)

    async def _highlighted(self, generation: Optional[str], queries: list[str],
                           hits: list[list[Hit]]) -> list[list[Hit]]:
        """Each hit (and its passages) with where its query's terms are, by the generation's keyword analysis."""
        out = []
        for q, hs in zip(queries, hits):
            texts = [t for h in hs for t in [h.text, *(p.text for p in h.passages or [])]]
            spans = iter(await self._highlight_spans(generation, q, texts) if texts else [])
            out.append([replace(h, highlights=next(spans),
                                passages=None if h.passages is None else
                                [replace(p, highlights=next(spans)) for p in h.passages]) for h in hs])
        return out

    async def _highlight_spans(self, generation: Optional[str], query: str, texts: list[str]) -> list[Any]:
        if self.remote is not None:
            return await self.remote.highlights.remote(generation, query, texts)
        return await self._run(self.reader.highlights, generation, query, texts)

    async def passage(self, chunk_id: int, query: Optional[str] = None, context_chars: int = 1500,
                      whole: bool = False) -> dict[str, Any]:
        """A passage in its file (the passage view): see CatalogReader.passage."""
        if self.remote is not None:
            return await self.remote.passage.remote(chunk_id, query, context_chars, whole)
        return await self._run(self.reader.passage, chunk_id, query, context_chars, whole)

    async def _sides(self, queries: list[str], opts: SearchOptions, plan: "Plan", allowed: Optional[np.ndarray],
                     clock: "Clock") -> tuple[Optional[DenseResult], Optional[tuple[np.ndarray, np.ndarray, str]], str,
                                              Optional[np.ndarray]]:
        """The dense side (encode, then the shard groups) and the keyword side, at the same time: the
        keyword search runs while the query is encoded and the groups answer. The keyword side must come from
        the generation the vectors came from: where a switch came between the two, it is asked again."""
        mode = plan.mode
        guess = self.backend.serving_generation()
        kw_task = asyncio.ensure_future(self._keyword_timed(guess, queries, plan.side)) if mode != "dense" else None
        dense: Optional[DenseResult] = None
        xq: Optional[np.ndarray] = None
        try:
            if mode != "keyword":
                xq = await self.backend.encode(queries)
                clock("encode")
                dense = await self.backend.dense(xq, plan.side, opts, allowed)
                clock("dense")
        except BaseException:
            if kw_task is not None:
                kw_task.cancel()
            raise
        kw = None
        if kw_task is not None:
            kw = await kw_task
            if kw is not None and dense is not None and kw[2] != dense.generation:
                kw = await self._keyword_timed(dense.generation, queries, plan.side)
            clock("keyword")  # what the keyword side added after the dense one (its own time: keyword_search)
            if kw is None:
                if mode == "keyword":
                    raise Conflict("this generation has no keyword index (index.keyword is false)")
                mode = "dense"  # hybrid without a keyword index: the dense side alone
        return dense, kw, mode, xq

    async def _keyword_timed(self, generation: Optional[str], queries: list[str],
                             n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
        t0 = time.perf_counter()
        try:
            return await self._keyword(generation, queries, n)
        finally:
            self.stages.record("keyword_search", (time.perf_counter() - t0) * 1000)

    async def _fused(self, dense: Optional[DenseResult], kw: Optional[tuple[np.ndarray, np.ndarray, str]],
                     plan: "Plan", allowed: Optional[np.ndarray], clock: "Clock") -> tuple[np.ndarray, np.ndarray]:
        """D, I of the answer before the catalog: one side, or both fused (inline for a few queries: it is
        microseconds of numpy, less than a thread hop)."""
        from shoal.index.fusion import fuse

        if kw is None:
            assert dense is not None
            return dense.D, dense.I
        Dk, Ik, _ = kw
        if allowed is not None:
            Ik = np.where(np.isin(Ik, allowed), Ik, -1)
        if dense is None:
            return Dk, Ik
        args = ((dense.D, dense.I), (Dk, Ik), plan.fetch, self.cfg.query)
        D, I = fuse(*args) if len(Dk) <= 8 else await self._run(fuse, *args)
        clock("fuse")
        return D, I

    async def _rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        from shoal.workers.rerank import rerank_order

        n = min(len(hits), self.cfg.serve.rerank_candidates)
        if n == 0:
            return hits
        scores = await self.backend.rerank(query, [h.text for h in hits[:n]])
        head = [replace(hits[i], score=float(scores[i]), first_stage_score=hits[i].score)
                for i in rerank_order(scores)]
        return [replace(h, rank=r) for r, h in enumerate(head + hits[n:], 1)]

    def close(self) -> None:
        self.reader.close()
