"""A small numeric fingerprint of the base weights an adapter was trained on.

An adapter applied to another base model loads without complaint and silently gives nonsense (an SMoA adapter even
more so: its row and column groups come from the base's own spectrum). The fingerprint lets the loaders and
converters notice. It has to survive what legitimately happens to a base between training and use: quantization
(training on a 4-bit MLX model, deploying the float PyTorch one), dtype casts and renaming. So it is not a hash but
a sketch: per module a few bilinear probes u^T W v with fixed +-1 vectors (deterministic from an integer hash, no
RNG whose stream could change between numpy versions) and the RMS of W. 4-bit quantization moves a probe by about a
tenth of the RMS (2-bit: up to 0.4); an unrelated weight by about 1.4 RMS.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from ..errors import BaseModelMismatchError

__all__ = [
    "BaseModelMismatchError",
    "FINGERPRINT_KEY",
    "fingerprint_modules",
    "fingerprint_weights",
    "check_fingerprint",
]

FINGERPRINT_KEY = "base_fingerprint"
VERSION = 1
PROBES = 8
# Normalised probe distance above which a module counts as a different weight: above 2-bit quantization noise,
# while an unrelated weight stays below it with probability ~2% per module (one module above it is enough).
TOLERANCE = 0.7


def _signs(n: int, seed: int) -> np.ndarray:
    """+-1 vector from a 64-bit mix of (index, seed): identical on every platform and numpy version."""
    with np.errstate(over="ignore"):
        offset = np.uint64((seed * 0xBF58476D1CE4E5B9 + 1) % 2**64)
        x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + offset
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    return np.where((x >> np.uint64(17)) & np.uint64(1), 1.0, -1.0)


def _sketch(weight) -> dict[str, Any]:
    import mlx.core as mx

    w = mx.array(weight) if isinstance(weight, np.ndarray) else weight
    if w.ndim != 2:
        raise ValueError(f"fingerprint needs 2-D weights, got shape {tuple(w.shape)}")
    w = w.astype(mx.float32)
    d_out, d_in = w.shape
    v = mx.array(np.stack([_signs(d_in, 2 * p + 1) for p in range(PROBES)], axis=1).astype(np.float32))
    u = mx.array(np.stack([_signs(d_out, 2 * p + 2) for p in range(PROBES)], axis=1).astype(np.float32))
    probes = (u * (w @ v)).sum(axis=0) / float(np.sqrt(max(d_out * d_in, 1)))
    rms = mx.sqrt(mx.mean(w * w)) if w.size else mx.array(0.0)
    return {"shape": [int(d_out), int(d_in)], "rms": float(rms.item()), "probes": np.asarray(probes).tolist()}


def fingerprint_weights(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Fingerprint of dense 2-D weights (MLX or numpy arrays), keyed by module path."""
    return {"version": VERSION, "modules": {path: _sketch(w) for path, w in sorted(weights.items())}}


def fingerprint_modules(modules: Mapping[str, Any]) -> dict[str, Any]:
    """Fingerprint of MLX linear layers (plain, quantized, or wrapped by an adapter layer in ``.linear``)."""
    from ..layer import dequantized_weight

    return fingerprint_weights({path: dequantized_weight(getattr(m, "linear", m)) for path, m in modules.items()})


def _distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    scale = max(float(a["rms"]), float(b["rms"]), 1e-30)
    diff = np.asarray(a["probes"], dtype=np.float64) - np.asarray(b["probes"], dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)) / scale)


def check_fingerprint(
    stored: Optional[Mapping[str, Any]],
    current: Mapping[str, Any],
    source: str,
    tolerance: float = TOLERANCE,
) -> None:
    """Raise :class:`BaseModelMismatchError` when ``current`` is not the base ``stored`` was taken from.

    Only modules present in both are compared (a fingerprint taken over fewer modules still checks those).
    ``stored=None`` (an adapter from before fingerprints, or another tool's) passes: there is nothing to check.
    """
    if not stored:
        return
    if int(stored.get("version", -1)) != VERSION:
        raise BaseModelMismatchError(f"{source}: unknown base_fingerprint version {stored.get('version')!r}")
    have, want = current.get("modules", {}), stored.get("modules", {})
    bad = []
    for path in sorted(set(have) & set(want)):
        if list(have[path]["shape"]) != list(want[path]["shape"]):
            bad.append(f"{path}: shape {tuple(have[path]['shape'])}, adapter trained on {tuple(want[path]['shape'])}")
            continue
        dist = _distance(have[path], want[path])
        if dist > tolerance:
            bad.append(f"{path}: weight fingerprint differs (distance {dist:.2f} > {tolerance})")
    if bad:
        shown = "\n  ".join(bad[:8]) + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise BaseModelMismatchError(
            f"{source}: the adapter was trained on a different base model than the one given:\n  {shown}"
        )
