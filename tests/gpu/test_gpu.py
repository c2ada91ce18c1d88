"""The GPU paths on real cards: embedding, actors per GPU, shard plan, FAISS on GPU.

Run by scripts/gpu_check.sh (SHOAL_GPU_CHECK=1); not part of the default suite.
"""

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _faiss_gpus() -> int:
    try:
        from shoal.index.gpu import num_gpus
    except ImportError:
        return 0
    return num_gpus()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="no GPU present: torch.cuda.is_available() is False")
needs_faiss_gpu = pytest.mark.skipif(
    _faiss_gpus() == 0, reason="FAISS sees no GPU here (faiss-cpu installed, or faiss-gpu with no card)")


def test_devices(report):
    """What this machine has: cards seen by torch, GPUs seen by FAISS."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report("torch", torch.__version__, f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build")
    report("cards (torch)", n, "no GPU present" if n == 0 else "")
    for i in range(n):
        free, total = torch.cuda.mem_get_info(i)
        assert 0 < free <= total
        report(f"card {i}", torch.cuda.get_device_name(i), f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    try:
        import faiss

        from shoal.index.gpu import num_gpus

        report("faiss", faiss.__version__, f"{num_gpus()} GPU(s) seen by FAISS"
               + ("" if hasattr(faiss, "StandardGpuResources") else ": CPU-only build"))
    except ImportError:
        report("faiss", "not installed", "FAISS checks skipped")


@needs_cuda
def test_encode_on_gpu_equals_cpu(report, model_name, texts):
    """The same model on the card and on the CPU gives the same vectors; chunks/s on the card."""
    import torch

    from shoal.workers.embed import encode, load_model

    gpu = load_model(model_name, device="cuda", max_seq_length=256)
    cpu = load_model(model_name, device="cpu", max_seq_length=256)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    assert gpu.fingerprint == cpu.fingerprint
    xg, xc = encode(texts[:64], gpu, 64), encode(texts[:64], cpu, 64)
    cos = (xg * xc).sum(1)
    assert cos.min() > 0.999, f"GPU and CPU embeddings differ: min cosine {cos.min():.5f}"
    report("embed GPU vs CPU", f"min cos {cos.min():.6f}", "64 passages, same model, fp32")
    rates = {}
    for bs in (64, 128, 256):
        encode(texts[:bs], gpu, bs)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        encode(texts, gpu, bs)
        torch.cuda.synchronize()
        rates[bs] = len(texts) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    encode(texts[:128], cpu, 64)
    cpu_rate = 128 / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    report("embed chunks/s (GPU)", f"{rates[best]:,.0f}",
           f"batch {best}; " + ", ".join(f"b{b}: {r:,.0f}" for b, r in rates.items())
           + f"; 2,048 passages of 120-200 words, {torch.cuda.get_device_name(0)}")
    report("embed chunks/s (CPU here)", f"{cpu_rate:,.0f}", f"{os.cpu_count()} cores; GPU/CPU = {rates[best] / cpu_rate:.0f}x")


@needs_cuda
def test_embed_actors_one_per_gpu(report, model_name, texts):
    """ingest's EmbedPool puts one num_gpus=1 actor on each card, each computing on its card."""
    pytest.importorskip("ray", reason="ray is not installed here")
    import ray
    import torch

    from shoal.cluster.config import load_config
    from shoal.cluster.ingest import pool_spec
    from shoal.cluster.ray_env import init_ray
    from shoal.workers.pool import EmbedPool

    n = torch.cuda.device_count()
    cfg = load_config(ROOT / "configs" / "test.yaml")
    cfg = replace(cfg, model=replace(cfg.model, name=model_name, device="auto"))
    init_ray(num_cpus=n + 2, num_gpus=n)
    try:
        pool = EmbedPool(pool_spec(cfg))
        pool.start()
        pool.ready()  # the models load in the background since the start; wait for them
        infos = pool.info
        assert len(infos) == n
        assert all(i["device"] == "cuda" for i in infos), infos
        assert sorted(i["cuda_visible_devices"] for i in infos) == [str(g) for g in range(n)]
        batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
        got = 0

        def take() -> None:
            nonlocal got
            nb, xb, _ = pool.wait_one()
            assert xb.shape == (nb, infos[0]["dim"])
            got += nb

        t0 = time.perf_counter()
        for b in batches:
            while pool.full():
                take()
            pool.submit(b, len(b))
        while pool.pending():
            take()
        dt = time.perf_counter() - t0
        assert got == len(texts)
        pool.shutdown()
        report("embed actors", f"{n} on {n} card(s)",
               "; ".join(f"pid {i['pid']} CUDA_VISIBLE_DEVICES={i['cuda_visible_devices']} batch {i['batch_size']}"
                         for i in infos))
        report("embed chunks/s (Ray actors)", f"{got / dt:,.0f}", "EmbedPool, 256-text batches, Ray overhead included")
    finally:
        ray.shutdown()


