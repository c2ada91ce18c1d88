"""The Ray Serve app: HTTP ingress -> QueryEncoder -> ShardSearcher per group -> merge -> catalog -> re-rank.

    shoal serve [--config ...] [--data-dir DIR]     # http://127.0.0.1:8000 by default

The Ingress does HTTP, auth and the fan-out, and only awaits: what happens to a
query is :class:`cluster.query.QueryCore`, the same code the CLI and the
evaluator run, with the deployments as its backend. Every status the API can
return is declared in /openapi.json with its body.
"""


import hmac
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Optional

import faiss
import numpy as np
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from shoal.cluster.config import Config, config_from_dict
from shoal.cluster.query import (MAX_K, MAX_NPROBE, MAX_QUERY_CHARS, NOT_BLANK, SEARCH_PARAMS, BatchRequest, DenseResult,
                                 FileType, Group, Hit, Mode, QueryCore, QueryError, SearchOptions, SearchRequest,
                                 Unavailable, field_errors)
from shoal.index.errors import ShoalError
from shoal.workers.datanode import DataNode, data_node_resources
from shoal.workers.serving import (BatchedEncoder, GroupHealth, QueryEncoder, Reranker, ShardSearcher, bounded,
                                   gather_groups, percentiles, probe_groups)

log = logging.getLogger(__name__)


# -- response bodies (the contract in /openapi.json) -----------------------------------------------
class FieldError(BaseModel):
    field: str
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]


class ErrorBody(BaseModel):
    detail: str


class GroupState(BaseModel):
    group: int
    state: Literal["up", "down"]
    since: float = Field(description="when it entered this state (Unix time)")
    for_s: float = Field(description="seconds in this state")
    reason: str = Field("", description="why it was marked down")


class UnavailableBody(BaseModel):
    detail: str
    missing_shards: list[int] = []
    shard_groups: list[GroupState] = []


class Answered(BaseModel):
    mode: str
    generation: Optional[str]
    ms: float
    partial: bool = False  # present (true) only when shard groups were missing and allow_partial was set
    missing_shards: list[int] = []
    feedback: Optional[Literal["dense"]] = Field(None, description="present where a query looked twice (feedback)")


class SearchResponse(Answered):
    query: str
    k: int
    hits: list[Hit]


class QueryResult(BaseModel):
    query: str
    hits: list[Hit]


class BatchResponse(Answered):
    results: list[QueryResult]


class PassageBody(BaseModel):
    id: int
    ordinal: int = Field(description="the passage's place in its file, from 0")
    n_chunks: int
    path: str
    root: str
    kind: str
    size: int
    mtime_ns: int
    sha256: str
    start: int = Field(description="character offsets of the passage in the file's extracted text")
    end: int
    line: Optional[int] = Field(description="the line the passage starts on (None where the file changed)")
    text: str = Field(description="the passage as indexed")
    before: str
    passage: str
    after: str
    text_start: int = Field(description="where ``before`` starts in the file's text")
    text_end: int
    text_chars: int
    current: bool = Field(description="the file is as it was indexed")
    note: str
    highlights: list[list[int]] = Field([], description="the query's terms, offsets into before + passage + after")


class Health(BaseModel):
    status: str
    generation: Optional[str]
    shard_groups: list[GroupState] = []


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body is not JSON text (undecodable bytes)"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token (serve.token)"},
    409: {"model": ErrorBody, "description": "the index or config cannot do this (no keyword index, re-ranking off)"},
    413: {"model": ErrorBody, "description": "request body over serve.max_body_bytes"},
    422: {"model": ValidationErrorBody, "description": "a field is wrong: each item names it"},
    503: {"model": UnavailableBody, "description": "no generation yet, or shard groups down (missing_shards)"},
}


def error(status: int, detail: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def wants_page(request: Request) -> bool:
    """A page route asked for HTML (not its JSON twin, ``format=json``)."""
    return page_path(request.url.path) and request.query_params.get("format") != "json" \
        and not request.url.path.startswith("/static/")


def page_error(status: int, title: str, detail: str, **kw: Any) -> HTMLResponse:
    from shoal.cluster import web

    return HTMLResponse(web.error_page(title, detail, **kw), status_code=status)


PAGE_TITLES = {401: "This server needs a token", 404: "Not found", 409: "This index cannot do that",
               413: "Too large", 422: "That request cannot be answered", 503: "Not available right now"}
HTML = {"text/html": {"schema": {"type": "string"}}}
PAGE_ERRORS = {401: "serve.token is set and the request has no valid bearer token: the page that asks for it",
               404: "no such passage, or not in a file inside the ingested roots",
               409: "the index cannot do this (no keyword index)", 422: "a parameter is wrong: the page names it",
               503: "no generation yet, or shard groups down"}
PAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": HTML, "description": "the page"},
    **{s: {"content": HTML, "description": d} for s, d in PAGE_ERRORS.items()}}


