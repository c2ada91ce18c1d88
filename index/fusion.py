"""Fusing a dense and a keyword ranking: reciprocal rank fusion, or a convex combination of scores.

RRF (Cormack et al., 2009) uses ranks only. The convex combination (Bruch,
Gai and Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", TOIS
2023) normalises each side's scores over its candidates and mixes them with
one weight ``alpha`` (the dense side's): alpha * dense + (1 - alpha) * keyword.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Fusion = Literal["rrf", "convex"]
Normalization = Literal["minmax", "zscore", "tmm"]
# theoretical minimum of each side's raw score, for "tmm": cosine similarity and BM25
DENSE_MIN, KEYWORD_MIN = -1.0, 0.0


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


def normalize(s: np.ndarray, how: Normalization, theoretical_min: float) -> np.ndarray:
    """One query's candidate scores (n,) -> normalised (n,).

    minmax: (s - min) / (max - min), in [0, 1]; zscore: (s - mean) / std;
    tmm: (s - theoretical_min) / (max - theoretical_min), in [0, 1].
    A single candidate, or equal scores, normalise to 1 (minmax, tmm) or 0 (zscore).
    """
    if len(s) == 0:
        return s.astype(np.float64)
    s = s.astype(np.float64)
    if how == "minmax":
        lo, hi = s.min(), s.max()
        return np.ones_like(s) if hi - lo < 1e-12 else (s - lo) / (hi - lo)
    if how == "zscore":
        sd = s.std()
        return np.zeros_like(s) if sd < 1e-12 else (s - s.mean()) / sd
    if how == "tmm":
        hi = s.max()
        return np.ones_like(s) if hi - theoretical_min < 1e-12 else (s - theoretical_min) / (hi - theoretical_min)
    raise ValueError(f"normalization must be minmax, zscore or tmm, got {how!r}")


def convex_fuse(dense: tuple[np.ndarray, np.ndarray], keyword: tuple[np.ndarray, np.ndarray], k: int,
                alpha: float, how: Normalization = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """alpha * norm(dense) + (1 - alpha) * norm(keyword) over the union of both sides' candidates.

    ``dense`` and ``keyword`` are (D, I) of size (nq, n_side), best first, -1
    for none. A candidate one side did not return gets that side's lowest
    normalised score (it ranked below that side's cut-off). Returns D, I of
    size (nq, k), best first; (0, -1) pads. With minmax or tmm, D is in [0, 1].
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    (Dd, Id), (Dk, Ik) = dense, keyword
    nq = Id.shape[0]
    D = np.zeros((nq, k), np.float32)
    I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        sides = []
        for Ds, Is, w, tmin in ((Dd, Id, alpha, DENSE_MIN), (Dk, Ik, 1 - alpha, KEYWORD_MIN)):
            ok = Is[q] >= 0
            ids, norm = Is[q][ok], normalize(Ds[q][ok], how, tmin)
            sides.append((dict(zip(ids.tolist(), norm.tolist())), float(norm.min()) if len(norm) else 0.0, w))
        union = set(sides[0][0]) | set(sides[1][0])
        acc = {i: sum(w * got.get(i, floor) for got, floor, w in sides) for i in union}
        best = sorted(acc.items(), key=lambda t: (-t[1], t[0]))[:k]
        for j, (i, s) in enumerate(best):
            I[q, j], D[q, j] = i, s
    return D, I


def fuse(dense: tuple[np.ndarray, np.ndarray], keyword: tuple[np.ndarray, np.ndarray], k: int, q) -> tuple[
        np.ndarray, np.ndarray]:
    """The configured fusion (``q``: QueryConfig or anything with its fusion fields)."""
    if q.fusion == "rrf":
        return rrf_fuse([dense[1], keyword[1]], [q.dense_weight, q.keyword_weight], k, q.rrf_k)
    return convex_fuse(dense, keyword, k, q.alpha, q.normalization)
