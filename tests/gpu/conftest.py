"""GPU checks: collected only when SHOAL_GPU_CHECK=1 (scripts/gpu_check.sh sets it).

Each test adds rows to a report (JSON at $SHOAL_GPU_REPORT) that
``tests/gpu/report.py`` prints as a table. On a machine without a card every
test skips, saying so, and the table says plainly that no GPU is present.
"""

import json
import os
import random
from pathlib import Path

import pytest

_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def report():
    """record(check, value, note) adds a row to the printed table."""

    def record(check: str, value, note: str = "") -> None:
        _ROWS.append({"check": check, "value": value, "note": note})

    yield record
    out = os.environ.get("SHOAL_GPU_REPORT")
    if out:
        Path(out).write_text(json.dumps(_ROWS, indent=1, default=str), encoding="utf-8")


@pytest.fixture(scope="session")
def model_name() -> str:
    """The bundled model, or $SHOAL_GPU_MODEL (a directory) where the package is not installed."""
    return os.environ.get("SHOAL_GPU_MODEL", "all-MiniLM-L6-v2")


WORDS = ("flow boundary layer pressure wing shock heat transfer supersonic plate cylinder "
         "velocity turbulent laminar jet nozzle temperature surface number reynolds mach "
         "theory results experimental measured distribution solution equations method the "
         "of and in a is for on with at by from this that are were be an which").split()


def seeded_passages(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rs = random.Random(seed)
    return [" ".join(rs.choice(WORDS) for _ in range(rs.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """2,048 seeded passages of 120-200 words: chunk-sized inputs like an ingest's."""
    return seeded_passages(2048, 120, 200, 1234)


@pytest.fixture(scope="session")
def passages() -> list[str]:
    """4,096 seeded passages of 120-250 words: the side-by-side speed check's input."""
    return seeded_passages(4096, 120, 250, 4096)
