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
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Literal, Optional, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from shoal.cluster.config import Config
from shoal.index.errors import ShoalError
from shoal.index import layout

MAX_K = 1000
MAX_QUERY_CHARS = 4096
MAX_NPROBE = 65536
ROOTS_TTL_S = 5.0  # the ingested roots change only when an ingest commits; a removed root's chunks leave the catalog
FileType = Literal["text", "markdown", "rst", "code", "data", "html", "pdf"]
Mode = Literal["dense", "keyword", "hybrid"]


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


# -- errors with an HTTP status: the CLI prints them (exit 2), the app returns them ---------------
class QueryError(ShoalError):
    """A query that cannot be answered as asked; ``status`` is its HTTP status."""

    status = 422

    def __init__(self, detail: Any, **extra: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else "; ".join(
            f"{d['field']}: {d['msg']}" if d.get("field") else d["msg"] for d in detail))
        self.detail, self.extra = detail, extra


class Conflict(QueryError):
    """The index or the configuration cannot do this (no keyword index, re-ranking off)."""

    status = 409


class Unavailable(QueryError):
    """No generation yet, or shard groups down."""

    status = 503


def validate(queries: Sequence[str], **opts: Any) -> BatchRequest:
    """The request model, from plain arguments (the CLI and the evaluator); QueryError names the field."""
    try:
        return BatchRequest(queries=list(queries), **{k: v for k, v in opts.items() if v is not None})
    except ValidationError as e:
        raise QueryError(field_errors(e)) from None


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    path: str
    kind: str
    start: int
    end: int
    text: str
    first_stage_score: Optional[float] = None

    def snippet(self, chars: int = 200) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= chars else flat[:chars].rstrip() + "…"

    def as_dict(self, snippet_chars: Optional[int] = 200) -> dict[str, Any]:
        d = asdict(self)
        if d["first_stage_score"] is None:
            del d["first_stage_score"]
        if snippet_chars is not None:
            d["text"] = self.snippet(snippet_chars)
        return d


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
        self.reader = CatalogReader(cfg)
        self.stage_ms: dict[str, deque[float]] = {}  # where a query's time goes, hop by hop (/stats)

    def _took(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.stage_ms.setdefault(stage, deque(maxlen=2000)).append((now - t0) * 1000)
        return now

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args) if self.offload else fn(*args)

    def stage_percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, d in self.stage_ms.items():
            a = np.asarray(d)
            out[stage] = {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
                          "n": int(len(a))}
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
        """Hits for already validated queries (a SearchRequest/BatchRequest did that)."""
        from shoal.index.fusion import fuse

        q = self.cfg.query
        mode = opts.mode or q.mode
        if opts.rerank and not self.cfg.serve.rerank_model:
            from shoal.workers.rerank import RERANK_OFF

            raise Conflict(RERANK_OFF)
        t = time.perf_counter()
        allowed = None
        if opts.path_prefix or opts.file_type:
            allowed = await self._ids_matching(opts.path_prefix or None, opts.file_type)
            t = self._took("filter", t)
        want = max(opts.k, self.cfg.serve.rerank_candidates) if opts.rerank else opts.k
        fetch = want + 16  # ids the catalog no longer knows are dropped below
        side = max(fetch, q.fusion_candidates) if mode == "hybrid" else fetch
        dense: Optional[DenseResult] = None
        if mode != "keyword":
            xq = await self.backend.encode(queries)
            t = self._took("encode", t)
            dense = await self.backend.dense(xq, side, opts, allowed)
            t = self._took("dense", t)
        kw = None
        kw_generation = None
        if mode != "dense":  # the keyword index of the generation the vectors came from
            gen = dense.generation if dense is not None else self.backend.serving_generation()
            kw = await self._keyword(gen, queries, side)
            if kw is None:
                if mode == "keyword":
                    raise Conflict("this generation has no keyword index (index.keyword is false)")
                mode = "dense"  # hybrid without a keyword index: the dense side alone
        if kw is not None:
            Dk, Ik, kw_generation = kw
            t = self._took("keyword", t)
            if allowed is not None:
                Ik = np.where(np.isin(Ik, allowed), Ik, -1)
            if dense is None:
                D, I = Dk, Ik
            else:
                D, I = await self._run(fuse, (dense.D, dense.I), (Dk, Ik), fetch, q)
                t = self._took("fuse", t)
        else:
            assert dense is not None
            D, I = dense.D, dense.I
        hits = await self._hits(D, I, want)
        t = self._took("catalog", t)
        if opts.rerank:
            hits = [await self._rerank(qq, hs) for qq, hs in zip(queries, hits)]
            self._took("rerank", t)
        generation = dense.generation if dense is not None else kw_generation
        return Answer([hs[:opts.k] for hs in hits], mode, generation, dense.missing if dense else [])

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


