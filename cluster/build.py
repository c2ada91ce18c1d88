"""Build a new index generation from the catalog's live chunks and their staged vectors."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cluster.catalog import Catalog
from cluster.config import Config
from cluster.errors import CorruptFileError, ShoalError
from index import generations, staging
from index.factory import add_in_blocks, choose_factory, parse_nlist, train_index, train_sample

log = logging.getLogger(__name__)


def model_meta(cat: Catalog) -> dict[str, Any]:
    import json

    raw = cat.get_meta("model")
    if raw is None:
        raise ShoalError("the catalog has no embedded chunks yet: run `shoal ingest PATH` first")
    return json.loads(raw)


def build_generation(cfg: Config, cat: Catalog) -> str:
    """Train, fill and publish a new generation; returns its name."""
    t0 = time.perf_counter()
    data = cfg.data_path
    meta = model_meta(cat)
    d = int(meta["dim"])
    live = cat.chunk_ids()
    names = cat.part_names()
    ids, xb = staging.load_live(data / "staging", names, live, d)
    if len(ids) != len(live) or not np.array_equal(ids, live):
        missing = np.setdiff1d(live, ids)
        raise CorruptFileError(
            f"{len(missing)} catalog chunks have no staged vector (first ids {missing[:5].tolist()}); "
            "re-run `shoal ingest` on their files"
        )
    factory = choose_factory(len(ids), cfg.index.factory, cfg.index.flat_threshold)
    index = train_index(factory, train_sample(xb, factory, cfg.index.train_sample_per_list))
    add_in_blocks(index, xb, ids)
    tmp = generations.begin(data)
    faiss.write_index(index, str(tmp / "shard_00.index"))
    manifest = {
        "model": meta,
        "dim": d,
        "metric": "inner_product",
        "factory": factory,
        "nlist": parse_nlist(factory),
        "nprobe": cfg.index.nprobe,
        "ntotal": int(index.ntotal),
        "shards": [{"file": "shard_00.index", "device": "cpu", "ntotal": int(index.ntotal)}],
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    name = generations.commit(data, tmp, manifest)
    generations.gc(data, cfg.index.keep_generations)
    compact_parts(cat, data / "staging", ids, xb)
    log.info("built generation %s: %s, %d vectors in %.1fs", name, factory, len(ids), manifest["build_seconds"])
    return name


def compact_parts(cat: Catalog, staging_dir: Path, ids: np.ndarray, xb: np.ndarray, min_dead: float = 0.3) -> None:
    """Rewrite the staged parts as one when deleted chunks are over ``min_dead`` of them."""
    names = cat.part_names()
    total = sum(staging.read_part(staging_dir, n)[0].shape[0] for n in names) if len(names) > 1 else len(ids)
    if len(names) <= 1 or (total - len(ids)) <= min_dead * total and len(names) < 256:
        return
    new = staging.write_part(staging_dir, ids, xb) if len(ids) else None
    cat.replace_parts(names, (new, ids) if new else None)
    for n in names:
        (staging_dir / n).unlink(missing_ok=True)
