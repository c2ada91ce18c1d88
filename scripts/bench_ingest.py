#!/usr/bin/env python3
"""Ingest benchmark: `shoal ingest` end to end beside txtai and LanceDB, and the pipeline's own ceiling.

    python scripts/bench_ingest.py [--runs 3] [--peer-python PY] [--beir ../shared/data/cranfield]
    python scripts/bench_ingest.py --null-embed [--min-chunks 30000] [--pdfs 300]

Default: the BEIR corpus written out as one text file per document. Each run
does `shoal ingest` (a real subprocess: local Ray, the bundled model on the CPU,
catalog, index and keyword build), then txtai and LanceDB on the same files
with the same model (scripts/peer_ingest.py, under --peer-python; a peer that
is not installed there has no row). shoal is timed end to end (process start
to generation published); the peers by their build alone (encode + index), as
their docs time it: the comparison is the stricter for shoal. texts/s counts
what each system embeds: shoal's chunks (<= 200 tokens), the peers' whole
documents (truncated at 256 tokens). Prints the runs, the ratio of shoal's
texts/s to the best peer's in each run, and shoal's per-stage breakdown.

--null-embed: the model is swapped for an instant embedder (`model.name:
null:384`, random unit vectors), so the table shows what the pipeline itself
feeds (scan, read, parse, chunk, commit), with the driver reading (0) and 1 and
2 read workers, on plain text (the corpus repeated to --min-chunks) and on
PDF-heavy input (--pdfs PDF files written with fpdf2, several pages each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")


def load_docs(beir: Path) -> list[dict]:
    return [json.loads(line) for line in open(beir / "corpus.jsonl", encoding="utf-8")]


def body(d: dict) -> str:
    return f"{d.get('title', '').strip()}\n\n{d.get('text', '').strip()}\n"


def write_text_corpus(docs: list[dict], out: Path, repeat: int = 1) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
        for d in docs:
            (out / f"{d['_id']}_r{r}.txt").write_text(body(d) + (f"\n(copy {r})\n" if r else ""), encoding="utf-8")
    return len(docs) * repeat


def write_pdf_corpus(docs: list[dict], out: Path, n_pdfs: int, per_pdf: int = 6) -> int:
    """``n_pdfs`` PDFs of ``per_pdf`` documents each (one page or more per document), plus one text file per PDF."""
    from fpdf import FPDF

    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_pdfs):
        pdf = FPDF()
        pdf.set_font("helvetica", size=10)
        for j in range(per_pdf):
            d = docs[(i * per_pdf + j) % len(docs)]
            pdf.add_page()
            text = body(d).encode("latin-1", "replace").decode("latin-1")
            pdf.multi_cell(0, 5, text, new_x="LMARGIN", new_y="NEXT")
        pdf.output(str(out / f"report_{i:05d}.pdf"))
        (out / f"notes_{i:05d}.txt").write_text(body(docs[(i * 7) % len(docs)]), encoding="utf-8")
    return 2 * n_pdfs


def shoal_ingest(corpus: Path, work: Path, tag: str, extra: dict) -> dict:
    cfg = work / f"{tag}.yaml"
    cfg.write_text(yaml.safe_dump(extra))
    data = work / f"data_{tag}"
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "ingest", str(corpus), "--config", str(cfg),
                        "--data-dir", str(data), "--json"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"shoal ingest failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rep = json.loads(p.stdout[p.stdout.index("{"):])
    shutil.rmtree(data, ignore_errors=True)
    return dict(rep, wall=wall)


def peer_ingest(python: str, peer: str, corpus: Path, work: Path, model: str) -> dict | None:
    p = subprocess.run([python, str(ROOT / "scripts" / "peer_ingest.py"), peer, str(corpus), str(work / peer), model],
                       env=ENV, capture_output=True, text=True)
    shutil.rmtree(work / peer, ignore_errors=True)
    if p.returncode != 0:
        print(f"# {peer}: failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def has_module(python: str, mod: str) -> bool:
    return subprocess.run([python, "-c", f"import {mod}"], capture_output=True).returncode == 0


def stage_cols(rep: dict) -> list[str]:
    st = rep["stages"]
    return [f"{st.get(k, 0):.1f}" for k in ("startup", "read_chunk", "embed_wait", "commit", "build", "scan")]


def peers_mode(a: argparse.Namespace, work: Path) -> None:
    from shoal.workers.embed import resolve_model_path

    docs = load_docs(Path(a.beir))
    corpus = work / "docs"
    n_docs = write_text_corpus(docs, corpus)
    model = resolve_model_path("all-MiniLM-L6-v2")
    peers = [p for p in ("txtai", "lancedb") if has_module(a.peer_python, p)]
    print(f"# corpus: {n_docs} files; peers under {a.peer_python}: {peers or 'none'}", file=sys.stderr)
    runs: list[dict] = []
    for r in range(a.runs):
        row = {"shoal": shoal_ingest(corpus, work, f"shoal{r}", {})}
        print(f"# run {r + 1}: shoal {row['shoal']['chunks_added']} chunks in {row['shoal']['wall']:.1f} s",
              file=sys.stderr)
        for peer in peers:
            got = peer_ingest(a.peer_python, peer, corpus, work, model)
            if got:
                row[peer] = got
                print(f"# run {r + 1}: {peer} {got['documents']} docs, build {got['build_seconds']:.1f} s",
                      file=sys.stderr)
        runs.append(row)
    print(f"\n### Ingest beside the peers: {Path(a.beir).name}, {n_docs} documents, all-MiniLM-L6-v2, "
          f"{os.cpu_count()} cores, CPU, {a.runs} runs\n")
    head = " | ".join(f"run {i + 1}" for i in range(a.runs))
    print(f"| system | texts | {head} | what is timed |")
    print("| --- | ---: | " + " | ".join(["---:"] * a.runs) + " | --- |")
    s0 = runs[0]["shoal"]
    print(f"| `shoal ingest` ({s0['chunks_added']} chunks of <= 200 tokens) | {s0['chunks_added']} | " + " | ".join(
        f"{r['shoal']['wall']:.1f} s ({r['shoal']['chunks_added'] / r['shoal']['wall']:.1f}/s)" for r in runs)
        + " | process start to generation published: Ray, model load, read, embed, catalog, index, BM25 |")
    for peer in peers:
        rs = [r.get(peer) for r in runs]
        if not any(rs):
            continue
        n = next(x for x in rs if x)["documents"]
        print(f"| {peer} ({n} documents, <= 256 tokens) | {n} | " + " | ".join(
            f"{x['build_seconds']:.1f} s ({x['documents'] / x['build_seconds']:.1f}/s)" if x else "-" for x in rs)
            + " | build only (encode + index); whole process: " + ", ".join(
            f"{x['total_seconds']:.1f}" for x in rs if x) + " s |")
    ratios = []
    for r in runs:
        best = max((r[p]["documents"] / r[p]["build_seconds"] for p in peers if p in r), default=0)
        ratios.append(r["shoal"]["chunks_added"] / r["shoal"]["wall"] / best if best else float("nan"))
    if peers:
        print(f"\nshoal's texts/s / the best peer's, per run: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(min {min(ratios):.2f}).")
    print("\nWhere shoal's time went (seconds, driver's view; embed busy is inside the actor, read tasks inside "
          "the readers):\n")
    print("| run | total | startup | read/chunk | embed wait | commit | build | scan + rest | embed busy | "
          "read tasks | first commit | driver CPU |")
    print("| --- | " + " | ".join(["---:"] * 11) + " |")
    for i, r in enumerate(runs):
        s = r["shoal"]
        print(f"| {i + 1} | {s['wall']:.1f} | " + " | ".join(stage_cols(s)) +
              f" | {s['embed_busy_seconds']:.1f} | {s['read_task_seconds']:.1f} | {s['first_commit_s']:.1f} | "
              f"{s['driver_cpu_seconds']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))


def null_mode(a: argparse.Namespace, work: Path) -> None:
    from shoal.workers.chunking import chunk_text
    from shoal.workers.reader import tokenizer_for

    docs = load_docs(Path(a.beir))
    tok = tokenizer_for("all-MiniLM-L6-v2", False)
    per_copy = sum(len(chunk_text(body(d), tok, 200, 40)) for d in docs)
    repeat = max(1, math.ceil(a.min_chunks / per_copy))
    corpora = {"plain text": work / "text", "PDF-heavy": work / "pdf"}
    n_text = write_text_corpus(docs, corpora["plain text"], repeat)
    t0 = time.perf_counter()
    n_pdf = write_pdf_corpus(docs, corpora["PDF-heavy"], a.pdfs)
    print(f"# text: {n_text} files; PDF-heavy: {n_pdf} files ({a.pdfs} PDFs, written in "
          f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = []
    for name, corpus in corpora.items():
        for workers in (0, 1, 2):
            rep = shoal_ingest(corpus, work, f"null_{corpus.name}_{workers}",
                               {"model": {"name": "null:384"}, "embed": {"dedup": False},
                                "ingest": {"read_workers": workers, "reader_niceness": 0}})
            rows.append((name, workers, rep))
            print(f"# {name}, {workers} read workers: {rep['chunks_added']} chunks in {rep['wall']:.1f} s",
                  file=sys.stderr)
    print(f"\n### Pipeline ceiling (`--null-embed`: instant embedder), {os.cpu_count()} cores\n")
    print("| input | read workers | files | chunks | seconds | chunks/s end to end | chunks/s pipeline | "
          "driver CPU s / 1000 chunks | reader s / 1000 chunks | chunks/s per reader core |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, workers, rep in rows:
        n = rep["chunks_added"]
        st = rep["stages"]
        steady = rep["wall"] - st.get("startup", 0) - st.get("build", 0) - (rep["wall"] - rep["seconds"])
        reader_s = rep["read_task_seconds"]
        print(f"| {name} | {workers or '0 (driver)'} | {rep['files_seen']} | {n} | {rep['wall']:.1f} | "
              f"{n / rep['wall']:.0f} | {n / steady:.0f} | {1000 * rep['driver_cpu_seconds'] / n:.2f} | "
              f"{1000 * reader_s / n:.2f} | {n / reader_s:.0f} |")
    print("\nchunks/s pipeline: chunks over the run less Ray/actor start-up, the index build and process start. "
          "reader s: reading, parsing and chunking time inside the readers (the driver's own when 0). Readers at "
          "normal priority (`ingest.reader_niceness: 0`), as on a box whose embedders are GPUs.")
    if a.json:
        Path(a.json).write_text(json.dumps([(n, w, r) for n, w, r in rows], indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beir", default=str(ROOT.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer-python", default=sys.executable, help="a Python with txtai / lancedb installed")
    ap.add_argument("--null-embed", action="store_true", help="pipeline ceiling with an instant embedder")
    ap.add_argument("--min-chunks", type=int, default=30_000, help="--null-embed: plain-text corpus size")
    ap.add_argument("--pdfs", type=int, default=300, help="--null-embed: PDF files in the PDF-heavy corpus")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="shoal-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    (null_mode if a.null_embed else peers_mode)(a, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
