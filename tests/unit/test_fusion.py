"""Convex fusion and keyword analysis, by hand (no Ray, no model)."""

from types import SimpleNamespace

import numpy as np
import pytest

from shoal.index.fusion import convex_fuse, fuse, normalize
from shoal.index.keyword import Analysis, KeywordIndex, analysis_for, build_keyword_index


def test_normalizations_by_hand():
    s = np.array([0.8, 0.6, 0.2])
    assert np.allclose(normalize(s, "minmax", -1), [1, 2 / 3, 0])
    assert np.allclose(normalize(s, "tmm", -1), [1, 1.6 / 1.8, 1.2 / 1.8])  # (s + 1) / (0.8 + 1)
    assert np.allclose(normalize(s, "zscore", -1), (s - s.mean()) / s.std())
    assert np.allclose(normalize(np.array([3.0, 3.0]), "minmax", 0), [1, 1])  # equal scores: all best
    with pytest.raises(ValueError, match="normalization"):
        normalize(s, "softmax", 0)


def test_convex_fuse_by_hand():
    # dense: ids 1, 2, 3 with cosines .9 .7 .5; keyword: ids 3, 4 with BM25 10, 5
    dense = (np.array([[0.9, 0.7, 0.5]], np.float32), np.array([[1, 2, 3]]))
    keyword = (np.array([[10.0, 5.0, 0.0]], np.float32), np.array([[3, 4, -1]]))
    D, I = convex_fuse(dense, keyword, 4, alpha=0.5, how="minmax")
    # minmax: dense 1 -> 1, 2 -> .5, 3 -> 0; keyword 3 -> 1, 4 -> 0; missing -> the side's lowest (0)
    want = {1: 0.5 * 1 + 0.5 * 0, 2: 0.5 * 0.5 + 0.5 * 0, 3: 0.5 * 0 + 0.5 * 1, 4: 0.5 * 0 + 0.5 * 0}
    got = dict(zip(I[0].tolist(), D[0].tolist()))
    assert set(got) == set(want) and all(abs(got[i] - want[i]) < 1e-6 for i in want)
    assert I[0][0] in (1, 3) and I[0][-1] == 4  # 1 and 3 tie at 0.5; 4 is last
    assert ((D >= 0) & (D <= 1)).all()
    # alpha 1: dense order alone; alpha 0: keyword order first
    assert convex_fuse(dense, keyword, 3, alpha=1.0)[1][0].tolist() == [1, 2, 3]
    assert convex_fuse(dense, keyword, 2, alpha=0.0)[1][0].tolist() == [3, 1]  # 3 (1.0), then ties at 0 by id


def test_convex_fuse_handles_empty_sides():
    dense = (np.zeros((1, 2), np.float32), np.array([[-1, -1]]))
    keyword = (np.array([[2.0, 1.0]], np.float32), np.array([[7, 8]]))
    D, I = convex_fuse(dense, keyword, 3, alpha=0.7)
    assert I[0].tolist() == [7, 8, -1] and D[0][2] == 0


def test_fuse_dispatches_on_config():
    dense = (np.array([[0.9, 0.1]], np.float32), np.array([[1, 2]]))
    keyword = (np.array([[9.0, 1.0]], np.float32), np.array([[2, 1]]))
    q = SimpleNamespace(fusion="rrf", dense_weight=1.0, keyword_weight=1.0, rrf_k=60.0, alpha=0.5,
                        normalization="minmax")
    D, _ = fuse(dense, keyword, 2, q)
    assert np.allclose(D[0], [1 / 61 + 1 / 62] * 2)
    q.fusion = "convex"
    D, _ = fuse(dense, keyword, 2, q)
    assert np.allclose(D[0], [0.5, 0.5])
    with pytest.raises(ValueError, match="alpha"):
        convex_fuse(dense, keyword, 2, alpha=1.5)


def test_analysis_from_config_and_manifest():
    assert analysis_for("english") == Analysis("english", "en")
    assert analysis_for("none") == Analysis(None, None)
    assert analysis_for("english", "none") == Analysis("english", None)
    assert analysis_for("German") == Analysis("german", "de")
    with pytest.raises(ValueError, match="Snowball"):
        analysis_for("klingon")
    with pytest.raises(ValueError, match="stop-word"):
        analysis_for("english", "klingon")
    assert Analysis.from_manifest({"keyword": {"analysis": {"stemmer": "english", "stopwords": None}}}) == \
        Analysis("english", None)
    assert Analysis.from_manifest({"keyword": {"kind": "bm25s"}}) == Analysis(None, "en")  # before it was recorded


def test_stemming_matches_word_forms_and_queries_use_the_index_analysis(tmp_path):
    texts = ["the flows over swept wings", "heat transferred through the plates", "boundary layer"]
    ids = np.array([10, 11, 12])
    stemmed, plain = tmp_path / "stemmed", tmp_path / "plain"
    for d, a in ((stemmed, analysis_for("english")), (plain, analysis_for("none"))):
        d.mkdir()
        build_keyword_index(texts, ids, d, a)
    ks = KeywordIndex(stemmed, analysis_for("english"))
    kp = KeywordIndex(plain, analysis_for("none"))
    _, I = ks.search(["flowing wing", "transfer plate"], 1)
    assert I[:, 0].tolist() == [10, 11]  # word forms meet through the stemmer
    _, I = kp.search(["flowing wing", "transfer plate"], 1)
    assert I[:, 0].tolist() == [-1, -1]  # no stemming: no shared term
    _, I = kp.search(["the"], 1)
    assert I[0, 0] in (10, 11)  # no stop words: "the" is a term
