"""Which implementation delta_fn picks, and the one-warning fallback when a kernel cannot compile."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

import smoa_mlx.kernels as kernels
from smoa_mlx.kernels import BlockLayout, delta_fn, reference_delta_fn

DENSE = BlockLayout((4, 4), (4, 4), (2, 2), 1.0)
Q3 = BlockLayout((4, 4), (32, 32), (2, 2), 1.0, group_size=32, bits=3)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "_runners", {})


def test_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    if kernels.gpu_backend() is None:
        assert delta_fn(DENSE) is reference_delta_fn(DENSE)
        assert kernels.kernel_backend(DENSE) is None


def test_env_forces_reference(monkeypatch):
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    monkeypatch.setenv(kernels.KERNEL_ENV, "mlx")
    assert kernels.kernel_backend(DENSE) is None
    assert delta_fn(DENSE) is reference_delta_fn(DENSE)
    monkeypatch.setenv(kernels.KERNEL_ENV, "kernel")
    assert kernels.kernel_backend(DENSE) == "metal"
    assert kernels.kernel_backend(Q3) is None  # 3-bit words straddle uint32 boundaries: reference path


def test_auto_follows_benchmark_table(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "KERNEL_DEFAULT", {"cuda": False, "metal": True})
    assert kernels.kernel_backend(DENSE) is None
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    assert kernels.kernel_backend(DENSE) == "metal"
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "KERNEL_DEFAULT", {"cuda": True, "metal": True})
    assert kernels.kernel_backend(DENSE) == "cuda"


def test_float32_routes_to_pure_mlx_on_cuda(monkeypatch):
    """CUDA's fragments take bf16/f16: float32 activations go to the pure-MLX path, with the same result."""
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.setenv(kernels.KERNEL_ENV, "kernel")
    monkeypatch.setattr(kernels, "_probe", lambda runner, layout: True)
    fn = delta_fn(DENSE)
    assert fn is not kernels.mlx_delta_fn(DENSE)  # the routing wrapper, not a fallback
    x = mx.random.normal((3, 8))
    index = tuple(mx.arange(8, dtype=mx.int32) for _ in range(4))
    args = (index, (mx.random.normal((8, 8)),), [mx.ones((2, 4))] * 2, [mx.ones((4, 2))] * 2)
    assert mx.allclose(fn(x, *args), reference_delta_fn(DENSE)(x, *args), atol=1e-5)


def test_failed_kernel_warns_once_and_falls_back(monkeypatch):
    # On this CPU-only machine the CUDA kernel cannot compile or launch: a real failure of the real probe.
    if kernels.gpu_backend() is not None:
        pytest.skip("needs a machine where the forced kernel backend is unavailable")
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.setenv(kernels.KERNEL_ENV, "kernel")
    with pytest.warns(RuntimeWarning, match="falling back to the pure-MLX path"):
        fn = delta_fn(DENSE)
    # The fallback is this backend's pure-MLX form (the dense form on CUDA), never the kernel.
    assert fn is kernels.mlx_delta_fn(DENSE) is kernels.dense_form_delta_fn(DENSE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert delta_fn(DENSE) is fn
    x = mx.ones((3, 8))
    index = tuple(mx.arange(8, dtype=mx.int32) for _ in range(4))
    out = fn(x, index, (mx.ones((8, 8)),), [mx.ones((2, 4))] * 2, [mx.ones((4, 2))] * 2)
    assert out.shape == (3, 8)
