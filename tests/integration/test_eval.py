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
    work = tmp_path_factory.mktemp("eval")
    res = eval_beir.main([str(CRANFIELD), "--limit-docs", "200", "--config", str(ROOT / "configs" / "test.yaml"),
                          "--work", str(work), "--out", str(work / "scores.json"), "--tune-fusion",
                          "--feedback-grid", "quick"],
                         out=lambda s: None)
    return res, work


def test_figures_are_finite_and_sane(slice_eval):
    res, work = slice_eval
    s = res["summary"]["all"]
    runs = {"BM25 (bm25s on documents, stemmed)", "shoal dense", "shoal keyword", "shoal hybrid",
            "shoal hybrid (config as given)"}
    assert runs <= set(s)
    for name in runs:
        for v in s[name].values():
            assert math.isfinite(v) and 0 <= v <= 1, (name, s[name])
    assert s["shoal dense"]["ndcg_cut_10"] > 0.2 and s["BM25 (bm25s on documents, stemmed)"]["ndcg_cut_10"] > 0.2
    assert (work / "scores.json").is_file()


def test_fusion_tuned_on_one_half_reported_on_the_other(slice_eval):
    res, work = slice_eval
    tune_q, report_q = res["split"]
    assert tune_q and report_q and not set(tune_q) & set(report_q)
    assert set(tune_q) | set(report_q) == set(res["per_query"]["shoal dense"])
    assert eval_beir.split_queries(sorted(tune_q + report_q), 0) == (tune_q, report_q)  # seeded: the same split
    fusion, norm, alpha = res["chosen"]
    best = max(r["smoothed"] for r in res["grid"])
    assert any(r["smoothed"] == best and (r["fusion"], r["normalization"], r["alpha"]) == (fusion, norm, alpha)
               for r in res["grid"])
    for r in res["grid"]:  # smoothed = the mean over alphas within 0.1, same normalisation
        near = [o["ndcg_cut_10"] for o in res["grid"] if o["normalization"] == r["normalization"]
                and abs(o["alpha"] - r["alpha"]) <= 0.1 + 1e-9]
        assert abs(r["smoothed"] - sum(near) / len(near)) < 1e-9
    assert len(res["grid"]) == len(eval_beir.FUSION_GRID)
    # feedback: tuned on the same half, its run reported beside hybrid with per-query wins and losses
    assert len(res["feedback_grid"]) == len(eval_beir.FEEDBACK_QUICK)
    best_fb = max(r["smoothed"] for r in res["feedback_grid"])
    assert any(r["smoothed"] == best_fb and r["feedback"] == res["feedback_chosen"][0] for r in res["feedback_grid"])
    [fb_run] = [n for n in res["per_query"] if n.startswith("shoal hybrid +feedback")]
    for label, qids in (("report half", report_q), ("tuning half", tune_q)):
        wl = res["summary"][label]["feedback vs hybrid"]
        assert wl["better"] + wl["worse"] + wl["equal"] == len(qids)
        assert wl["better"] == sum(res["per_query"][fb_run][q]["ndcg_cut_10"] >
                                   res["per_query"]["shoal hybrid"][q]["ndcg_cut_10"] + 1e-9 for q in qids)
    for label, qids in (("report half", report_q), ("tuning half", tune_q)):
        for other in ("dense", "keyword"):
            wl = res["summary"][label][f"hybrid vs {other}"]
            assert wl["better"] + wl["worse"] + wl["equal"] == len(qids)
    # per-query wins and losses agree with the per-query scores
    h, d = res["per_query"]["shoal hybrid"], res["per_query"]["shoal dense"]
    assert res["summary"]["report half"]["hybrid vs dense"]["better"] == sum(
        h[q]["ndcg_cut_10"] > d[q]["ndcg_cut_10"] + 1e-9 for q in report_q)


def test_ivf_sharded_on_disk_matches_exact(slice_eval, lm):
    """IVF at the tuned nprobe, two shards, on-disk lists: nDCG@10 within 0.005 of exact search."""
    from shoal.cluster.build import build_generation
    from shoal.workers.catalog import Catalog
    from shoal.cluster.config import GpuSpec, load_config
    from shoal.cluster.search import Searcher
    from shoal.cluster.tune import tune

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


def test_eval_rerank_with_a_cross_encoder(slice_eval, tmp_path):
    """eval_beir --rerank end to end with a cross-encoder directory (a tiny one the test saves)."""
    from conftest import tiny_cross_encoder

    res, _ = slice_eval
    ce = tiny_cross_encoder(tmp_path / "ce")
    cfg = tmp_path / "rerank.yaml"
    cfg.write_text((ROOT / "configs" / "test.yaml").read_text() + f"serve:\n  rerank_model: {ce}\n"
                   "  rerank_candidates: 10\n")
    out = eval_beir.main([str(CRANFIELD), "--limit-docs", "200", "--config", str(cfg), "--data-dir", res["data"],
                          "--modes", "hybrid", "--rerank"], out=lambda s: None)
    s = out["summary"]["all"]
    assert {"shoal hybrid", "shoal hybrid +rerank"} <= set(s)
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in s["shoal hybrid +rerank"].values())
    # only the top 10 chunks are re-ordered: the documents in the top 100 are the same
    assert s["shoal hybrid +rerank"]["recall_100"] == pytest.approx(s["shoal hybrid"]["recall_100"])
    assert out["per_query"]["shoal hybrid +rerank"] != out["per_query"]["shoal hybrid"]  # it did re-order
