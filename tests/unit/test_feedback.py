"""Pseudo-relevance feedback through the real query core over a real generation (synthetic vectors, no model).

The geometry is constructed: a query, one close document A, fillers at cosine 0.5, and a document B at
cosine 0.45 that lies next to A. The first pass (k=3) gets A and fillers; looking twice moves the query
toward A, and B comes in second.
"""

import asyncio
import json
from dataclasses import replace
from typing import Optional

import numpy as np
import pytest

from shoal.cluster.build import build_generation
from shoal.cluster.config import Config
from shoal.cluster.query import DenseResult, QueryCore, SearchOptions, validate
from shoal.index import generations, staging
from shoal.index.feedback import looks_twice, rocchio, top_ids
from shoal.index.search import LoadedGeneration
from shoal.workers.catalog import Catalog, CatalogReader, FileBatch
from shoal.workers.chunking import Chunk

D = 64


def unit(*pairs) -> np.ndarray:
    v = np.zeros(D, np.float32)
    for axis, w in pairs:
        v[axis] = w
    return v / np.linalg.norm(v)


class VectorBackend:
    """The query core's Backend over a loaded generation, for queries that are given as vectors by name:
    encode is the one thing a constructed geometry cannot take from the model."""

    def __init__(self, gen: LoadedGeneration, name: str, queries: dict[str, np.ndarray]) -> None:
        self.gen, self.name, self.queries = gen, name, queries
        self.asked: list[np.ndarray] = []  # every query vector the shard side was given

    def serving_generation(self) -> Optional[str]:
        return self.name

    async def encode(self, queries: list[str]) -> np.ndarray:
        return np.stack([self.queries[q] for q in queries])

    async def dense(self, xq: np.ndarray, k: int, opts: SearchOptions, allowed: Optional[np.ndarray]) -> DenseResult:
        self.asked.append(np.array(xq))
        D_, I_ = self.gen.search(xq, k, allowed, nprobe=opts.nprobe)
        return DenseResult(D_, I_, self.name)

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        raise AssertionError("no re-ranking here")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fb")
    cfg = Config(data_dir=str(tmp / "data"))
    cfg = replace(cfg, index=replace(cfg.index, factory="Flat", keyword=False),
                  query=replace(cfg.query, feedback="none", feedback_docs=1, feedback_weight=2.0))
    cat = Catalog(cfg.data_path / "catalog.sqlite")
    cat.set_meta("model", json.dumps({"name": "synthetic", "fingerprint": "sha256:synthetic", "dim": D}))
    A = unit((0, 0.9), (1, 0.436))
    B = unit((0, 0.45), (1, 0.893))
    fillers = [unit((0, 0.5), (2 + j, 0.866)) for j in range(20)]
    noise = np.random.default_rng(0).normal(size=(200, D)).astype(np.float32)
    noise[:, :2] = 0  # far from the query and from A and B
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    xb = np.vstack([A, B, *fillers, noise]).astype(np.float32)
    names = ["A", "B"] + [f"filler{j}" for j in range(20)] + [f"noise{j}" for j in range(200)]
    for name, x in zip(names, xb):
        fb = FileBatch(f"/c/{name}.txt", "/c", 1, 1, "h", "text", [Chunk(0, 0, 1, name)])
        cat.commit_files([fb], write_part=lambda ids, x=x: staging.write_part(cfg.data_path / "staging", ids, x[None]))
    build_generation(cfg, cat)
    gen_dir, m = generations.open_current(cfg.data_path)
    gen = LoadedGeneration(gen_dir, m)
    ids = cat.chunk_ids()
    yield cfg, gen, m["generation"], dict(zip(names, ids)), dict(zip(ids.tolist(), xb))
    cat.close()


def ask(cfg, gen, name, mode="dense", **opts):
    backend = VectorBackend(gen, name, {"q": unit((0, 1.0))})
    core = QueryCore(cfg, backend, offload=False)
    req = validate(["q"], k=3, mode=mode, **opts)
    ans = asyncio.run(core.search(req.queries, req))
    core.close()
    return ans, backend


def test_second_pass_finds_what_the_first_missed(built):
    cfg, gen, name, id_of, _ = built
    first, _ = ask(cfg, gen, name)
    got = [h.id for h in first.hits[0]]
    assert got[0] == id_of["A"] and id_of["B"] not in got and first.feedback is None
    again, backend = ask(cfg, gen, name, feedback="dense")
    got2 = [h.id for h in again.hits[0]]
    assert got2[:2] == [id_of["A"], id_of["B"]] and again.feedback == "dense"
    assert len(backend.asked) == 2  # one more vector search, no second forward pass


def test_the_vectors_used_are_the_top_chunks_staged_vectors(built):
    cfg, gen, name, id_of, staged = built
    cfg3 = replace(cfg, query=replace(cfg.query, feedback_docs=3))
    first, _ = ask(cfg3, gen, name)
    top3 = [h.id for h in first.hits[0]][:3]
    reader = CatalogReader(cfg.data_path)
    got_ids, got_x = reader.vectors(np.array(top3[::-1]))
    assert got_ids.tolist() == top3[::-1]
    assert np.array_equal(got_x, np.stack([staged[i] for i in top3[::-1]]))  # exact, from staging
    _, backend = ask(cfg3, gen, name, feedback="dense")
    want = rocchio(unit((0, 1.0))[None], [np.stack([staged[i] for i in top3])], 2.0)
    np.testing.assert_allclose(backend.asked[1], want, rtol=0, atol=1e-6)


def test_rocchio_and_the_rule():
    q = unit((0, 1.0))[None]
    assert np.allclose(rocchio(q, [np.zeros((0, D), np.float32)], 5.0), q)  # nothing to move toward: q stays
    moved = rocchio(q, [unit((1, 1.0))[None]], 1.0)
    assert np.isclose(np.linalg.norm(moved), 1.0) and np.isclose(moved[0, 0], moved[0, 1])
    dense = np.array([[1, 2, 3], [4, 5, -1]])
    kw = np.array([[3, 9, 9], [7, 8, 9]])
    assert looks_twice("agree", dense, kw, 3).tolist() == [True, False]
    assert looks_twice("agree", dense, kw, 2).tolist() == [False, False]
    assert looks_twice("always", dense, kw, 1).tolist() == [True, True]
    assert looks_twice("agree", dense, None, 3).tolist() == [True, True]  # one side: no disagreement to see
    assert [t.tolist() for t in top_ids(dense, 5)] == [[1, 2, 3], [4, 5]]


def test_hybrid_without_a_keyword_side_says_it_looked_twice_on_dense_alone(built):
    cfg, gen, name, id_of, _ = built  # this generation has no keyword index (index.keyword false)
    dense, _ = ask(cfg, gen, name, feedback="dense")
    hybrid, _ = ask(cfg, gen, name, mode="hybrid", feedback="dense")
    assert hybrid.mode == "dense" and hybrid.feedback == "dense"  # what it did: the dense side alone, twice
    assert [h.id for h in hybrid.hits[0]][:2] == [h.id for h in dense.hits[0]][:2] == [id_of["A"], id_of["B"]]
    assert np.allclose([h.score for h in hybrid.hits[0]], [h.score for h in dense.hits[0]])  # third: tied fillers
