"""How much of an adapter's update survives re-quantizing the fused weights.

Fusing into a quantized base and quantizing again can silently drop the whole fine-tune (mlx-lm #1172): an
update smaller than the quantization step rounds back to the base's own grid. What the quantized fused model
really changes, relative to the same quantization of the base, is Q(W0 + dW) - Q(W0); the rest of dW is what
quantization dropped. Measured per adapted layer, before the layer is quantized, with the same ``mx.quantize``
call (same group size, bits and dtype) that mlx-lm's ``quantize_model`` then applies to the fused layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

# Share of the update's norm lost to quantization above which the fused model no longer carries the fine-tune
# well: past a quarter, rounding noise is the same order as the update itself.
WARN_FRACTION = 0.25


@dataclass
class LayerLoss:
    path: str
    update_norm: float  # ||dW||_F
    dropped_norm: float  # ||dW - (Q(W0 + dW) - Q(W0))||_F
    update_max: float  # max |dW|
    dropped_max: float  # max |dropped|

    @property
    def fraction(self) -> float:
        return self.dropped_norm / self.update_norm if self.update_norm > 0 else 0.0


@dataclass
class QuantizationReport:
    bits: int
    group_size: int
    layers: list[LayerLoss]

    @property
    def fraction(self) -> float:
        """Share of the whole update's norm (all adapted layers together) that quantization dropped."""
        total = math.sqrt(sum(l.update_norm**2 for l in self.layers))
        lost = math.sqrt(sum(l.dropped_norm**2 for l in self.layers))
        return lost / total if total > 0 else 0.0

    @property
    def dropped_max(self) -> float:
        return max((l.dropped_max for l in self.layers), default=0.0)

    @property
    def update_max(self) -> float:
        return max((l.update_max for l in self.layers), default=0.0)

    @property
    def worst(self) -> Optional[LayerLoss]:
        return max(self.layers, key=lambda l: l.fraction, default=None)

    @property
    def meaningful_loss(self) -> bool:
        return self.fraction > WARN_FRACTION

    def summary(self) -> str:
        if not self.layers:
            return f"{self.bits}-bit quantization: no adapted layer is quantized"
        worst = self.worst
        return (
            f"{self.bits}-bit quantization (group size {self.group_size}) dropped {self.fraction:.1%} of the "
            f"adapter's update (norm over {len(self.layers)} layers); largest weight change dropped "
            f"{self.dropped_max:.3g} (largest update entry {self.update_max:.3g}); "
            f"worst layer {worst.path}: {worst.fraction:.1%}"
        )

    def warning(self) -> Optional[str]:
        if not self.meaningful_loss:
            return None
        return (
            f"WARNING: quantization erases {self.fraction:.1%} of the adapter's update: the quantized fused model "
            f"behaves much like the quantized base (mlx-lm #1172). Fuse without --quantize, or use more bits "
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
    dropped = update - kept
    values = mx.stack([mx.sum(update * update), mx.sum(dropped * dropped), mx.abs(update).max(), mx.abs(dropped).max()])
    u_sq, d_sq, u_max, d_max = values.tolist()
    return LayerLoss(path, math.sqrt(u_sq), math.sqrt(d_sq), u_max, d_max)


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
