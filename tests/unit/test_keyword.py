"""The segmented keyword index: a delta build equals a full rebuild of the live chunks, costs what changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shoal.index import keyword
from shoal.index.errors import CorruptFileError
from shoal.index.keyword import KeywordIndex, analysis_for, build_keyword_index, write_keyword

from conftest import CRANFIELD

def _corpus() -> tuple[list[str], list[str]]:
    """The Cranfield slice the suite ships (tests/data): the same in every clone."""
    docs = [json.loads(line) for line in open(CRANFIELD / "corpus.jsonl", encoding="utf-8")]
    queries = [json.loads(line)["text"] for line in open(CRANFIELD / "queries.jsonl", encoding="utf-8")]
    return [f"{d.get('title', '')}\n{d['text']}" for d in docs], queries[:80]


TEXTS, QUERIES = _corpus()
A = analysis_for("english")


class Store:
    """Chunk texts by id, as the catalog serves them to a build."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}

    def live(self) -> np.ndarray:
        return np.array(sorted(self.texts), dtype=np.int64)

    def texts_for(self, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        keys = [int(i) for i in ids if int(i) in self.texts]
        return np.asarray(keys, np.int64), [self.texts[i] for i in keys]

    def blocks(self, n: int = 400):
        live = self.live()
        for i0 in range(0, len(live), n):
            yield self.texts_for(live[i0:i0 + n])

    def build(self, out: Path, base: Path | None = None) -> dict:
        entry = json.loads((base / "keyword" / "index.json").read_text()) if base else None
        return write_keyword(out, A, live=self.live(), texts_for=self.texts_for, text_blocks=self.blocks,
                             base_dir=base, base=entry)


def assert_same_ranking(a: KeywordIndex, b: KeywordIndex, k: int = 10) -> None:
    Da, Ia = a.search(QUERIES, k)
    Db, Ib = b.search(QUERIES, k)
    np.testing.assert_allclose(Da, Db, rtol=1e-5, atol=1e-5)
    # equal scores may swap places; compare the sets per query and the order where scores differ
    for qa, qb, da in zip(Ia, Ib, Da):
        assert set(qa[da > da.min() + 1e-4]) <= set(qb) and set(qb[da > da.min() + 1e-4]) <= set(qa)


def test_delta_builds_rank_exactly_as_a_full_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(keyword, "MAX_SEGMENTS", 3)  # so this small corpus also goes through merges
    monkeypatch.setattr(keyword, "MERGE_FACTOR", 2)
    rs = np.random.default_rng(7)
    ids = np.arange(len(TEXTS), dtype=np.int64) * 2 + 1
    store = Store()
    n0 = int(len(TEXTS) * 0.6)
    store.texts.update(zip(ids[:n0].tolist(), TEXTS[:n0]))
    gens = [tmp_path / "g0"]
    first = store.build(gens[0])
    assert first["build"] == "full" and first["analysed"] == n0
    steps = [("add", ids[n0:n0 + 30]), ("del", rs.choice(ids[:n0], 40, replace=False)),
             ("add", ids[n0 + 30:n0 + 40]), ("change", rs.choice(ids[:n0], 12, replace=False)),
             ("add", ids[n0 + 40:n0 + 90]), ("del", rs.choice(ids[:n0], 80, replace=False)),
             ("add", ids[n0 + 90:])]
    for step, (what, sel) in enumerate(steps, 1):
        changed = 0
        for i in sel.tolist():
            if what == "del":
                store.texts.pop(i, None)
            elif what == "change":  # a changed file: its chunks get new ids
                if i in store.texts:
                    store.texts[10_000_000 + i] = store.texts.pop(i) + " revised"
                    changed += 1
            else:
                store.texts[i] = TEXTS[(i - 1) // 2]
        out = tmp_path / f"g{step}"
        before = {n for n in os.listdir(gens[-1] / "keyword")}
        entry = store.build(out, gens[-1])
        gens.append(out)
        assert entry["build"] == "delta"
        assert entry["ntotal"] == len(store.texts)
        assert len(entry["segments"]) <= keyword.MAX_SEGMENTS
        added = {"add": len(sel), "del": 0, "change": changed}[what]
        assert entry["analysed"] == added  # only what changed is analysed
        kept = [s["name"] for s in entry["segments"] if s["name"] in before]
        for name in kept:  # unchanged segments are the same files (hard links)
            assert os.path.samefile(out / "keyword" / name / "docs.npy", gens[-2] / "keyword" / name / "docs.npy")
        full = tmp_path / f"full{step}"
        live = store.live()
        build_keyword_index([store.texts[i] for i in live.tolist()], live, full, A)
        inc, ref = KeywordIndex(out, A), KeywordIndex(full, A)
        assert inc.n == ref.n and inc.avgdl == pytest.approx(ref.avgdl)
        assert_same_ranking(inc, ref)
        _, I = inc.search(QUERIES, 50)
        gone = set(I.ravel().tolist()) - set(live.tolist()) - {-1}
        assert not gone, f"deleted chunks returned: {sorted(gone)[:5]}"
    assert any(s > 0 for s in [json.loads((g / "keyword" / "index.json").read_text())["merged"] for g in gens])


def test_scores_match_bm25s(tmp_path):
    import bm25s

    ids = np.arange(len(TEXTS), dtype=np.int64)
    build_keyword_index(TEXTS, ids, tmp_path, A)
    D, I = KeywordIndex(tmp_path, A).search(QUERIES, 10)
    r = bm25s.BM25()
    r.index(keyword._tokenize(TEXTS, A), show_progress=False)
    docs, scores = r.retrieve(keyword._tokenize(QUERIES, A), k=10, show_progress=False)
    np.testing.assert_allclose(D, scores, rtol=1e-4, atol=1e-4)
    assert (I[:, 0] == docs[:, 0]).mean() > 0.95  # ties may order differently


def test_empty_and_termless(tmp_path):
    build_keyword_index([], np.empty(0, np.int64), tmp_path / "a", A)
    D, I = KeywordIndex(tmp_path / "a", A).search(["wing"], 3)
    assert (I == -1).all() and (D == 0).all()
    build_keyword_index(["a b c", "the of"], np.array([4, 5]), tmp_path / "b", A)
    _, I = KeywordIndex(tmp_path / "b", A).search(["wing", ""], 3)
    assert (I == -1).all()


def test_damaged_segment_file_is_named(tmp_path):
    build_keyword_index(TEXTS[:50], np.arange(50), tmp_path, A)
    victim = next((tmp_path / "keyword").glob("seg-*/docs.npy"))
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 9)
    with pytest.raises(CorruptFileError, match="docs.npy"):
        KeywordIndex(tmp_path, A)


def test_generation_written_before_segments_still_answers(tmp_path):
    """A generation from an older shoal (one bm25s index, bm25/ + bm25_ids.npy) keeps answering, same scores."""
    import bm25s

    from shoal.index import layout

    ids = np.arange(len(TEXTS), dtype=np.int64) + 100
    r = bm25s.BM25()
    r.index(keyword._tokenize(TEXTS, A), show_progress=False)
    r.save(str(tmp_path / layout.BM25), allow_pickle=False, show_progress=False)
    np.save(tmp_path / layout.BM25_IDS, ids)
    manifest = {"keyword": {"kind": "bm25s", "analysis": A.as_dict()}}
    assert KeywordIndex.exists(tmp_path)
    old = KeywordIndex.open(tmp_path, manifest)
    assert isinstance(old, keyword.Bm25sIndex)
    build_keyword_index(TEXTS, ids, tmp_path / "new", A)
    D_old, I_old = old.search(QUERIES, 5)
    D_new, _ = KeywordIndex(tmp_path / "new", A).search(QUERIES, 5)
    np.testing.assert_allclose(D_old, D_new, rtol=1e-4, atol=1e-4)
    assert (I_old[:, 0] >= 100).all()
