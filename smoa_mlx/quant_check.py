"""How much of an adapter's update survives re-quantizing the fused weights.

Fusing into a quantized base and quantizing again can silently drop the whole fine-tune (mlx-lm #1172): on a
base already on the quantization grid, an update smaller than half a step rounds straight back to the base.
What the quantized fused model really changes, relative to the same quantization of the base, is
kept = Q(W0 + dW) - Q(W0). Entry by entry that is mostly rounding noise (a step, or nothing), so the measure is
its projection on the update, <kept, dW> / <dW, dW>: 1 when the update survives (on average, as when rounding
dithers it), 0 when quantization erased it. Alongside, the largest update entry that left its quantized weight
unchanged. Measured per adapted layer before anything is merged, with the same ``mx.quantize`` call (group size,
bits, dtype) that mlx-lm's ``quantize_model`` then applies to the fused layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

# Share of the update lost above which the quantized fused model no longer carries the fine-tune reliably.
WARN_DROPPED = 0.25


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


@dataclass
class QuantizationReport:
    bits: int
    group_size: int
    layers: list[LayerLoss]

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
            return f"{self.bits}-bit quantization: no adapted layer is quantized"
        worst = self.worst
        return (
            f"{self.bits}-bit quantization (group size {self.group_size}) keeps {self.kept:.1%} of the adapter's "
            f"update over {len(self.layers)} layers (drops {self.dropped:.1%}); largest update entry it erased "
            f"entirely: {self.erased_max:.3g} (largest update entry: {self.update_max:.3g}); "
            f"worst layer {worst.path} keeps {worst.kept:.1%}"
        )

    def warning(self) -> Optional[str]:
        if self.dropped <= WARN_DROPPED:
            return None
        return (
            f"WARNING: quantization erases {self.dropped:.1%} of the adapter's update, so the quantized fused model "
            f"behaves more like the quantized base (mlx-lm #1172). Fuse without --quantize, or use more bits "
            f"(--q-bits 8) or a smaller --q-group-size."
        )


def dense_weight(module: nn.Module) -> mx.array:
    """The weight of a plain or quantized linear / embedding, dequantized (in its own dtype)."""
    if "scales" in module:
        return mx.dequantize(
            module.weight, module.scales, module.get("biases"), group_size=module.group_size,
            bits=module.bits, mode=getattr(module, "mode", "affine"),
        )
    return module.weight


def _round_trip(w: mx.array, group_size: int, bits: int) -> mx.array:
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def layer_loss(path: str, base: mx.array, fused: mx.array, group_size: int, bits: int) -> LayerLoss:
    """Loss of one layer: ``base`` is W0 and ``fused`` W0 + dW, both dense, in the dtype quantization sees."""
    f32 = mx.float32
    update = fused.astype(f32) - base.astype(f32)
    kept = _round_trip(fused, group_size, bits).astype(f32) - _round_trip(base, group_size, bits).astype(f32)
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
) -> QuantizationReport:
    """Measure every adapter layer of ``model`` (anything with ``.fuse``) against ``bits``-bit quantization.

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
        gs, b = group_size, bits
        if predicate is not None:
            choice = predicate(path, fused)
            if not choice:
                continue
            if isinstance(choice, dict):
                gs, b = choice.get("group_size", gs), choice.get("bits", b)
        if not hasattr(fused, "to_quantized") or fused.weight.shape[-1] % gs:
            continue
        layers.append(layer_loss(path, dense_weight(_base_of(module)), fused.weight, gs, b))
    return QuantizationReport(bits=bits, group_size=group_size, layers=layers)
