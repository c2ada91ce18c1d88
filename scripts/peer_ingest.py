#!/usr/bin/env python
"""One peer's ingest of a folder of text files, for scripts/bench_ingest.py: txtai or LanceDB, same model.

    python scripts/peer_ingest.py {txtai,lancedb} DOCS_DIR WORK_DIR MODEL_DIR

Prints one JSON line: documents, build seconds (encode + index, as each project's
docs show it), total seconds (process start to index on disk). Runs under any
Python that has the peer installed (``--peer-python`` of bench_ingest).
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = time.perf_counter()


def read(folder: str) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(folder))
    texts = []
    for n in names:
        with open(os.path.join(folder, n), encoding="utf-8") as f:
            texts.append(f.read())
    return names, texts


def txtai_build(names: list[str], texts: list[str], work: str, model: str) -> float:
    from txtai import Embeddings

    emb = Embeddings(path=model, content=False, backend="faiss", maxlength=256)
    t0 = time.perf_counter()
    emb.index([(n, t, None) for n, t in zip(names, texts)])
    emb.save(os.path.join(work, "txtai-index"))
    return time.perf_counter() - t0


def lancedb_build(names: list[str], texts: list[str], work: str, model: str) -> float:
    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    func = get_registry().get("sentence-transformers").create(name=model, device="cpu", normalize=True)

    class Doc(LanceModel):
        name: str
        text: str = func.SourceField()
        vector: Vector(func.ndims()) = func.VectorField()  # type: ignore[valid-type]

    db = lancedb.connect(os.path.join(work, "lancedb"))
    t0 = time.perf_counter()
    table = db.create_table("docs", schema=Doc, mode="overwrite")
    table.add([{"name": n, "text": t} for n, t in zip(names, texts)])
    return time.perf_counter() - t0


def main() -> int:
    which, folder, work, model = sys.argv[1:5]
    os.makedirs(work, exist_ok=True)
    names, texts = read(folder)
    build = {"txtai": txtai_build, "lancedb": lancedb_build}[which](names, texts, work, model)
    print(json.dumps({"peer": which, "documents": len(texts), "build_seconds": build,
                      "total_seconds": time.perf_counter() - T0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
