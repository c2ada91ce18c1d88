
import faiss
import numpy as np
import pytest

from shoal.index.errors import ConfigError, CorruptFileError, ShoalError
from shoal.index import generations, staging
from shoal.index.factory import add_in_blocks, choose_factory, nlist_for, search_params, train_index, train_sample


def clustered(n, d=32, nc=50, seed=0):
    rs = np.random.default_rng(seed)
    centers = rs.normal(size=(nc, d)).astype(np.float32)
    x = centers[rs.integers(0, nc, n)] + 0.3 * rs.normal(size=(n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_nlist_keeps_39_points_per_list():
    for n in (10, 100, 1000, 5000, 20_000, 1_000_000):
        nl = nlist_for(n)
        assert nl >= 1 and (nl == 1 or n >= 39 * nl)
        assert nl & (nl - 1) == 0
    assert nlist_for(1_000_000) == 4096


def test_choose_factory():
    assert choose_factory(100) == "Flat"
    assert choose_factory(50_000) == f"IVF{nlist_for(50_000)},Flat"
    assert choose_factory(1_000_000) == "IVF4096,Flat"  # flat quantizer below HNSW_MIN_NLIST
    assert choose_factory(10_000_000) == "IVF16384_HNSW32,Flat"  # graph quantizer: build stays ~n log n
    assert choose_factory(50_000, "IVF{nlist},PQ16") == f"IVF{nlist_for(50_000)},PQ16"
    assert choose_factory(10, "IVF64,Flat") == "IVF64,Flat"


def test_bad_factory_is_config_error():
    with pytest.raises(ConfigError, match="index.factory"):
        train_index("IVFbogus", np.zeros((10, 8), np.float32))
    with pytest.raises(ConfigError, match="training vectors"):
        train_index("IVF256,Flat", np.zeros((10, 8), np.float32))


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "IVF64,SQfp16"])
def test_index_recall_against_exact(factory):
    xb = clustered(8000)
    xq = clustered(200, seed=1)
    ids = np.arange(8000, dtype=np.int64) * 7 + 3  # arbitrary global ids
    gt = faiss.IndexFlatIP(32)
    gt.add(xb)
    _, Igt = gt.search(xq, 10)
    index = train_index(factory, train_sample(xb, factory))
    add_in_blocks(index, xb, ids, bs=1000)
    _, I = index.search(xq, 10, params=search_params(index, 16))
    recall = np.mean([len(set(I[i]) & set(ids[Igt[i]])) / 10 for i in range(len(xq))])
    assert recall >= (0.999 if factory == "Flat" else 0.9), recall


def test_centroid_allocation_is_proportional_and_bounded():
    from shoal.index.factory import _allocate

    rs = np.random.default_rng(0)
    for _ in range(200):
        counts = rs.integers(0, 50, rs.integers(1, 40))
        if counts.sum() == 0:
            continue
        total = int(rs.integers(max(1, (counts > 0).sum()), counts.sum() + 1))
        a = _allocate(counts, total)
        assert a.sum() == total and (a <= counts).all() and (a[counts > 0] >= 1).all()
    assert list(_allocate(np.array([100, 100, 0, 200]), 8)) == [2, 2, 0, 4]


def test_two_level_training_and_hnsw_quantizer_keep_recall(monkeypatch):
    """Two-level k-means (as auto trains from HNSW_MIN_NLIST lists on) and an HNSW coarse quantizer
    cost a little recall at the same nprobe, never more than twice the nprobe buys back.

    The data are hard for two-level on purpose: 400 tight clusters over 256 lists split in 16 groups."""
    import shoal.index.factory as F
    from shoal.index.gpu import flatten_quantizer

    xb = clustered(30_000, nc=400)
    xq = clustered(300, nc=400, seed=1)
    ids = np.arange(len(xb), dtype=np.int64) * 3 + 1
    gt = faiss.IndexFlatIP(32)
    gt.add(xb)
    _, Igt = gt.search(xq, 10)

    def recall(index, nprobe):
        _, I = index.search(xq, 10, params=search_params(index, nprobe))
        return np.mean([len(set(I[i]) & set(ids[Igt[i]])) / 10 for i in range(len(xq))])

    built = {}
    for factory, two_level_from in (("IVF256,Flat", 10 ** 9), ("IVF256,Flat", 256), ("IVF256_HNSW32,Flat", 256)):
        monkeypatch.setattr(F, "HNSW_MIN_NLIST", two_level_from)
        index = train_index(factory, train_sample(xb, factory))
        add_in_blocks(index, xb, ids, bs=5000)
        built[(factory, two_level_from)] = index
    flat, two, hnsw = built.values()
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(hnsw).quantizer), faiss.IndexHNSWFlat)
    assert faiss.downcast_index(faiss.extract_index_ivf(hnsw).quantizer).hnsw.efSearch == F.QUANTIZER_EF_ADD
    r_flat, r_two, r_hnsw = (recall(x, 8) for x in (flat, two, hnsw))
    assert r_flat >= 0.8 and r_two >= r_flat - 0.08 and r_hnsw >= r_two - 0.02, (r_flat, r_two, r_hnsw)
    assert recall(two, 16) >= r_flat and recall(hnsw, 16) >= r_flat
    # on a GPU the HNSW quantizer becomes a flat one over the same centroids, lists untouched
    q = faiss.extract_index_ivf(hnsw).quantizer
    cents = q.reconstruct_n(0, 256)
    _, I_before = hnsw.search(xq, 10, params=search_params(hnsw, 8))
    flatten_quantizer(hnsw)
    q2 = faiss.downcast_index(faiss.extract_index_ivf(hnsw).quantizer)
    assert isinstance(q2, faiss.IndexFlat) and np.array_equal(q2.reconstruct_n(0, 256), cents)
    assert search_params(hnsw, 8).quantizer_params is None  # nothing HNSW left to parameterise
    _, I_after = hnsw.search(xq, 10, params=search_params(hnsw, 8))
    assert np.mean(I_before == I_after) >= 0.97
    assert recall(hnsw, 8) >= r_hnsw - 0.01


