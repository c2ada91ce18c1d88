"""Retrieval quality end to end on a 200-document slice of Cranfield: real ingest, real query path."""

import math
import sys
from dataclasses import replace

import pytest

from conftest import CRANFIELD, ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import eval_beir  # noqa: E402


@pytest.fixture(scope="module")
def slice_eval(tmp_path_factory):
    if not (CRANFIELD / "corpus.jsonl").is_file():
        pytest.skip("Cranfield collection not found")
    work = tmp_path_factory.mktemp("eval")
    res = eval_beir.main([str(CRANFIELD), "--limit-docs", "200", "--config", str(ROOT / "configs" / "test.yaml"),
                          "--work", str(work), "--out", str(work / "scores.json")], out=lambda s: None)
    return res, work


def test_figures_are_finite_and_sane(slice_eval):
    res, work = slice_eval
    s = res["summary"]
    assert set(s) == {"BM25 (bm25s, documents)", "shoal dense", "shoal keyword", "shoal hybrid"}
    for name, m in s.items():
        for v in m.values():
            assert math.isfinite(v) and 0 <= v <= 1, (name, m)
    assert s["shoal dense"]["ndcg_cut_10"] > 0.2 and s["BM25 (bm25s, documents)"]["ndcg_cut_10"] > 0.2
    assert (work / "scores.json").is_file()


def test_ivf_sharded_on_disk_matches_exact(slice_eval, lm):
    """IVF at the tuned nprobe, two shards, on-disk lists: nDCG@10 within 0.005 of exact search."""
    from cluster.build import build_generation
    from cluster.catalog import Catalog
    from cluster.config import GpuSpec, load_config
    from cluster.search import Searcher
    from cluster.tune import tune

    res, work = slice_eval
    docs, queries, qrels = eval_beir.load_beir(CRANFIELD, 200)
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=res["data"])
    exact = Searcher(cfg, lm=lm)
    assert exact.manifest["factory"] == "Flat"
    exact_runs = eval_beir.in_process_runs(cfg, queries, ["dense"], searcher=exact)
    exact.close()
    ivf = replace(cfg, index=replace(cfg.index, factory="IVF8,Flat", ondisk=True,
                                     gpus=(GpuSpec("rtx4080", 16 << 30), GpuSpec("p4000", 8 << 30))))
    with Catalog(ivf.data_path / "catalog.sqlite") as cat:
        build_generation(ivf, cat)
    nprobe, points = tune(ivf, target=0.99, nq=200)
    s = Searcher(ivf, lm=lm)
    assert s.manifest["factory"] == "IVF8,Flat" and len(s.manifest["shards"]) == 2
    assert s.index.devices == ["cpu-ondisk", "cpu-ondisk"] and s.index.nprobe == nprobe
    ivf_runs = eval_beir.in_process_runs(ivf, queries, ["dense"], searcher=s)
    s.close()
    a = eval_beir.mean(eval_beir.evaluate(qrels, exact_runs["dense"]))["ndcg_cut_10"]
    b = eval_beir.mean(eval_beir.evaluate(qrels, ivf_runs["dense"]))["ndcg_cut_10"]
    assert abs(a - b) <= 0.005, (a, b, nprobe, points)
