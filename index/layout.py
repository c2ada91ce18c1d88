"""The data dir's layout, in one place (DESIGN.md, "On disk").

    DATA_DIR/catalog.sqlite, write.lock, staging/, generations/NNNNNN/, CURRENT
    a generation: manifest.json, trained.index, shard_NN.index (+ .ivfdata; + .vectors.npy and .vector_ids.npy
                  for a refine stage on disk), ids.npy,
                  delta.index + deleted.npy (between merges), keyword/ (segments; older generations: bm25/ + bm25_ids.npy)
"""

from __future__ import annotations

from pathlib import Path

CATALOG = "catalog.sqlite"
LOCK = "write.lock"
STAGING = "staging"
GENERATIONS = "generations"
CURRENT = "CURRENT"

# inside a generation folder
MANIFEST = "manifest.json"
TRAINED = "trained.index"
IDS = "ids.npy"
DELTA = "delta.index"
DELETED = "deleted.npy"
BM25 = "bm25"
BM25_IDS = "bm25_ids.npy"
# a shard's exact vectors for re-scoring (IVF-PQ + refine with on-disk lists): shard_NN + these suffixes
REFINE_VECTORS = ".vectors.npy"
REFINE_IDS = ".vector_ids.npy"


def catalog(data: Path) -> Path:
    return data / CATALOG


def lock(data: Path) -> Path:
    return data / LOCK


def staging(data: Path) -> Path:
    return data / STAGING


def generations(data: Path) -> Path:
    return data / GENERATIONS


def current(data: Path) -> Path:
    return data / CURRENT


def shard_stem(shard: int) -> str:
    return f"shard_{shard:02d}"
