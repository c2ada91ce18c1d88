#!/usr/bin/env python3
"""Ingest benchmark: shoal on local Ray vs the plain single-process script from the tutorials.

    python scripts/bench_ingest.py [--min-chunks 20000] [--beir ../shared/data/cranfield] [--work DIR]

The Cranfield documents are written out as files, repeated until the corpus
holds at least --min-chunks chunks. Then, in one run on the same machine:
(a) the plain script a user would write from the FAISS tutorials: read each
file, chunk it the same way, sentence-transformers `encode` in batches of 32,
`IndexFlatIP.add`; (b) `shoal ingest` (a real subprocess, local Ray) with 1 and
2 CPU actors, and with 1 actor and `embed.dedup: false`: the repeated corpus
makes shoal's per-batch de-duplication embed each copy once, so the dedup-off
row is the like-for-like pipeline comparison. Chunks/s is end to end (process
start to index on disk). The driver's peak RSS is sampled every 0.2 s, for
shoal at two corpus sizes.
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

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAIN = r"""
import json, os, sys, time
t0 = time.perf_counter()
import faiss, numpy as np
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer
sys.path.insert(0, sys.argv[3])
from shoal.cluster.chunking import chunk_text
from shoal.workers.embed import resolve_model_path
path = resolve_model_path("all-MiniLM-L6-v2")
model = SentenceTransformer(path, device="cpu")
tok = AutoTokenizer.from_pretrained(path)
texts = []
for name in sorted(os.listdir(sys.argv[1])):
    with open(os.path.join(sys.argv[1], name), encoding="utf-8") as f:
        texts += [c.text for c in chunk_text(f.read(), tok, 200, 40)]
xb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
index = faiss.IndexFlatIP(xb.shape[1])
index.add(xb)
faiss.write_index(index, sys.argv[2])
print(json.dumps({"chunks": len(texts), "seconds": time.perf_counter() - t0}))
"""


def make_corpus(beir: Path, out: Path, min_chunks: int, n_docs: int = 0) -> tuple[int, int]:
    """Write the documents, repeated; returns (files, repeat)."""
    from shoal.cluster.chunking import chunk_text
    from shoal.workers.embed import resolve_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    docs = [json.loads(line) for line in open(beir / "corpus.jsonl", encoding="utf-8")]
    docs = docs[:n_docs] if n_docs else docs
    bodies = [f"{d.get('title', '').strip()}\n\n{d.get('text', '').strip()}\n" for d in docs]
    per_copy = sum(len(chunk_text(b, tok, 200, 40)) for b in bodies)
    repeat = max(1, math.ceil(min_chunks / per_copy))
    out.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
        for d, b in zip(docs, bodies):
            (out / f"{d['_id']}_r{r}.txt").write_text(b, encoding="utf-8")
    return len(docs) * repeat, repeat


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run cmd; return (wall seconds, peak RSS of the process itself in bytes, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = p.stdout.read() if p.stdout else ""
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed ({p.returncode}):\n{out[-2000:]}")
    return time.perf_counter() - t0, peak, out


def shoal_ingest(corpus: Path, work: Path, actors: int, env: dict[str, str], dedup: bool = True) -> dict:
    cfg = work / f"bench_{actors}_{dedup}.yaml"
    cfg.write_text(yaml.safe_dump({"embed": {"cpu_actors": actors, "threads_per_actor": 0, "dedup": dedup}}))
    data = work / f"data_{actors}_{dedup}_{corpus.name}"
    shutil.rmtree(data, ignore_errors=True)
    wall, peak, out = run_measured([sys.executable, "-m", "shoal.cluster.cli", "ingest", str(corpus), "--config",
                                    str(cfg), "--data-dir", str(data), "--json"], env)
    rep = json.loads(out[out.index("{"):])
    return {"chunks": rep["chunks_added"], "seconds": wall, "rss": peak, "files": rep["files_seen"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beir", default=str(ROOT.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--min-chunks", type=int, default=20_000)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--docs", type=int, default=0, help="use only the first N documents (a quick check)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="shoal-bench-ingest-"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    big = work / "corpus"
    files, repeat = make_corpus(Path(a.beir), big, a.min_chunks, a.docs)
    small = work / "corpus_quarter"
    small.mkdir(exist_ok=True)
    for i, p in enumerate(sorted(big.iterdir())):
        if i % 4 == 0:
            shutil.copy(p, small / p.name)
    print(f"# corpus: {files} files ({repeat} copies of each document) in {work}", file=sys.stderr)

    wall, peak, out = run_measured([sys.executable, "-c", PLAIN, str(big), str(work / "plain.index"), str(ROOT)], env)
    plain = json.loads(out.strip().splitlines()[-1])
    plain.update(seconds=wall, rss=peak)
    print(f"# plain: {plain['chunks']} chunks in {wall:.1f}s", file=sys.stderr)
    runs = {}
    for actors in (1, 2):
        runs[actors] = shoal_ingest(big, work, actors, env)
        print(f"# shoal {actors} actor(s): {runs[actors]['chunks']} chunks in {runs[actors]['seconds']:.1f}s",
              file=sys.stderr)
    quarter = shoal_ingest(small, work, 1, env)
    nodedup = shoal_ingest(big, work, 1, env, dedup=False)
    print(f"# shoal 1 actor, dedup off: {nodedup['chunks']} chunks in {nodedup['seconds']:.1f}s", file=sys.stderr)

    base = plain["chunks"] / plain["seconds"]
    print(f"\n### Ingest benchmark: Cranfield x{repeat} ({files} files), all-MiniLM-L6-v2, "
          f"{os.cpu_count()} cores, CPU\n")
    print("| pipeline | chunks | seconds | chunks/s | vs plain script | peak RSS of the driver MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| (a) plain script: sentence-transformers encode(batch 32) + IndexFlatIP.add | {plain['chunks']} | "
          f"{plain['seconds']:.1f} | {base:.1f} | 1.00 | {plain['rss'] / 1e6:.0f} |")
    for actors, r in runs.items():
        rate = r["chunks"] / r["seconds"]
        print(f"| (b) shoal ingest, local Ray, {actors} CPU actor(s) | {r['chunks']} | {r['seconds']:.1f} | "
              f"{rate:.1f} | {rate / base:.2f} | {r['rss'] / 1e6:.0f} |")
    rate = nodedup["chunks"] / nodedup["seconds"]
    print(f"| (b) shoal ingest, 1 CPU actor, embed.dedup off (every copy embedded) | {nodedup['chunks']} | "
          f"{nodedup['seconds']:.1f} | {rate:.1f} | {rate / base:.2f} | {nodedup['rss'] / 1e6:.0f} |")
    rate = quarter["chunks"] / quarter["seconds"]
    print(f"| (b) shoal ingest, 1 CPU actor, quarter corpus | {quarter['chunks']} | {quarter['seconds']:.1f} | "
          f"{rate:.1f} | {rate / base:.2f} | {quarter['rss'] / 1e6:.0f} |")
    print(f"\nDriver peak RSS: {quarter['rss'] / 1e6:.0f} MB at {quarter['files']} files, "
          f"{runs[1]['rss'] / 1e6:.0f} MB at {runs[1]['files']} files (the plain script holds every chunk "
          f"and vector: {plain['rss'] / 1e6:.0f} MB).")
    if a.json:
        Path(a.json).write_text(json.dumps({"plain": plain, "shoal": runs, "quarter": quarter, "nodedup": nodedup},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
