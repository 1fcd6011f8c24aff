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
