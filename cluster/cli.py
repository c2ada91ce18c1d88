"""The `shoal` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

from shoal.cluster.config import Config, load_config
from shoal.index.errors import ShoalError
from shoal.index import layout

log = logging.getLogger("shoal")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: built-in embedded defaults)")
    p.add_argument("--data-dir", metavar="DIR", help="data dir (also $SHOAL_DATA_DIR; default ./.shoal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


def _positive_k(s: str) -> int:
    try:
        k = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be an integer, got {s!r}") from None
    if not 1 <= k <= 1000:
        raise argparse.ArgumentTypeError(f"k must be from 1 to 1000, got {k}")
    return k


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shoal", description="Semantic search over folders of files.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="scan, embed and index files (incremental, resumable)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--no-build", action="store_true", help="commit embeddings but do not build an index")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted run (also what a plain rerun does)")
    p.add_argument("--address", help="Ray cluster to join (also $RAY_ADDRESS); default: a local Ray")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.add_argument("--watch", action="store_true",
                   help="after the first pass, keep the index current as files change, until SIGTERM/SIGINT "
                        "(`ray job stop`); see ingest.watch* in the config")
    _common(p)

    p = sub.add_parser("build", help="build a new index generation from the committed embeddings")
    _common(p)

    for name, helptext in (("query", "search once and print the hits"),
                           ("search", "interactive search: type queries until `exit`")):
        p = sub.add_parser(name, help=helptext, description=helptext + ".", epilog=SCORE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "query":
            p.add_argument("text", help="the query")
            p.add_argument("--json", action="store_true", help="JSON output for scripts")
        p.add_argument("-k", type=_positive_k, default=None, help="number of hits (default from config)")
        p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default from the index)")
        p.add_argument("--full", action="store_true", help="show each hit's whole chunk, not a snippet")
        p.add_argument("--url", help="query a running `shoal serve` (e.g. http://127.0.0.1:8000) instead of the local index")
        p.add_argument("--rerank", action="store_true",
                       help="re-rank the top serve.rerank_candidates with the cross-encoder in serve.rerank_model")
        p.add_argument("--mode", choices=("dense", "keyword", "hybrid"), default=None,
                       help="dense vectors, BM25 keywords, or both fused (default query.mode)")
        p.add_argument("--chunks", action="store_true",
                       help="every matching chunk as its own hit (default: one line per file, its best passage)")
        _common(p)

    p = sub.add_parser("serve", help="serve the index over HTTP (Ray Serve) until Ctrl-C")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    p.add_argument("--address", help="Ray cluster to join (also $RAY_ADDRESS); default: a local Ray")
    p.add_argument("--detach", action="store_true", help="deploy and return, leaving the app on the cluster joined")
    _common(p)

    p = sub.add_parser("status", help="index generation, counts, skipped files, model, device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--skipped", action="store_true", help="list every skipped file with its reason")
    p.add_argument("--address", help="Ray cluster running `shoal serve`: also show every serving replica "
                   "(node, GPU, shards, generation)")
    _common(p)

    p = sub.add_parser("reindex", help="retrain the quantizer on all vectors and rebuild every shard")
    _common(p)

    p = sub.add_parser("tune", help="measure recall against exact search; store the smallest nprobe that reaches it")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("-k", type=_positive_k, default=10)
    p.add_argument("--queries", type=int, default=500, help="sampled index vectors used as queries")
    _common(p)

    p = sub.add_parser("gc", help="delete old generations, keeping the newest N")
    p.add_argument("--keep", type=int, default=None, help="generations to keep (default index.keep_generations)")
    _common(p)
    return ap


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, data_dir=args.data_dir)
    addr = getattr(args, "address", None)
    if addr:
        from dataclasses import replace

        cfg = replace(cfg, ray=replace(cfg.ray, address=addr))
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        loopback_only_ray()
    return cfg


def loopback_only_ray() -> None:
    """Ray's single-machine mode: GCS, raylet, agents and workers on 127.0.0.1 only.

    Ray reads this variable when it is first imported, so it is set before any
    command imports Ray, and only when no cluster is being joined (a driver that
    joins a real cluster must report its real address).
    """
    if "ray" in sys.modules:
        log.warning("Ray was imported before its loopback-only mode could be set")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


SCORE_HELP = """\
scores, by mode (higher is better):
  hybrid   query.fusion convex (the default): alpha * dense + (1 - alpha) * keyword, each side
           min-max normalised over its candidates: in [0, 1], 1 = the best hit of both sides
           (query.fusion rrf: a reciprocal-rank score, at most 2/61 = 0.033)
  dense    cosine similarity of query and chunk, in [-1, 1]
  keyword  BM25 score, >= 0, unbounded (it grows with rare matching terms)
  --rerank the cross-encoder's relevance logit (unbounded)"""