def test_generation_commit_switch_and_gc(tmp_path):
    for i in range(4):
        tmp = generations.begin(tmp_path)
        (tmp / "shard_00.index").write_bytes(b"x" * (i + 1))
        name = generations.commit(tmp_path, tmp, {"ntotal": i})
        assert generations.current_name(tmp_path) == name == f"{i + 1:06d}"
    gen_dir, m = generations.open_current(tmp_path)
    assert m["ntotal"] == 3 and m["files"]["shard_00.index"]["bytes"] == 4
    generations.verify(gen_dir, m)
    stale = generations.begin(tmp_path)  # a build that crashed midway
    assert generations.gc(tmp_path, keep=2) == ["000001", "000002"]
    assert generations.list_generations(tmp_path) == ["000003", "000004"]
    assert not stale.exists()


def test_checksum_catches_torn_file(tmp_path):
    tmp = generations.begin(tmp_path)
    (tmp / "shard_00.index").write_bytes(b"0123456789" * 100)
    generations.commit(tmp_path, tmp, {})
    gen_dir, m = generations.open_current(tmp_path)
    with open(gen_dir / "shard_00.index", "r+b") as f:
        f.seek(500)
        f.write(b"XX")
    with pytest.raises(CorruptFileError, match="shard_00.index"):
        generations.verify(gen_dir, m)
    (gen_dir / "manifest.json").write_text("{ torn")
    with pytest.raises(CorruptFileError, match="manifest"):
        generations.open_current(tmp_path)


def test_no_generation_is_a_clear_error(tmp_path):
    with pytest.raises(ShoalError, match="shoal ingest"):
        generations.open_current(tmp_path)


def test_staging_parts_round_trip_and_orphans(tmp_path):
    xb = clustered(100, d=8)
    ids = np.arange(100, dtype=np.int64) + 10
    a = staging.write_part(tmp_path, ids[:60], xb[:60])
    b = staging.write_part(tmp_path, ids[60:], xb[60:])
    (tmp_path / "part-orphan.npz").write_bytes(b"junk")
    live = np.setdiff1d(ids, [15, 70])
    got_ids, got_xb = staging.gather(tmp_path, [(a, 10, 69), (b, 70, 109)], live, 8)
    assert np.array_equal(got_ids, live)
    assert np.allclose(got_xb, xb[np.isin(ids, live)])
    assert staging.remove_orphans(tmp_path, [a, b]) == ["part-orphan.npz"]
    (tmp_path / a).write_bytes(b"torn")
    with pytest.raises(CorruptFileError, match=a):
        staging.read_part(tmp_path, a)


def test_staging_streams_in_id_order_across_overlapping_and_float16_parts(tmp_path):
    rs = np.random.default_rng(3)
    xb = clustered(1000, d=8)
    ids = np.arange(1000, dtype=np.int64) * 3
    parts = []
    # ordinary commits, one compaction-like part whose range overlaps two others, a float16 part
    for lo, hi, dt in ((0, 200, "float32"), (200, 400, "float32"), (600, 1000, "float16")):
        name = staging.write_part(tmp_path, ids[lo:hi], xb[lo:hi], dt)
        parts.append((name, int(ids[lo]), int(ids[hi - 1])))
    mixed = rs.permutation(np.arange(400, 600))
    for chunk in (mixed[:100], mixed[100:]):
        name = staging.write_part(tmp_path, ids[chunk], xb[chunk])
        parts.append((name, int(ids[chunk].min()), int(ids[chunk].max())))
    live = np.setdiff1d(ids, ids[rs.choice(1000, 50, replace=False)])
    got_i, got_x, sizes = [], [], []
    for i, x in staging.iter_sorted(tmp_path, parts, live, block=128):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        got_i.append(i)
        got_x.append(x)
        sizes.append(len(i))
    assert max(sizes) == 128 and all(s == 128 for s in sizes[:-1])
    assert np.array_equal(np.concatenate(got_i), live)
    want = xb[np.isin(ids, live)]
    np.testing.assert_allclose(np.concatenate(got_x), want, atol=1e-3)  # float16 part: 3 digits
    part = live[(live > ids[650]) & (live < ids[700])]
    g, x = staging.gather(tmp_path, parts, part, 8)
    assert np.array_equal(g, part) and x.shape == (len(part), 8)
    with np.load(tmp_path / parts[2][0]) as z:
        assert z["xb"].dtype == np.float16  # half the bytes of float32 on disk
