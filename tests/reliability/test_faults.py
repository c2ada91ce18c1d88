"""Torn files, a full disk, foreign formats: detected with a message naming the file; the old generation stays."""

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shoal.index.errors import CorruptFileError, ShoalError
from shoal.cluster.ingest import ingest
from shoal.cluster.search import Searcher
from shoal.index import generations

from conftest import ROOT, cranfield_docs, write_docs


@pytest.fixture(scope="module")
def base_data(tmp_path_factory, ray_local):

    from shoal.cluster.config import load_config

    tmp = tmp_path_factory.mktemp("faults")
    write_docs(cranfield_docs(25), tmp / "docs")
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    return cfg


@pytest.fixture
def cfg(base_data, tmp_path):
    from dataclasses import replace

    shutil.copytree(base_data.data_path, tmp_path / "data")
    return replace(base_data, data_dir=str(tmp_path / "data"))


def tear(path, at=100, n=16):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x00" * n)


def test_torn_index_file_is_named(cfg, lm):
    gen_dir, _ = generations.open_current(cfg.data_path)
    tear(gen_dir / "shard_00.index")
    with pytest.raises(CorruptFileError, match="shard_00.index.*checksum"):
        Searcher(cfg, lm=lm)


def test_truncated_keyword_file_is_named(cfg, lm):
    gen_dir, _ = generations.open_current(cfg.data_path)
    victim = next((gen_dir / "keyword").glob("seg-*/docs.npy"))
    with open(victim, "r+b") as f:
        f.truncate(max(0, victim.stat().st_size - 7))
    with pytest.raises(CorruptFileError, match=victim.name):
        Searcher(cfg, lm=lm)


def test_torn_manifest_and_current(cfg, lm):
    gen_dir, _ = generations.open_current(cfg.data_path)
    (gen_dir / "manifest.json").write_text('{"format": 1, "files": {')
    with pytest.raises(CorruptFileError, match="manifest.json"):
        Searcher(cfg, lm=lm)
    (cfg.data_path / "CURRENT").write_bytes(b"\xff\x00garbage")
    with pytest.raises(CorruptFileError, match="CURRENT"):
        Searcher(cfg, lm=lm)


def test_damaged_catalog_is_named(cfg, lm):
    for p in cfg.data_path.glob("catalog.sqlite*"):
        if p.name != "catalog.sqlite":
            p.unlink()
    tear(cfg.data_path / "catalog.sqlite", at=0, n=64)  # the header
    with pytest.raises(CorruptFileError, match="catalog.sqlite"):
        Searcher(cfg, lm=lm)


def test_cli_reports_corruption_with_exit_2(cfg):
    gen_dir, _ = generations.open_current(cfg.data_path)
    tear(gen_dir / "shard_00.index")
    r = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "query", "wing", "--data-dir", str(cfg.data_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "shard_00.index" in r.stderr and "Traceback" not in r.stderr


def test_pickled_vector_part_is_refused(cfg):
    from shoal.workers.catalog import Catalog
    from shoal.index import staging

    with Catalog(cfg.data_path / "catalog.sqlite") as cat:
        name = cat.part_names()[0]
    with open(cfg.data_path / "staging" / name, "wb") as f:
        np.savez(f, ids=np.array([object()], dtype=object), xb=np.zeros((1, 384), np.float32))
    with pytest.raises(CorruptFileError, match=name):
        staging.read_part(cfg.data_path / "staging", name)


def test_disk_full_while_writing_a_generation(cfg, lm):
    """RLIMIT_FSIZE (ulimit -f) makes the new generation's files fail to write."""
    before = generations.current_name(cfg.data_path)
    s = Searcher(cfg, lm=lm)
    [want] = s.search(["wing in a slipstream"], k=5)
    s.close()
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))  # the catalog opens; shards do not fit
        from shoal.cluster.cli import main
        sys.exit(main(["reindex", "--config", "configs/test.yaml", "--data-dir", {str(cfg.data_path)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode in (1, 2), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert "too large" in r.stderr.lower() or "cannot write" in r.stderr.lower(), r.stderr[-2000:]
    assert generations.current_name(cfg.data_path) == before
    assert not any(p.name.startswith(".tmp-") for p in (cfg.data_path / "generations").iterdir())
    s = Searcher(cfg, lm=lm)
    [got] = s.search(["wing in a slipstream"], k=5)
    assert [h.id for h in got] == [h.id for h in want]


def test_failed_build_keeps_serving_searcher_unchanged(cfg, lm):
    """A build that raises midway (bad factory) publishes nothing."""
    from dataclasses import replace

    from shoal.cluster.build import build_generation
    from shoal.workers.catalog import Catalog

    before = generations.current_name(cfg.data_path)
    bad = replace(cfg, index=replace(cfg.index, factory="IVF100000,Flat"))
    with Catalog(cfg.data_path / "catalog.sqlite") as cat, pytest.raises(ShoalError, match="training vectors"):
        build_generation(bad, cat, retrain=True)
    assert generations.current_name(cfg.data_path) == before
    Searcher(cfg, lm=lm).close()