class CatalogReader:
    """Reads catalog.sqlite and the keyword index of a generation; lives on the data node only.

    SQLite never goes over a network filesystem: a core elsewhere reaches this
    through the DataNode deployment. One lock keeps the catalog connection to
    one user at a time.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._catalog: Any = None
        self._db_lock = threading.Lock()
        self._kw: Optional[tuple[str, Any]] = None
        self._kw_lock = threading.Lock()
        self._roots: tuple[float, tuple[str, ...]] = (0.0, ())

    def catalog(self) -> Any:
        from shoal.cluster.catalog import Catalog

        if self._catalog is None:
            self._catalog = Catalog(layout.catalog(self.cfg.data_path), readonly=True)
        return self._catalog

    def _db(self, fn: str, *args: Any) -> Any:
        with self._db_lock:
            return getattr(self.catalog(), fn)(*args)

    def ids_matching(self, prefix: Optional[str], types: Any) -> np.ndarray:
        return self._db("ids_matching", prefix, types)

    def counts(self) -> dict[str, Any]:
        return self._db("counts")

    def keyword_index(self, generation: Optional[str]) -> Any:
        """The BM25 index of ``generation`` (or CURRENT), with the analysis it was built with; None if it has none."""
        from shoal.index import generations
        from shoal.index.keyword import KeywordIndex

        name = generation or generations.current_name(self.cfg.data_path)
        if name is None:
            raise Unavailable("no index generation yet: run `shoal ingest` first")
        with self._kw_lock:
            if self._kw is None or self._kw[0] != name:
                gen_dir = generations.generations_dir(self.cfg.data_path) / name
                kw = KeywordIndex.open(gen_dir, generations.read_manifest(gen_dir)) \
                    if KeywordIndex.exists(gen_dir) else None
                self._kw = (name, kw)
            return self._kw

    def keyword_search(self, generation: Optional[str], queries: list[str],
                       n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
        """(D, I, generation) of the keyword index, or None where the generation has none."""
        name, kw = self.keyword_index(generation)
        if kw is None:
            return None
        D, I = kw.search(queries, n)
        return D, I, name

    def health(self) -> dict[str, Any]:
        """The catalog answers (one indexed row, not a count) and the live generation's keyword index
        (if it has one) opens."""
        with self._db_lock:
            self.catalog().db.execute("SELECT id FROM chunks ORDER BY id LIMIT 1").fetchall()
        name, kw = self.keyword_index(None)
        return {"generation": name, "keyword": kw is not None}

    def hits(self, D: np.ndarray, I: np.ndarray, n: int) -> list[list[Hit]]:
        """Ids -> catalog rows, best first, at most n per query. Ids no longer in the catalog are
        dropped, and so is anything outside the ingested roots: no path outside them is ever served."""
        with self._db_lock:
            cat = self.catalog()
            rows = cat.lookup(np.unique(I[I >= 0]).tolist())
            if time.monotonic() - self._roots[0] > ROOTS_TTL_S:  # a DISTINCT over files: not per query
                self._roots = (time.monotonic(), tuple(r.rstrip("/") + "/" for r in cat.roots()))
            roots = self._roots[1]
        out = []
        for drow, irow in zip(D, I):
            hs: list[Hit] = []
            for score, i in zip(drow, irow):
                c = rows.get(int(i))
                if c is None or not (c.path + "/").startswith(roots) and not c.path.startswith(roots):
                    continue
                hs.append(Hit(len(hs) + 1, float(score), c.id, c.path, c.kind, c.start, c.end, c.text))
                if len(hs) == n:
                    break
            out.append(hs)
        return out

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

