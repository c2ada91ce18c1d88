"""The evaluation metric path on a collection small enough to check by hand."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from eval_beir import evaluate, hits_to_run, mean  # noqa: E402

from shoal.index.fusion import rrf_fuse  # noqa: E402


def test_metrics_by_hand():
    qrels = {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d3": 3.0, "d2": 2.0, "d1": 1.0}, "q2": {"d1": 2.0, "d2": 1.0}}
    per_q = evaluate(qrels, run)
    # q1: DCG = 1/log2(2) + 0 + 2/log2(4) = 2; IDCG = 2/log2(2) + 1/log2(3)
    assert per_q["q1"]["ndcg_cut_10"] == pytest.approx(2 / (2 + 1 / math.log2(3)), abs=1e-4)
    assert per_q["q2"]["ndcg_cut_10"] == pytest.approx(1 / math.log2(3), abs=1e-4)
    assert per_q["q1"]["recall_100"] == 1.0 and per_q["q2"]["recall_100"] == 1.0
    assert per_q["q1"]["recip_rank"] == 1.0 and per_q["q2"]["recip_rank"] == 0.5
    m = mean(per_q)
    assert m["recip_rank"] == pytest.approx(0.75)


def test_mrr_is_cut_at_10_and_missing_queries_score_zero():
    qrels = {"q1": {"d11": 1}, "q2": {"d1": 1}}
    run = {"q1": {f"d{i}": 100.0 - i for i in range(12)}}  # d11 at rank 12
    per_q = evaluate(qrels, run)
    assert per_q["q1"]["recip_rank"] == 0.0 and per_q["q1"]["recall_100"] == 1.0
    assert per_q["q2"] == {"ndcg_cut_10": 0.0, "recall_100": 0.0, "recip_rank": 0.0}


def test_chunks_map_to_documents_at_best_rank():
    run = hits_to_run([["/x/d2.txt", "/x/d1.txt", "/x/d2.txt", "/x/d3.txt"]], ["q"])
    assert run == {"q": {"d2": 1.0, "d1": 0.5, "d3": 0.25}}


def test_rrf_by_hand():
    import numpy as np

    dense = np.array([[10, 20, 30]])
    keyword = np.array([[30, 40, -1]])
    D, I = rrf_fuse([dense, keyword], [1.0, 1.0], 4, rrf_k=60)
    # 30: 1/63 + 1/61; 10: 1/61; 40: 1/62; 20: 1/62 (tie broken by id)
    assert I[0].tolist() == [30, 10, 20, 40]
    assert D[0, 0] == pytest.approx(1 / 63 + 1 / 61)


def test_progress_follows_finished_bytes_not_scanned_files():
    """All files scanned but a quarter of the bytes embedded reads 25%, not 100%."""
    from shoal.cluster.ingest import IngestReport, Progress

    lines = []
    p = Progress(lines.append, total_files=10, total_bytes=1000, every_s=0, tty=False)
    r = IngestReport(run_id=1, files_seen=10, bytes_done=250, chunks_added=5)
    p.tick(r, force=True)
    assert " 25% embedded 5 chunks" in lines[-1] and "scanned 10/10 files" in lines[-1]
    r.bytes_done, r.generation = 1000, "000001"
    p.tick(r, force=True)
    assert "100%" in lines[-1] and "ETA     0s" in lines[-1]


def test_card_labels():
    from shoal.workers.actors import card_slug

    assert card_slug("NVIDIA GeForce RTX 4080") == "rtx4080"
    assert card_slug("Quadro P4000") == "p4000"
    assert card_slug("NVIDIA H200") == "h200"
