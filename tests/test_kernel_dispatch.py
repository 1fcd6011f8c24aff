"""Which implementation delta_fn / linear_fn pick, and the one-warning fallback when the kernels cannot run."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

import smoa_mlx.kernels as kernels
from smoa_mlx.kernels import BlockLayout, delta_fn, dense_form_delta_fn, linear_fn
from smoa_mlx.kernels.blocks import block_fn
from smoa_mlx.kernels.merged import merged_fn

SMALL = BlockLayout((4, 4), (4, 4), (2, 2), 1.0)
LARGE = BlockLayout((4096, 4096), (7168, 7168), (8, 8), 1.0)  # 8192 x 14336 weights: above the GPU threshold


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "_kernel_ops", {})
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    # The switches that pick another merged function than the default: a user's own setting must not reach these.
    for name in (kernels.MERGE_KERNEL_ENV, kernels.MERGED_KEEP_ENV):
        monkeypatch.delenv(name, raising=False)


def test_cpu_uses_the_measured_form():
    if kernels.gpu_backend() is not None:
        pytest.skip("CPU-only check")
    assert kernels.form(SMALL) == kernels.CPU_FORM == "dense"
    assert delta_fn(SMALL) is dense_form_delta_fn(SMALL)
    # Without dropout: the merged form, its steps in plain MLX, one full matmul for the factor gradients.
    assert kernels.form(SMALL, fused=True) == "merged"
    assert linear_fn(LARGE) is merged_fn(LARGE, kernels._MLX_OPS, False)


def test_gpu_auto_picks_by_layer_size(monkeypatch):
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    assert kernels.form(SMALL) == "dense"
    assert kernels.form(LARGE) == "kernel"
    assert 1024 * 4096 < kernels.GPU_BLOCK_MIN_WEIGHTS <= 4096 * 4096  # between the measured losers and winners
    probes = []
    ops = "ops"  # stands in for the GPU kernels: nothing is launched
    monkeypatch.setattr(kernels, "_ops", lambda quantized=False, dtypes=(): probes.append(quantized) or ops)
    assert delta_fn(LARGE) is block_fn(LARGE, ops, False)
    probes.clear()
    # A small layer: the merge kernel builds W0 + Delta W, one full matmul (no gathers) gives the factor gradients.
    assert linear_fn(SMALL) is merged_fn(SMALL, ops, False)
    assert probes == [False]  # a dense base: the quantized renderings are not probed
    # A large one: the diagonal blocks' gradients through the kernels' gathers.
    assert linear_fn(LARGE) is merged_fn(LARGE, ops, True)
    monkeypatch.setenv(kernels.MERGE_KERNEL_ENV, "0")  # MLX's merge, the kernels' block gradients all the same
    assert linear_fn(LARGE) is merged_fn(LARGE, ops, True, mlx_merge=True) is not merged_fn(LARGE, ops, True)
    monkeypatch.delenv(kernels.MERGE_KERNEL_ENV)
    probes.clear()
    quantized = BlockLayout((4096, 4096), (7168, 7168), (8, 8), 1.0, 64, 4)
    assert linear_fn(quantized) is merged_fn(quantized, ops, True) and probes == [True]  # its renderings too
    # mxfp4 / nvfp4 / mxfp8: the kernels' gathers and scatters only (anchors from MLX, MLX's merge), so the affine
    # renderings are neither probed nor needed.
    for mode, group_size, bits in (("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)):
        probes.clear()
        micro = BlockLayout((4096, 4096), (7168, 7168), (8, 8), 1.0, group_size, bits, mode)
        assert micro.quantized and not micro.affine and quantized.affine
        assert linear_fn(micro) is merged_fn(micro, ops, True)
        assert delta_fn(micro) is block_fn(micro, ops, False)
        assert probes == [False, False]
    # The rule between the measured winners and losers (docs/BENCHMARKS.md), and never with one block.
    assert kernels.block_grads_pay(4096, 4096, 2) and kernels.block_grads_pay(4096, 14336, 2)
    assert not kernels.block_grads_pay(1024, 4096, 4) and not kernels.block_grads_pay(14336, 14336, 1)


def test_env_forces_a_form(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "mlx")
    assert delta_fn(SMALL) is block_fn(SMALL, kernels._MLX_OPS, False)
    assert linear_fn(SMALL) is block_fn(SMALL, kernels._MLX_OPS, True)
    monkeypatch.setenv(kernels.KERNEL_ENV, "merged")
    assert linear_fn(SMALL) is merged_fn(SMALL, kernels._MLX_OPS, False)
    assert delta_fn(SMALL) is dense_form_delta_fn(SMALL)  # the update alone cannot be merged: auto's choice
    monkeypatch.setenv(kernels.KERNEL_ENV, "dense")
    assert delta_fn(LARGE) is dense_form_delta_fn(LARGE)
    monkeypatch.setenv(kernels.KERNEL_ENV, "reference")  # retired with the one-block-at-a-time form
    with pytest.raises(ValueError, match="SMOA_MLX_KERNEL='reference'"):
        delta_fn(SMALL)


def test_failed_kernels_warn_once_and_fall_back(monkeypatch):
    # On this CPU-only machine the CUDA kernels cannot compile or launch: a real failure of the real probe.
    if kernels.gpu_backend() is not None:
        pytest.skip("needs a machine where the forced kernel backend is unavailable")
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.setenv(kernels.KERNEL_ENV, "kernel")
    with pytest.warns(RuntimeWarning, match="falling back to plain MLX"):
        fn = delta_fn(SMALL)
    assert fn is dense_form_delta_fn(SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert delta_fn(SMALL) is fn
    x = mx.ones((3, 8))
    index = tuple(mx.arange(8, dtype=mx.int32) for _ in range(4))
    out = fn(x, index, (mx.ones((8, 8)),), mx.ones((32,)))
    assert out.shape == (3, 8)


def test_failed_kernels_leave_the_merged_form_on_full_gradients(monkeypatch):
    """A large layer would take its factor gradients block by block through the kernels' gathers; where the
    kernels cannot run (as on a Mac whose Metal compiler rejected them), one full matmul, not plain-MLX takes."""
    if kernels.gpu_backend() is not None:
        pytest.skip("needs a machine where the forced kernel backend is unavailable")
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    assert kernels.merged_block_grads(LARGE)
    with pytest.warns(RuntimeWarning, match="falling back to plain MLX"):
        fn = linear_fn(LARGE)
    assert fn is merged_fn(LARGE, kernels._MLX_OPS, False)