@needs_cuda
def test_shard_plan_from_real_cards(report):
    """The plan made from the cards' own memory: one shard per card, sized by memory."""
    import torch

    from shoal.index.gpu import cuda_cards
    from shoal.index.shards import bytes_per_vector, plan_shards

    devs = cuda_cards()
    assert len(devs) == torch.cuda.device_count()
    d, factory = 384, "IVF65536,Flat"
    usable = sum(g.memory_bytes for g in devs) * 0.8
    n = int(0.9 * usable / bytes_per_vector(factory, d))  # as many vectors as the cards can hold
    specs = plan_shards(n, d, factory, devs, cpu_memory_bytes=64 << 30)
    assert [s.gpu_id for s in specs] == list(range(len(devs)))
    assert all(s.placement == "gpu" for s in specs)
    total_mem = sum(g.memory_bytes for g in devs)
    for s, g in zip(specs, devs):
        assert abs((s.i1 - s.i0) / n - g.memory_bytes / total_mem) < 1e-3
        report(f"plan shard {s.shard}", f"{s.i1 - s.i0:,} vectors", s.reason)
    report("plan capacity", f"{n / 1e6:,.0f}M x {d}", f"{factory} on {len(devs)} card(s), 20% reserve")


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rs = np.random.default_rng(seed)
    centers = rs.standard_normal((256, d)).astype(np.float32)
    x = centers[rs.integers(0, 256, n)] + 0.3 * rs.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@needs_faiss_gpu
def test_gpu_search_equals_cpu(report):
    """index_cpu_to_gpu shards: the same ids as the CPU search at the same nprobe."""
    import faiss

    from shoal.index.factory import make_index
    from shoal.index.gpu import num_gpus, to_gpu

    d, nb, nq, k, nprobe = 384, 200_000, 1_000, 10, 16
    xb, xq = _clustered(nb, d, 1), _clustered(nq, d, 2)
    cpu = make_index("IVF1024,Flat", d)
    cpu.train(xb[:65_536])
    cpu.add_with_ids(xb, np.arange(nb, dtype=np.int64))
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    t0 = time.perf_counter()
    Dc, Ic = cpu.search(xq, k, params=params)
    t_cpu = time.perf_counter() - t0
    n = num_gpus()
    shards = faiss.IndexShards(d, True, False)
    per = nb // n
    gpu_parts = []
    for g in range(n):  # one shard per card, each a copy of the trained index with its id range
        part = faiss.clone_index(cpu)
        part.reset()
        i1 = nb if g == n - 1 else (g + 1) * per
        part.add_with_ids(xb[g * per:i1], np.arange(g * per, i1, dtype=np.int64))
        gpu_parts.append(to_gpu(part, g))
        shards.add_shard(gpu_parts[-1])
    shards.search(xq[:10], k, params=params)  # warm-up
    t0 = time.perf_counter()
    Dg, Ig = shards.search(xq, k, params=params)  # nprobe per call, through IndexShards to each GPU shard
    t_gpu = time.perf_counter() - t0
    same = np.mean([len(set(a) & set(b)) / k for a, b in zip(Ic, Ig)])
    assert same >= 0.99, f"GPU and CPU top-{k} overlap {same:.4f}"
    report("GPU search == CPU", f"{same:.4f} top-10 overlap", f"IVF1024,Flat, nprobe {nprobe}, {n} GPU shard(s)")
    report("search q/s", f"GPU {nq / t_gpu:,.0f} / CPU {nq / t_cpu:,.0f}", f"{nb:,} x {d}, {nq} queries")


