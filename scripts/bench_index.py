#!/usr/bin/env python3
"""Index benchmark: build time, bytes on disk, RSS on disk vs in memory, recall@10 vs QPS.

    python scripts/bench_index.py [--n 1000000] [--d 384] [--nq 1000] [--out BENCH_DIR] [--plot PNG]

Synthetic clustered, L2-normalised vectors (seeded). Exact search (Flat) gives
the ground truth; IVF-Flat, IVF-PQ and IVF-PQ+refine are built with shoal's own
index functions (the on-disk variant with `write_ondisk_shard` / `read_ondisk`,
as production opens it) and swept over nprobe. RSS is measured in a fresh
subprocess per layout that opens the index and runs the same queries.
Prints one markdown table; everything comes from one run.

    python scripts/bench_index.py --sizes 1M,3M,10M [--dtypes float32,float16] [--out DIR]

--sizes measures the product's own build path at each size: a data dir whose
catalog holds N synthetic chunk rows and whose staging holds their clustered
vectors (written as float32 and as float16), then `build_generation` in a fresh
process: IVF-Flat, and IVF-PQ + refine (float32 staging only), both on on-disk lists, the
refine's exact vectors memory-mapped from disk; the coarse quantizer is what "auto" picks
(HNSW from 8192 lists on). Build seconds split into training and adding:
build seconds, peak build RSS (the process's own, from wait4), bytes of the
generation, recall@10 against exact search over the staged vectors (streamed),
queries/s at the first nprobe reaching --target, and the serving process's
anonymous RSS after those queries (LoadedGeneration, as a shard replica opens it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss  # noqa: E402

from shoal.index.factory import add_in_blocks, choose_factory, nlist_for, train_sample  # noqa: E402
from scripts.bench_catalog import parse_count  # noqa: E402
from shoal.index.ondisk import read_ondisk, write_ondisk_shard  # noqa: E402
from shoal.cluster.tune import exact_top_k  # noqa: E402


def clustered(n: int, d: int, nc: int, seed: int, latent: int = 64) -> np.ndarray:
    """Clusters in a ``latent``-dim subspace mapped to d dims, plus a little full-rank noise.

    Sentence embeddings have a low intrinsic dimension; isotropic noise in all
    384 dims would be a far harder (and less realistic) case for PQ.
    """
    basis = np.random.default_rng(12345).normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    rs = np.random.default_rng(seed)
    centers = rs.normal(size=(nc, latent)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i0 in range(0, n, 100_000):
        m = min(100_000, n - i0)
        z = centers[rs.integers(0, nc, m)] + 0.5 * rs.normal(size=(m, latent)).astype(np.float32)
        out[i0:i0 + m] = z @ basis + 0.02 * rs.normal(size=(m, d)).astype(np.float32)
    faiss.normalize_L2(out)
    return out


def recall(I: np.ndarray, Igt: np.ndarray, k: int = 10) -> float:
    from faiss.contrib.evaluation import knn_intersection_measure

    return float(knn_intersection_measure(I[:, :k], Igt[:, :k]))


def timed_search(index: faiss.Index, xq: np.ndarray, k: int, reps: int = 3) -> tuple[np.ndarray, float]:
    """-> I, median queries/s over ``reps`` runs of the whole batch."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, I = index.search(xq, k)
        times.append(time.perf_counter() - t0)
    return I, len(xq) / float(np.median(times))


RSS_CHILD = r"""
import sys, json, numpy as np
sys.path.insert(0, sys.argv[4])
import faiss
from shoal.index.ondisk import read_ondisk
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
base = status('VmRSS:')
path, ondisk, nprobe = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3])
index = read_ondisk(path) if ondisk else faiss.read_index(path)
faiss.extract_index_ivf(index).nprobe = nprobe
xq = np.load(path + '.xq.npy')
for i in range(0, len(xq), 100):
    index.search(xq[i:i + 100], 10)
print(json.dumps({'rss': status('VmRSS:') - base, 'anon': status('RssAnon:'), 'file': status('RssFile:'),
                  'peak': status('VmHWM:')}))
"""


def rss_of(path: Path, ondisk: bool, nprobe: int, xq: np.ndarray) -> dict:
    np.save(str(path) + ".xq.npy", xq)
    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), "1" if ondisk else "0", str(nprobe), root],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


