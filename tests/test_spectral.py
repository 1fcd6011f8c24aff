"""The Gram-eigendecomposition ordering against the reference's full SVD, and the split rules."""

import numpy as np
import pytest

from smoa_mlx.spectral import order_margin, spectral_order, spectral_scores, split_rank, split_sizes
from reference_numpy import ref_order, ref_scores


def _weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    # A decaying spectrum, as trained weights have, keeps the scores well separated.
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    q = min(shape)
    s = np.exp(-np.linspace(0, 4, q))
    return (u[:, :q] * s) @ v[:, :q].T + 0.01 * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48), (33, 17), (1, 5), (7, 1)])
def test_gram_scores_match_full_svd(shape):
    w = _weight(shape)
    rows, cols = spectral_scores(w)
    ref_rows, ref_cols = ref_scores(w)
    np.testing.assert_allclose(rows, ref_rows, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cols, ref_cols, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48), (33, 17)])
def test_order_matches_reference(shape):
    w = _weight(shape, seed=1)
    rows, cols = spectral_order(w)
    ref_rows, ref_cols = ref_order(w)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(cols, ref_cols)
    svd_rows, svd_cols = spectral_order(w, method="svd")
    np.testing.assert_array_equal(svd_rows, ref_rows)
    np.testing.assert_array_equal(svd_cols, ref_cols)


def test_order_accepts_mlx_arrays_in_low_precision():
    import mlx.core as mx

    w = _weight((40, 24), seed=2).astype(np.float32)
    rows, cols = spectral_order(mx.array(w).astype(mx.float16))
    ref_rows, ref_cols = ref_order(w.astype(np.float16).astype(np.float64))
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(cols, ref_cols)


def test_rank_deficient_weight_orders_like_reference():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))  # rank 3: 17 zero singular values
    rows, cols = spectral_scores(w)
    ref_rows, ref_cols = ref_scores(w)
    np.testing.assert_allclose(rows, ref_rows, atol=1e-8)
    np.testing.assert_allclose(cols, ref_cols, atol=1e-8)


def test_split_rules_match_tensor_split():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(11, 3) == [4, 4, 3]
    assert split_rank(5, 2) == [3, 2]
    for n in range(1, 20):
        for k in range(1, n + 1):
            assert split_sizes(n, k) == [len(p) for p in np.array_split(np.arange(n), k)]
    with pytest.raises(ValueError, match="blocks must be positive"):
        split_sizes(4, 0)


def test_order_margin_flags_ties_at_group_boundaries():
    assert order_margin(np.array([0.0, 1.0, 2.0, 3.0]), [2, 2]) == pytest.approx(1 / 3)
    assert order_margin(np.array([0.0, 1.0, 1.0, 3.0]), [2, 2]) == 0.0
    assert order_margin(np.array([0.0, 1.0, 2.0]), [3]) == np.inf


def test_bad_method_and_shape():
    with pytest.raises(ValueError, match="unknown method"):
        spectral_order(np.eye(3), method="qr")
    with pytest.raises(ValueError, match="2-D"):
        spectral_order(np.ones(3))


def _no_recompute(monkeypatch):
    import smoa_mlx.spectral as spectral

    def fail(*_):
        raise AssertionError("the orders were recomputed, not read from the cache")

    monkeypatch.setattr(spectral, "spectral_scores", fail)


def test_disk_cache_is_reused_by_the_next_run(monkeypatch, tmp_path):
    from smoa_mlx.spectral import CACHE_ENV, cached_orders

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    w = _weight((48, 80), seed=3).astype(np.float32)
    fresh = spectral_order(w)
    with cached_orders(disk=True):  # a first run fills the cache...
        spectral_order(w)
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))
    _no_recompute(monkeypatch)
    with cached_orders(disk=True):  # ...which a second one (empty memory cache) reads
        got = spectral_order(w)
    for a, b in zip(got, fresh):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="recomputed"):  # another weight is not a hit
        with cached_orders(disk=True):
            spectral_order(w + 1)


def test_damaged_cache_file_is_recomputed_and_replaced(monkeypatch, tmp_path):
    from smoa_mlx.spectral import CACHE_ENV, cached_orders

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    w = _weight((24, 40), seed=4).astype(np.float32)
    fresh = spectral_order(w)
    with cached_orders(disk=True):
        spectral_order(w)
    (file,) = tmp_path.rglob("*.npy")
    np.save(file, np.zeros(64, dtype=np.int32))  # right size, not a permutation
    with cached_orders(disk=True):
        got = spectral_order(w)
    for a, b in zip(got, fresh):
        np.testing.assert_array_equal(a, b)
    with cached_orders(disk=True), pytest.raises(ValueError, match="2-D"):
        spectral_order(np.zeros(5, dtype=np.float32))  # a cache lookup does not hide the shape error
    _no_recompute(monkeypatch)
    with cached_orders(disk=True):
        spectral_order(w)  # the file was rewritten with the right orders


def test_disk_cache_off_or_unwritable(monkeypatch, tmp_path):
    from smoa_mlx.spectral import CACHE_ENV, cached_orders

    w = _weight((16, 24), seed=5).astype(np.float32)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where a cache that is not off would land
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, "off")
    with cached_orders(disk=True):
        spectral_order(w)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # cannot be created: a warning, the orders still come
    with pytest.warns(UserWarning, match="cannot write"):
        with cached_orders(disk=True):
            rows, cols = spectral_order(w)
    np.testing.assert_array_equal(rows, ref_order(w)[0])
    assert list(tmp_path.iterdir()) == [blocker]


def test_spectral_threads(monkeypatch):
    from smoa_mlx.spectral import THREADS_ENV, spectral_threads

    monkeypatch.setenv(THREADS_ENV, "3")
    assert spectral_threads() == 3
    monkeypatch.delenv(THREADS_ENV)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (6.2, 0, 0))  # this process and ~5 others: 3 cores left
    assert spectral_threads() == 3
    monkeypatch.setattr("os.getloadavg", lambda: (40.0, 0, 0))
    assert spectral_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0, 0))
    assert spectral_threads() == 8


def test_ordering_runs_with_the_chosen_blas_threads(monkeypatch):
    import smoa_mlx.spectral as spectral
    from threadpoolctl import threadpool_info

    seen = []
    real = spectral.spectral_scores

    def spy(w):
        seen.extend(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        return real(w)

    monkeypatch.setattr(spectral, "spectral_scores", spy)
    monkeypatch.setenv(spectral.THREADS_ENV, "1")
    spectral_order(_weight((16, 24)))
    assert seen and set(seen) == {1}