def twin_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """A page with a JSON twin (format=json): HTML, or the same data (errors too) as JSON."""
    out: dict[int | str, dict[str, Any]] = {200: {"content": {**HTML, "application/json": {
        "schema": {"$ref": "#/components/schemas/PassageBody"}}}, "description": what}}
    for s in (401, 404, 422):
        body = "ValidationErrorBody" if s == 422 else "ErrorBody"
        out[s] = {"content": {**HTML, "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
                  "description": PAGE_ERRORS[s]}
    return out


OPEN_PATHS = ("/healthz", "/docs", "/openapi.json")  # answered without the bearer token
# pages check the token themselves: without it they render the page that asks for it (and no data)
PAGE_PATHS = ("/", "/static/", "/passage/", "/text/")


def page_path(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PATHS[1:])


class Guard:
    """The bearer token (serve.token), the body limit (serve.max_body_bytes) and the Allow header of a 405,
    as plain ASGI middleware: Starlette's @app.middleware("http") runs each request through a task group
    and memory streams, a cost paid on every query."""

    def __init__(self, app: Any, state: Any, openapi: Any) -> None:
        self.app, self.state, self.openapi = app, state, openapi

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token, limit = self.state.token, self.state.max_body_bytes
        if token and scope["path"] not in OPEN_PATHS and not page_path(scope["path"]):
            if not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
                return await error(401, "missing or wrong bearer token")(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            size = headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > limit):
                return await error(413, f"request body over {limit} bytes")(scope, receive, send)
            if size is None:  # chunked: read it all (at most the limit + 1), then hand it on
                body, more = b"", True
                while more and len(body) <= limit:
                    msg = await receive()
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                if len(body) > limit:
                    return await error(413, f"request body over {limit} bytes")(scope, receive, send)
                receive = _replay(body)

        async def send_allow(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start" and msg["status"] == 405:
                documented = self.openapi()["paths"].get(scope["path"], {})
                if documented:  # Starlette names only the first route's methods; a path may have more
                    allow = ", ".join(sorted(m.upper() for m in documented)).encode()
                    msg["headers"] = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"allow"] + \
                        [(b"allow", allow)]
            await send(msg)

        await self.app(scope, receive, send_allow)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def make_api() -> FastAPI:
    """The FastAPI app; its token and body limit live in ``api.state`` (set by the Ingress replica)."""
    api = FastAPI(title="shoal", description="Semantic search over files", version="0.1.0")
    api.state.token = None
    api.state.max_body_bytes = 1 << 20

    api.add_middleware(Guard, state=api.state, openapi=lambda: api.openapi())

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        errs = [{"field": ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")),
                 "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        if wants_page(request):
            return page_error(422, "That request cannot be answered",
                              "; ".join(f"{e['field']}: {e['msg']}" for e in errs))
        return error(422, errs)

    @api.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return error(exc.status, exc.detail, **exc.extra)

    base_openapi = api.openapi

    def served_openapi() -> dict[str, Any]:
        """FastAPI's schema plus what this server's config enforces (the batch size limit)."""
        spec = base_openapi()
        queries = spec["components"]["schemas"]["BatchRequest"]["properties"]["queries"]
        queries["maxItems"] = int(api.state.max_batch_queries)
        # the passage view's JSON twin (format=json) is described by PassageBody
        spec["components"]["schemas"]["PassageBody"] = PassageBody.model_json_schema(
            ref_template="#/components/schemas/{model}")
        return spec

    api.openapi = served_openapi  # type: ignore[method-assign]
    api.state.max_batch_queries = 64
    return api


@dataclass(frozen=True)
class AppArgs:
    cfg: dict[str, Any]  # Config as a plain dict (travels through .bind() cheaply)


def build_app(args: AppArgs) -> Any:
    """The whole application: one ShardSearcher deployment per shard group."""
    cfg = config_from_dict(args.cfg)
    from shoal.cluster.app import Ingress  # the decorated class, defined below

    sv, m = cfg.serve, cfg.model
    groups, gpus_per_group = plan_groups(cfg)
    enc_device, enc_gpus = encoder_placement(sv.encoder_device, sv.encoder_gpu_fraction, _cluster_gpus())
    in_ingress = encoder_in_ingress(sv.encoder, enc_device)
    if in_ingress:
        enc_gpus = 0.0
    gpus_per_group = searcher_gpus(gpus_per_group, enc_gpus)
    pin = data_node_resources()  # the node that holds the data dir
    datanode = DataNode.options(ray_actor_options={"num_cpus": sv.num_cpus_datanode, "resources": pin},
                                max_ongoing_requests=max(64, sv.max_ongoing_requests)).bind(str(cfg.data_path))
    batching = {"max_batch_size": sv.max_batch_size, "batch_wait_timeout_s": sv.batch_wait_timeout_s}
    encoder = None if in_ingress else QueryEncoder.options(
        num_replicas=sv.encoder_replicas,
        ray_actor_options={"num_cpus": sv.num_cpus_encoder, "num_gpus": enc_gpus,
                           **({"resources": pin} if enc_device == "cpu" else {})},  # on CPU: beside the ingress
        max_ongoing_requests=sv.max_ongoing_requests, user_config=batching,
    ).bind(m.name, m.max_seq_length, enc_device, m.allow_download, 0, m.query_runtime)
    searchers = [
        ShardSearcher.options(  # one group per GPU of the cluster: Serve puts each on a node that has one
            name=f"ShardSearcher{g}", num_replicas=sv.replicas_per_group,  # replicas spread over nodes (SPREAD)
            max_constructor_retry_count=3,  # a group that cannot load fails the deploy in seconds, not minutes
            max_ongoing_requests=sv.max_ongoing_requests,
            ray_actor_options={"num_cpus": sv.num_cpus_searcher, "num_gpus": gpus_per_group},
        ).bind(str(cfg.data_path), g, groups, sv.reload_interval_s, cfg.index.refine_k_factor, sv.searcher_threads,
               datanode, sv.cache_dir, int(sv.transfer_chunk_bytes))
        for g in range(groups)
    ]
    reranker = Reranker.options(ray_actor_options={"num_cpus": sv.num_cpus_reranker}).bind(
        sv.rerank_model, m.allow_download) if sv.rerank_model else None
    on_data_node = sv.ingress == "data_node"
    where = pin if on_data_node else {} if sv.ingress == "any" else {f"node:{sv.ingress}": 0.001}
    cpus = sv.num_cpus_ingress + (sv.num_cpus_encoder if in_ingress else 0.0)
    # Ray sets OMP_NUM_THREADS=1 in a replica of under one CPU: the query's forward pass then runs on one
    # core (ONNX Runtime 9 ms instead of 7 for one query here); it is short, give it the cores it asks for
    threads = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(query_threads())}}} if in_ingress else {}
    return Ingress.options(ray_actor_options={"num_cpus": cpus, **({"resources": where} if where else {}), **threads},
                           max_ongoing_requests=sv.max_ongoing_requests, user_config=batching).bind(
        encoder, searchers, reranker, datanode, on_data_node, args.cfg)