def _print_hits(hits: Sequence[Any], full: bool, snippet_chars: int, out: Any = sys.stdout) -> None:
    from shoal.workers.scan import display_path

    if not hits:
        print("  (no hits)", file=out)
    for h in hits:
        more = f"  (+{len(h.passages)} more passage{'s' if len(h.passages) != 1 else ''})" if h.passages else ""
        print(f"{h.rank:3d}  {h.score:6.3f}  {display_path(h.path)}  [chars {h.start}-{h.end}]{more}", file=out)
        body = h.text if full else h.snippet(snippet_chars)
        for line in (body.splitlines() or [""]):
            print(f"       {line}", file=out)
    out.flush()


def cmd_ingest(args: argparse.Namespace) -> int:
    from shoal.cluster.ingest import ingest

    cfg = _config(args)
    if args.watch:
        return _watch(args, cfg)
    r = ingest(args.paths, cfg, build=not args.no_build)
    if args.json:
        print(json.dumps(r.as_dict(), indent=2, default=str))
    else:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(r.skipped.items())) or "none"
        print(f"ingested {r.files_seen} files: {r.new} new, {r.changed} changed, {r.unchanged} unchanged, "
              f"{r.deleted} deleted; skipped: {skipped}")
        print(f"chunks: +{r.chunks_added} -{r.chunks_removed} in {r.seconds:.1f}s "
              f"({r.chunks_per_s:.1f} chunks/s); generation {r.generation or '-'}")
        if r.skipped:
            print("see `shoal status --skipped` for the reasons")
    return 0


def _watch(args: argparse.Namespace, cfg: Config) -> int:
    """`shoal ingest --watch`: SIGTERM or SIGINT ends it between two batches (a second SIGINT at once)."""
    from shoal.cluster.watch import watch

    if args.no_build:
        raise ShoalError("--watch publishes a generation per update: it cannot go with --no-build")
    return watch(args.paths, cfg, out=lambda s: print(s, file=sys.stderr, flush=True), signals=True)


def cmd_build(args: argparse.Namespace, retrain: bool = False) -> int:
    from shoal.cluster.build import build_generation
    from shoal.workers.catalog import Catalog
    from shoal.cluster.ingest import data_dir_lock
    from shoal.index import generations

    cfg = _config(args)
    with data_dir_lock(cfg.data_path, "shoal build"), Catalog(layout.catalog(cfg.data_path)) as cat:
        name = build_generation(cfg, cat, retrain=retrain)
    _, m = generations.open_current(cfg.data_path)
    print(f"built generation {name} ({m['build_mode']}: {m['build_reason']}): {m['factory']}, "
          f"{m['ntotal']} vectors, {len(m['shards'])} shard(s) in {m['build_seconds']:.1f}s")
    for s in m["shards"]:
        print(f"  {s['file']}: {s['ntotal']} vectors, {s['placement']} on {s['device']}: {s['reason']}")
    if m.get("reindex_advised"):
        print(f"note: {m['reindex_advised']}")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    return cmd_build(args, retrain=True)


def cmd_tune(args: argparse.Namespace) -> int:
    from shoal.cluster.ingest import data_dir_lock
    from shoal.cluster.tune import tune

    cfg = _config(args)
    with data_dir_lock(cfg.data_path, "shoal tune"):
        best, points = tune(cfg, args.target_recall, args.k, args.queries)
    print(f"{'nprobe':>7} {'recall@' + str(args.k):>10} {'ms/query':>9}")
    for p in points:
        print(f"{p.nprobe:>7} {p.recall:>10.4f} {p.ms_per_query:>9.3f}")
    from shoal.index import generations

    print(f"nprobe {best} published as generation {generations.current_name(cfg.data_path)} "
          "(running servers switch to it)")
    return 0


