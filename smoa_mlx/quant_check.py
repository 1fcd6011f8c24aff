"""How much of an adapter's update survives re-quantizing the fused weights, in weight space and in behaviour.

Fusing into a quantized base and quantizing again can silently drop the whole fine-tune (mlx-lm #1172): on a
base already on the quantization grid, an update smaller than half a step rounds straight back to the base.
What the quantized fused model really changes, relative to the same quantization of the base, is
kept = Q(W0 + dW) - Q(W0). Entry by entry that is mostly rounding noise (a step, or nothing), so the measure is
its projection on the update, <kept, dW> / <dW, dW>: 1 when the update survives (on average, as when rounding
dithers it), 0 when quantization erased it. Alongside, the largest update entry that left its quantized weight
unchanged. Measured per adapted layer before anything is merged, with the same ``mx.quantize`` call (group size,
bits, dtype) that mlx-lm's ``quantize_model`` then applies to the fused layer.

The weight-space share is a proxy, and an optimistic one: it weighs every update entry alike while a few erased
entries can carry what the adapter learned (81% kept, yet the loss nearly doubled, in the case in
:class:`LossCheck`), and it does not see quantization moving the base weights themselves (every layer, adapted or
not, e.g. a 4-bit base re-quantized with another group size than its own: 93% kept, loss 0.35 -> 0.79).
:class:`LossCheck` measures behaviour instead: the loss on the adapter's validation data of the base, the fused
model and the quantized fused model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .layer import dequantized_weight

# Share of the update lost above which the quantized fused model no longer carries the fine-tune reliably.
WARN_DROPPED = 0.25
# Relative rise of the validation perplexity (quantized fused against fused) above which fuse warns.
WARN_PERPLEXITY = 0.10


@dataclass
class LayerLoss:
    path: str
    update_sq: float  # <dW, dW>
    kept_dot: float  # <Q(W0 + dW) - Q(W0), dW>
    update_max: float  # max |dW|
    erased_max: float  # max |dW| over the entries whose quantized weight did not change at all

    @property
    def kept(self) -> float:
        return self.kept_dot / self.update_sq if self.update_sq > 0 else 1.0


def quant_label(bits: int, group_size: int, mode: str = "affine", noun: str = "") -> str:
    """How the reports name a quantization: "4-bit (group size 32)", "mxfp4 (4-bit, group size 32)"; ``noun``
    follows the first word ("4-bit quantization (group size 32)")."""
    head, inner = (f"{bits}-bit", f"group size {group_size}") if mode == "affine" else (
        mode, f"{bits}-bit, group size {group_size}")
    return f"{head}{' ' + noun if noun else ''} ({inner})"


def _advice(mode: str) -> str:
    """What to try instead, in fuse's flags (mxfp4 / nvfp4 / mxfp8 fix their bits and group size)."""
    if mode == "affine":
        return "use more bits (--q-bits 8) or a smaller --q-group-size"
    finer = "--q-mode mxfp8, or " if mode != "mxfp8" else ""
    return f"use more bits ({finer}--q-mode affine --q-bits 8 --q-group-size 32)"


@dataclass
class QuantizationReport:
    bits: int
    group_size: int
    layers: list[LayerLoss]
    mode: str = "affine"

    @property
    def kept(self) -> float:
        """Share of the whole update (all adapted layers together) that the quantized model still applies."""
        total = sum(l.update_sq for l in self.layers)
        return sum(l.kept_dot for l in self.layers) / total if total > 0 else 1.0

    @property
    def dropped(self) -> float:
        return 1.0 - self.kept

    @property
    def erased_max(self) -> float:
        return max((l.erased_max for l in self.layers), default=0.0)

    @property
    def update_max(self) -> float:
        return max((l.update_max for l in self.layers), default=0.0)

    @property
    def worst(self) -> Optional[LayerLoss]:
        return min(self.layers, key=lambda l: l.kept, default=None)

    def summary(self) -> str:
        if not self.layers:
            label = f"{self.bits}-bit" if self.mode == "affine" else self.mode
            return f"{label} quantization: no adapted layer is quantized"
        worst = self.worst
        label = quant_label(self.bits, self.group_size, self.mode, "quantization")
        return (
            f"{label} keeps {self.kept:.1%} of the adapter's "
            f"update over {len(self.layers)} layers (drops {self.dropped:.1%}); largest update entry it erased "
            f"entirely: {self.erased_max:.3g} (largest update entry: {self.update_max:.3g}); "
            f"worst layer {worst.path} keeps {worst.kept:.1%}"
        )

    def warning(self) -> Optional[str]:
        if self.dropped <= WARN_DROPPED:
            return None
        return (
            f"WARNING: quantization erases {self.dropped:.1%} of the adapter's update, so the quantized fused model "
            f"behaves more like the quantized base (mlx-lm #1172). Fuse without --quantize, or {_advice(self.mode)}."
        )


def _round_trip(w: mx.array, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)  # (w, scales[, biases]): biases affine only
    return mx.dequantize(*q, group_size=group_size, bits=bits, mode=mode)


