"""The Ray Serve app: HTTP ingress -> QueryEncoder -> ShardSearcher per group -> merge -> catalog -> re-rank.

    shoal serve [--config ...] [--data-dir DIR]     # http://127.0.0.1:8000 by default
"""



import hmac
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import faiss
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import Config, config_from_dict
from cluster.search import MAX_K, MAX_QUERY_CHARS
from index.fusion import fuse
from workers.serving import QueryEncoder, Reranker, ShardSearcher, gather_groups, percentiles

log = logging.getLogger(__name__)
SHARD_TIMEOUT_S = 30.0


FileType = Literal["text", "markdown", "rst", "code", "data", "html", "pdf"]


class SearchOptions(BaseModel):
    """What a single and a batch search share."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, le=MAX_K)
    nprobe: Optional[int] = Field(None, ge=1, le=65536)
    rerank: bool = False
    path_prefix: Optional[str] = Field(None, min_length=1, max_length=4096)
    file_type: Optional[list[FileType]] = None
    allow_partial: bool = False
    full: bool = False
    mode: Optional[Literal["dense", "keyword", "hybrid"]] = None


class SearchRequest(SearchOptions):
    q: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)

    @field_validator("q")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is empty")
        return v.strip()


class BatchRequest(SearchOptions):
    queries: list[str] = Field(min_length=1)

    @field_validator("queries")
    @classmethod
    def _check_queries(cls, v: list[str]) -> list[str]:
        for i, q in enumerate(v):
            if not q.strip():
                raise ValueError(f"queries[{i}] is empty")
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"queries[{i}] is longer than {MAX_QUERY_CHARS} characters")
        return [q.strip() for q in v]


SEARCH_PARAMS = set(SearchRequest.model_fields)


def error(status: int, detail: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


class ServeError(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def make_api() -> FastAPI:
    """The FastAPI app; its token and body limit live in ``api.state`` (set by the Ingress replica)."""
    api = FastAPI(title="shoal", description="Semantic search over files", version="0.1.0")
    api.state.token = None
    api.state.max_body_bytes = 1 << 20

    @api.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        token, max_body_bytes = api.state.token, api.state.max_body_bytes
        if token and request.url.path not in ("/healthz", "/docs", "/openapi.json"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong bearer token")
        if request.method in ("POST", "PUT", "PATCH"):
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
                return error(413, f"request body over {max_body_bytes} bytes")
            if size is None and len(await request.body()) > max_body_bytes:
                return error(413, f"request body over {max_body_bytes} bytes")
        return await call_next(request)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"field": ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query")),
                 "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return error(422, errs)

    @api.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error(exc.status, exc.detail, **exc.extra)

    return api


@dataclass(frozen=True)
class AppArgs:
    cfg: dict[str, Any]  # Config as a plain dict (travels through .bind() cheaply)


def build_app(args: AppArgs) -> Any:
    """The whole application: one ShardSearcher deployment per shard group."""
    cfg = config_from_dict(args.cfg)
    from cluster.app import Ingress  # the decorated class, defined below

    sv, m = cfg.serve, cfg.model
    groups, gpus_per_group = plan_groups(cfg)
    enc_device, enc_gpus = encoder_placement(sv.encoder_device, sv.encoder_gpu_fraction, _cluster_gpus())
    encoder = QueryEncoder.options(
        num_replicas=sv.encoder_replicas, ray_actor_options={"num_cpus": sv.num_cpus_encoder, "num_gpus": enc_gpus},
        max_ongoing_requests=sv.max_ongoing_requests,
        user_config={"max_batch_size": sv.max_batch_size, "batch_wait_timeout_s": sv.batch_wait_timeout_s},
    ).bind(m.name, m.max_seq_length, enc_device, m.allow_download, 0)
    searchers = [
        ShardSearcher.options(
            name=f"ShardSearcher{g}", num_replicas=sv.searcher_replicas,
            max_ongoing_requests=sv.max_ongoing_requests,
            ray_actor_options={"num_cpus": sv.num_cpus_searcher, "num_gpus": gpus_per_group},
        ).bind(str(cfg.data_path), g, groups, sv.reload_interval_s, cfg.index.refine_k_factor, sv.searcher_threads)
        for g in range(groups)
    ]
    reranker = Reranker.options(ray_actor_options={"num_cpus": sv.num_cpus_reranker}).bind(
        sv.rerank_model, m.allow_download) if sv.rerank_model else None
    return Ingress.options(ray_actor_options={"num_cpus": sv.num_cpus_ingress},
                           max_ongoing_requests=sv.max_ongoing_requests).bind(
        encoder, searchers, reranker, args.cfg)


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


def plan_groups(cfg: Config) -> tuple[int, float]:
    """(shard groups, GPUs per group): one group per GPU of the live plan where the cluster has them."""
    import ray

    from index import generations

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


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, searchers: list[DeploymentHandle],
                 reranker: Optional[DeploymentHandle], cfg: dict[str, Any]) -> None:
        from cluster.catalog import Catalog

        self.cfg = config_from_dict(cfg)
        self.encoder, self.searchers, self.reranker = encoder, searchers, reranker
        api.state.token = self.cfg.serve.token or os.environ.get("SHOAL_TOKEN") or None
        api.state.max_body_bytes = int(self.cfg.serve.max_body_bytes)
        self.catalog_path = self.cfg.data_path / "catalog.sqlite"
        self._catalog: Optional[Catalog] = None
        self._kw: Optional[tuple[str, Any]] = None
        self.latency_ms: deque[float] = deque(maxlen=5000)
        self.requests = 0
        self.errors = 0

    # -- helpers ------------------------------------------------------------
    @property
    def catalog(self) -> Any:
        from cluster.catalog import Catalog

        if self._catalog is None:
            self._catalog = Catalog(self.catalog_path, readonly=True)
        return self._catalog

    def _keyword_index(self, generation: Optional[str]) -> Any:
        """The BM25 index of ``generation`` (or CURRENT), loaded once per generation."""
        from index import generations
        from index.keyword import KeywordIndex

        name = generation or generations.current_name(self.cfg.data_path)
        if name is None:
            raise ServeError(503, "no index generation yet")
        if self._kw is None or self._kw[0] != name:
            gen_dir = generations.generations_dir(self.cfg.data_path) / name
            if not KeywordIndex.exists(gen_dir):
                return None
            self._kw = (name, KeywordIndex.open(gen_dir, generations.read_manifest(gen_dir)))
        return self._kw[1]

    async def _encode(self, queries: list[str], mode: str, single: bool) -> Optional[np.ndarray]:
        if mode == "keyword":
            return None
        if single:
            return np.asarray(await self.encoder.encode_one.remote(queries[0]), dtype=np.float32)[None, :]
        return np.asarray(await self.encoder.encode_many.remote(queries), dtype=np.float32)

    async def _search(self, queries: list[str], req: Any, xq: Optional[np.ndarray]) -> dict[str, Any]:
        k = req.k
        mode = req.mode or self.cfg.query.mode
        if req.rerank and self.reranker is None:
            from workers.rerank import RERANK_OFF

            raise ServeError(409, RERANK_OFF)
        allowed = None
        if req.path_prefix or req.file_type:
            allowed = self.catalog.ids_matching(req.path_prefix, req.file_type)
        fetch = max(k, self.cfg.serve.rerank_candidates) if req.rerank else k
        fetch += 16  # ids the catalog no longer knows are dropped below
        if mode == "hybrid":
            fetch = max(fetch, self.cfg.query.fusion_candidates)
        missing: list[int] = []
        gens: list[str] = []
        D = I = None
        if xq is not None:
            D, I, gens, missing = await self._dense(xq, fetch, req, allowed)
        if mode != "dense":
            kw = self._keyword_index(gens[-1] if gens else None)
            if kw is None and mode == "keyword":
                raise ServeError(409, "this generation has no keyword index (index.keyword is false)")
            if kw is not None:
                Dk, Ik = kw.search(queries, fetch)
                if allowed is not None:
                    Ik = np.where(np.isin(Ik, allowed), Ik, -1)
                if mode == "keyword":
                    D, I = Dk, Ik
                else:
                    D, I = fuse((D, I), (Dk, Ik), fetch, self.cfg.query)
        return await self._hits(queries, req, D, I, gens, missing, mode)

    async def _dense(self, xq: np.ndarray, fetch: int, req: Any, allowed: Optional[np.ndarray]) -> Any:
        calls = [h.search.remote(xq, fetch, req.nprobe, allowed) for h in self.searchers]
        results = await gather_groups(calls, SHARD_TIMEOUT_S)
        missing = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if missing and (not req.allow_partial or len(missing) == len(results)):
            raise ServeError(503, f"shard group(s) {missing} unavailable: {results[missing[0]]!s:.200}",
                             missing_shards=missing)
        ok = [r for r in results if not isinstance(r, BaseException)]
        heap = faiss.ResultHeap(len(xq), fetch, keep_max=True)
        for D, I, _ in ok:
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return heap.D, heap.I, sorted({g for _, _, g in ok}), missing

    async def _hits(self, queries: list[str], req: Any, D: np.ndarray, I: np.ndarray, gens: list[str],
                    missing: list[int], mode: str) -> dict[str, Any]:
        k = req.k
        rows = self.catalog.lookup(np.unique(I[I >= 0]).tolist())
        roots = tuple(r.rstrip("/") + "/" for r in self.catalog.roots())
        out = []
        for qi, q in enumerate(queries):
            hits = []
            for score, i in zip(D[qi], I[qi]):
                c = rows.get(int(i))
                if c is None or not (c.path + "/").startswith(roots) and not c.path.startswith(roots):
                    continue
                hits.append({"id": c.id, "score": float(score), "path": c.path, "kind": c.kind,
                             "start": c.start, "end": c.end, "text": c.text})
            if req.rerank and hits:  # re-score the top serve.rerank_candidates; the rest keep their order after them
                n = min(len(hits), self.cfg.serve.rerank_candidates)
                head, tail = hits[:n], hits[n:]
                from workers.rerank import rerank_order

                scores = await self.reranker.rerank.remote(q, [h["text"] for h in head])
                for h, s in zip(head, scores):
                    h["first_stage_score"], h["score"] = h["score"], float(s)
                hits = [head[i] for i in rerank_order(scores)] + tail
            hits = hits[:k]
            for r, h in enumerate(hits, 1):
                h["rank"] = r
                if not req.full:
                    flat = " ".join(h["text"].split())
                    snip = self.cfg.query.snippet_chars
                    h["text"] = flat if len(flat) <= snip else flat[:snip].rstrip() + "…"
            out.append({"query": q, "hits": hits})
        gen = gens[-1] if gens else (self._kw[0] if self._kw else None)
        resp: dict[str, Any] = {"generation": gen, "mode": mode, "results": out}
        if missing:
            resp.update(partial=True, missing_shards=missing)
        return resp

    def _done(self, t0: float) -> None:
        self.requests += 1
        self.latency_ms.append((time.perf_counter() - t0) * 1000)

    # -- endpoints ----------------------------------------------------------
    @api.get("/search")
    async def search_get(self, request: Request, q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                         k: int = Query(10, ge=1, le=MAX_K), nprobe: Optional[int] = Query(None, ge=1, le=65536),
                         rerank: bool = False, path_prefix: Optional[str] = None,
                         file_type: Optional[list[str]] = Query(None), allow_partial: bool = False,
                         full: bool = False, mode: Optional[str] = None) -> Any:
        unknown = sorted(set(request.query_params) - SEARCH_PARAMS)
        if unknown:
            return error(422, [{"field": u, "msg": "unknown parameter", "type": "extra_forbidden"} for u in unknown])
        try:
            req = SearchRequest(q=q, k=k, nprobe=nprobe, rerank=rerank, path_prefix=path_prefix,
                                file_type=file_type, allow_partial=allow_partial, full=full, mode=mode)
        except Exception as e:  # pydantic.ValidationError
            raise RequestValidationError(e.errors()) from e  # type: ignore[attr-defined]
        return await self.search_post(req)

    @api.post("/search")
    async def search_post(self, req: SearchRequest) -> Any:
        t0 = time.perf_counter()
        xq = await self._encode([req.q], req.mode or self.cfg.query.mode, single=True)
        res = await self._search([req.q], req, xq)
        self._done(t0)
        one = res["results"][0]
        body = {"query": one["query"], "k": req.k, "mode": res["mode"], "generation": res["generation"],
                "hits": one["hits"],
                "ms": round((time.perf_counter() - t0) * 1000, 2)}
        if res.get("partial"):
            body.update(partial=True, missing_shards=res["missing_shards"])
        return body

    @api.post("/search/batch")
    async def search_batch(self, req: BatchRequest) -> Any:
        if len(req.queries) > self.cfg.serve.max_batch_queries:
            return error(422, [{"field": "queries", "msg": f"at most {self.cfg.serve.max_batch_queries} queries "
                                f"per batch, got {len(req.queries)}", "type": "too_long"}])
        t0 = time.perf_counter()
        xq = await self._encode(req.queries, req.mode or self.cfg.query.mode, single=False)
        res = await self._search(req.queries, req, xq)
        self._done(t0)
        res["ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return res

    @api.get("/healthz")
    async def healthz(self) -> Any:
        results = await gather_groups([h.info.remote() for h in self.searchers], 10.0)
        bad = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if bad:
            return error(503, f"shard group(s) {bad} not loaded", missing_shards=bad)
        return {"status": "ok", "generation": sorted({r["generation"] for r in results})[-1]}

    @api.get("/stats")
    async def stats(self) -> Any:
        results = await gather_groups([h.info.remote() for h in self.searchers], 10.0)
        enc = await gather_groups([self.encoder.info.remote()], 10.0)
        groups = [r if not isinstance(r, BaseException) else {"group": i, "error": str(r)[:200]}
                  for i, r in enumerate(results)]
        gens = sorted({g["generation"] for g in groups if "generation" in g})
        counts = self.catalog.counts()
        return {"generation": gens[-1] if gens else None, "shard_groups": groups,
                "encoder": enc[0] if not isinstance(enc[0], BaseException) else {"error": str(enc[0])[:200]},
                "catalog": counts, "requests": self.requests, "latency_ms": percentiles(list(self.latency_ms))}


def run_serve(cfg: Config, *, detach: bool = False, out: Any = print) -> None:
    """Start or join Ray, deploy the app on cfg.serve.host:port, block until Ctrl-C/SIGTERM."""
    import signal
    import threading

    from cluster.ray_env import init_ray
    from index import generations

    generations.open_current(cfg.data_path)  # a clear error now rather than a replica that cannot start
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/")
    out(f"shoal serving {cfg.data_path} at http://{cfg.serve.host}:{cfg.serve.port} (docs at /docs)")
    if detach:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    out("shutting down")
    serve.shutdown()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["scan"]["ignore"] = list(d["scan"]["ignore"])
    d["index"]["gpus"] = [dict(g) for g in d["index"]["gpus"]]
    return d