@needs_faiss_gpu
def test_gpu_kmeans(report):
    """The coarse quantizer trained on the GPUs, as a build does."""
    import faiss

    from shoal.index.factory import make_index
    from shoal.index.gpu import use_gpu_clustering

    d, n = 384, 262_144
    xt = _clustered(n, d, 3)
    index = make_index("IVF4096,Flat", d)
    assert use_gpu_clustering(index)
    t0 = time.perf_counter()
    index.train(xt)
    t_gpu = time.perf_counter() - t0
    assert index.is_trained
    km = faiss.Kmeans(d, 4096, niter=10, seed=1, gpu=False)
    t0 = time.perf_counter()
    km.train(xt[:65_536])
    t_cpu = (time.perf_counter() - t0) * (n / 65_536)
    report("k-means 4096 x 384", f"GPU {t_gpu:.1f} s", f"{n:,} points; CPU ~{t_cpu:.0f} s (extrapolated from 1/4)")


# -- half precision and the side-by-side speed check (issue: embedding at the card's speed) -------------------
def _st_rate(model_dir: str, texts: list[str]) -> tuple[float, str]:
    """What a user would write instead: sentence-transformers' encode on the card in fp16, its best batch of
    64/128/256 (or, where it cannot import, the plain transformers fp16 loop), chunks/s and what ran."""
    import torch

    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model_dir, device="cuda", model_kwargs={"dtype": torch.float16})
        st.max_seq_length = 256

        def run(bs: int, items: list[str]) -> None:
            st.encode(items, batch_size=bs, convert_to_numpy=True, normalize_embeddings=True)

        what = "sentence-transformers encode, fp16"
    except ImportError as e:
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()

        def run(bs: int, items: list[str]) -> None:
            with torch.inference_mode():
                for i in range(0, len(items), bs):
                    enc = tok(items[i:i + bs], padding=True, truncation=True, max_length=256,
                              return_tensors="pt").to("cuda")
                    h = model(**enc).last_hidden_state
                    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                    torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).float().cpu()

        what = f"plain transformers fp16 loop (sentence-transformers does not import here: {e})"
    rates = {}
    for bs in (64, 128, 256):
        run(bs, texts[:2 * bs])  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(bs, texts)
        torch.cuda.synchronize()
        rates[bs] = len(texts) / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    return rates[best], f"{what}, best batch {best} (" + ", ".join(f"b{b}: {r:,.0f}" for b, r in rates.items()) + ")"


@needs_cuda
def test_half_precision_matches_fp32_on_the_card(report, model_name, passages):
    """fp16 and bf16 on the card against fp32 on the card: the dtype check's cosine and the vectors'."""
    import copy

    import torch

    from shoal.workers.embed import encode, gpu_dtype_for, load_model, settle_dtype

    base = load_model(model_name, device="cuda", max_seq_length=256)
    ref = encode(passages[:512], base, 128)
    cap = torch.cuda.get_device_capability(0)
    for dtype in ("float16", "bfloat16"):
        if dtype == "bfloat16" and cap < (8, 0):
            continue
        lm = copy.copy(base)
        check = settle_dtype(lm, dtype)
        assert check.dtype == dtype, check
        got = encode(passages[:512], lm, 128)
        cos = (ref * got).sum(1)
        assert cos.min() > 0.999 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
        report(f"{dtype} vs fp32 (card)", f"min cos {cos.min():.6f}", f"probe {check.min_cosine:.6f}; 512 passages")
    report("gpu_dtype auto", gpu_dtype_for("auto", cap), f"sm_{cap[0]}{cap[1]}")