def query_threads() -> int:
    """Threads for one query's forward pass: a few cores (more only add hand-off for so small a pass)."""
    return max(1, min(4, os.cpu_count() or 1))


def encoder_in_ingress(mode: str, encoder_device: str) -> bool:
    """serve.encoder: "ingress" or "deployment" as said; auto: inside the Ingress unless the encoder has a GPU
    (a hop to a CPU encoder on the Ingress's own node buys nothing; to a card, the card's speed)."""
    if mode == "auto":
        return encoder_device == "cpu"
    return mode == "ingress"


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def encoder_placement(device: str, gpu_fraction: float, cluster_gpus: float) -> tuple[str, float]:
    """(device, num_gpus) for the QueryEncoder: a fraction of a GPU where asked ("auto"/"cuda") and the
    cluster has one, else the CPU (with a warning when "cuda" was asked of a cluster without GPUs)."""
    if device == "cpu" or cluster_gpus <= 0:
        if device == "cuda":
            log.warning("serve.encoder_device is cuda but the Ray cluster has no GPU: encoding on the CPU")
        return "cpu", 0.0
    return "cuda", float(gpu_fraction)


def searcher_gpus(gpus_per_group: float, encoder_gpus: float) -> float:
    """A ShardSearcher's share of its card: all of it, or what the QueryEncoder leaves when it shares one.

    Every card may hold a searcher, so a fractional encoder only fits beside one: with two
    groups on two cards and an encoder of 0.25, each searcher asks for 0.75.
    """
    return max(0.0, gpus_per_group - encoder_gpus) if gpus_per_group and encoder_gpus else gpus_per_group


