"""Build a new index generation from the catalog's live chunks and their staged vectors.

Three ways, chosen by :func:`choose_mode`:

- ``full``: train the coarse quantizer (and PQ) on a sample, plan the shards,
  add every vector. First build, `shoal reindex`, or a changed factory.
- ``merge``: keep the trained quantizer of the live generation, re-add every
  live vector into fresh shards (no retraining).
- ``delta``: hard-link the live generation's shard files, put the vectors
  added since into a small in-memory ``delta.index`` searched beside them,
  and list the removed ids in ``deleted.npy`` (masked at search time:
  ``remove_ids`` on merged on-disk lists removes nothing, faiss#2315).
  Used while added + deleted stay under ``index.delta_max_fraction``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import faiss
import numpy as np
import psutil

from shoal.workers.catalog import Catalog
from shoal.cluster.config import Config
from shoal.index.errors import CorruptFileError, ShoalError
from shoal.index import generations, staging
from shoal.index.factory import (add_in_blocks, choose_factory, parse_nlist, split_refine, train_index,
                                 train_positions)
from shoal.index.gpu import detect_gpus
from shoal.index.ondisk import write_ondisk_shard_blocks
from shoal.index.shards import plan_shards
from shoal.index import layout

log = logging.getLogger(__name__)

Mode = Literal["full", "merge", "delta"]


def model_meta(cat: Catalog) -> dict[str, Any]:
    raw = cat.get_meta("model")
    if raw is None:
        raise ShoalError("the catalog has no embedded chunks yet: run `shoal ingest PATH` first")
    return json.loads(raw)


def _live_generation(data: Path, meta: dict[str, Any]) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    try:
        gen_dir, m = generations.open_current(data)
    except ShoalError:
        return None, None
    if m["model"].get("fingerprint") != meta["fingerprint"] or m.get("dim") != meta["dim"]:
        return None, None
    return gen_dir, m


def choose_mode(cfg: Config, n_live: int, added: int, deleted: int, base: Optional[dict[str, Any]],
                retrain: bool) -> tuple[Mode, str, str]:
    """(mode, factory, reason) for a build of ``n_live`` vectors; pure, for tests."""
    wanted = choose_factory(n_live, cfg.index.factory, cfg.index.flat_threshold)
    if retrain or base is None:
        return "full", wanted, "reindex requested" if retrain else "no live generation for this model"
    if base["factory"] == "Flat" or base.get("configured_factory") != cfg.index.factory:
        return "full", wanted, "exact index rebuilt" if base["factory"] == "Flat" else "index.factory changed"
    if base.get("ondisk") != cfg.index.ondisk and split_refine(base["factory"])[1]:
        return "full", wanted, "index.ondisk changed: the refine stage moves between RAM and disk"
    if base.get("ondisk") != cfg.index.ondisk or base.get("plan_devices") != plan_signature(cfg):
        return "merge", base["factory"], "shard placement changed: re-sharded on the trained quantizer"
    main = int(base.get("main_ntotal", base["ntotal"]))
    if main and added + deleted <= cfg.index.delta_max_fraction * main:
        return "delta", base["factory"], f"{added} added, {deleted} deleted: within the delta budget"
    return "merge", base["factory"], f"{added} added, {deleted} deleted: rebuilt on the trained quantizer"


def plan_signature(cfg: Config) -> list[str]:
    """The devices a plan was made for, to notice when they change."""
    return [f"{g.name}:{g.memory}" for g in cfg.index.gpus] or ["detected"]


def build_generation(cfg: Config, cat: Catalog, *, retrain: bool = False) -> str:
    """Publish a new generation for the catalog's live chunks; returns its name."""
    t0 = time.perf_counter()
    data = cfg.data_path
    meta = model_meta(cat)
    d = int(meta["dim"])
    live = cat.chunk_ids()
    base_dir, base = _live_generation(data, meta)
    main_ids = _read_ids(base_dir) if base is not None else None
    added = np.setdiff1d(live, main_ids, assume_unique=True) if main_ids is not None else live
    removed = np.setdiff1d(main_ids, live, assume_unique=True) if main_ids is not None else live[:0]
    mode, factory, reason = choose_mode(cfg, len(live), len(added), len(removed), base, retrain)
    log.info("build mode %s (%s), factory %s", mode, reason, factory)
    tmp = generations.begin(data)
    try:
        if mode == "delta":
            manifest = _build_delta(cfg, cat, tmp, base_dir, base, added, removed, d)
        else:
            manifest = _build_main(cfg, cat, tmp, live, factory, d, mode, base_dir, base)
        if cfg.index.keyword:
            manifest["keyword"] = _build_keyword(cat, tmp, keyword_analysis(cfg), live, base_dir, base, retrain)
    except RuntimeError as e:  # FAISS reports write failures (disk full, file too large) this way
        shutil.rmtree(tmp, ignore_errors=True)
        raise ShoalError(f"cannot write the new generation: {str(e).strip().splitlines()[-1]}; "
                         "the live generation is unchanged") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.update(model=meta, dim=d, metric="inner_product", build_mode=mode, build_reason=reason,
                    configured_factory=cfg.index.factory, ondisk=cfg.index.ondisk, plan_devices=plan_signature(cfg),
                    build_seconds=round(time.perf_counter() - t0, 3))
    manifest["ntotal"] = int(manifest["main_ntotal"] + manifest.get("delta_ntotal", 0) - manifest.get("deleted", 0))
    trained_for = int(manifest["trained_for"])
    if manifest["nlist"] and manifest["ntotal"] > cfg.index.retrain_growth * max(trained_for, 1):
        manifest["reindex_advised"] = (
            f"{manifest['ntotal']} vectors, {manifest['ntotal'] / trained_for:.1f}x the {trained_for} the quantizer "
            f"was trained for (index.retrain_growth {cfg.index.retrain_growth}): run `shoal reindex`"
        )
        log.warning("%s", manifest["reindex_advised"])
    name = generations.commit(data, tmp, manifest, (base_dir, base) if base_dir is not None and base else None)
    generations.gc(data, cfg.index.keep_generations)
    log.info("built generation %s (%s): %s, %d vectors in %.1fs", name, mode, factory, manifest["ntotal"],
             manifest["build_seconds"])
    return name