SCALE_BUILD = r"""
import json, sys, time, resource, threading
sys.path.insert(0, sys.argv[3])
peak_anon = [0]
def watch():  # RssAnon (heap, not the mapped .ivfdata pages VmHWM also counts), every 20 ms
    while True:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
from shoal.cluster.config import load_config
from shoal.workers.catalog import Catalog
from shoal.cluster.build import build_generation
cfg = load_config(sys.argv[1])
t0 = time.perf_counter()
with Catalog(cfg.data_path / "catalog.sqlite") as cat:
    name = build_generation(cfg, cat, retrain=True)
m = json.loads((cfg.data_path / "generations" / name / "manifest.json").read_text())
print(json.dumps({"generation": name, "seconds": time.perf_counter() - t0, "peak_anon": peak_anon[0],
                  "stages": m.get("stages", {}),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

SCALE_SERVE = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
from shoal.index import generations
from shoal.index.search import LoadedGeneration
gen_dir, m = generations.open_current(__import__('pathlib').Path(sys.argv[1]))
g = LoadedGeneration(gen_dir, m, k_factor=float(sys.argv[5]))
xq = np.load(sys.argv[2])
gt = np.load(sys.argv[2] + '.gt.npy')
out = []
for nprobe in [int(x) for x in sys.argv[4].split(',')]:
    g.search(xq[:50], 10, nprobe=nprobe)  # warm the touched lists
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        D, I = g.search(xq, 10, nprobe=nprobe)
        times.append(time.perf_counter() - t0)
    rec = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)]))
    out.append({"nprobe": nprobe, "recall": rec, "qps": len(xq) / float(np.median(times))})
print(json.dumps({"rows": out, "anon": status('RssAnon:'), "file": status('RssFile:'), "peak": status('VmHWM:')}))
"""


