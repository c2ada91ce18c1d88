"""A generation's files travelling to a node-local cache: what a group needs, verification, pruning."""

import hashlib
import json

import pytest

from shoal.index.errors import CorruptFileError, ShoalError
from shoal.index.sync import GenerationCache, group_files, manifest_sha256, read_local, visible_in_place


def make_generation(root, name="000003", files=None):
    files = files or {"shard_00.index": b"a" * 1000, "shard_00.ivfdata": b"b" * 5000, "shard_01.index": b"c" * 700,
                      "delta.index": b"d" * 50, "deleted.npy": b"e" * 20, "trained.index": b"t" * 10,
                      "bm25/x": b"k" * 30}
    gen = root / "generations" / name
    for f, raw in files.items():
        (gen / f).parent.mkdir(parents=True, exist_ok=True)
        (gen / f).write_bytes(raw)
    m = {"format": 1, "generation": name, "files": {f: {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
                                                   for f, raw in files.items()},
         "shards": [{"file": "shard_00.index", "ondisk": True}, {"file": "shard_01.index"}]}
    raw = json.dumps(m).encode()
    (gen / "manifest.json").write_bytes(raw)
    return gen, m, raw


def test_group_files_are_exactly_what_a_group_serves(tmp_path):
    _, m, _ = make_generation(tmp_path)
    assert group_files(m, 0, 2) == ["shard_00.index", "shard_00.ivfdata", "delta.index", "deleted.npy"]
    assert group_files(m, 1, 2) == ["shard_01.index", "deleted.npy"]  # no delta, no other shard, no bm25
    assert group_files(m, 0, 1)[:3] == ["shard_00.index", "shard_00.ivfdata", "shard_01.index"]
    del m["files"]["shard_01.index"]
    with pytest.raises(CorruptFileError, match="shard_01.index"):
        group_files(m, 1, 2)


def test_fetch_verifies_and_publishes_whole(tmp_path):
    gen, m, raw = make_generation(tmp_path / "data")
    cache = GenerationCache(tmp_path / "cache", "k")
    files = group_files(m, 0, 2)
    reads = []

    def read(f, off, size):
        reads.append((f, off, size))
        return read_local(gen)(f, off, size)

    got = cache.fetch("000003", raw, files, read, chunk_bytes=1024)
    assert got.copied and got.bytes == 1000 + 5000 + 50 + 20
    assert max(s for _, _, s in reads) <= 1024  # bounded chunks
    for f in files:
        assert (got.gen_dir / f).read_bytes() == (gen / f).read_bytes()
    assert not (got.gen_dir / "shard_01.index").exists()
    again = cache.fetch("000003", raw, files, read, chunk_bytes=1024)  # complete already: nothing copied
    assert not again.copied and again.gen_dir == got.gen_dir


def test_a_byte_changed_in_transit_is_refused_and_nothing_published(tmp_path):
    gen, m, raw = make_generation(tmp_path / "data")
    cache = GenerationCache(tmp_path / "cache", "k")

    def flipping(f, off, size):
        b = read_local(gen)(f, off, size)
        return bytes([b[0] ^ 1]) + b[1:] if f == "shard_00.ivfdata" and off == 2048 else b

    with pytest.raises(CorruptFileError, match="shard_00.ivfdata"):
        cache.fetch("000003", raw, group_files(m, 0, 2), flipping, chunk_bytes=1024)
    assert cache.listing() == [] and not any(cache.dir.iterdir())

    def short(f, off, size):
        return b"" if f == "delta.index" else read_local(gen)(f, off, size)

    with pytest.raises(CorruptFileError, match="delta.index"):
        cache.fetch("000003", raw, group_files(m, 0, 2), short, chunk_bytes=1024)


def test_prune_keeps_serving_and_incoming(tmp_path):
    cache = GenerationCache(tmp_path / "cache", "k")
    for name in ("000001", "000002", "000003"):
        gen, m, raw = make_generation(tmp_path / "data", name)
        cache.fetch(name, raw, ["deleted.npy"], read_local(gen))
    assert cache.listing() == ["000001", "000002", "000003"]
    assert cache.prune({"000002", "000003"}) == ["000001"]
    assert cache.listing() == ["000002", "000003"]


def test_in_place_only_with_the_announced_manifest(tmp_path):
    gen, m, raw = make_generation(tmp_path / "data")
    assert visible_in_place(tmp_path / "data", "000003", manifest_sha256(raw)) == gen
    assert visible_in_place(tmp_path / "data", "000003", "0" * 64) is None  # another data dir at that path
    assert visible_in_place(tmp_path / "elsewhere", "000003", manifest_sha256(raw)) is None


def test_unwritable_cache_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ShoalError, match="serve.cache_dir"):
        GenerationCache(blocker, "k")
