#!/usr/bin/env python3
"""Write a BEIR collection's documents out as files, one per document.

    scripts/make_corpus.py OUT_DIR [--beir DIR] [--limit N] [--repeat R]

Each document becomes OUT_DIR/<id>.txt holding "title\\n\\ntext". With no BEIR
collection at hand (a fresh machine without ../shared/data), the project's own
source and docs are copied instead, so the demo always has something to search.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEIR = ROOT.parent / "shared" / "data" / "cranfield"


def write_beir(beir: Path, out: Path, limit: int = 0, repeat: int = 1) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(beir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            if limit and n >= limit:
                break
            d = json.loads(line)
            body = f"{d.get('title', '').strip()}\n\n{d.get('text', '').strip()}\n"
            for r in range(repeat):
                name = f"{d['_id']}.txt" if repeat == 1 else f"{d['_id']}_r{r}.txt"
                (out / name).write_text(body, encoding="utf-8")
            n += 1
    return n * repeat


def write_fallback(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted([*ROOT.glob("*.md"), *ROOT.glob("cluster/*.py"), *ROOT.glob("index/*.py"),
                     *ROOT.glob("workers/*.py"), *ROOT.glob("configs/*.yaml")]):
        shutil.copy(p, out / f"{p.parent.name}_{p.name}")
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--beir", default=str(DEFAULT_BEIR))
    ap.add_argument("--limit", type=int, default=0, help="first N documents (0: all)")
    ap.add_argument("--repeat", type=int, default=1, help="write each document R times")
    a = ap.parse_args()
    beir, out = Path(a.beir), Path(a.out)
    if (beir / "corpus.jsonl").is_file():
        n = write_beir(beir, out, a.limit, a.repeat)
        print(f"wrote {n} documents from {beir} to {out}", file=sys.stderr)
    else:
        n = write_fallback(out)
        print(f"no BEIR collection at {beir}; copied {n} project files to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