def write_staged(data: Path, n: int, d: int, dtype: str, part_rows: int = 262_144) -> float:
    """A data dir whose catalog holds n chunk rows (ids 1..n) and whose staging holds their vectors."""
    import sqlite3

    from shoal.workers.catalog import Catalog
    from shoal.index import staging

    t0 = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    Catalog(data / "catalog.sqlite").close()
    db = sqlite3.connect(data / "catalog.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    with db:
        db.execute("INSERT INTO meta VALUES ('model', ?)", (json.dumps(
            {"name": "synthetic", "fingerprint": "sha256:synthetic", "dim": d}),))
        db.executemany("INSERT INTO files (id, path, root, size, mtime_ns, sha256, kind, status, n_chunks, "
                       "indexed_at) VALUES (?, ?, '/c', 1, 0, 'x', 'text', 'indexed', 100, 0)",
                       ((f + 1, f"/c/f{f:08d}") for f in range((n + 99) // 100)))
    nc = max(100, n // 1000)
    for i0 in range(0, n, part_rows):
        m = min(part_rows, n - i0)
        ids = np.arange(i0 + 1, i0 + m + 1, dtype=np.int64)
        with db:
            db.executemany("INSERT INTO chunks (id, file_id, ordinal, char_start, char_end, text) "
                           "VALUES (?, ?, 0, 0, 1, 'x')", ((int(i), (int(i) - 1) // 100 + 1) for i in ids))
        xb = clustered_block(m, d, nc, seed=i0)
        name = staging.write_part(data / "staging", ids, xb, dtype)
        with db:
            db.execute("INSERT INTO parts (name, n, min_id, max_id, created_at) VALUES (?, ?, ?, ?, 0)",
                       (name, m, int(ids[0]), int(ids[-1])))
    db.close()
    return time.perf_counter() - t0


def clustered_block(m: int, d: int, nc: int, seed: int, latent: int = 64) -> np.ndarray:
    """``clustered`` for one block: the same basis and centres for every block, other points."""
    basis = np.random.default_rng(12345).normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    centers = np.random.default_rng(777).normal(size=(nc, latent)).astype(np.float32)
    rs = np.random.default_rng(seed + 1)
    z = centers[rs.integers(0, nc, m)] + 0.5 * rs.normal(size=(m, latent)).astype(np.float32)
    out = np.ascontiguousarray(z @ basis + 0.02 * rs.normal(size=(m, d)), dtype=np.float32)
    faiss.normalize_L2(out)
    return out


def scale_main(a: argparse.Namespace) -> int:
    import yaml

    root = str(Path(__file__).resolve().parent.parent)
    sizes = [parse_count(x) for x in a.sizes.split(",")]
    work = Path(a.out or tempfile.mkdtemp(prefix="shoal-bench-scale-"))
    rows = []
    for n in sizes:
        xq = clustered_block(a.nq, a.d, max(100, n // 1000), seed=10**9)
        for dtype in a.dtypes.split(","):
            data = work / f"n{n}_{dtype}"
            shutil.rmtree(data, ignore_errors=True)
            t_stage = write_staged(data, n, a.d, dtype)
            stage_bytes = sum(f.stat().st_size for f in (data / "staging").iterdir())
            print(f"# {n:,} vectors staged as {dtype} in {t_stage:.0f} s ({stage_bytes / 1e9:.2f} GB)", file=sys.stderr)
            np.save(data / "xq.npy", xq)
            if dtype == a.dtypes.split(",")[0]:  # the truth is the first dtype's (float32): float16 is judged by it
                t0 = time.perf_counter()
                gt = exact_top_k(data, xq, 10)  # ids are 1..n: positions + 1
                print(f"# ground truth in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            np.save(str(data / "xq.npy") + ".gt.npy", gt)
            flat = choose_factory(n)  # what "auto" builds: an HNSW coarse quantizer from HNSW_MIN_NLIST lists on
            for factory, ondisk in ((flat, True), (flat.replace(",Flat", f",PQ{a.pq},RFlat"), True)):
                if dtype != "float32" and factory != flat:
                    continue  # the staging dtype question is asked of IVF-Flat (exact codes)
                if factory != flat and n > parse_count(a.pq_max):
                    continue
                cfg = {"data_dir": str(data), "index": {"factory": factory, "ondisk": ondisk,
                                                         "staging_dtype": dtype, "keyword": False}}
                cfg_path = data / "bench.yaml"
                cfg_path.write_text(yaml.safe_dump(cfg))
                built, peak = run_measured(SCALE_BUILD, [str(cfg_path), "-", root])
                gen = data / "generations" / built["generation"]
                disk = sum(f.stat().st_size for f in gen.rglob("*") if f.is_file())
                served, _ = run_measured(SCALE_SERVE, [str(data), str(data / "xq.npy"), root, a.nprobes,
                                                       str(a.k_factor)])
                best = next((r for r in served["rows"] if r["recall"] >= a.target), served["rows"][-1])
                rows.append(dict(n=n, factory=factory, ondisk=ondisk, dtype=dtype, build_s=built["seconds"],
                                 train_s=built["stages"].get("train_s", 0), add_s=built["stages"].get("add_s", 0),
                                 stages=built["stages"],
                                 peak_rss=peak, peak_anon=built["peak_anon"], disk=disk, staging=stage_bytes, nprobe=best["nprobe"],
                                 recall=best["recall"], qps=best["qps"], anon=served["anon"], sweep=served["rows"]))
                print(f"# {factory} {'on disk' if ondisk else 'RAM'} {dtype}: build {built['seconds']:.0f} s, peak "
                      f"{peak / 1e9:.2f} GB (anon {built['peak_anon'] / 1e9:.2f}), recall {best['recall']:.4f} at nprobe {best['nprobe']}, "
                      f"{best['qps']:.0f} q/s, anon {served['anon'] / 1e6:.0f} MB; stages {built['stages']}", file=sys.stderr)
            if not a.keep:
                shutil.rmtree(data, ignore_errors=True)
    print(f"\n### The index past RAM: the product's build (`build_generation`, vectors streamed from staging), "
          f"{a.d} dims, {a.nq} queries, target recall@10 {a.target}\n")
    print("| vectors | index | staging | build s | train s | add s | peak build RSS GB | peak build RssAnon GB | "
          "generation on disk GB | staging GB | nprobe | recall@10 | queries/s | serving RssAnon MB |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']:,} | {r['factory']}{' on disk' if r['ondisk'] else ''} | {r['dtype']} | {r['build_s']:.0f} | "
              f"{r['train_s']:.0f} | {r['add_s']:.0f} | "
              f"{r['peak_rss'] / 1e9:.2f} | {r['peak_anon'] / 1e9:.2f} | {r['disk'] / 1e9:.2f} | {r['staging'] / 1e9:.2f} | {r['nprobe']} | "
              f"{r['recall']:.4f} | {r['qps']:.0f} | {r['anon'] / 1e6:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot_scale(rows, a.plot)
    return 0


def run_measured(code: str, args: list[str]) -> tuple[dict, int]:
    """Run ``code`` in a fresh python; its JSON line and its own peak RSS (wait4's ru_maxrss, bytes)."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read() if p.stdout else b""
    err = p.stderr.read() if p.stderr else b""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1]), ru.ru_maxrss * 1024


def plot_scale(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for key in dict.fromkeys((r["factory"].split(",", 1)[1], r["ondisk"], r["dtype"]) for r in rows):
        pts = [r for r in rows if (r["factory"].split(",", 1)[1], r["ondisk"], r["dtype"]) == key]
        label = f"IVF,{key[0]}{' on disk' if key[1] else ''} ({key[2]})"
        ns = [r["n"] for r in pts]
        axes[0].plot(ns, [r["build_s"] for r in pts], marker="o", label=label)
        axes[1].plot(ns, [r["peak_anon"] / 1e9 for r in pts], marker="o", label=label)
        axes[2].plot(ns, [r["disk"] / 1e9 for r in pts], marker="o", label=label)
    ns = sorted({r["n"] for r in rows})
    if ns:
        first = min((r for r in rows if r["n"] == ns[0]), key=lambda r: r["build_s"])
        axes[0].plot(ns, [first["build_s"] * n * np.log(n) / (ns[0] * np.log(ns[0])) for n in ns], "k--", lw=1,
                     label="n log n from the smallest")
    axes[1].axhline(4, color="r", ls=":", lw=1, label="4 GB goal")
    for ax, t in zip(axes, ("build seconds", "peak build RssAnon (GB)", "generation on disk (GB)")):
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("vectors")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot written to {path}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--pq", type=int, default=48, help="PQ sub-quantizers")
    ap.add_argument("--nprobes", default="1,4,16,64,256")
    ap.add_argument("--out", default=None, help="folder for the index files (default: a temp dir)")
    ap.add_argument("--plot", default="bench_index.png")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--sizes", default=None, help="e.g. 1M,3M,10M: the product's build at each size (see below)")
    ap.add_argument("--dtypes", default="float32,float16", help="--sizes: staging dtypes to build from")
    ap.add_argument("--target", type=float, default=0.95, help="--sizes: recall@10 the nprobe is tuned to")
    ap.add_argument("--keep", action="store_true", help="--sizes: keep the data dirs")
    ap.add_argument("--pq-max", default="100M", help="--sizes: build IVF-PQ only up to this size")
    ap.add_argument("--k-factor", type=float, default=8, help="--sizes: refine candidates per hit (IVF-PQ + refine)")
    a = ap.parse_args()
    if a.sizes:
        if a.nprobes == "1,4,16,64,256":
            a.nprobes = "8,16,32,64,128"
        if a.plot == "bench_index.png":
            a.plot = "bench_scale.png"
        return scale_main(a)
    n, d, k = a.n, a.d, 10
    out = Path(a.out or tempfile.mkdtemp(prefix="shoal-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    nprobes = [int(x) for x in a.nprobes.split(",")]
    print(f"# {n} x {d} clustered vectors, {a.nq} queries, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, files in {out}", file=sys.stderr)

    t0 = time.perf_counter()
    xb = clustered(n, d, nc=max(100, n // 1000), seed=0)
    xq = clustered(a.nq, d, nc=max(100, n // 1000), seed=1)  # same basis, other points
    ids = np.arange(n, dtype=np.int64)
    print(f"# data in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    rows = []
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    build = time.perf_counter() - t0
    Igt, qps_flat = timed_search(flat, xq, k, reps=1)
    faiss.write_index(flat, str(out / "flat.index"))
    rows.append(dict(index="Flat (exact)", nprobe="-", build_s=build, disk_mb=(out / "flat.index").stat().st_size / 1e6,
                     recall=1.0, qps=qps_flat))
    del flat
    print(f"# exact: {qps_flat:.1f} q/s", file=sys.stderr)

    nlist = nlist_for(n)
    t0 = time.perf_counter()
    ivf = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(train_sample(xb, f"IVF{nlist},Flat", per_list=39))
    train_s = time.perf_counter() - t0
    trained = faiss.clone_index(ivf)
    add_in_blocks(ivf, xb, ids)
    build_ivf = time.perf_counter() - t0
    faiss.write_index(ivf, str(out / "ivf.index"))
    print(f"# IVF{nlist},Flat: trained in {train_s:.1f}s, built in {build_ivf:.1f}s", file=sys.stderr)

    t0 = time.perf_counter()
    write_ondisk_shard(trained, xb, ids, out, "ivf_ondisk", block=200_000)
    build_disk = train_s + time.perf_counter() - t0
    disk = read_ondisk(out / "ivf_ondisk.index")

    quant = faiss.downcast_index(trained.quantizer)
    t0 = time.perf_counter()
    pq = faiss.IndexIVFPQ(quant, d, nlist, a.pq, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(train_sample(xb, f"IVF{nlist},PQ{a.pq}", per_list=39))  # coarse quantizer already trained
    add_in_blocks(pq, xb, ids)
    build_pq = train_s + time.perf_counter() - t0
    faiss.write_index(pq, str(out / "ivfpq.index"))
    refine = faiss.IndexRefineFlat(pq, faiss.swig_ptr(xb))  # exact copies, in the base index's order
    refine.k_factor = 8
    t0 = time.perf_counter()
    faiss.write_index(refine, str(out / "ivfpq_rflat.index"))
    print(f"# IVF{nlist},PQ{a.pq}: built in {build_pq:.1f}s", file=sys.stderr)

    layouts = [
        (f"IVF{nlist},Flat (RAM)", ivf, build_ivf, (out / "ivf.index").stat().st_size),
        (f"IVF{nlist},Flat (on disk)", disk, build_disk,
         (out / "ivf_ondisk.index").stat().st_size + (out / "ivf_ondisk.ivfdata").stat().st_size),
        (f"IVF{nlist},PQ{a.pq}", pq, build_pq, (out / "ivfpq.index").stat().st_size),
        (f"IVF{nlist},PQ{a.pq},RFlat (k_factor 8)", refine, build_pq, (out / "ivfpq_rflat.index").stat().st_size),
    ]
    for name, index, build_s, nbytes in layouts:
        for nprobe in nprobes:
            if nprobe > nlist:
                continue
            faiss.extract_index_ivf(index).nprobe = nprobe  # one thread of searches: setting it is safe here
            I, qps = timed_search(index, xq, k)
            rows.append(dict(index=name, nprobe=nprobe, build_s=build_s, disk_mb=nbytes / 1e6,
                             recall=recall(I, Igt, k), qps=qps))
            print(f"# {name} nprobe {nprobe}: recall {rows[-1]['recall']:.4f}, {qps:.0f} q/s", file=sys.stderr)

    tuned = next((r for r in rows if r["index"].endswith("(RAM)") and r["recall"] >= 0.95), None)
    mem = rss_of(out / "ivf.index", False, 16, xq)
    dsk = rss_of(out / "ivf_ondisk.index", True, 16, xq)

    print(f"\n### Index benchmark: {n:,} x {d} vectors, {a.nq} queries, k={k}\n")
    print("| index | nprobe | build s | on disk MB | recall@10 | queries/s | x exact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['index']} | {r['nprobe']} | {r['build_s']:.1f} | {r['disk_mb']:.0f} | {r['recall']:.4f} | "
              f"{r['qps']:.0f} | {r['qps'] / qps_flat:.1f} |")
    print(f"\n| IVF-Flat opened for search ({a.nq} queries, nprobe 16, fresh process) | RSS growth MB | "
          "RssAnon MB | RssFile MB | peak RSS (VmHWM) MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, m in (("in memory (read_index)", mem), ("on disk (IO_FLAG_ONDISK_SAME_DIR / READ_ONLY)", dsk)):
        print(f"| {name} | {m['rss'] / 1e6:.0f} | {m['anon'] / 1e6:.0f} | {m['file'] / 1e6:.0f} | "
              f"{m['peak'] / 1e6:.0f} |")
    print(f"\nOn disk / in memory: anonymous (process-owned) memory {dsk['anon'] / mem['anon']:.3f}, "
          f"peak RSS {dsk['peak'] / mem['peak']:.3f} (RSS counts the mapped .ivfdata pages the queries touched; "
          "they are page cache the kernel can drop, not heap)")
    if tuned:
        print(f"IVF-Flat at recall@10 >= 0.95 (nprobe {tuned['nprobe']}, recall {tuned['recall']:.4f}): "
              f"{tuned['qps']:.0f} q/s = {tuned['qps'] / qps_flat:.1f}x exact search ({qps_flat:.1f} q/s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "rss_mem": mem, "rss_disk": dsk}, indent=2))
    if a.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("# matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(r["index"] for r in rows if r["nprobe"] != "-"):
            pts = [(r["recall"], r["qps"]) for r in rows if r["index"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(qps_flat, color="k", ls="--", lw=1, label=f"exact ({qps_flat:.0f} q/s)")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries/s (log)")
        ax.set_yscale("log")
        ax.set_title(f"{n:,} x {d}, {a.nq} queries, {faiss.omp_get_max_threads()} threads")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"# plot written to {a.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