class RemoteSearcher:
    """The Searcher interface over HTTP, for `--url`."""

    def __init__(self, url: str, full: bool, rerank: bool, mode: Optional[str] = None) -> None:
        import httpx

        headers = {"authorization": f"Bearer {os.environ['SHOAL_TOKEN']}"} if os.environ.get("SHOAL_TOKEN") else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=60, headers=headers)
        self.full, self.rerank, self.mode = full, rerank, mode
        try:
            st = self.client.get("/healthz").json()
        except httpx.HTTPError as e:
            raise ShoalError(f"cannot reach {url}: {e}") from e
        self.generation = st.get("generation")
        self.manifest = {"ntotal": "?"}

    def search(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None,
               mode: Optional[str] = None, rerank: bool = False, group: str = "chunk") -> list[list[Any]]:
        from shoal.workers.catalog import Hit, Passage

        out = []
        for q in queries:
            body: dict[str, Any] = {"q": q, "k": k, "full": self.full, "rerank": self.rerank or rerank,
                                    "group": group}
            if mode or self.mode:
                body["mode"] = mode or self.mode
            if nprobe is not None:
                body["nprobe"] = nprobe
            r = self.client.post("/search", json=body)
            if r.status_code != 200:
                detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
                raise ShoalError(f"server answered {r.status_code}: {detail}")
            out.append([Hit(h["rank"], h["score"], h["id"], h["path"], h["kind"], h["start"], h["end"], h["text"],
                            passages=[Passage(**{k: p[k] for k in ("id", "rank", "score", "start", "end", "text")})
                                      for p in h["passages"]] if "passages" in h else None)
                        for h in r.json()["hits"]])
        return out

    def close(self) -> None:
        self.client.close()


