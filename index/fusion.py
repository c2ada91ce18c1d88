"""Reciprocal rank fusion of ranked id lists (Cormack et al., 2009)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def rrf_fuse(rankings: Sequence[np.ndarray], weights: Sequence[float], k: int, rrf_k: float = 60.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-query rankings: each (nq, n_i) array of ids, best first, -1 for none.

    score(id) = sum_i weights[i] / (rrf_k + rank_i(id)), rank from 1.
    Returns D (fused scores), I (ids) of size (nq, k), best first; (0, -1) pads.
    """
    if len(rankings) != len(weights):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    nq = rankings[0].shape[0]
    D = np.zeros((nq, k), np.float32)
    I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        acc: dict[int, float] = {}
        for R, w in zip(rankings, weights):
            for rank, i in enumerate(R[q], 1):
                if i >= 0:
                    acc[int(i)] = acc.get(int(i), 0.0) + w / (rrf_k + rank)
        best = sorted(acc.items(), key=lambda t: (-t[1], t[0]))[:k]
        for j, (i, s) in enumerate(best):
            I[q, j], D[q, j] = i, s
    return D, I
