"""Spectral ordering of a weight's rows and columns, and the aligned block split.

The reference (misonsky/SMoA, ``cpeft/tuners/smoa.py``) scores every row i by the mean singular index of its
energy, ``a_i = sum_l l U[i,l]^2 s_l^2 / sum_l U[i,l]^2 s_l^2``, columns likewise with V, and sorts both
ascending. It gets U, s, V from a full float32 SVD. Here the same scores come from one symmetric
eigendecomposition of the smaller Gram matrix in float64: with G = W W^T = U diag(s^2) U^T (d_out <= d_in),
the row energies are (U s)^2 and the column energies are (W^T U)^2 = (V s)^2, so no division by s and no
second factorisation is needed. That is several times cheaper than an SVD, and more accurate.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "spectral_scores",
    "spectral_scores_svd",
    "spectral_order",
    "cached_orders",
    "split_sizes",
    "split_rank",
    "order_margin",
]


def _to_numpy(weight) -> np.ndarray:
    """A numpy view of an MLX or numpy weight (MLX's low-precision types go through float32)."""
    return np.asarray(weight.astype(_mx().float32) if _is_mx(weight) else weight)


def _as_float64(weight) -> np.ndarray:
    w = _to_numpy(weight).astype(np.float64, copy=False)
    if w.ndim != 2:
        raise ValueError(f"spectral ordering needs a 2-D weight, got shape {tuple(w.shape)}")
    return w


def _is_mx(x) -> bool:
    return type(x).__module__.startswith("mlx")


def _mx():
    import mlx.core as mx

    return mx


def _scores_from_energy(energy: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Mean spectral index of each row of ``energy`` (rows: coordinates, columns: singular index)."""
    ids = np.arange(energy.shape[1], dtype=dtype)
    denom = np.maximum(energy.sum(axis=1), np.finfo(dtype).eps)
    return (energy @ ids) / denom


def spectral_scores(weight) -> tuple[np.ndarray, np.ndarray]:
    """Row and column scores of ``weight`` (d_out x d_in) through the Gram eigendecomposition, float64."""
    w = _as_float64(weight)
    d_out, d_in = w.shape
    if min(d_out, d_in) == 0:
        return np.zeros(d_out), np.zeros(d_in)
    transposed = d_out > d_in
    if transposed:
        w = w.T
    # w is (m x n) with m <= n: G = w w^T is the small Gram matrix.
    lam, u = np.linalg.eigh(w @ w.T)
    # eigh returns ascending eigenvalues; the reference indexes singular values largest first.
    lam, u = lam[::-1], u[:, ::-1]
    s2 = np.clip(lam, 0.0, None)
    near_energy = u * u * s2[None, :]  # (U s)^2 for the small side
    far = w.T @ u  # V s for the large side
    far_energy = far * far
    small_scores = _scores_from_energy(near_energy)
    large_scores = _scores_from_energy(far_energy)
    if transposed:
        return large_scores, small_scores
    return small_scores, large_scores


def spectral_scores_svd(weight, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """The reference's own computation (economy SVD), for checks. Slow on big matrices."""
    w = _as_float64(weight).astype(dtype)
    if min(w.shape) == 0:
        return np.zeros(w.shape[0]), np.zeros(w.shape[1])
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    s2 = (s * s)[None, :]
    return _scores_from_energy(u * u * s2, dtype), _scores_from_energy(vh.T * vh.T * s2, dtype)


def spectral_order(weight, method: str = "gram") -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders (ascending spectral score), as int64 numpy arrays.

    ``method="gram"`` (default) uses one float64 eigendecomposition; ``method="svd"`` runs the reference's full
    SVD in float64, for checking the fast path.
    """
    key = _cache_key(weight, method) if _order_cache is not None else None
    if key is not None and key in _order_cache:
        rows, cols = _order_cache[key]
        return rows.copy(), cols.copy()
    if method == "gram":
        rows, cols = spectral_scores(weight)
    elif method == "svd":
        rows, cols = spectral_scores_svd(weight)
    else:
        raise ValueError(f"spectral_order: unknown method {method!r} (use 'gram' or 'svd')")
    # A stable sort keeps ties in index order, which is what torch.argsort gives for exact ties on CPU.
    rows, cols = np.argsort(rows, kind="stable"), np.argsort(cols, kind="stable")
    if key is not None:
        _order_cache[key] = (rows.copy(), cols.copy())
    return rows, cols


_order_cache: Optional[dict] = None


def _cache_key(weight, method: str) -> tuple:
    w = np.ascontiguousarray(_to_numpy(weight))
    return method, w.dtype.str, w.shape, hashlib.blake2b(w.view(np.uint8).reshape(-1), digest_size=16).digest()


@contextlib.contextmanager
def cached_orders() -> Iterator[None]:
    """Within the block, :func:`spectral_order` remembers its result per weight content (a hash of the values).

    For comparison grids that apply SMoA to the same base model run after run: the orders are a function of W0
    alone, and recomputing them is most of an SMoA run's setup time on a small model. Off by default, so
    timings of the spectral step itself (scripts/bench_spectral.py) stay honest. Nesting keeps the outer cache.
    """
    global _order_cache
    outer = _order_cache
    _order_cache = {} if outer is None else outer
    try:
        yield
    finally:
        _order_cache = outer


def order_margin(scores: np.ndarray, sizes: Sequence[int]) -> float:
    """Smallest relative score gap across a group boundary.

    The grouping only depends on which coordinates fall on each side of a boundary, so a tiny gap there means a
    float32 recomputation (as the reference does) could put a coordinate in the neighbouring group.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    scale = max(float(np.abs(s).max()) if s.size else 0.0, 1e-30)
    margin = np.inf
    edge = 0
    for size in list(sizes)[:-1]:
        edge += size
        if 0 < edge < s.size:
            margin = min(margin, float(s[edge] - s[edge - 1]) / scale)
    return float(margin)


def split_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split sizes: the first ``total % parts`` parts take one extra element."""
    if parts <= 0:
        raise ValueError(f"number of blocks must be positive, got {parts}")
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def split_rank(rank: int, blocks: int) -> list[int]:
    """The reference's default per-block ranks: ``rank // blocks``, the first ``rank % blocks`` get one more."""
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    return split_sizes(rank, blocks)