@needs_cuda
def test_side_by_side_speed(report, model_name, passages, tmp_path):
    """On the same 4,096 passages: sentence-transformers fp16, shoal's encode (texts; and input ids), the Ray
    actors (EmbedPool), and `shoal ingest` end to end over files, with the card's busy fraction."""
    pytest.importorskip("ray", reason="ray is not installed here")
    import subprocess
    import threading

    import ray
    import torch

    from shoal.cluster.config import config_from_dict
    from shoal.cluster.ingest import ingest, pool_spec
    from shoal.cluster.ray_env import init_ray
    from shoal.workers.actors import batch_tokens_for
    from shoal.workers.embed import encode, encode_ids, gpu_dtype_for, load_model, resolve_model_path, settle_dtype, \
        tokenize
    from shoal.workers.pool import EmbedPool

    path = resolve_model_path(model_name)
    st_rate, st_what = _st_rate(path, passages)
    report("sentence-transformers chunks/s", f"{st_rate:,.0f}", st_what)

    lm = load_model(model_name, device="cuda", max_seq_length=256)
    props = torch.cuda.get_device_properties(0)
    settle_dtype(lm, gpu_dtype_for("auto", (props.major, props.minor)))
    budget = batch_tokens_for(props.total_memory)
    batch = tokenize(passages, lm)
    encode(passages[:256], lm, 1024, max_tokens=budget)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode(passages, lm, 1024, max_tokens=budget)
    bare_texts = len(passages) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    encode_ids(batch, lm, 1024, max_tokens=budget)
    bare = len(passages) / (time.perf_counter() - t0)
    report("shoal encode chunks/s (texts)", f"{bare_texts:,.0f}", f"{lm.dtype}, {budget:,} tokens a batch; "
           f"/ sentence-transformers = {bare_texts / st_rate:.2f}x (goal >= 1.0)")
    report("shoal encode chunks/s (input ids)", f"{bare:,.0f}", f"what the actors run; / sentence-transformers = "
           f"{bare / st_rate:.2f}x")
    del lm
    torch.cuda.empty_cache()

    cfg = config_from_dict({"data_dir": str(tmp_path / "data"), "model": {"name": model_name},
                            "embed": {"batch_chunks": 512, "max_in_flight": 3}, "index": {"keyword": False}})
    init_ray(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count())
    try:
        pool = EmbedPool(pool_spec(cfg))
        pool.start()
        pool.ready()
        blocks = [batch.take(np.arange(i, min(i + 512, len(batch)))) for i in range(0, len(batch), 512)]
        for warm in blocks[:2]:  # first calls: CUDA context and kernels
            pool.submit(warm, 0)
        while pool.pending():
            pool.wait_one()
        t0 = time.perf_counter()
        for b in blocks:
            while pool.full():
                pool.wait_one()
            pool.submit(b, len(b))
        while pool.pending():
            pool.wait_one()
        actors = len(passages) / (time.perf_counter() - t0)
        info = pool.info[0]
        pool.shutdown()
        report("shoal actors chunks/s (EmbedPool)", f"{actors:,.0f}", f"{len(pool.info)} actor(s), {info['dtype']}, "
               f"batches of 512 ids; / bare = {actors / bare:.2f}x (goal >= 0.9)")

        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for i in range(0, len(passages), 4):  # files of 4 passages: real reading, chunking and commits
            (corpus / f"{i // 4:05d}.txt").write_text("\n\n".join(passages[i:i + 4]), encoding="utf-8")
        util: list[tuple[float, int]] = []
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "100"], stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda: [util.append((time.perf_counter(), int(x.split(",")[0])))
                                                  for x in smi.stdout if x.strip().split(",")[0].isdigit()],
                                  daemon=True)
        reader.start()
        t0 = time.perf_counter()
        r = ingest([str(corpus)], cfg, out=lambda s: None)
        t1 = time.perf_counter()
        smi.terminate()
        first = t0 + (r.first_commit_s or 0.0)
        embed_end = t1 - r.stages.get("build", 0.0)
        during = [u for t, u in util if first <= t <= embed_end]
        busy = float(np.mean(during)) / 100 if during else float("nan")
        pipeline = r.chunks_added / max(1e-9, embed_end - first)
        report("shoal ingest chunks/s", f"{pipeline:,.0f}", f"{r.chunks_added:,} chunks of {len(passages) // 4:,} "
               f"files, first commit to last; / bare = {pipeline / bare:.2f}x (goal >= 0.8); end to end "
               f"{r.chunks_added / r.seconds:,.0f}/s in {r.seconds:.1f} s with start-up and build")
        report("card busy during ingest", f"{busy:.0%}", f"nvidia-smi utilization.gpu, {len(during)} samples "
               f"(goal >= 80%); read workers {r.read_workers}, driver CPU {r.driver_cpu_seconds:.1f} s, actors' "
               f"prep CPU {r.embed_prep_cpu_seconds:.2f} s")
    finally:
        ray.shutdown()