def _searcher(args: argparse.Namespace, cfg: Config) -> Any:
    if getattr(args, "url", None):
        return RemoteSearcher(args.url, args.full, args.rerank, args.mode)
    from shoal.cluster.search import Searcher

    return Searcher(cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from shoal.cluster.app import run_serve

    cfg = _config(args)
    if args.host or args.port:
        cfg = replace(cfg, serve=replace(cfg.serve, host=args.host or cfg.serve.host, port=args.port or cfg.serve.port))
    run_serve(cfg, detach=args.detach, out=lambda s: print(s, flush=True))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    cfg = _config(args)
    k = args.k or cfg.query.k
    s = _searcher(args, cfg)
    t0 = time.perf_counter()
    [hits] = s.search([args.text], k=k, nprobe=args.nprobe, mode=args.mode, rerank=args.rerank,
                      group="chunk" if args.chunks else "file")
    ms = (time.perf_counter() - t0) * 1000
    if args.json:
        print(json.dumps({"query": args.text, "k": k, "mode": args.mode or cfg.query.mode,
                          "generation": s.generation, "ms": round(ms, 2),
                          "hits": [h.as_dict(None if args.full else cfg.query.snippet_chars) for h in hits]},
                         indent=2, ensure_ascii=False))
    else:
        _print_hits(hits, args.full, cfg.query.snippet_chars)
    s.close()
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from shoal.cluster import interactive

    cfg = _config(args)
    k = args.k or cfg.query.k
    s = _searcher(args, cfg)
    print(f"shoal: {s.manifest['ntotal']} chunks, generation {s.generation}{' at ' + args.url if args.url else ''}. "
          "Type a query; `open N`, `full N`, `more`, `help`; `exit`, `quit` or Ctrl-D to leave.", flush=True)
    session = interactive.Session(
        s, k, dict(nprobe=args.nprobe, mode=args.mode, rerank=args.rerank, group="chunk" if args.chunks else "file"),
        show=lambda hits: _print_hits(hits, args.full, cfg.query.snippet_chars))
    interactive.run(session, sys.stdin.isatty())
    s.close()
    return 0


def _embedding_device() -> dict[str, Any]:
    """Where embedding would run: CUDA as torch sees it, known without loading torch where no device node is."""
    from shoal.workers.embed import cuda_absent

    if cuda_absent():
        return {"embedding": "cpu", "torch_cuda_devices": 0}
    try:
        import torch
    except ImportError:
        return {"embedding": "unknown"}
    cuda = torch.cuda.is_available()
    return {"embedding": "cuda" if cuda else "cpu", "torch_cuda_devices": torch.cuda.device_count() if cuda else 0}


def status_dict(cfg: Config) -> dict[str, Any]:
    import faiss

    from shoal.workers.catalog import Catalog
    from shoal.index import generations

    data = cfg.data_path
    from shoal.cluster.ingest import lock_holder

    st: dict[str, Any] = {"data_dir": str(data), "generation": None, "writer": lock_holder(data)}
    st["device"] = {**_embedding_device(), "faiss_gpus": faiss.get_num_gpus()}
    name = generations.current_name(data)
    if name is not None:
        gen_dir, m = generations.open_current(data)
        st["generation"] = name
        st["index"] = {k: m.get(k) for k in ("factory", "ntotal", "nprobe", "nlist", "dim", "metric", "created_at",
                                             "build_mode", "delta_ntotal", "deleted", "ondisk", "reindex_advised",
                                             "trained_for")}
        st["index"]["shards"] = m.get("shards")
        st["index"]["bytes"] = sum(f["bytes"] for f in m["files"].values())
        st["model"] = m["model"]
    st["generations"] = generations.list_generations(data)
    cat_path = layout.catalog(data)
    if cat_path.exists():
        with Catalog(cat_path, readonly=True) as cat:
            st["counts"] = cat.counts()
            st["skipped_by_reason"] = cat.skipped_by_reason()
            st["last_run"] = cat.last_run()
            st["roots"] = cat.roots()
            st["skipped"] = [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in cat.skipped()]
    return st


def cmd_status(args: argparse.Namespace) -> int:
    from shoal.workers.scan import display_path

    cfg = _config(args)
    st = status_dict(cfg)
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        from shoal.cluster.app import serving_replicas

        st["serving"] = serving_replicas(cfg)
    if not args.skipped:
        st.pop("skipped", None)
    if args.json:
        print(json.dumps(st, indent=2, default=str, ensure_ascii=False))
        return 0
    print(f"data dir:    {st['data_dir']}")
    if st["writer"]:
        print(f"writer:      {st['writer']}")
    if st["generation"] is None:
        print("generation:  none (run `shoal ingest PATH`)")
    else:
        ix = st["index"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ix["created_at"]))
        print(f"generation:  {st['generation']} (built {created}; kept: {', '.join(st['generations'])})")
        print(f"index:       {ix['factory']}, {ix['ntotal']} vectors, dim {ix['dim']}, nprobe {ix['nprobe']}, "
              f"{ix['bytes'] / 1e6:.1f} MB")
        for i, s in enumerate(ix["shards"]):
            print(f"  shard {i}:   {s['ntotal']} vectors, {s.get('placement', 'cpu')} on {s['device']}: "
                  f"{s.get('reason', '')}")
        if ix.get("delta_ntotal") or ix.get("deleted"):
            print(f"  delta:     {ix.get('delta_ntotal', 0)} added, {ix.get('deleted', 0)} deleted since the last merge")
        if ix.get("reindex_advised"):
            print(f"  advice:    {ix['reindex_advised']}")
        print(f"model:       {st['model']['name']} ({st['model']['fingerprint']})")
    d = st["device"]
    print(f"device:      embedding on {d['embedding']}; FAISS GPUs: {d['faiss_gpus']}")
    if "counts" in st:
        c = st["counts"]
        print(f"catalog:     {c['files']} files, {c['chunks']} chunks, {c['skipped']} skipped")
        if st["skipped_by_reason"]:
            print("skipped:     " + ", ".join(f"{k} {v}" for k, v in st["skipped_by_reason"].items()))
        if st.get("roots"):
            print("roots:       " + ", ".join(st["roots"]))
        r = st["last_run"]
        if r:
            print(f"last run:    #{r['id']} {r['status']} ({r['stats'].get('chunks_added', 0)} chunks added)")
    if "serving" in st:
        reps = st["serving"]
        print(f"serving:     {len(reps)} shard replica(s)" if reps else "serving:     no shoal app on this cluster")
        for r in reps:
            gpus = ",".join(r.get("gpu_ids") or []) or "none"
            print(f"  group {r['group']}:   node {r.get('node_ip')} GPU {gpus}, shards {', '.join(r.get('shards', []))}, "
                  f"generation {r.get('generation')} ({r.get('source')}; {r.get('devices')}), seen {r.get('seen_s_ago')} s ago"
                  + (f"; {r['load_error']}" if r.get("load_error") else ""))
    for s in st.get("skipped", []):
        print(f"  {s['reason']:<22} {display_path(s['path'])}" + (f"  ({s['detail']})" if s["detail"] else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from shoal.cluster.ingest import data_dir_lock
    from shoal.index import generations

    cfg = _config(args)
    keep = args.keep if args.keep is not None else cfg.index.keep_generations
    if keep < 1:
        raise ShoalError(f"--keep must be >= 1, got {keep}")
    with data_dir_lock(cfg.data_path, "shoal gc"):
        gone = generations.gc(cfg.data_path, keep)
    print(f"removed {len(gone)} generation(s)" + (f": {', '.join(gone)}" if gone else ""))
    return 0


COMMANDS = {"ingest": cmd_ingest, "build": cmd_build, "query": cmd_query, "search": cmd_search,
            "status": cmd_status, "gc": cmd_gc, "reindex": cmd_reindex, "tune": cmd_tune,
            "serve": cmd_serve}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _config(args)  # validates the config, and sets Ray's loopback-only mode before Ray is imported
        return COMMANDS[args.cmd](args)
    except ShoalError as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # disk full, file too large, permissions: the last good generation stays live
        print(f"shoal: error: {e.strerror or e} ({e.filename or 'I/O'}); nothing was switched: "
              "the previous generation is still the live one", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith("ray."):  # the cluster went away under us
            print(f"shoal: error: the Ray cluster failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                  "committed work is kept: rerun the same command to resume", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