def keyword_analysis(cfg: Config) -> Any:
    from shoal.index.keyword import analysis_for

    return analysis_for(cfg.index.keyword_language, cfg.index.keyword_stopwords)


def keyword_stale(cfg: Config, manifest: Optional[dict[str, Any]]) -> bool:
    """Whether the live generation's keyword index was built with other settings than the config's.

    A build then rebuilds it; until then queries use the generation's own analysis, never a mix.
    """
    from shoal.index.keyword import Analysis

    if manifest is None:
        return False
    has = bool(manifest.get("keyword"))
    if has != cfg.index.keyword:
        return True
    return has and Analysis.from_manifest(manifest) != keyword_analysis(cfg)


def _build_keyword(cat: Catalog, tmp: Path, analysis: Any, live: np.ndarray, base_dir: Optional[Path],
                   base: Optional[dict[str, Any]], retrain: bool) -> dict[str, Any]:
    """The keyword index: the last generation's segments plus one for the chunks added since (a delta),
    or every live chunk analysed again (first build, changed analysis, `shoal reindex`)."""
    from shoal.index.keyword import SEGMENT_DOCS, write_keyword

    kw = (base or {}).get("keyword") if not retrain else None
    return write_keyword(tmp, analysis, live=live, texts_for=cat.chunk_texts_for,
                         text_blocks=lambda: cat.chunk_text_blocks(SEGMENT_DOCS),
                         base_dir=base_dir if kw else None, base=kw)


def _read_ids(gen_dir: Optional[Path]) -> Optional[np.ndarray]:
    if gen_dir is None or not (gen_dir / layout.IDS).is_file():
        return None
    return np.load(gen_dir / layout.IDS, allow_pickle=False)


def _cpu_budget(cfg: Config) -> int:
    return int(cfg.index.cpu_memory) or psutil.virtual_memory().total // 2