def plan_groups(cfg: Config) -> tuple[int, float]:
    """(shard groups, GPUs per group): one group per GPU of the live plan where the cluster has them."""
    import ray

    from shoal.index import generations

    if cfg.serve.shard_groups:
        groups = cfg.serve.shard_groups
    else:
        try:
            _, man = generations.open_current(cfg.data_path)
            groups = max(1, sum(1 for s in man["shards"] if s.get("placement") == "gpu"))
        except Exception:  # noqa: BLE001 - no index yet: the app starts and reports it
            groups = 1
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return groups, (1.0 if cluster_gpus >= groups and cluster_gpus > 0 else 0.0)


api = make_api()


class ServeBackend:
    """The query core's backend in the app: the encoder (in the Ingress, or the QueryEncoder deployment) and
    the ShardSearcher deployments, whose health it tracks (:class:`GroupHealth`)."""

    def __init__(self, encoder: Any, searchers: list[DeploymentHandle], reranker: Optional[DeploymentHandle],
                 timeout_s: float, probe_interval_s: float = 1.0, probe_timeout_s: float = 2.0) -> None:
        self.encoder, self.searchers, self.reranker, self.timeout_s = encoder, searchers, reranker, timeout_s
        self.local = isinstance(encoder, BatchedEncoder)
        self.health = GroupHealth(len(searchers))
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self._probe: Optional[Any] = None
        self.last_generation: Optional[str] = None

    def serving_generation(self) -> Optional[str]:
        """The generation the groups answered from last (the keyword side starts there; the core asks again
        where the vectors came from another one); None before any answer: CURRENT."""
        return self.last_generation

    async def encode(self, queries: list[str]) -> np.ndarray:
        if self.local:  # concurrent single queries share one forward pass (@serve.batch in the Ingress)
            if len(queries) == 1:
                return np.asarray(await self.encoder.encode_one(queries[0]), dtype=np.float32)[None, :]
            return await self.encoder.encode_many(queries)
        try:
            if len(queries) == 1:
                call = self.encoder.encode_one.remote(queries[0])
                return np.asarray(await bounded(call, self.timeout_s), dtype=np.float32)[None, :]
            call = self.encoder.encode_many.remote(queries)
            return np.asarray(await bounded(call, self.timeout_s), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a lost encoder replica is a 503, never a 500
            raise Unavailable(f"the query encoder did not answer: {type(e).__name__}: {str(e)[:200]}") from e

    def watch(self) -> None:
        """Start the probe that marks groups up again (once, on this replica's event loop)."""
        if self._probe is None or self._probe.done():
            import asyncio

            calls = [lambda h=h: h.info.remote() for h in self.searchers]
            self._probe = asyncio.ensure_future(probe_groups(self.health, calls, self.probe_interval_s,
                                                             self.probe_timeout_s))

    async def ask_groups(self, call: Any, timeout_s: float) -> tuple[dict[int, Any], list[int]]:
        """``call(handle)`` on every group not marked down, together: ({group: answer}, groups missing).
        A group that fails or times out is marked down; one already down is not asked (the probe asks)."""
        self.watch()
        down = set(self.health.down())
        live = [g for g in range(len(self.searchers)) if g not in down]
        got = await gather_groups([lambda h=self.searchers[g]: call(h) for g in live], timeout_s)
        answers, missing = {}, sorted(down)
        for g, r in zip(live, got):
            if isinstance(r, BaseException):
                self.health.mark_down(g, f"{type(r).__name__}: {str(r)[:200]}")
                missing.append(g)
            else:
                answers[g] = r
        return answers, sorted(missing)

    async def dense(self, xq: np.ndarray, k: int, opts: SearchOptions,
                    allowed: Optional[np.ndarray]) -> DenseResult:
        answers, missing = await self.ask_groups(lambda h: h.search.remote(xq, k, opts.nprobe, allowed), self.timeout_s)
        if missing and (not opts.allow_partial or not answers):
            raise Unavailable(f"shard group(s) {missing} unavailable: " +
                              "; ".join(f"{g} {self.health.why(g)}" for g in missing),
                              missing_shards=missing)
        self.last_generation = sorted({g for _, _, g in answers.values()})[-1]
        if len(answers) == 1:  # one group: its top-k is the answer
            [(D, I, _)] = answers.values()
            return DenseResult(D, I, self.last_generation, missing)
        heap = faiss.ResultHeap(len(xq), k, keep_max=True)
        for D, I, _ in answers.values():
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return DenseResult(heap.D, heap.I, self.last_generation, missing)

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        assert self.reranker is not None  # the core refuses rerank without serve.rerank_model
        return list(await self.reranker.rerank.remote(query, texts))


def _snip(hits: list[Any], full: bool, chars: int) -> list[dict[str, Any]]:
    return [h.as_dict(None if full else chars) for h in hits]


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: Optional[DeploymentHandle], searchers: list[DeploymentHandle],
                 reranker: Optional[DeploymentHandle], datanode: DeploymentHandle, on_data_node: bool,
                 cfg: dict[str, Any]) -> None:
        self.cfg = config_from_dict(cfg)
        sv, m = self.cfg.serve, self.cfg.model
        self.searchers = searchers
        # no QueryEncoder deployment (serve.encoder): the model lives here, no hop per query
        self.encoder: Any = encoder if encoder is not None else BatchedEncoder(
            m.name, m.max_seq_length, "cpu", m.allow_download, 0, m.query_runtime)
        self.datanode = datanode
        api.state.token = sv.token or os.environ.get("SHOAL_TOKEN") or None
        api.state.max_body_bytes = int(sv.max_body_bytes)
        api.state.max_batch_queries = int(sv.max_batch_queries)
        self.backend = ServeBackend(self.encoder, searchers, reranker, sv.shard_timeout_s, sv.probe_interval_s,
                                    sv.probe_timeout_s)
        self.core = QueryCore(self.cfg, self.backend, remote=None if on_data_node else datanode)
        self.latency_ms: deque[float] = deque(maxlen=5000)
        self.requests = 0
        self._counts: tuple[float, dict[str, Any]] = (0.0, {})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The in-Ingress encoder's batching changes without a redeploy (as the QueryEncoder's does)."""
        if isinstance(self.encoder, BatchedEncoder):
            self.encoder.configure(user_config.get("max_batch_size", 32), user_config.get("batch_wait_timeout_s", 0.0))

    def _done(self, t0: float) -> float:
        self.requests += 1
        ms = (time.perf_counter() - t0) * 1000
        self.latency_ms.append(ms)
        return round(ms, 2)

    # -- endpoints ----------------------------------------------------------
    @api.get("/search", response_model=SearchResponse, responses=ERRORS,
              response_model_exclude_defaults=True)
    async def search_get(
        self, request: Request,
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK, description="the query")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        nprobe: Annotated[Optional[int], Query(ge=1, le=MAX_NPROBE)] = None,
        rerank: bool = False,
        path_prefix: Annotated[Optional[str], Query(max_length=4096)] = None,
        file_type: Annotated[Optional[list[FileType]], Query()] = None,
        allow_partial: bool = False, full: bool = False, mode: Optional[Mode] = None,
        group: Group = "chunk", highlight: bool = False, feedback: Optional[Literal["none", "dense"]] = None,
    ) -> Any:
        unknown = sorted(set(request.query_params) - SEARCH_PARAMS)
        if unknown:
            return error(422, [{"field": u, "msg": "unknown parameter", "type": "extra_forbidden"} for u in unknown])
        try:
            req = SearchRequest(q=q, k=k, nprobe=nprobe, rerank=rerank, path_prefix=path_prefix,
                                file_type=file_type, allow_partial=allow_partial, full=full, mode=mode,
                                group=group, highlight=highlight, feedback=feedback)
        except ValidationError as e:
            return error(422, field_errors(e))
        return await self.search_post(req)

    @api.post("/search", response_model=SearchResponse, responses=ERRORS,
              response_model_exclude_defaults=True)
    async def search_post(self, req: SearchRequest) -> Any:
        t0 = time.perf_counter()
        ans = await self.core.search([req.q], req)
        body = {"query": req.q, "k": req.k, "mode": ans.mode, "generation": ans.generation,
                "hits": _snip(ans.hits[0], req.full, self.cfg.query.snippet_chars), "ms": self._done(t0)}
        if ans.partial:
            body.update(partial=True, missing_shards=ans.missing)
        if ans.feedback:
            body["feedback"] = ans.feedback
        return JSONResponse(body)  # the body is SearchResponse already: no second validation pass

    @api.post("/search/batch", response_model=BatchResponse, responses=ERRORS,
              response_model_exclude_defaults=True)
    async def search_batch(self, req: BatchRequest) -> Any:
        if len(req.queries) > self.cfg.serve.max_batch_queries:
            return error(422, [{"field": "queries", "msg": f"at most {self.cfg.serve.max_batch_queries} queries "
                                f"per batch, got {len(req.queries)}", "type": "too_long"}])
        t0 = time.perf_counter()
        ans = await self.core.search(req.queries, req)
        body = {"mode": ans.mode, "generation": ans.generation, "ms": 0.0,
                "results": [{"query": q, "hits": _snip(hs, req.full, self.cfg.query.snippet_chars)}
                            for q, hs in zip(req.queries, ans.hits)]}
        if ans.partial:
            body.update(partial=True, missing_shards=ans.missing)
        if ans.feedback:
            body["feedback"] = ans.feedback
        body["ms"] = self._done(t0)
        return JSONResponse(body)

    # -- the search page and the passage view (HTML; their data is the JSON API's) -------------------
    def _authorized(self, request: Request) -> bool:
        token = api.state.token
        got = request.headers.get("authorization", "")
        return not token or hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    @staticmethod
    def _token_sent(request: Request) -> bool:
        """A refused request that carried a token: the page says that one was wrong, not that one is needed."""
        return bool(request.headers.get("authorization", "").strip())

    async def _status_line(self) -> dict[str, Any]:
        """The page's status line: generation, files and chunks, each shard group up or down."""
        now = time.monotonic()
        if now - self._counts[0] > 5.0:  # COUNT(*) over every chunk: not per page at 10M rows
            self._counts = (now, await self.core.counts())
        counts = self._counts[1]
        generation = self.backend.last_generation
        if generation is None:
            try:
                generation = (await self.core.data_health()).get("generation")
            except Exception:  # noqa: BLE001 - the status line says what it knows
                pass
        return {"generation": generation, "files": counts.get("files", 0),
                "chunks": counts.get("chunks", 0), "groups": self.backend.health.report()}

    @api.get("/", response_class=HTMLResponse, responses=PAGE_RESPONSES, summary="The search page")
    async def page(
        self, request: Request,
        q: Annotated[Optional[str], Query(max_length=MAX_QUERY_CHARS, description="the query (empty: the form)")] = None,
        k: Annotated[int, Query(ge=1, le=MAX_K, description="files to show")] = 10,
        mode: Optional[Mode] = None,
        path_prefix: Annotated[Optional[str], Query(max_length=4096)] = None,
        file_type: Annotated[Optional[list[FileType]], Query()] = None,
    ) -> Any:
        """A query box, mode, k and the filters; results grouped by file, best passage highlighted, the
        file's other matching passages to expand, each linked to its passage view. Server-rendered: it works
        without JavaScript (a GET form). Its JSON twin is ``GET /search?group=file``."""
        from shoal.cluster import web

        if not self._authorized(request):
            return HTMLResponse(web.search_page(needs_token=True, token_refused=self._token_sent(request)),
                                status_code=401)
        form = dict(q=(q or "").strip(), mode=mode or self.cfg.query.mode, k=k, path_prefix=path_prefix,
                    file_type=file_type)
        if not form["q"]:
            return HTMLResponse(web.search_page(status=await self._status_line(), **form))
        t0 = time.perf_counter()
        try:
            req = SearchRequest(q=form["q"], k=k, mode=mode, path_prefix=path_prefix or None, file_type=file_type,
                                allow_partial=True, group="file")
            ans = await self.core.search([req.q], req)
        except ValidationError as e:
            return HTMLResponse(web.search_page(status=await self._status_line(), error={
                "title": PAGE_TITLES[422], "detail": "; ".join(f"{x['field']}: {x['msg']}" for x in field_errors(e))},
                **form), status_code=422)
        except QueryError as e:
            return HTMLResponse(web.search_page(status=await self._status_line(), error={
                "title": PAGE_TITLES.get(e.status, "Error"), "detail": str(e)}, **form), status_code=e.status)
        hits = [h.as_dict(self.cfg.query.snippet_chars) for h in ans.hits[0]]
        status = {**await self._status_line(), "generation": ans.generation}
        return HTMLResponse(web.search_page(status=status, hits=hits, ms=self._done(t0), partial=ans.partial,
                                            missing=ans.missing, **form))

    async def _passage(self, request: Request, chunk_id: int, q: Optional[str], fmt: str, whole: bool) -> Any:
        from shoal.cluster import web

        if not self._authorized(request):
            return error(401, "missing or wrong bearer token") if fmt == "json" else \
                HTMLResponse(web.error_page(PAGE_TITLES[401], "", needs_token=True,
                                            token_refused=self._token_sent(request)), status_code=401)
        try:
            p = await self.core.passage(chunk_id, (q or "").strip() or None, whole=whole)
        except QueryError as e:
            if fmt == "json":
                return error(e.status, str(e))
            return page_error(e.status, PAGE_TITLES.get(e.status, "Error"), str(e))
        if fmt == "json":
            return JSONResponse(p)
        return HTMLResponse((web.text_page if whole else web.passage_page)(p, q))

    @api.get("/passage/{chunk_id}", response_class=HTMLResponse, summary="A passage in its file",
             responses=twin_responses("the passage view"))
    async def passage_view(
        self, request: Request, chunk_id: Annotated[int, Path(ge=0, le=2**63 - 1, description="the chunk id")],
        q: Annotated[Optional[str], Query(max_length=MAX_QUERY_CHARS, description="terms to highlight")] = None,
        format: Literal["html", "json"] = "html",
    ) -> Any:
        """The passage inside its file's text with context before and after, the query's terms highlighted;
        the file's path, type, size, modification time and the passage's line. ``format=json``: the same data."""
        return await self._passage(request, chunk_id, q, format, whole=False)

    @api.get("/text/{chunk_id}", response_class=HTMLResponse, summary="The whole text of a passage's file",
             responses=twin_responses("the whole text"))
    async def text_view(
        self, request: Request, chunk_id: Annotated[int, Path(ge=0, le=2**63 - 1, description="the chunk id")],
        q: Annotated[Optional[str], Query(max_length=MAX_QUERY_CHARS, description="terms to highlight")] = None,
        format: Literal["html", "json"] = "html",
    ) -> Any:
        """The whole text of the passage's file as extracted (PDF and HTML as text), the passage marked."""
        return await self._passage(request, chunk_id, q, format, whole=True)

    @api.get("/static/{name}", summary="The page's stylesheet and script",
             responses={200: {"content": {"text/css": {"schema": {"type": "string"}},
                                          "text/javascript": {"schema": {"type": "string"}}},
                              "description": "the file"}, 422: ERRORS[422]})
    async def static(self, name: Literal["shoal.css", "shoal.js"]) -> Any:
        from shoal.cluster import web

        body, media = web.static_file(name)
        return Response(body, media_type=media, headers={"cache-control": "max-age=300"})

    @api.get("/healthz", response_model=Health, responses={503: ERRORS[503]})
    async def healthz(self) -> Any:
        """200 when every shard group, the catalog and the keyword index answer. A group already marked down
        is reported at once (the probe asks it), not waited for."""
        limit = min(10.0, self.cfg.serve.shard_timeout_s)
        answers, missing = await self.backend.ask_groups(lambda h: h.info.remote(), limit)
        groups = self.backend.health.report()
        if missing:
            return error(503, f"shard group(s) {missing} not answering: " +
                         "; ".join(f"{g} {self.backend.health.why(g)}" for g in missing),
                         missing_shards=missing, shard_groups=groups)
        try:  # the ingress path: the catalog and the live keyword index answer
            await bounded(self.core.data_health(), limit)
        except Exception as e:  # noqa: BLE001
            return error(503, f"the catalog or keyword index cannot answer: {type(e).__name__}: {str(e)[:200]}",
                         shard_groups=groups)
        return {"status": "ok", "generation": sorted({r["generation"] for r in answers.values()})[-1],
                "shard_groups": groups}

    @api.get("/stats", responses={401: ERRORS[401]})
    async def stats(self) -> dict[str, Any]:
        answers, _ = await self.backend.ask_groups(lambda h: h.info.remote(), min(10.0, self.cfg.serve.shard_timeout_s))
        health = self.backend.health.report()
        if self.backend.local:
            enc: Any = {"where": "ingress", **self.encoder.info()}
        else:
            [enc] = await gather_groups([lambda: self.encoder.info.remote()], 10.0)
            enc = enc if not isinstance(enc, BaseException) else {"error": str(enc)[:200]}
        [replicas] = await gather_groups([lambda: self.datanode.replica_reports.remote()], 10.0)
        groups = [{**answers[g], "health": health[g]} if g in answers else {"group": g, "health": health[g]}
                  for g in range(len(self.searchers))]
        gens = sorted({g["generation"] for g in groups if "generation" in g})
        counts = await self.core.counts()
        from shoal.workers.datanode import where

        return {"generation": gens[-1] if gens else None, "shard_groups": groups,
                "ingress": {**where(), "reads_catalog": "through DataNode" if self.core.remote else "here"},
                "encoder": enc, "replicas": replicas if not isinstance(replicas, BaseException) else [],
                "catalog": counts, "requests": self.requests, "latency_ms": percentiles(list(self.latency_ms)),
                "stages_ms": self.core.stage_percentiles()}


