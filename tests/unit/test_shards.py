import pytest

from shoal.index.shards import Device, PlanError, bytes_per_vector, plan_shards, shard_ranges

G = 1 << 30
RTX4080 = Device("rtx4080", "gpu", 16 * G, 0)
P4000 = Device("p4000", "gpu", 8 * G, 1)


def test_shard_ranges_proportional_and_complete():
    r = list(shard_ranges(3_000_000, [16, 8]))
    assert r == [(0, 0, 2_000_000), (1, 2_000_000, 3_000_000)]
    r = list(shard_ranges(10, [1, 1, 1]))
    assert r[0][1] == 0 and r[-1][2] == 10 and all(a[2] == b[1] for a, b in zip(r, r[1:]))
    with pytest.raises(ValueError):
        list(shard_ranges(10, []))


@pytest.mark.parametrize("factory,per", [
    ("Flat", 8 + 4 * 384), ("IVF4096,Flat", 8 + 4 * 384), ("IVF4096,PQ32", 8 + 32),
    ("IVF4096,PQ32,RFlat", 8 + 32 + 4 * 384), ("IVF4096,SQfp16", 8 + 2 * 384), ("IVF1024,SQ8", 8 + 384),
    ("IVF1024,PQ48x4fs", 8 + 24),
])
def test_bytes_per_vector(factory, per):
    assert bytes_per_vector(factory, 384) == per


def test_two_gpus_take_two_to_one():
    plan = plan_shards(30_000_000, 384, "IVF4096,PQ32", [RTX4080, P4000], cpu_memory_bytes=64 * G)
    assert [p.placement for p in plan] == ["gpu", "gpu"]
    assert [p.i1 - p.i0 for p in plan] == [20_000_000, 10_000_000]
    assert [p.gpu_id for p in plan] == [0, 1]
    assert "fits in rtx4080" in plan[0].reason


def test_too_big_for_gpus_is_refused_with_numbers():
    with pytest.raises(PlanError) as e:
        plan_shards(30_000_000, 384, "IVF4096,Flat", [RTX4080, P4000], cpu_memory_bytes=64 * G)
    msg = str(e.value)
    assert "20000000 vectors x 1544 bytes" in msg and "GB" in msg and "PQ" in msg and "ondisk" in msg


def test_too_big_for_gpu_goes_on_disk_and_says_why():
    plan = plan_shards(30_000_000, 384, "IVF4096,Flat", [RTX4080, P4000], cpu_memory_bytes=64 * G, ondisk=True)
    assert [p.placement for p in plan] == ["ondisk", "ondisk"]
    assert all(p.device == "cpu" and "NVMe" in p.reason for p in plan)
    # a small index still goes to GPU memory even with ondisk
    plan = plan_shards(1_000_000, 384, "IVF4096,Flat", [RTX4080, P4000], cpu_memory_bytes=64 * G, ondisk=True)
    assert [p.placement for p in plan] == ["gpu", "gpu"]


def test_cpu_plans():
    plan = plan_shards(1_000_000, 384, "IVF4096,Flat", [], cpu_memory_bytes=8 * G)
    assert len(plan) == 1 and plan[0].placement == "cpu" and plan[0].device == "cpu"
    plan = plan_shards(100_000_000, 384, "IVF4096,Flat", [], cpu_memory_bytes=8 * G, ondisk=True)
    assert plan[0].placement == "ondisk"
    with pytest.raises(PlanError, match="does not fit"):
        plan_shards(100_000_000, 384, "IVF4096,Flat", [], cpu_memory_bytes=8 * G)
