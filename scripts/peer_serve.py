#!/usr/bin/env python
"""txtai's API beside `shoal serve`, for scripts/bench_serve.py: build an index, write the API's config.

    python scripts/peer_serve.py DOCS_DIR WORK_DIR MODEL_DIR

Builds ``Embeddings(content=True, hybrid=True)`` (dense + BM25, as txtai's docs show hybrid
search) over the folder's files with the same model, saves it under WORK_DIR/txtai-index, and
writes WORK_DIR/txtai.yml for ``uvicorn txtai.api:app`` (CONFIG=...): ``path:`` names the saved
index and an ``embeddings:`` key stands beside it (without one the API serves no /search).
Prints one JSON line. Runs under any Python that has txtai[api] (``--peer-python`` of bench_serve).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    folder, work, model = sys.argv[1:4]
    from txtai import Embeddings

    os.makedirs(work, exist_ok=True)
    names = sorted(os.listdir(folder))
    docs = []
    for n in names:
        with open(os.path.join(folder, n), encoding="utf-8") as f:
            docs.append((n, f.read(), None))
    t0 = time.perf_counter()
    emb = Embeddings(path=model, content=True, hybrid=True, maxlength=256)
    emb.index(docs)
    index = os.path.join(work, "txtai-index")
    emb.save(index)
    build = time.perf_counter() - t0
    with open(os.path.join(work, "txtai.yml"), "w", encoding="utf-8") as f:
        f.write(f"path: {index}\nembeddings:\n  path: {model}\n  content: true\n  hybrid: true\n")
    print(json.dumps({"documents": len(docs), "build_seconds": build, "config": os.path.join(work, "txtai.yml"),
                      "components": emb.config.get("backend", "faiss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
