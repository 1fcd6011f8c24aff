"""SMoALinear: a frozen linear (dense or quantized) plus the spectrally aligned block-sparse Hadamard update."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import resolve_ranks
from .kernels import BlockLayout, build_plan, delta_fn, dense_delta, factor_views, fused_weight, linear_fn, pack_factors
from .kernels.dense import dequantize
from .kernels.plan import LayerIndex, Order
from .spectral import spectral_order, split_sizes

BaseLinear = Union[nn.Linear, nn.QuantizedLinear]
_CACHE_WARNED = False  # the inference cache's memory warning is given once per process


def base_dims(base: BaseLinear) -> tuple[int, int]:
    """(d_out, d_in) of a dense or quantized linear."""
    if isinstance(base, nn.QuantizedLinear):
        return base.weight.shape[0], base.weight.shape[1] * 32 // base.bits
    return base.weight.shape[0], base.weight.shape[1]


# The quantized bases SMoA wraps: MLX's quantization modes and their bits (affine: any; the others take one
# group size and bit width each, those MLX allows).
QUANT_MODES = {"affine": (2, 3, 4, 5, 6, 8), "mxfp4": (4,), "nvfp4": (4,), "mxfp8": (8,)}


def check_base(base: nn.Module, name: str = "layer") -> None:
    """Reject layers SMoA cannot wrap, naming the layer."""
    if isinstance(base, nn.QuantizedLinear):
        mode = base.mode
        if mode not in QUANT_MODES or base.bits not in QUANT_MODES[mode]:
            supported = "; ".join(f"{m} {'/'.join(map(str, b))}-bit" for m, b in QUANT_MODES.items())
            raise ValueError(f"{name}: SMoA supports quantized bases in {supported}, got mode={mode!r} "
                             f"bits={base.bits}")
        if "global_scale" in base:  # a tensor scale (nvfp4) the dequantization here would leave out
            raise ValueError(f"{name}: SMoA does not support quantized bases with a global_scale")
        return
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name}: SMoA wraps nn.Linear or nn.QuantizedLinear, not {type(base).__name__}")


def _quantized_parts(base: nn.Module) -> tuple[mx.array, ...]:
    """(weight, scales, biases) affine, (weight, scales) in the modes without biases."""
    if base.mode == "affine":
        return (base.weight, base.scales, base.biases)
    return (base.weight, base.scales)


def dequantized_weight(base: nn.Module) -> mx.array:
    """The weight of a plain or quantized linear (or embedding) as a dense array: a quantized one's in its own dtype
    (that of its scales), bfloat16 for mxfp4 / nvfp4 / mxfp8 (whose scales are 8-bit codes; exact, see
    kernels.dense.FP_MODE_DTYPE)."""
    if "scales" in base:
        return dequantize(_quantized_parts(base), base.group_size, base.bits, base.mode)
    return base.weight


@contextlib.contextmanager
def live_inference() -> Iterator[None]:
    """Eval-mode calls inside run the live form and build no merged copies: validation during training, where
    the copies (one d_out x d_in per layer, dense even for a quantized base) would raise peak memory for a pass
    that runs once per evaluation and is dropped again when training resumes."""
    previous = SMoALinear.cache_merged_weight
    SMoALinear.cache_merged_weight = False
    try:
        yield
    finally:
        SMoALinear.cache_merged_weight = previous


class SMoALinear(nn.Module):
    """y = base(x) + dropout(x) Delta W^T, with Delta W[R_k, C_k] = s (B_k A_k) * W0[R_k, C_k].

    The anchors W0[R_k, C_k] are read from ``self.linear``'s own weight, so the layer stores nothing of the
    base beyond the row and column orders (int32). ``row_groups`` / ``col_groups`` are views of those orders.

    The factors are one trainable array, ``smoa_factors`` ([A_0, .., A_K-1, B_0, .., B_K-1] flattened): the
    optimizer then updates one array per layer whatever K (with 2K arrays per layer, SMoA's K=4 step on an H200 ran
    18% over its forward + backward, LoRA's 2%).
    ``smoa_a`` / ``smoa_b`` are its per-block views; assigning a list to either repacks the array. Adapter files
    keep one tensor per block (``smoa_a.<k>``, ``smoa_b.<k>``).
    """

    @classmethod
    def from_base(
        cls,
        base: BaseLinear,
        rank: int = 8,
        blocks: int = 2,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        branch_ranks: Optional[Sequence[int]] = None,
        row_order: Optional[Order] = None,
        col_order: Optional[Order] = None,
        name: str = "layer",
    ) -> "SMoALinear":
        """Wrap ``base``; the spectral order is computed from its weight unless given (e.g. from a saved adapter)."""
        check_base(base, name)
        if (row_order is None) != (col_order is None):
            raise ValueError(f"{name}: give both row_order and col_order, or neither")
        if row_order is None:
            row_order, col_order = spectral_order(dequantized_weight(base))
        return cls(base, rank, blocks, alpha, dropout, branch_ranks, row_order, col_order, name)

    def __init__(
        self,
        base: BaseLinear,
        rank: int,
        blocks: int,
        alpha: Optional[float],
        dropout: float,
        branch_ranks: Optional[Sequence[int]],
        row_order: Order,
        col_order: Order,
        name: str = "layer",
    ):
        super().__init__()
        check_base(base, name)
        d_out, d_in = base_dims(base)
        ranks = resolve_ranks(rank, blocks, branch_ranks, name)
        if blocks > min(d_out, d_in):
            raise ValueError(f"{name}: blocks={blocks} exceeds the smaller dimension of its {d_out}x{d_in} weight")
        row_sizes, col_sizes = split_sizes(d_out, blocks), split_sizes(d_in, blocks)
        for k, (r_k, rows, cols) in enumerate(zip(ranks, row_sizes, col_sizes)):
            if r_k > min(rows, cols):
                raise ValueError(
                    f"{name}: block {k} is {rows}x{cols}, too small for rank {r_k} (rank={rank}, blocks={blocks})"
                )
        row_order = np.asarray(row_order, dtype=np.int64).reshape(-1)
        col_order = np.asarray(col_order, dtype=np.int64).reshape(-1)
        for label, order, n in (("row_order", row_order, d_out), ("col_order", col_order, d_in)):
            if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
                raise ValueError(f"{name}: {label} must be a permutation of range({n}), got shape {order.shape}")

        self.linear = base
        self.linear.freeze()
        self.name = name
        self.rank = rank
        self.blocks = blocks
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = dropout
        # Private (underscore) arrays are module state but not parameters: never trained, never in weight dumps.
        self._layout = BlockLayout(
            row_sizes=tuple(row_sizes),
            col_sizes=tuple(col_sizes),
            ranks=tuple(ranks),
            scale=self.scale,
            group_size=base.group_size if isinstance(base, nn.QuantizedLinear) else 0,
            bits=base.bits if isinstance(base, nn.QuantizedLinear) else 0,
            mode=base.mode if isinstance(base, nn.QuantizedLinear) else "affine",
        )
        # The orders, their inverses and the block-major plan the kernels index with (kernels/plan.py).
        self._index = (
            mx.array(row_order, dtype=mx.int32),
            mx.array(col_order, dtype=mx.int32),
            mx.array(np.argsort(row_order), dtype=mx.int32),
            mx.array(np.argsort(col_order), dtype=mx.int32),
            tuple(build_plan(self._layout, row_order, col_order)),
        )
        # Reference init: A_k Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(|C_k|), 1/sqrt(|C_k|)); B_k zero.
        self.smoa_factors = pack_factors(
            [mx.random.uniform(-1 / math.sqrt(c), 1 / math.sqrt(c), shape=(r, c)) for r, c in zip(ranks, col_sizes)],
            [mx.zeros((n, r)) for r, n in zip(ranks, row_sizes)],
        )
        # Resolve the backend now, outside any mx.compile / grad trace, so a GPU kernel's one-time compile probe
        # (and its fallback warning) happens here rather than in the middle of a training step: in the float type
        # the base computes in, which is what the model's activations are (a call in another type probes it then).
        linear_fn(self._layout, self._own_dtype())

    # -- views ---------------------------------------------------------------------------------------------
    @property
    def smoa_a(self) -> list[mx.array]:
        """A_k [r_k, |C_k|], views of ``smoa_factors``."""
        return factor_views(self._layout, self.smoa_factors)[0]

    @property
    def smoa_b(self) -> list[mx.array]:
        """B_k [|R_k|, r_k], views of ``smoa_factors``."""
        return factor_views(self._layout, self.smoa_factors)[1]

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in ("smoa_a", "smoa_b"):
            super().__setattr__(key, value)
            return
        current = getattr(self, key)
        value = list(value)
        got, want = [tuple(v.shape) for v in value], [tuple(c.shape) for c in current]
        if got != want:
            raise ValueError(f"{self.name}: {key} must have the shapes {want}, got {got}")
        a_list, b_list = (value, self.smoa_b) if key == "smoa_a" else (self.smoa_a, value)
        self.smoa_factors = pack_factors(a_list, b_list, self.smoa_factors.dtype)

    @property
    def ranks(self) -> list[int]:
        return list(self._layout.ranks)

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    @property
    def index(self) -> LayerIndex:
        """(row_order, col_order, inverse row order, inverse col order, block plan), int32 arrays."""
        return self._index

    @property
    def row_order(self) -> mx.array:
        return self._index[0]

    @property
    def col_order(self) -> mx.array:
        return self._index[1]

    def _groups(self, order: mx.array, sizes: Sequence[int]) -> list[mx.array]:
        out, start = [], 0
        for n in sizes:
            out.append(order[start : start + n])
            start += n
        return out

    @property
    def row_groups(self) -> list[mx.array]:
        return self._groups(self.row_order, self._layout.row_sizes)

    @property
    def col_groups(self) -> list[mx.array]:
        return self._groups(self.col_order, self._layout.col_sizes)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self._layout.row_sizes), sum(self._layout.col_sizes)

    def weight_parts(self) -> tuple[mx.array, ...]:
        """The base's own arrays, as every form takes them: (W0,), (w, scales, biases) affine, (w, scales) in the
        other quantization modes."""
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            return _quantized_parts(base)
        return (base.weight,)

    def _own_dtype(self) -> Optional[mx.Dtype]:
        """The dtype of the base's dense weight: its own, an affine base's scales'; None for mxfp4 / nvfp4 / mxfp8,
        which hold no float array and compute in their input's dtype."""
        if not isinstance(self.linear, nn.QuantizedLinear):
            return self.linear.weight.dtype
        return self.linear.scales.dtype if self._layout.affine else None

    # -- compute -------------------------------------------------------------------------------------------
    def __call__(self, x: mx.array) -> mx.array:
        merged = None if self.training or not SMoALinear.cache_merged_weight else self._inference_weight(x.dtype)
        if merged is not None:
            return x @ merged.T if "bias" not in self.linear else mx.addmm(self.linear.bias, x, merged.T)
        if self.dropout_p > 0 and self.training:  # dropout on the update path only: two inputs
            y = self.linear(x)
            delta = delta_fn(self._layout, x.dtype)(self.dropout(x), self._index, self.weight_parts(), self.smoa_factors)
            return y + delta.astype(y.dtype)
        y = linear_fn(self._layout, x.dtype)(x, self._index, self.weight_parts(), self.smoa_factors)
        return y + self.linear.bias if "bias" in self.linear else y

    # Inference (eval mode) runs on a cached W0 + Delta W; False (or SMOA_MLX_MERGE_CACHE=0) keeps the live
    # block form and its smaller memory.
    cache_merged_weight = os.environ.get("SMOA_MLX_MERGE_CACHE", "1") != "0"
    # The cached copies may grow active memory up to this share of the device's recommended working set (Metal)
    # or memory size; past it a layer stays on the live form, so chat on a big quantized model on a laptop does
    # not trade a 15x speed-up for swapping. Where MLX reports no limit (the CPU backend), there is no cap.
    cache_memory_share = 0.75

    def _inference_weight(self, dtype: mx.Dtype) -> Optional[mx.array]:
        """W0 + Delta W, built on the first inference call and reused while the adapter and base stay the same.

        Decoding one token at a time makes the live update the bottleneck (every block re-modulated per token),
        so at inference the layer runs as its fused linear would. The cache keeps the very arrays it was built
        from and is rebuilt when any of them is replaced: an optimizer step, ``load_weights``, ``set_dtype``, the
        tracer copies inside ``mx.grad`` / ``mx.compile`` (so gradients taken in eval mode still flow through it).
        Training mode never reads it and switching to training mode drops it. In-place item assignment on
        ``smoa_factors`` is not seen: call :meth:`clear_inference_weight` after one (on a view in ``smoa_a`` /
        ``smoa_b`` it changes only the view: assign the list instead). Cost: one d_out x d_in copy per layer, dense in
        the base's compute dtype even for a quantized base (re-quantizing can round a small update away; see
        ``fuse -q``); ``SMoALinear.cache_merged_weight = False`` or ``SMOA_MLX_MERGE_CACHE=0`` keeps the block form.
        None where the copy would not fit in :attr:`cache_memory_share` of the device's memory (the live form then).
        The compute dtype of an mxfp4 / nvfp4 / mxfp8 base, which has no float array, is its input's, ``dtype``.
        """
        dtype = self._own_dtype() or dtype
        sources = (self.smoa_factors, *self.weight_parts())
        cached = self.__dict__.get("_inference_cache")  # a plain attribute: module entries join mx.compile's state
        if (cached is not None and cached[2] == dtype and len(cached[0]) == len(sources)
                and all(a is b for a, b in zip(cached[0], sources))):
            return cached[1]
        merged = self.merged_weight(dtype) if self._cache_fits(dtype) else None
        self.__dict__["_inference_cache"] = (sources, merged, dtype)
        return merged

    def _cache_fits(self, dtype: mx.Dtype) -> bool:
        info = mx.device_info()
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if not limit:
            return True
        d_out, d_in = self.shape
        nbytes = d_out * d_in * dtype.size  # the merged copy's dtype, without building a dequantize
        if mx.get_active_memory() + nbytes <= SMoALinear.cache_memory_share * limit:
            return True
        global _CACHE_WARNED
        if not _CACHE_WARNED:
            _CACHE_WARNED = True
            warnings.warn(
                f"smoa_mlx: {self.name} and later SMoA layers run the live block form at inference: caching their "
                f"merged weights would pass {SMoALinear.cache_memory_share:.0%} of the device memory "
                f"(fuse the adapter for full speed)", RuntimeWarning, stacklevel=4)
        return False

    def clear_inference_weight(self) -> None:
        """Forget the cached W0 + Delta W; the next inference call rebuilds it."""
        self.__dict__.pop("_inference_cache", None)

    def _set_training_mode(self, mode: bool) -> None:
        super()._set_training_mode(mode)
        if mode:
            self.clear_inference_weight()

    def merged_weight(self, dtype: Optional[mx.Dtype] = None) -> mx.array:
        """W0 + Delta W as one dense matrix (float32 inside, rounded once) in ``dtype``, by default the base's compute
        dtype: its weight's, an affine base's scales', bfloat16 for mxfp4 / nvfp4 / mxfp8 (MLX's own
        dequantization type for them, what mlx-lm's fuse and dequantize_model give)."""
        return fused_weight(self._layout, self._index, self.weight_parts(), self.smoa_factors, dtype)

    def delta_weight(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The dense d_out x d_in update, for checks and merging only."""
        return dense_delta(self._layout, self._index, self.weight_parts(), self.smoa_factors, dtype)

    def fuse(self, dequantize: bool = True) -> BaseLinear:
        """A plain linear layer with the update merged in: W0 + Delta W, no inference cost.

        A quantized base comes back dequantized unless ``dequantize=False``, which re-quantizes with the base's
        own group size, bits and mode (quantization error can then swallow part of a small update). Dequantized, an
        mxfp4 / nvfp4 / mxfp8 base's fused weight is bfloat16, as mlx-lm's own fuse makes it.
        """
        base = self.linear
        merged = self.merged_weight()
        d_out, d_in = self.shape
        has_bias = "bias" in base
        fused = nn.Linear(d_in, d_out, bias=has_bias)
        fused.weight = merged
        if has_bias:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, group_size=base.group_size, bits=base.bits,
                                                  mode=base.mode)
        return fused

    def num_trainable(self) -> int:
        return self.smoa_factors.size