class _Stream:
    """The live vectors, streamed from staging in id order, and a check that every id arrived."""

    def __init__(self, cfg: Config, cat: Catalog, d: int) -> None:
        self.dir, self.parts, self.d = layout.staging(cfg.data_path), cat.parts(), d
        self.block = int(cfg.index.ondisk_block)

    def blocks(self, ids: np.ndarray, block: int = 0):
        """(ids, xb) of ``ids`` (sorted) in order, ``block`` rows at a time (default index.ondisk_block)."""
        n = 0
        for got, xb in staging.iter_sorted(self.dir, self.parts, ids, block or self.block):
            if not np.array_equal(got, ids[n:n + len(got)]):
                break
            n += len(got)
            yield got, xb
        if n != len(ids):
            missing = np.setdiff1d(ids, staging.gather(self.dir, self.parts, ids, self.d)[0])
            raise CorruptFileError(
                f"{len(missing)} catalog chunks have no staged vector (first ids {missing[:5].tolist()}); "
                "re-run `shoal ingest` on their files"
            )

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids`` (sorted; a sample, a delta) in one array; only parts that can hold them are read."""
        xb = [x for _, x in self.blocks(ids)]
        return np.concatenate(xb) if xb else np.empty((0, self.d), np.float32)

    def sample(self, ids: np.ndarray, factory: str, per_list: int) -> np.ndarray:
        return self.gather(ids[train_positions(len(ids), factory, per_list)])


def _build_main(cfg: Config, cat: Catalog, tmp: Path, ids: np.ndarray, factory: str, d: int, mode: Mode,
                base_dir: Optional[Path], base: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Train (or reuse the trained quantizer), then add the live vectors shard by shard, streamed from
    staging in blocks of ``index.ondisk_block``: a build holds one block (plus the training sample and
    what the index itself keeps in RAM), never every vector."""
    src = _Stream(cfg, cat, d)
    ondisk = cfg.index.ondisk and factory.startswith("IVF")
    # with on-disk lists a refine stage (",RFlat") keeps its exact vectors on disk beside each shard,
    # memory-mapped at search (index/search.py DiskRefine); FAISS builds only the base index
    base_factory, disk_refine = split_refine(factory) if ondisk else (factory, False)
    t0 = time.perf_counter()
    if mode == "merge" and base_dir is not None and base is not None:
        trained = faiss.read_index(str(base_dir / layout.TRAINED))
        trained_for = int(base["trained_for"])
    else:
        trained = train_index(base_factory, src.sample(ids, base_factory, cfg.index.train_sample_per_list))
        trained_for = len(ids)
    t_train = time.perf_counter() - t0
    faiss.write_index(trained, str(tmp / layout.TRAINED))
    plan = plan_shards(len(ids), d, base_factory, detect_gpus(cfg.index.gpus), cpu_memory_bytes=_cpu_budget(cfg),
                       ondisk=ondisk, gpu_reserve_fraction=cfg.index.gpu_reserve_fraction)
    shards = []
    timings: dict[str, float] = {}  # on-disk shards: read / add / write / merge seconds
    for spec in plan:
        stem = f"shard_{spec.shard:02d}"
        blocks = src.blocks(ids[spec.i0:spec.i1])
        extra: dict[str, str] = {}
        if disk_refine:
            extra = {"refine_vectors": f"{stem}{layout.REFINE_VECTORS}", "refine_ids": f"{stem}{layout.REFINE_IDS}"}
            np.save(tmp / extra["refine_ids"], ids[spec.i0:spec.i1])
            blocks = _tee_vectors(blocks, tmp / extra["refine_vectors"], spec.i1 - spec.i0, d,
                                  cfg.index.staging_dtype)
        if ondisk:
            write_ondisk_shard_blocks(trained, blocks, tmp, stem, timings)
        else:
            idx = faiss.clone_index(trained)
            for ids_b, xb_b in blocks:
                add_in_blocks(idx, xb_b, ids_b)
            faiss.write_index(idx, str(tmp / f"{stem}.index"))
            del idx
        shards.append(dict(spec.as_dict(), file=f"{stem}.index", ntotal=int(spec.i1 - spec.i0), ondisk=ondisk,
                           **extra))
    t_add = time.perf_counter() - t0 - t_train
    np.save(tmp / layout.IDS, ids)
    compact_parts(cat, layout.staging(cfg.data_path), ids, src, cfg.index.staging_dtype)
    stages = {"train_s": round(t_train, 2), "add_s": round(t_add, 2),
              "compact_s": round(time.perf_counter() - t0 - t_train - t_add, 2),
              **{f"ondisk_{k}": round(v, 2) for k, v in timings.items()}}
    return {"factory": factory, "nlist": parse_nlist(factory), "nprobe": _nprobe(cfg, base, factory),
            "shards": shards, "main_ntotal": int(len(ids)), "trained_for": trained_for, "stages": stages,
            "refine": "disk" if disk_refine else ("ram" if split_refine(factory)[1] else None)}


