#!/usr/bin/env python3
"""Retrieval quality on a BEIR-format collection, end to end through shoal's real ingest and query paths.

    python scripts/eval_beir.py DATASET_DIR [--config FILE] [--limit-docs N] [--url URL] [--work DIR]
                                [--out scores.json] [--tune-fusion] [--rerank]

Writes each document as a file (title + text), runs the real `shoal ingest`
(a subprocess) on that folder, sends every query through the real query path
(in-process Searcher; with --url also `POST /search/batch` of a running
`shoal serve`), maps hits back to document ids by file path (a document with
several chunks counts once, at its best rank) and scores the runs with
pytrec_eval (trec_eval's own measures): nDCG@10, Recall@100, MRR@10. A BM25
baseline from bm25s (English stop words, Snowball stemmer) runs on the same documents.

--tune-fusion splits the judged queries in two halves (seeded), picks the
fusion (RRF, or convex with a normalisation and a weight alpha) that scores
best on the tuning half, and reports every run on the other half, never on
the queries it tuned on. Hybrid is compared query by query with dense and
keyword (better / worse / equal nDCG@10). --rerank re-scores the top
serve.rerank_candidates with the cross-encoder in serve.rerank_model.
Prints tables; --out writes per-query scores as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURES = {"ndcg_cut_10": "nDCG@10", "recall_100": "Recall@100", "recip_rank": "MRR@10"}
DEPTH = 100


def load_beir(d: Path, limit_docs: int = 0) -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    docs = [json.loads(line) for line in open(d / "corpus.jsonl", encoding="utf-8")]
    if limit_docs:
        docs = docs[:limit_docs]
    keep = {x["_id"] for x in docs}
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(d / "queries.jsonl", encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    with open(d / "qrels.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")[:3]
            if did in keep and int(score) > 0:
                qrels.setdefault(qid, {})[did] = int(score)
    queries = {q: t for q, t in queries.items() if q in qrels}  # queries with a judged relevant doc
    return docs, queries, qrels


def doc_text(d: dict) -> str:
    return f"{d.get('title', '').strip()}\n\n{d.get('text', '').strip()}\n"


def write_docs(docs: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (out / f"{d['_id']}.txt").write_text(doc_text(d), encoding="utf-8")


def split_queries(qids: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded half/half split: (tune, report)."""
    rs = np.random.default_rng(seed)
    order = [qids[i] for i in rs.permutation(len(qids))]
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def wins_losses(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], qids: list[str],
                measure: str = "ndcg_cut_10") -> tuple[int, int, int]:
    """How many of ``qids`` score better, worse, equal in run a than in run b."""
    d = np.array([a[q][measure] - b[q][measure] for q in qids])
    return int((d > 1e-9).sum()), int((d < -1e-9).sum()), int((np.abs(d) <= 1e-9).sum())


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-query nDCG@10, Recall@100 and MRR@10 (reciprocal rank within the top 10) by pytrec_eval."""
    import pytrec_eval

    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"}).evaluate(run)
    top10 = {q: dict(sorted(r.items(), key=lambda t: -t[1])[:10]) for q, r in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    out = {}
    for q in qrels:
        out[q] = {"ndcg_cut_10": full.get(q, {}).get("ndcg_cut_10", 0.0),
                  "recall_100": full.get(q, {}).get("recall_100", 0.0),
                  "recip_rank": rr.get(q, {}).get("recip_rank", 0.0)}
    return out


def mean(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in MEASURES}


def hits_to_run(ranked_paths: list[list[str]], qids: list[str]) -> dict[str, dict[str, float]]:
    """Chunk hits (paths, best first) -> {qid: {doc id: score}}, each document at its best rank."""
    run: dict[str, dict[str, float]] = {}
    for qid, paths in zip(qids, ranked_paths):
        docs: dict[str, float] = {}
        for rank, p in enumerate(paths):
            did = Path(p).stem
            if did not in docs:
                docs[did] = 1.0 / (rank + 1)
            if len(docs) >= DEPTH:
                break
        run[qid] = docs
    return run


def bm25_baseline(docs: list[dict], queries: dict[str, str]) -> dict[str, dict[str, float]]:
    import bm25s
    import Stemmer

    stem = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([doc_text(d) for d in docs], stopwords="en", stemmer=stem, show_progress=False),
                    show_progress=False)
    qids = list(queries)
    res, scores = retriever.retrieve(bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stem,
                                                    show_progress=False),
                                     k=min(DEPTH, len(docs)), show_progress=False)
    return {q: {docs[i]["_id"]: float(s) for i, s in zip(res[j], scores[j]) if s > 0} for j, q in enumerate(qids)}


def ingest(docs_dir: Path, data: Path, config: Optional[str]) -> float:
    cmd = [sys.executable, "-m", "shoal.cluster.cli", "ingest", str(docs_dir), "--data-dir", str(data), "--json"]
    if config:
        cmd += ["--config", config]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"shoal ingest failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def in_process_runs(cfg: Any, queries: dict[str, str], modes: list[str], nprobe: Optional[int] = None,
                    searcher: Any = None, rerank: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    from shoal.cluster.search import Searcher

    s = searcher or Searcher(cfg)
    qids = list(queries)
    runs = {}
    for mode in modes:
        paths = []
        for i0 in range(0, len(qids), 64):
            batch = [queries[q] for q in qids[i0:i0 + 64]]
            for hits in s.search(batch, k=DEPTH * 3, nprobe=nprobe, mode=mode, rerank=rerank):
                paths.append([h.path for h in hits])
        runs[mode + (" +rerank" if rerank else "")] = hits_to_run(paths, qids)
    if searcher is None:
        s.close()
    return runs


FUSION_GRID = [("rrf", "-", 0.0)] + [("convex", norm, round(a, 2)) for norm in ("minmax", "zscore", "tmm")
                                      for a in np.linspace(0, 1, 21)]


def tune_fusion(s: Any, queries: dict[str, str], qrels: dict[str, dict[str, int]], tune_q: list[str],
                out: Callable[[str], None]) -> tuple[tuple[str, str, float], list[dict[str, Any]]]:
    """Score every fusion in FUSION_GRID on ``tune_q`` with the searcher's own candidates and fusion code.

    Each side's candidates are fetched once, exactly as a hybrid search fetches
    them (k + 16 hits asked, max(k, query.fusion_candidates) per side), then
    fused by index.fusion with each setting. The choice is the setting whose
    neighbourhood scores best: mean nDCG@10 over alphas within ±0.1 of it, same
    normalisation ("smoothed"). A sharp peak is tuned to this collection's
    score scales; a broad one is what carries to collections never tuned on.
    Returns the chosen (fusion, norm, alpha) and the grid.
    """
    from dataclasses import replace

    from shoal.index.fusion import fuse

    k = DEPTH * 3 + 16  # what Searcher.search(k=DEPTH * 3) asks of search_ids
    n = max(k, s.cfg.query.fusion_candidates)
    qs = [queries[q] for q in tune_q]
    dense = s.search_ids(qs, n, mode="dense")
    keyword = s.search_ids(qs, n, mode="keyword")
    rows: list[dict[str, Any]] = []
    for fusion, norm, alpha in FUSION_GRID:
        qc = replace(s.cfg.query, fusion=fusion, normalization=norm if norm != "-" else "minmax", alpha=alpha)
        D, I = fuse(dense, keyword, k, qc)
        paths = [[h.path for h in hits] for hits in s.hits(D, I, DEPTH * 3)]
        per_q = evaluate({q: qrels[q] for q in tune_q}, hits_to_run(paths, tune_q))
        rows.append({"fusion": fusion, "normalization": norm, "alpha": alpha, **mean(per_q)})
    for r in rows:
        near = [o["ndcg_cut_10"] for o in rows if o["normalization"] == r["normalization"]
                and abs(o["alpha"] - r["alpha"]) <= 0.1 + 1e-9]
        r["smoothed"] = float(np.mean(near))
    best = max(rows, key=lambda r: (round(r["smoothed"], 6), round(r["ndcg_cut_10"], 6)))
    out(f"\n### fusion tuned on {len(tune_q)} queries (nDCG@10 on the tuning half)\n")
    out("| fusion | normalisation | alpha (best smoothed) | smoothed (alpha ±0.1) | nDCG@10 there "
        "| peak nDCG@10 (alpha) | at alpha 0.5 |")
    out("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for norm in ("-", "minmax", "zscore", "tmm"):
        rs = [r for r in rows if r["normalization"] == norm]
        b = max(rs, key=lambda r: r["smoothed"])
        pk = max(rs, key=lambda r: r["ndcg_cut_10"])
        mid = next((r["ndcg_cut_10"] for r in rs if abs(r["alpha"] - 0.5) < 1e-9), b["ndcg_cut_10"])
        a = (lambda r: f"{r['alpha']:.2f}" if norm != "-" else "-")
        out(f"| {b['fusion']} | {norm} | {a(b)} | {b['smoothed']:.4f} | {b['ndcg_cut_10']:.4f} "
            f"| {pk['ndcg_cut_10']:.4f} ({a(pk)}) | {mid:.4f} |")
    return (best["fusion"], best["normalization"], best["alpha"]), rows


# look twice: (feedback, docs m, weight beta, first-pass list, when); "none" is hybrid without feedback
FEEDBACK_GRID = [("none", 0, 0.0, "-", "-")] + [("dense", m, b, src, when) for m in (2, 3, 5, 10)
                                                for b in (0.5, 1.0, 2.0, 3.0, 4.0) for src in ("hybrid", "dense")
                                                for when in ("always", "agree")]
# --feedback-grid quick (the suite's): the shipped setting and its two neighbouring weights
FEEDBACK_QUICK = [("none", 0, 0.0, "-", "-")] + [("dense", 2, b, "hybrid", "always") for b in (0.5, 1.0)]


def tune_feedback(s: Any, queries: dict[str, str], qrels: dict[str, dict[str, int]], tune_q: list[str],
                  out: Callable[[str], None], grid: Optional[list[tuple[Any, ...]]] = None
                  ) -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    """Score every setting of FEEDBACK_GRID on ``tune_q``, hybrid with the searcher's fusion (the one tuned just
    before), through the product's own query path (Searcher.search with the setting in the config).

    The rule of when to look twice is one of two, fixed before any report-half figure was seen: ``always``,
    or ``agree`` (only where the dense and keyword top-m share a chunk). The choice is the setting whose
    neighbourhood scores best: mean nDCG@10 over its own weight and the neighbouring weights (same m, list,
    rule), as for the fusion's alpha; "none" competes as is. Returns the chosen setting and the grid.
    """
    from dataclasses import replace

    base = s.cfg
    tq = {q: queries[q] for q in tune_q}
    rows: list[dict[str, Any]] = []
    for fb, m, beta, src, when in grid or FEEDBACK_GRID:
        qc = base.query if fb == "none" else replace(base.query, feedback=fb, feedback_docs=m, feedback_weight=beta,
                                                     feedback_source=src, feedback_when=when)
        s.cfg = replace(base, query=qc)
        run = in_process_runs(s.cfg, tq, ["hybrid"], searcher=s)["hybrid"]
        rows.append({"feedback": fb, "docs": m, "weight": beta, "source": src, "when": when,
                     **mean(evaluate({q: qrels[q] for q in tune_q}, run))})
    s.cfg = base
    betas = sorted({r["weight"] for r in rows if r["feedback"] != "none"})
    for r in rows:
        if r["feedback"] == "none":
            r["smoothed"] = r["ndcg_cut_10"]
            continue
        i = betas.index(r["weight"])
        near = [o["ndcg_cut_10"] for o in rows if o["feedback"] != "none" and (o["docs"], o["source"], o["when"]) ==
                (r["docs"], r["source"], r["when"]) and abs(betas.index(o["weight"]) - i) <= 1]
        r["smoothed"] = float(np.mean(near))
    best = max(rows, key=lambda r: (round(r["smoothed"], 6), round(r["ndcg_cut_10"], 6)))
    out(f"\n### feedback tuned on {len(tune_q)} queries (hybrid, the tuned fusion; nDCG@10 / Recall@100 on the "
        "tuning half; smoothed: the weight and its neighbours)\n")
    out("| feedback | docs m | weight beta | first pass | when | nDCG@10 | smoothed | Recall@100 |")
    out("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: -r["smoothed"]):
        out(f"| {r['feedback']} | {r['docs'] or '-'} | {r['weight'] or '-'} | {r['source']} | {r['when']} | "
            f"{r['ndcg_cut_10']:.4f} | {r['smoothed']:.4f} | {r['recall_100']:.4f} |")
    return (best["feedback"], best["docs"], best["weight"], best["source"], best["when"]), rows


def http_runs(url: str, queries: dict[str, str], modes: list[str], rerank: bool = False, batch: int = 32
              ) -> dict[str, dict[str, dict[str, float]]]:
    import httpx

    qids = list(queries)
    runs = {}
    headers = {"authorization": f"Bearer {os.environ['SHOAL_TOKEN']}"} if os.environ.get("SHOAL_TOKEN") else {}
    with httpx.Client(base_url=url, timeout=300, headers=headers) as c:
        for mode in modes:
            paths = []
            for i0 in range(0, len(qids), batch):
                qs = [queries[q] for q in qids[i0:i0 + batch]]
                r = c.post("/search/batch", json={"queries": qs, "k": DEPTH * 3, "mode": mode, "rerank": rerank})
                r.raise_for_status()
                paths += [[h["path"] for h in res["hits"]] for res in r.json()["results"]]
            runs[mode + (" +rerank" if rerank else "")] = hits_to_run(paths, qids)
    return runs


def main(argv: Optional[list[str]] = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--config", default=None)
    ap.add_argument("--limit-docs", type=int, default=0)
    ap.add_argument("--url", default=None, help="also query a running `shoal serve` over HTTP")
    ap.add_argument("--rerank", action="store_true",
                    help="also the re-ranked runs (cross-encoder in serve.rerank_model; over HTTP with --url)")
    ap.add_argument("--tune-fusion", action="store_true",
                    help="choose the fusion on half the queries (seeded), report the other half")
    ap.add_argument("--seed", type=int, default=0, help="the query split's seed")
    ap.add_argument("--work", default=None, help="folder for the documents and the data dir")
    ap.add_argument("--data-dir", default=None, help="an already ingested data dir (skip the ingest)")
    ap.add_argument("--modes", default="dense,keyword,hybrid")
    ap.add_argument("--http-modes", default=None, help="modes sent over HTTP (default: --modes)")
    ap.add_argument("--out", default=None, help="per-query scores as JSON")
    ap.add_argument("--feedback-grid", choices=("full", "quick"), default="full",
                    help="the feedback settings tuned with --tune-fusion (quick: the shipped one and its neighbours)")
    a = ap.parse_args(argv)
    from shoal.cluster.config import load_config

    ds = Path(a.dataset)
    docs, queries, qrels = load_beir(ds, a.limit_docs)
    work = Path(a.work or tempfile.mkdtemp(prefix="shoal-eval-"))
    data = Path(a.data_dir) if a.data_dir else work / "data"
    ingest_s = None
    if not a.data_dir:
        write_docs(docs, work / "docs")
        ingest_s = ingest(work / "docs", data, a.config)
    from dataclasses import replace

    shipped = load_config(a.config, data_dir=str(data))
    # the plain modes look once: feedback is tuned and reported as its own run beside them
    cfg = replace(shipped, query=replace(shipped.query, feedback="none"))
    modes = a.modes.split(",")

    from shoal.cluster.search import Searcher

    s = Searcher(cfg)
    tune_q, report_q = split_queries(sorted(queries), a.seed) if a.tune_fusion else ([], sorted(queries))
    chosen, grid = None, []
    fb_chosen: tuple[Any, ...] = ("none",)
    fb_grid: list[dict[str, Any]] = []
    if a.tune_fusion:
        chosen, grid = tune_fusion(s, queries, qrels, tune_q, out)
        fusion, norm, alpha = chosen
        s.cfg = replace(cfg, query=replace(cfg.query, fusion=fusion, alpha=alpha,
                                           normalization=norm if norm != "-" else cfg.query.normalization))
        out(f"\nchosen on the tuning half: fusion {fusion}" + (f", {norm}, alpha {alpha}" if fusion == "convex" else ""))
        if "hybrid" in modes:
            fb_chosen, fb_grid = tune_feedback(s, queries, qrels, tune_q, out,
                                               FEEDBACK_QUICK if a.feedback_grid == "quick" else FEEDBACK_GRID)
            out(f"\nfeedback chosen on the tuning half: {fb_chosen}")
    runs: dict[str, dict[str, dict[str, float]]] = {"BM25 (bm25s on documents, stemmed)": bm25_baseline(docs, queries)}
    runs.update({f"shoal {m}": r for m, r in in_process_runs(cfg, queries, modes, searcher=s).items()})
    if a.tune_fusion and "hybrid" in modes:  # the default fusion beside the chosen one
        s_cfg = s.cfg
        s.cfg = shipped
        runs["shoal hybrid (config as given)"] = in_process_runs(shipped, queries, ["hybrid"], searcher=s)["hybrid"]
        # the chosen feedback (or, where "none" won, the best setting that looks twice: reported beside it)
        best_fb = next(tuple(r[k] for k in ("feedback", "docs", "weight", "source", "when"))
                       for r in sorted(fb_grid, key=lambda r: -r["smoothed"]) if r["feedback"] != "none")
        fb, m, beta, src, when = fb_chosen if fb_chosen[0] != "none" else best_fb
        s.cfg = replace(s_cfg, query=replace(s_cfg.query, feedback=fb, feedback_docs=m, feedback_weight=beta,
                                             feedback_source=src, feedback_when=when))
        runs[f"shoal hybrid +feedback (m {m}, beta {beta}, {src}, {when})"] = \
            in_process_runs(s.cfg, queries, ["hybrid"], searcher=s)["hybrid"]
        s.cfg = s_cfg
    if a.rerank and not a.url:
        runs.update({f"shoal {m}": r for m, r in in_process_runs(cfg, queries, ["hybrid"], searcher=s,
                                                                 rerank=True).items()})
    if a.url:
        hmodes = a.http_modes.split(",") if a.http_modes else modes
        runs.update({f"shoal {m} (HTTP)": r for m, r in http_runs(a.url, queries, hmodes).items()})
        if a.rerank:
            runs.update({f"shoal {m} (HTTP)": r for m, r in http_runs(a.url, queries, hmodes, rerank=True).items()})
    s.close()
    scores = {name: evaluate(qrels, run) for name, run in runs.items()}
    from shoal.index import generations

    _, man = generations.open_current(data)
    out(f"\n### {ds.name}: {len(docs)} documents, {len(queries)} judged queries, "
        f"index {man['factory']} (nprobe {man['nprobe']}), {man['ntotal']} chunks"
        + (f", ingest {ingest_s:.0f} s" if ingest_s else "") + "\n")
    halves = [("report half", report_q), ("tuning half", tune_q), ("all", sorted(queries))] if a.tune_fusion \
        else [("all", sorted(queries))]
    summary: dict[str, Any] = {}
    for label, qids in halves:
        if a.tune_fusion:
            out(f"\n#### {label}: {len(qids)} queries\n")
        out("| run | " + " | ".join(MEASURES.values()) + " |")
        out("| --- | " + " | ".join("---:" for _ in MEASURES) + " |")
        for name, per_q in scores.items():
            m = {mm: float(np.mean([per_q[q][mm] for q in qids])) for mm in MEASURES}
            summary.setdefault(label, {})[name] = m
            out(f"| {name} | " + " | ".join(f"{m[mm]:.4f}" for mm in MEASURES) + " |")
        if "shoal hybrid" in scores:
            out("\n| hybrid vs | better | worse | equal (nDCG@10, per query) |")
            out("| --- | ---: | ---: | ---: |")
            for other in ("shoal dense", "shoal keyword"):
                if other in scores:
                    w, lo, eq = wins_losses(scores["shoal hybrid"], scores[other], qids)
                    summary[label][f"hybrid vs {other.split()[-1]}"] = {"better": w, "worse": lo, "equal": eq}
                    out(f"| {other.split()[-1]} | {w} | {lo} | {eq} |")
            for name in [n for n in scores if n.startswith("shoal hybrid +feedback")]:
                w, lo, eq = wins_losses(scores[name], scores["shoal hybrid"], qids)
                summary[label]["feedback vs hybrid"] = {"better": w, "worse": lo, "equal": eq}
                out(f"\n| with feedback vs hybrid without | better | worse | equal (nDCG@10, per query) |\n"
                    f"| --- | ---: | ---: | ---: |\n| {name[len('shoal hybrid '):]} | {w} | {lo} | {eq} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"dataset": str(ds), "split": {"tune": tune_q, "report": report_q},
                                           "chosen": chosen, "grid": grid, "feedback_chosen": fb_chosen,
                                           "feedback_grid": fb_grid, "summary": summary,
                                           "per_query": scores}, indent=1))
    return {"summary": summary, "per_query": scores, "data": str(data), "work": str(work), "chosen": chosen,
            "grid": grid, "feedback_chosen": fb_chosen, "feedback_grid": fb_grid, "split": (tune_q, report_q)}


if __name__ == "__main__":
    main()
    sys.exit(0)
