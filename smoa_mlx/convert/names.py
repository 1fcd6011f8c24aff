"""Module paths between mlx-lm and Hugging Face transformers, and PEFT's key spelling.

mlx-lm loads Hugging Face checkpoints of these families without renaming the decoder's linears, so for them an
mlx-lm path *is* the transformers path (``model.layers.3.self_attn.q_proj``); phi3 keeps its fused ``qkv_proj``
and ``gate_up_proj`` on both sides. Multimodal gemma3 nests the text model differently on each side. Everything
else is refused by name rather than guessed: a wrong guess would load "successfully" into the wrong layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError

PEFT_PREFIX = "base_model.model."

_STANDARD = r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
_PHI3 = r"self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj"


@dataclass(frozen=True)
class Family:
    """How one model family's adaptable linears are named: ``<prefix>layers.<i>.<leaf>`` on each side."""

    mlx_prefix: str
    hf_prefix: str
    leaves: str  # regex of the block-relative linear paths
    top: tuple[str, ...] = ("lm_head",)  # linears outside the blocks, same name on both sides

    def _convert(self, path: str, src: str, dst: str, model_type: str, side: str) -> str:
        if path in self.top:
            return path
        m = re.fullmatch(re.escape(src) + r"layers\.(\d+)\.(" + self.leaves + r")", path)
        if m is None:
            raise UnsupportedArchitectureError(
                f"module {path!r} of a {model_type!r} model has no known counterpart outside {side} "
                f"(adaptable: {src}layers.<i>.({self.leaves}) and {', '.join(self.top)})"
            )
        return f"{dst}layers.{m.group(1)}.{m.group(2)}"


FAMILIES: dict[str, Family] = {
    **{
        t: Family("model.", "model.", _STANDARD)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "phi3": Family("model.", "model.", _PHI3),
    "gemma3": Family("language_model.model.", "model.language_model.", _STANDARD, top=()),
}


def family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported for conversion (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def to_hf(path: str, model_type: str) -> str:
    """mlx-lm module path -> transformers module path."""
    fam = family(model_type)
    return fam._convert(path, fam.mlx_prefix, fam.hf_prefix, model_type, "mlx-lm")


def to_mlx(path: str, model_type: str) -> str:
    """transformers module path -> mlx-lm module path."""
    fam = family(model_type)
    return fam._convert(path, fam.hf_prefix, fam.mlx_prefix, model_type, "transformers")


def layer_index(path: str) -> int:
    """Block index of an mlx-lm path, or -1 for top-level modules such as lm_head."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
    return int(m.group(1)) if m else -1


def block_relative(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (mlx-lm's lora ``keys`` spelling)."""
    m = re.search(r"(?:^|\.)layers\.\d+\.(.+)$", path)
    return m.group(1) if m else path