def run_serve(cfg: Config, *, detach: bool = False, out: Any = print) -> None:
    """Start or join Ray, deploy the app on cfg.serve.host:port, block until Ctrl-C/SIGTERM."""
    import signal
    import threading

    from shoal.cluster.ray_env import init_ray
    from shoal.index import generations

    generations.open_current(cfg.data_path)  # a clear error now rather than a replica that cannot start
    # the replicas' logs stay in Ray's session logs and the dashboard: this terminal gets shoal's lines
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, log_to_driver=False)
    if not log.isEnabledFor(logging.INFO):  # Serve's "Started Serve ..." lines too, unless -v
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    _check_http_options(cfg)
    try:
        serve._run(build_app(AppArgs(cfg=config_to_dict(cfg))), name=APP, route_prefix="/", _blocking=False)
        wait_deployed(cfg.serve.deploy_timeout_s)
    except BaseException as e:
        reason = e.args[0] if isinstance(e, ShoalError) else f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
        try:  # nothing half-running: the app goes, and Serve with it if nothing else runs there
            serve.delete(APP)
            if not serve.status().applications:
                serve.shutdown()
        except Exception:  # noqa: BLE001 - reporting the first failure matters more
            log.exception("could not remove the failed app")
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ShoalError(f"shoal serve: {reason}") from None
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    out(f"shoal serving {cfg.data_path} at {url}\n  search page: {url}/\n  API docs:    {url}/docs")
    if detach:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    out("shutting down")
    serve.shutdown()