def _tee_vectors(blocks, path: Path, n: int, d: int, dtype: str):
    """Pass (ids, xb) blocks through, writing xb in order into ``path`` (an (n, d) .npy of ``dtype``)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    i = 0
    for ids_b, xb_b in blocks:
        out[i:i + len(xb_b)] = xb_b
        i += len(xb_b)
        yield ids_b, xb_b
    if i != n:
        raise RuntimeError(f"{path.name}: {i} vectors streamed, {n} planned")
    out.flush()
    del out


def _nprobe(cfg: Config, base: Optional[dict[str, Any]], factory: str) -> int:
    """Keep a tuned nprobe across rebuilds of the same factory."""
    if base is not None and base.get("factory") == factory and base.get("tuned"):
        return int(base["nprobe"])
    return cfg.index.nprobe


def _build_delta(cfg: Config, cat: Catalog, tmp: Path, base_dir: Optional[Path], base: Optional[dict[str, Any]],
                 added: np.ndarray, removed: np.ndarray, d: int) -> dict[str, Any]:
    assert base_dir is not None and base is not None  # choose_mode only picks delta with a base
    main_files = [s["file"] for s in base["shards"]]
    main_files += [f.replace(".index", ".ivfdata") for f in main_files if (base_dir / f.replace(".index", ".ivfdata")).exists()]
    main_files += [s[k] for s in base["shards"] for k in ("refine_vectors", "refine_ids") if s.get(k)]
    for f in main_files + [layout.TRAINED, layout.IDS]:
        generations.link_or_copy(base_dir / f, tmp / f)
    delta = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if len(added):
        add_in_blocks(delta, _Stream(cfg, cat, d).gather(added), added)
    faiss.write_index(delta, str(tmp / layout.DELTA))
    np.save(tmp / layout.DELETED, np.asarray(removed, dtype=np.int64))
    keep = ("factory", "nlist", "nprobe", "tuned", "shards", "main_ntotal", "trained_for", "refine")
    m = {k: base[k] for k in keep if k in base}
    m.update(delta_ntotal=int(len(added)), deleted=int(len(removed)))
    return m


def compact_parts(cat: Catalog, staging_dir: Path, ids: np.ndarray, src: "_Stream", dtype: str = "float32",
                  min_dead: float = 0.3, max_parts: int = 256, part_rows: int = 262_144) -> None:
    """Rewrite the staged parts without deleted chunks when those are over ``min_dead`` of them (or there
    are too many parts): streamed, into parts of at most ``part_rows`` vectors."""
    names = cat.part_names()
    if len(names) <= 1:
        return
    total = cat.staged_vectors()
    if total - len(ids) <= min_dead * total and len(names) < max_parts:
        return
    new = []
    try:
        for got, xb in src.blocks(ids, part_rows):
            new.append((staging.write_part(staging_dir, got, xb, dtype), got))
        cat.replace_parts(names, new)
    except BaseException:
        for n, _ in new:
            (staging_dir / n).unlink(missing_ok=True)
        raise
    for n in names:
        (staging_dir / n).unlink(missing_ok=True)
    log.info("compacted %d staged parts (%d vectors, %d live) into %d", len(names), total, len(ids), len(new))
