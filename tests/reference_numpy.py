"""An independent float64 numpy rendering of the reference SMoA semantics (misonsky/SMoA cpeft/tuners/smoa.py).

Written from the spec, not from smoa_mlx, so the tests compare two implementations: full economy SVD,
per-coordinate mean singular index, argsort, tensor_split groups, per-block Hadamard update scattered into a
dense Delta W.
"""

from __future__ import annotations

import numpy as np


def ref_scores(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, dtype=np.float64)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    ids = np.arange(s.shape[0], dtype=np.float64)

    def score(vectors):
        energy = vectors**2 * (s**2)[None, :]
        denom = np.maximum(energy.sum(axis=1), np.finfo(np.float64).eps)
        return (energy * ids[None, :]).sum(axis=1) / denom

    return score(u), score(vh.T)


def ref_order(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = ref_scores(w)
    return np.argsort(rows, kind="stable"), np.argsort(cols, kind="stable")


def ref_groups(order: np.ndarray, k: int) -> list[np.ndarray]:
    # np.array_split has torch.tensor_split's sizes: the first len % k pieces are one longer.
    return np.array_split(order, k)


def ref_ranks(r: int, k: int, branch_ranks=None) -> list[int]:
    if branch_ranks is not None:
        return list(branch_ranks)
    return [r // k + (1 if i < r % k else 0) for i in range(k)]


def ref_delta(w: np.ndarray, a_list, b_list, k: int, scale: float, orders=None) -> np.ndarray:
    """Dense Delta W with blocks s (B_k A_k) * W[R_k, C_k]; ``orders`` defaults to the reference ordering."""
    w = np.asarray(w, dtype=np.float64)
    row_order, col_order = orders if orders is not None else ref_order(w)
    delta = np.zeros_like(w)
    for rows, cols, a, b in zip(ref_groups(row_order, k), ref_groups(col_order, k), a_list, b_list):
        if a.shape[0] == 0:
            continue
        anchor = w[np.ix_(rows, cols)]
        delta[np.ix_(rows, cols)] = (np.asarray(b, np.float64) @ np.asarray(a, np.float64)) * anchor
    return scale * delta


def ref_dequantize(wq, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """Affine dequantization of MLX's packed layout (uint32 words, low bits first)."""
    wq = np.asarray(wq).astype(np.uint64)
    per_word = 32 // bits
    mask = (1 << bits) - 1
    q = np.stack([(wq >> (bits * i)) & mask for i in range(per_word)], axis=-1).reshape(wq.shape[0], -1)
    s = np.repeat(np.asarray(scales, np.float64), group_size, axis=1)
    z = np.repeat(np.asarray(biases, np.float64), group_size, axis=1)
    return q.astype(np.float64) * s + z


def ref_layer(w: np.ndarray, x: np.ndarray, cot: np.ndarray, a_list, b_list, k: int, scale: float, orders,
              with_base: bool = True):
    """float64 forward and gradients of y = x (W0 + Delta W)^T (``with_base=False``: x Delta W^T alone) for the
    cotangent ``cot``: [y, dx, dA_0..dA_K-1, dB_0..dB_K-1]. dL/d(B_k A_k) = s (cot^T x)[R_k, C_k] * W0[R_k, C_k]."""
    w = np.asarray(w, dtype=np.float64)
    x2 = np.asarray(x, np.float64).reshape(-1, w.shape[1])
    g2 = np.asarray(cot, np.float64).reshape(-1, w.shape[0])
    full = ref_delta(w, a_list, b_list, k, scale, orders) + (w if with_base else 0.0)
    gram = g2.T @ x2
    da, db = [], []
    for rows, cols, a, b in zip(ref_groups(orders[0], k), ref_groups(orders[1], k), a_list, b_list):
        h = scale * gram[np.ix_(rows, cols)] * w[np.ix_(rows, cols)]
        da.append(np.asarray(b, np.float64).T @ h)
        db.append(h @ np.asarray(a, np.float64).T)
    return [x2 @ full.T, g2 @ full, *da, *db]
