"""The embedded default end to end: real files, real local Ray, real FAISS, the real model."""


import numpy as np
import pytest

from shoal.workers.catalog import Catalog
from shoal.cluster.ingest import ingest
from shoal.cluster.search import Searcher
from shoal.index import generations

from conftest import cranfield_docs, write_docs


def first_sentence(path):
    text = path.read_text().split("\n\n", 1)[1]
    return text.split(" . ")[0]


def catalog_and_index_agree(cfg):
    with Catalog(cfg.data_path / "catalog.sqlite") as cat:
        cat_ids = cat.chunk_ids()
    s = Searcher(cfg, lm=LM[0])
    try:
        idx = s.index.live_ids()
    finally:
        s.close()
    assert np.array_equal(cat_ids, idx), (len(cat_ids), len(idx))
    return cat_ids


LM = []


@pytest.fixture(autouse=True)
def _share_lm(lm):
    if not LM:
        LM.append(lm)


def test_ingest_query_and_incremental(tmp_path, test_cfg, ray_local):
    docs = cranfield_docs(50)
    paths = write_docs(docs, tmp_path / "corpus")
    (tmp_path / "corpus" / "bad.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf8 \xc3\x28")
    (tmp_path / "corpus" / "blank.md").write_text("   \n")
    r = ingest([str(tmp_path / "corpus")], test_cfg, out=lambda s: None)
    assert r.new == 50 and r.generation == "000001"
    assert dict(r.skipped) == {"binary": 1, "undecodable": 1, "empty": 1}
    assert r.chunks_added >= 50
    # configs/test.yaml: two read tasks in flight; the report says where the time went
    assert r.read_workers == 2 and r.read_task_seconds > 0
    assert {"startup", "read_chunk", "embed_wait", "commit", "build", "scan"} <= set(r.stages)
    assert sum(r.stages.values()) == pytest.approx(r.seconds, rel=0.02)
    assert r.embed_busy_seconds > 0 and 0 < r.first_commit_s < r.seconds and r.driver_cpu_seconds > 0
    kw = generations.read_manifest(generations.generations_dir(test_cfg.data_path) / r.generation)["keyword"]
    assert kw["kind"] == "segments" and kw["build"] == "full" and kw["ntotal"] == r.chunks_added
    ids1 = catalog_and_index_agree(test_cfg)

    s = Searcher(test_cfg, lm=LM[0])
    for doc_id in ("1", "7", "23", "42"):
        [hits] = s.search([first_sentence(paths[doc_id])], k=5, mode="dense")
        assert hits[0].path == str(paths[doc_id]), (doc_id, [h.path for h in hits])
        assert hits[0].score > 0.5
        assert paths[doc_id].read_text()[hits[0].start:hits[0].end] == hits[0].text
    s.close()

    # edit one, add one, delete one; unchanged files keep their chunk ids
    with Catalog(test_cfg.data_path / "catalog.sqlite") as cat:
        before = {p: cat.file_by_path(str(paths[p])) for p in ("2", "3", "4")}
    paths["2"].write_text("hypersonic boundary layer transition on a sharp cone\n\nnew text entirely about cones .")
    paths["3"].unlink()
    extra = tmp_path / "corpus" / "sub" / "new.md"
    extra.parent.mkdir()
    extra.write_text("# Rotor blades\n\nhelicopter rotor blade flapping dynamics in forward flight .")
    r2 = ingest([str(tmp_path / "corpus")], test_cfg, out=lambda s: None)
    assert (r2.new, r2.changed, r2.deleted, r2.unchanged) == (1, 1, 1, 48)
    assert r2.generation == "000002"
    kw = generations.read_manifest(generations.generations_dir(test_cfg.data_path) / r2.generation)["keyword"]
    assert kw["build"] == "delta" and kw["analysed"] == r2.chunks_added  # only the new chunks analysed
    ids2 = catalog_and_index_agree(test_cfg)
    with Catalog(test_cfg.data_path / "catalog.sqlite") as cat:
        assert cat.file_by_path(str(paths["3"])) is None
        assert cat.file_by_path(str(paths["2"])).sha256 != before["2"].sha256
        after4 = cat.file_by_path(str(paths["4"]))
        assert after4.id == before["4"].id  # untouched file kept its row and chunks
    assert len(set(ids1) - set(ids2)) >= 2  # chunks of the edited and deleted files are gone
    s = Searcher(test_cfg, lm=LM[0])
    [hits] = s.search(["helicopter rotor blade flapping"], k=3)
    assert hits[0].path == str(extra)
    [hits] = s.search(["sharp cone boundary layer transition hypersonic"], k=3)
    assert hits[0].path == str(paths["2"])
    [hits] = s.search([first_sentence_of_text(docs, "3")], k=10)
    assert str(paths["3"]) not in {h.path for h in hits}
    s.close()

    # nothing changed: no new generation, no embedding
    r3 = ingest([str(tmp_path / "corpus")], test_cfg, out=lambda s: None)
    assert r3.chunks_added == 0 and r3.generation == "000002" and r3.unchanged == 50


def first_sentence_of_text(docs, doc_id):
    d = next(x for x in docs if x["_id"] == doc_id)
    return d["text"].split(" . ")[0]


def test_ivf_index_above_threshold(tmp_path, test_cfg, ray_local):
    from dataclasses import replace

    docs = cranfield_docs(120)
    write_docs(docs, tmp_path / "corpus")
    cfg = replace(test_cfg, index=replace(test_cfg.index, flat_threshold=50))
    r = ingest([str(tmp_path / "corpus")], cfg, out=lambda s: None)
    gen_dir, m = generations.open_current(cfg.data_path)
    assert m["factory"].startswith("IVF") and m["ntotal"] == r.chunks_added
    catalog_and_index_agree(cfg)