def layer_loss(path: str, base: mx.array, fused: mx.array, group_size: int, bits: int,
               mode: str = "affine") -> LayerLoss:
    """Loss of one layer: ``base`` is W0 and ``fused`` W0 + dW, both dense, in the dtype quantization sees."""
    f32 = mx.float32
    update = fused.astype(f32) - base.astype(f32)
    kept = (_round_trip(fused, group_size, bits, mode).astype(f32)
            - _round_trip(base, group_size, bits, mode).astype(f32))
    erased = mx.where((kept == 0) & (update != 0), mx.abs(update), 0)
    values = mx.stack([mx.sum(update * update), mx.sum(kept * update), mx.abs(update).max(), erased.max()])
    return LayerLoss(path, *values.tolist())


def _base_of(adapter: nn.Module) -> nn.Module:
    for name in ("linear", "embedding"):
        if name in adapter:
            return adapter[name]
    raise TypeError(f"{type(adapter).__name__}: no base layer (.linear / .embedding) to compare the fuse with")


def quantization_report(
    model: nn.Module,
    group_size: int,
    bits: int,
    predicate: Optional[Callable[[str, nn.Module], Any]] = None,
    mode: str = "affine",
) -> QuantizationReport:
    """Measure every adapter layer of ``model`` (anything with ``.fuse``) against ``bits``-bit quantization in MLX's
    ``mode`` ("affine", "mxfp4", "nvfp4", "mxfp8").

    Layers mlx-lm's ``quantize_model`` would leave unquantized (last dimension not a multiple of the group size,
    or refused by the model's own ``quant_predicate``) lose nothing and are skipped. A predicate returning
    per-layer parameters is honoured as ``quantize_model`` honours it.
    """
    predicate = predicate or getattr(model, "quant_predicate", None)
    layers = []
    for path, module in model.named_modules():
        if not callable(getattr(module, "fuse", None)):
            continue
        fused = module.fuse(dequantize=True)
        gs, b, m = group_size, bits, mode
        if predicate is not None:
            choice = predicate(path, fused)
            if not choice:
                continue
            if isinstance(choice, dict):
                gs, b, m = choice.get("group_size", gs), choice.get("bits", b), choice.get("mode", m)
        if not hasattr(fused, "to_quantized") or fused.weight.shape[-1] % gs:
            continue
        layers.append(layer_loss(path, dequantized_weight(_base_of(module)), fused.weight, gs, b, m))
    return QuantizationReport(bits=bits, group_size=group_size, layers=layers, mode=mode)


@dataclass
class LossCheck:
    """Validation loss of the base, the fused model and the quantized fused model, on the same examples.

    The perplexity ratio of the quantized to the unquantized fused model is what the warning watches. The share of
    the adapter's improvement kept is reported too, but it flatters: much of a fine-tune's first gain is format
    (a chat template, an answer style) that survives quantization while the content does not. Measured on the
    embedded model (30 SMoA steps on the packaged data, fused at 4 bits, group size 32): share 91%, yet the loss
    nearly doubled (0.35 -> 0.66) and "What is 45 minus 24?" went from 21 to 24.
    """

    data: str
    bits: int
    group_size: int
    base: float
    fused: float
    quantized: float
    mode: str = "affine"

    @property
    def kept(self) -> Optional[float]:
        """Share of the adapter's loss improvement the quantized model keeps (None if the adapter did not improve)."""
        gain = self.base - self.fused
        return (self.base - self.quantized) / gain if gain > 0 else None

    @property
    def perplexity_ratio(self) -> float:
        """Validation perplexity of the quantized fused model over the unquantized one's."""
        return math.exp(self.quantized - self.fused)

    def summary(self) -> str:
        kept = self.kept
        share = f"; it keeps {kept:.1%} of the adapter's loss improvement" if kept is not None else ""
        return (
            f"validation loss on {self.data}: base {self.base:.4f}, fused {self.fused:.4f}, fused and "
            f"{quant_label(self.bits, self.group_size, self.mode)} {self.quantized:.4f}: perplexity "
            f"{self.perplexity_ratio:.2f}x the unquantized fused model's{share}"
        )

    def warning(self) -> Optional[str]:
        if self.perplexity_ratio <= 1.0 + WARN_PERPLEXITY:
            return None
        return (
            f"WARNING: the {quant_label(self.bits, self.group_size, self.mode)} fused model's validation perplexity is "
            f"{self.perplexity_ratio:.2f}x the unquantized fused model's (loss {self.quantized:.4f} against "
            f"{self.fused:.4f}; base {self.base:.4f}): quantization changes what the adapter does. Fuse without "
            f"--quantize, or {_advice(self.mode)}."
        )


@contextmanager
def adapters_removed(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every adapter layer swapped for its base layer, put back on exit: the base's behaviour."""
    adapters = [(path, m) for path, m in model.named_modules() if callable(getattr(m, "fuse", None))]
    model.update_modules(tree_unflatten([(path, _base_of(m)) for path, m in adapters]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapters))


def validation_loss(model: nn.Module, dataset: Any, batch_size: int, batches: int, max_seq_length: int) -> float:
    """mlx-lm's own validation loss (mean over tokens), in eval mode, on the same batches at every call."""
    from functools import partial

    from mlx_lm.tuner.trainer import evaluate, iterate_batches

    model.eval()
    same_batches = partial(iterate_batches, seed=0)
    return evaluate(model, dataset, batch_size, batches, max_seq_length, iterate_batches=same_batches)
