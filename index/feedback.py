"""Pseudo-relevance feedback on the query vector (Rocchio): look twice.

The first answer's top m hits are taken as relevant; the query moves toward their mean,
q' = normalise(q + beta * mean(x_1..x_m)), and the vectors are searched again with q' (no second
forward pass). Which queries look twice is a rule (``when``): every one, or only those whose two
sides agree on at least one of their top hits (the first answer is then more likely on topic).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

When = Literal["always", "agree"]


def top_ids(I: np.ndarray, m: int) -> list[np.ndarray]:
    """The first ``m`` valid ids of each row of I (nq, n), best first."""
    return [row[row >= 0][:m] for row in np.asarray(I)]


def looks_twice(when: When, dense_I: np.ndarray | None, keyword_I: np.ndarray | None, m: int) -> np.ndarray:
    """(nq,) bool: which queries get feedback. ``agree``: the dense and keyword top-m share an id (with one
    side missing, every query does)."""
    if when == "always" or dense_I is None or keyword_I is None:
        n = len(dense_I if dense_I is not None else keyword_I)
        return np.ones(n, bool)
    return np.array([bool(np.intersect1d(a, b).size) for a, b in zip(top_ids(dense_I, m), top_ids(keyword_I, m))])


def rocchio(xq: np.ndarray, feedback: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """q' = normalise(q + beta * mean(feedback vectors)) per row of xq (nq, d); a row with no feedback
    vectors keeps q."""
    out = np.array(xq, dtype=np.float32, copy=True)
    for i, X in enumerate(feedback):
        if len(X):
            out[i] += beta * np.asarray(X, dtype=np.float32).mean(axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
