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
import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # hints only: MLX is imported when an MLX weight comes in (_mx)
    import mlx.core as mx
    import numpy.typing as npt

__all__ = [
    "spectral_scores",
    "spectral_scores_svd",
    "spectral_order",
    "cached_orders",
    "cache_dir",
    "spectral_threads",
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


def spectral_scores(weight: Union[np.ndarray, mx.array]) -> tuple[np.ndarray, np.ndarray]:
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


def spectral_scores_svd(
    weight: Union[np.ndarray, mx.array], dtype: npt.DTypeLike = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's own computation (economy SVD), for checks. Slow on big matrices."""
    w = _as_float64(weight).astype(dtype)
    if min(w.shape) == 0:
        return np.zeros(w.shape[0]), np.zeros(w.shape[1])
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    s2 = (s * s)[None, :]
    return _scores_from_energy(u * u * s2, dtype), _scores_from_energy(vh.T * vh.T * s2, dtype)


def spectral_order(weight: Union[np.ndarray, mx.array], method: str = "gram") -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders (ascending spectral score), as int64 numpy arrays.

    ``method="gram"`` (default) uses one float64 eigendecomposition; ``method="svd"`` runs the reference's full
    SVD in float64, for checking the fast path. Inside :func:`cached_orders` a result is reused per weight content.
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"spectral_order: unknown method {method!r} (use 'gram' or 'svd')")
    w = _to_numpy(weight)
    key = _cache_key(w, method) if _order_cache is not None else None
    if key is not None:
        hit = _order_cache.get(key)
        if hit is None and _disk_dir is not None:
            hit = _read_cached(_disk_dir / _file_name(key), w.shape)
            if hit is not None:
                _order_cache[key] = hit
        if hit is not None:
            return hit[0].copy(), hit[1].copy()
    with _blas_threads():
        rows, cols = spectral_scores(w) if method == "gram" else spectral_scores_svd(w)
    # A stable sort keeps ties in index order, which is what torch.argsort gives for exact ties on CPU.
    rows, cols = np.argsort(rows, kind="stable"), np.argsort(cols, kind="stable")
    if key is not None:
        _order_cache[key] = (rows.copy(), cols.copy())
        if _disk_dir is not None:
            _write_cached(_disk_dir / _file_name(key), rows, cols)
    return rows, cols


# -- caching the orders -------------------------------------------------------------------------------------
CACHE_ENV = "SMOA_MLX_CACHE"  # the folder of smoa-mlx's caches; "off" turns the on-disk order cache off
_ORDERS_FOLDER = "spectral-orders-v1"  # a new version whenever a change to this module changes the orders

_order_cache: Optional[dict] = None
_disk_dir: Optional[Path] = None
_warned_write = False


def _cache_key(w: np.ndarray, method: str) -> tuple:
    w = np.ascontiguousarray(w)
    return method, w.dtype.str, w.shape, hashlib.blake2b(w.view(np.uint8).reshape(-1), digest_size=16).digest()


def _file_name(key: tuple) -> str:
    method, dtype, shape, digest = key
    return f"{method}-{'x'.join(map(str, shape))}-{dtype.lstrip('<>|=')}-{digest.hex()}.npy"


def cache_dir() -> Optional[Path]:
    """smoa-mlx's cache folder: ``$SMOA_MLX_CACHE``, else the user's cache folder (``~/Library/Caches/smoa-mlx``
    on macOS, ``$XDG_CACHE_HOME/smoa-mlx`` or ``~/.cache/smoa-mlx`` elsewhere); None when set to ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "no", "none") else Path(value).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "smoa-mlx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoa-mlx"


def _read_cached(file: Path, shape: tuple) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The orders stored in ``file``, or None when absent or not two permutations of the right sizes (a damaged
    file is recomputed and rewritten, never trusted)."""
    if len(shape) != 2:
        return None  # not a weight matrix: the computation says so
    try:
        both = np.load(file, allow_pickle=False)
    except (OSError, ValueError):
        return None
    d_out, d_in = shape
    if both.shape != (d_out + d_in,) or both.dtype.kind not in "iu":
        return None
    rows, cols = both[:d_out].astype(np.int64), both[d_out:].astype(np.int64)
    if not (np.array_equal(np.sort(rows), np.arange(d_out)) and np.array_equal(np.sort(cols), np.arange(d_in))):
        return None
    return rows, cols


def _write_cached(file: Path, rows: np.ndarray, cols: np.ndarray) -> None:
    """Atomic (a reader sees the whole file or none); a cache that cannot be written costs speed, not the run."""
    global _warned_write
    from .atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, np.concatenate([rows, cols]).astype(np.int32))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, buffer.getvalue())
    except OSError as e:
        if not _warned_write:
            warnings.warn(f"spectral order cache: cannot write {file} ({e}); set {CACHE_ENV}=off or a writable "
                          "folder", stacklevel=3)
            _warned_write = True


@contextlib.contextmanager
def cached_orders(disk: bool = False) -> Iterator[None]:
    """Within the block, :func:`spectral_order` remembers its result per weight content (a hash of the values).

    The orders are a function of W0 alone, and computing them is most of an SMoA run's setup time on a small
    model. In memory for comparison grids that apply SMoA to the same base run after run; with ``disk`` also in
    :func:`cache_dir` (one small file per weight, named by the hash of its bytes), so that the next run of
    ``python -m smoa_mlx.train`` skips the step. Off by default, so timings of the spectral step itself
    (scripts/bench_spectral.py) stay honest. Nesting keeps the outer cache.
    """
    global _order_cache, _disk_dir
    outer = _order_cache, _disk_dir
    _order_cache = {} if outer[0] is None else outer[0]
    if disk and _disk_dir is None:
        folder = cache_dir()
        _disk_dir = None if folder is None else folder / _ORDERS_FOLDER
    try:
        yield
    finally:
        _order_cache, _disk_dir = outer


# -- threads ------------------------------------------------------------------------------------------------
THREADS_ENV = "SMOA_MLX_SPECTRAL_THREADS"
_controller = None


def spectral_threads() -> int:
    """BLAS threads for one ordering: the cores that no other process is using, at least one.

    OpenBLAS threads spin while they wait for each other; on cores that other processes hold, two threads ran the
    150 orderings of SmolLM2-135M 4-5x slower than one (docs/training_demo.md). Taken from the 1-minute load
    average less this process; ``$SMOA_MLX_SPECTRAL_THREADS`` overrides, and BLAS's own setting
    (``OPENBLAS_NUM_THREADS``) is never exceeded.
    """
    given = os.environ.get(THREADS_ENV)
    if given:
        try:
            return max(1, int(given))
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={given!r}: expected a number of threads") from None
    cpus = os.cpu_count() or 1
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:  # no load average (Windows)
        return cpus
    return max(1, min(cpus, cpus - int(round(others))))


@contextlib.contextmanager
def _blas_threads() -> Iterator[None]:
    global _controller
    from threadpoolctl import ThreadpoolController

    if _controller is None:
        _controller = ThreadpoolController()
    blas = _controller.select(user_api="blas")
    current = [lib["num_threads"] for lib in blas.info()]
    with blas.limit(limits=min([spectral_threads(), *current])):
        yield


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