APP = "shoal"


def _check_http_options(cfg: Config) -> None:
    """Serve keeps the HTTP address it was first started with: refuse to deploy where nobody would look."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if (http.host, int(http.port)) != (cfg.serve.host, int(cfg.serve.port)):
        raise ShoalError(f"Ray Serve already runs on this cluster at {http.host}:{http.port}, not "
                         f"{cfg.serve.host}:{cfg.serve.port}: run `serve shutdown --address ...` first, or set "
                         "serve.host/serve.port to match")


def serving_replicas(cfg: Config) -> list[dict[str, Any]]:
    """Every ShardSearcher replica of the running app, as the data node last heard from it; [] if none."""
    from shoal.cluster.ray_env import init_ray

    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
    if APP not in serve.status().applications:
        return []
    h = serve.get_deployment_handle("DataNode", app_name=APP)
    return list(h.replica_reports.remote().result(timeout_s=30))


def wait_deployed(timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until every deployment of the app is healthy; ShoalError naming the first one that failed
    (or is still not running at the deadline), where, and why, on one line."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP)
        status = str(getattr(app, "status", "")) if app else ""
        if status.endswith("RUNNING"):
            return
        failed = status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY")
        if failed or time.monotonic() > deadline:
            raise ShoalError(deploy_failure(app, timed_out=not failed, timeout_s=timeout_s))
        time.sleep(poll_s)


def deploy_failure(app: Any, *, timed_out: bool, timeout_s: float) -> str:
    """One line: the deployment, the node where we know it, the reason (the replica's own message)."""
    import re

    if app is None:
        return "the app did not appear in Serve"
    deployments = getattr(app, "deployments", {}) or {}
    rank = {"UNHEALTHY": 0, "DEPLOY_FAILED": 0, "UPDATING": 1}  # the one that failed, before those waiting on it
    bad = sorted(((n, d) for n, d in deployments.items() if str(getattr(d, "status", "")).split(".")[-1] != "HEALTHY"),
                 key=lambda nd: rank.get(str(getattr(nd[1], "status", "")).split(".")[-1], 2))
    if not bad:
        return f"app status {app.status}: {(getattr(app, 'message', '') or '').strip()[-300:]}"
    name, d = bad[0]
    msg = (getattr(d, "message", "") or "").strip()
    ours = re.findall(r"(\w+ on node [^:\s]+: [^\n]+)", msg)  # our replicas name their node themselves
    if ours:
        return f"deployment {name} failed: {ours[-1].strip()[:400]}"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    reason = lines[-1] if lines else str(getattr(d, "status", ""))
    if timed_out:
        need = re.search(r"Resources required for each replica: (\{[^}]*\})", msg)
        reason = (f"not running after {timeout_s:.0f} s" +
                  (f": no node has the resources it asks for {need.group(1)}" if need else f": {reason[:300]}"))
    return f"deployment {name} failed: {reason[:400]}"


def config_to_dict(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["scan"]["ignore"] = list(d["scan"]["ignore"])
    d["index"]["gpus"] = [dict(g) for g in d["index"]["gpus"]]
    return d
