"""Dispatch for the SMoA block-modulated product.

Three forms of one contract, ``fn(x, index, weight_parts, factors)`` (``factors``: the layer's A_k and B_k in one
flat vector, :func:`~.plan.pack_factors`):

- the merged form (:mod:`.merged`): x (W0 + Delta W)^T, the update merged into a transient copy of the weight (on
  a GPU by the merge kernel in one pass over W0; elsewhere an MLX matmul for the rank-r product and one fused
  elementwise pass), so the forward and dx are one matmul each;
  its factor gradients come from one full matmul or, with ``block_grads``, from the K diagonal blocks only. It
  needs the update to see the base's own input, so it serves :func:`linear_fn` (no dropout), the training default;
- the block-major form (:mod:`.blocks`): the base apart, the update in batched MLX matmuls at 2 + 3/K
  layer-matmuls, its gathers, scatters and anchor reads done by the kernels of :mod:`.source` on a GPU (Metal or
  CUDA); with those steps in plain MLX takes it is the pure-MLX reference the kernels are checked against
  (``SMOA_MLX_KERNEL=mlx``, any device);
- the dense HiRA form (:func:`dense_form_delta_fn`: the update as a second product through a transient
  d_out x d_in Delta W).

:func:`delta_fn` returns the update alone (layers with dropout on the update path: the block or the dense form);
:func:`linear_fn` returns x W0^T plus the update. ``SMOA_MLX_KERNEL`` picks: ``auto`` (default: the merged form for
:func:`linear_fn` everywhere, with the block gradients on GPU layers where :func:`block_grads_pay` says; for
:func:`delta_fn` the block form on GPU layers of at least :data:`GPU_BLOCK_MIN_WEIGHTS` weights and the dense form
below and on the CPU; every choice measured by scripts/bench_kernels.py), ``merged``, ``kernel`` (the block form
with the GPU kernels), ``mlx`` (the block form with its steps in plain MLX: any device, for checks), ``dense``. The
merged form uses the merge kernel on a GPU (and there the gathers and Hadamard kernel for its block gradients), plain MLX
elsewhere. Kernels that fail to compile or run on a first small probe, or disagree there with plain MLX, are reported
once with a warning, and plain MLX is used from then on.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional, Sequence

import mlx.core as mx

from .blocks import FLOAT_TYPES, KernelOps, MlxOps, base_forward, block_fn, reads_base
from .gpu import GpuRunner, gpu_backend
from .dense import dense_delta, dense_form_delta_fn, full_factors, gather_anchor, gather_rows
from .merged import fused_weight, merged_fn
from .plan import BlockLayout, BlockPlan, LayerFn, build_plan, factor_sizes, factor_views, pack_factors

__all__ = [
    "BlockLayout",
    "BlockPlan",
    "CPU_FORM",
    "GPU_BLOCK_MIN_WEIGHTS",
    "GPU_TOLERANCE",
    "KERNEL_ENV",
    "MERGED_KEEP_ENV",
    "MERGE_KERNEL_ENV",
    "MERGED_BLOCK_GRADS_MIN_SAVING",
    "block_grads_pay",
    "build_plan",
    "delta_fn",
    "dense_delta",
    "dense_form_delta_fn",
    "factor_sizes",
    "factor_views",
    "form",
    "fused_weight",
    "gather_anchor",
    "gather_rows",
    "linear_fn",
    "merged_block_grads",
    "merged_fn",
    "pack_factors",
]

KERNEL_ENV = "SMOA_MLX_KERNEL"
# "1": the merged form's backward reuses the forward's W0 + Delta W (merged_fn's ``keep``): fewer kernels per step,
# one more weight copy per adapted layer at peak. Off by default: a laptop's memory is the scarcer resource.
MERGED_KEEP_ENV = "SMOA_MLX_MERGED_KEEP"
# "0": the merged form builds W0 + Delta W with MLX's matmul + fused pass on a GPU too, instead of the merge kernel
# (measured side by side by scripts/bench_kernels.py and bench_train.py's smoa-mlx-merge; docs/BENCHMARKS.md).
MERGE_KERNEL_ENV = "SMOA_MLX_MERGE_KERNEL"
FORMS = ("auto", "merged", "kernel", "mlx", "dense")

# The form ``auto`` uses for the update alone (dropout) where MLX has no GPU: the dense HiRA form, whose full
# matmuls go through BLAS, beat the block form, whose takes MLX's CPU back-end runs slowly
# (``scripts/bench_kernels.py --cpu``, docs/BENCHMARKS.md). Without dropout the merged form beats both there.
CPU_FORM = "dense"

# On a GPU, ``auto`` runs the update alone (dropout) in the block form for layers with at least this many weights
# and in the dense form below it. Measured per layer on an H200 (docs/BENCHMARKS.md, "Dropout layers"): at 16M
# weights (4096x4096, 8192x2048, 2048x8192) and above the block form took 0.69-0.95x the dense form's time in every
# run since 57436d2; at 4M (2048x2048, 1024x4096) 0.87-1.22x, and 1.15-1.24x at 1M.
GPU_BLOCK_MIN_WEIGHTS = 16 * 2**20

_MLX_OPS = MlxOps()
_kernel_ops: dict[str, KernelOps] = {}
_probed: dict[tuple[str, bool, mx.Dtype], bool] = {}  # (backend, quantized, float type): whether they ran and agreed


# The merged form takes its factor gradients from the K diagonal blocks (two gathers of the activations, 1/K of a
# matmul) instead of one full matmul where that saves enough: the matmul work it saves per token, d_out d_in (1 - 1/K),
# against the elements it gathers per token, d_out + d_in, must reach this ratio. Measured per layer on an H200
# (docs/BENCHMARKS.md); on the CPU MLX's takes make the gathers cost more than the matmul they save.
MERGED_BLOCK_GRADS_MIN_SAVING = 800.0


def form(layout: Optional[BlockLayout] = None, fused: bool = False) -> str:
    """The form the environment asks for (for ``layout``): "merged", "kernel", "mlx" or "dense".

    ``fused``: for the whole layer (:func:`linear_fn`), where the merged form applies; the update alone cannot be
    merged into the weight, so there ``merged`` means what ``auto`` picks.
    """
    choice = os.environ.get(KERNEL_ENV, "auto").lower()
    if choice not in FORMS:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected one of {', '.join(FORMS)}")
    if choice in ("auto", "merged"):
        if fused:
            return "merged"
        choice = "auto"
    if choice != "auto":
        return choice
    if gpu_backend() is None:
        return CPU_FORM
    if layout is not None and sum(layout.row_sizes) * sum(layout.col_sizes) < GPU_BLOCK_MIN_WEIGHTS:
        return "dense"
    return "kernel"


def block_grads_pay(d_out: int, d_in: int, blocks: int) -> bool:
    """Whether the diagonal blocks' gradients save more matmul work than their gathers cost on a GPU (see
    MERGED_BLOCK_GRADS_MIN_SAVING); never for K = 1, where the one block is the whole matrix."""
    return d_out * d_in * (1 - 1 / blocks) / (d_out + d_in) >= MERGED_BLOCK_GRADS_MIN_SAVING


def merged_block_grads(layout: BlockLayout) -> bool:
    """Whether the merged form takes its factor gradients block by block on this device, for this layer."""
    d_out, d_in = sum(layout.row_sizes), sum(layout.col_sizes)
    return gpu_backend() is not None and block_grads_pay(d_out, d_in, len(layout.ranks))


# The probe's layouts: ragged groups, for the kernels every layer uses; a 4-bit affine base, for the anchored kernels'
# quantized renderings, probed only once an affine-quantized layer needs them. Widths of 16 and 24 take the 16-byte
# vector paths of the merge kernel and the scatters in every float type, as a model's layers do.
_PROBE_LAYOUTS = {
    False: BlockLayout((9, 7), (13, 11), (2, 1), 1.5),
    True: BlockLayout((3, 2), (64, 64), (1, 1), 1.0, 32, 4),
}


def _probe(ops: KernelOps, quantized: bool = False, dtypes: Sequence[mx.Dtype] = FLOAT_TYPES) -> bool:
    """Compile and run the kernels once on tiny inputs, in each of ``dtypes`` not probed yet, against plain MLX; False
    on any failure or disagreement.

    Why per float type: each type is its own set of instantiations, compiled on first use; a layer asks for the type
    it computes in (:func:`linear_fn`), so a bf16 model compiles a third of what probing every type did (on an H200
    the probe took 30 s for a bf16 model and 59-85 s for a 4-bit one with all three, bench_train_e19b9e1.json).

    Why so narrow: on CUDA every new instantiation is compiled on first use, and each of MLX's quantized matmuls
    took 19-28 s there (docs/BENCHMARKS.md). The quantized layout runs the update alone, so it compiles our
    kernels' quantized renderings and none of MLX's quantized matmuls (whose group size would not be the model's
    anyway), and it runs only for models with affine-quantized layers. The dense layout runs the whole layer (the
    scatter that adds the base's output) and the quantized one the update alone (the plain scatter), each then the
    merge kernel: between them, every kernel."""
    todo = [dtype for dtype in dtypes if (ops.name, quantized, dtype) not in _probed]
    if not todo:
        return all(_probed[(ops.name, quantized, dtype)] for dtype in dtypes)
    layout = _PROBE_LAYOUTS[quantized]
    try:
        d_out, d_in = sum(layout.row_sizes), sum(layout.col_sizes)
        w = mx.random.normal((d_out, d_in), key=mx.random.key(0))
        parts = tuple(mx.quantize(w, group_size=layout.group_size, bits=layout.bits)) if quantized else (w,)
        plan = build_plan(layout, range(d_out), range(d_in))
        index = (mx.arange(d_out), mx.arange(d_in), mx.arange(d_out), mx.arange(d_in), tuple(plan))
        factors = mx.random.normal((sum(factor_sizes(layout)),), key=mx.random.key(1))
        for dtype in todo:
            p = tuple(q if q.dtype == mx.uint32 else q.astype(dtype) for q in parts)
            b_full, a_full = full_factors(layout, index, factors, dtype)
            x, cot = mx.ones((3, d_in), dtype=dtype), mx.ones((3, d_out), dtype)
            runs = []
            for one in (ops, _MLX_OPS):  # the kernels, then plain MLX
                fn = block_fn(layout, one, not quantized)  # the merged form's block gradients launch a subset
                y, grads = mx.vjp(lambda x, f: fn(x, index, p, f), [x, factors], [cot])
                runs.append([*y, *grads, one.merge(layout, plan, p, b_full, a_full, dtype)])  # + the merged form's W
            _check_probe(runs[0], runs[1], dtype)
    except Exception as err:  # noqa: BLE001 - any compile or launch error means: use plain MLX
        if "transformation" in str(err) or ("compile" in str(err) and "tracing" in str(err)):
            return True  # called inside mx.compile: cannot probe now, try the kernels and probe next time
        warnings.warn(
            f"smoa_mlx: the {ops.name} SMoA kernels{' for quantized bases' if quantized else ''} failed "
            f"({type(err).__name__}: {str(err)[:300]}); falling back to plain MLX, the dense form "
            f"(set {KERNEL_ENV}=dense to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        _probed.update({(ops.name, quantized, dtype): False for dtype in todo})
        return False
    _probed.update({(ops.name, quantized, dtype): True for dtype in todo})
    return all(_probed[(ops.name, quantized, dtype)] for dtype in dtypes)


# The relative error a GPU path may show per float type: the probe's against plain MLX, and bench_kernels'
# verification's against float64. float32 that loose because MLX's float32 matmuls on CUDA round like TF32 (an
# H200 put plain MLX 2.1e-4 from the kernels' path in the probe; 1e-4 sent every CUDA model to the dense form).
GPU_TOLERANCE = {mx.float32: 1e-3, mx.float16: 1e-2, mx.bfloat16: 3e-2}


def _check_probe(got: list[mx.array], want: list[mx.array], dtype: mx.Dtype) -> None:
    """Raise unless every probe output of the kernels is finite and within the type's tolerance of plain MLX's (relative
    norm): a kernel that compiles and runs but computes wrong values (a compiler's miscompilation, a driver's fault)
    must not train a model on a user's machine."""
    for g, w in zip(got, want):
        g, w = g.astype(mx.float32), w.astype(mx.float32)
        rel = mx.linalg.norm(g - w) / mx.maximum(mx.linalg.norm(w), 1e-30)
        if not (rel <= GPU_TOLERANCE[dtype]).item():  # NaN fails too
            raise RuntimeError(f"kernel output differs from plain MLX by {rel.item():.2e} in {dtype}")


def _ops(quantized: bool = False, dtypes: Sequence[mx.Dtype] = FLOAT_TYPES):
    """The GPU kernels if they work on this machine (``quantized``: their renderings for a quantized base too, which
    only layers whose base they read need: :func:`.blocks.reads_base`), else None. Other quantized bases (3/5/6-bit
    affine, mxfp4, nvfp4, mxfp8) use only the gathers and scatters, as dense ones do: their anchors come from MLX's
    own dequantization, never from the kernels (KernelOps._anchored)."""
    backend = gpu_backend()
    if backend is None:
        return None
    ops = _kernel_ops.setdefault(backend, KernelOps(GpuRunner(backend)))
    return ops if _probe(ops, False, dtypes) and (not quantized or _probe(ops, True, dtypes)) else None


def _dtypes(dtype: Optional[mx.Dtype]) -> Sequence[mx.Dtype]:
    return FLOAT_TYPES if dtype is None else (dtype,)


def _block_ops(layout: BlockLayout, dtype: Optional[mx.Dtype]):
    """The block form's steps for ``layout`` (GPU kernels or plain MLX), or None for the dense form."""
    chosen = form(layout)
    if chosen == "mlx":
        return _MLX_OPS
    return _ops(reads_base(layout), _dtypes(dtype)) if chosen == "kernel" else None


def delta_fn(layout: BlockLayout, dtype: Optional[mx.Dtype] = None) -> LayerFn:
    """The update alone (for layers with dropout on the update path). ``dtype``: the float type the layer computes
    in, the only one the GPU kernels need to have been probed in (None: every type)."""
    ops = _block_ops(layout, dtype)
    return dense_form_delta_fn(layout) if ops is None else block_fn(layout, ops, False)


def linear_fn(layout: BlockLayout, dtype: Optional[mx.Dtype] = None) -> LayerFn:
    """x W0^T plus the update (no bias): the whole adapted layer in one call (``dtype`` as for :func:`delta_fn`)."""
    if form(layout, fused=True) == "merged":
        # On a GPU the merge kernel builds W0 + Delta W for every layer, and the block gradients (where they pay)
        # use the gather and Hadamard kernels. Where the kernels fail: MLX's merge and full gradients, not block
        # gradients through plain-MLX takes, which lose to the matmul they would save (on the CPU 59 against
        # 35-38 ms per layer step; on an H200 a take of an 8192 x 4096 activation's columns was 3x a simple kernel,
        # 6x the shipped gathers; docs/BENCHMARKS.md).
        ops = _ops(reads_base(layout), _dtypes(dtype)) if gpu_backend() is not None else None
        block_grads = ops is not None and merged_block_grads(layout)
        return merged_fn(layout, ops or _MLX_OPS, block_grads, os.environ.get(MERGED_KEEP_ENV, "0") == "1",
                         os.environ.get(MERGE_KERNEL_ENV, "1") == "0")
    ops = _block_ops(layout, dtype)
    return _dense_linear(layout) if ops is None else block_fn(layout, ops, True)


@lru_cache(maxsize=None)
def _dense_linear(layout: BlockLayout):
    delta = dense_form_delta_fn(layout)

    def fn(x, index, weight_parts, factors):
        y = base_forward(layout, mx.reshape(x, (-1, x.shape[-1])), weight_parts)
        y = mx.reshape(y, (*x.shape[:-1], y.shape[-1]))
        return y + delta(x, index, weight_parts, factors).astype(y.dtype)

    return fn
