"""The reference SMoA layer's semantics in PyTorch, written for this project (no code from the authors' fork).

The authors' implementation (misonsky/SMoA, ``cpeft/tuners/smoa.py``) lives in a fork of an old PEFT that cannot
be installed next to a current one. This module reproduces what that layer computes, so converted adapters can be
checked in PyTorch: the spectral ordering from a float32 SVD of W0 (``torch.linalg.svd``, the reference's call),
``torch.tensor_split`` groups, float32 anchors, ``Delta W[R_k, C_k] = s (B_k A_k) * W0[R_k, C_k]`` with
``s = lora_alpha / r``, and the reference's file layout (``lora_A.<k>.weight`` / ``lora_B.<k>.weight``, blocks of
rank 0 have no tensors). torch is imported here, and this module is only imported when torch is wanted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "base_model.model."

__all__ = ["reference_orders", "ReferenceSMoALinear", "wrap_reference_smoa", "save_reference_adapter",
           "load_reference_adapter"]


def _order(vectors: torch.Tensor, singular: torch.Tensor) -> torch.Tensor:
    """Ascending mean-singular-index score of each coordinate, computed in float32 as the reference does."""
    ids = torch.arange(vectors.shape[1], dtype=vectors.dtype)
    energy = vectors.pow(2) * singular.to(vectors.dtype).unsqueeze(0).pow(2)
    denom = energy.sum(dim=1).clamp_min(torch.finfo(energy.dtype).eps)
    return torch.argsort((energy * ids.unsqueeze(0)).sum(dim=1) / denom)


def reference_orders(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order, column order) of a d_out x d_in weight by the reference's float32 SVD recipe."""
    w = weight.detach().to(torch.float32)
    if min(w.shape) == 0:
        return torch.arange(w.shape[0]), torch.arange(w.shape[1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return _order(u, s), _order(vh.transpose(0, 1), s)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class ReferenceSMoALinear(nn.Module):
    """A frozen nn.Linear plus the reference's block-modulated update (dense delta, as the reference builds it)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        num_blocks: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        branch_ranks: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.ranks = list(branch_ranks) if branch_ranks is not None else _split(r, num_blocks)
        if len(self.ranks) != num_blocks or sum(self.ranks) != r:
            raise ValueError(f"branch_ranks {self.ranks} must have {num_blocks} entries summing to r={r}")
        self.scaling = lora_alpha / r if r > 0 else 1.0
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        rows, cols = reference_orders(base.weight)
        self.row_groups = list(torch.tensor_split(rows, num_blocks))
        self.col_groups = list(torch.tensor_split(cols, num_blocks))
        w = base.weight.detach().to(torch.float32)
        self.anchors = [w[g][:, c].contiguous() for g, c in zip(self.row_groups, self.col_groups)]
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        for r_k, g, c in zip(self.ranks, self.row_groups, self.col_groups):
            if r_k == 0:
                self.lora_A.append(nn.Identity())
                self.lora_B.append(nn.Identity())
                continue
            a, b = nn.Linear(len(c), r_k, bias=False), nn.Linear(r_k, len(g), bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            self.lora_A.append(a)
            self.lora_B.append(b)

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.base.weight
        delta = torch.zeros(w.shape, dtype=dtype, device=w.device)
        for r_k, a, b, g, c, anchor in zip(
            self.ranks, self.lora_A, self.lora_B, self.row_groups, self.col_groups, self.anchors
        ):
            if r_k > 0:
                delta[g[:, None], c[None, :]] = ((b.weight @ a.weight) * anchor.to(a.weight.dtype)).to(dtype)
        return delta * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(self.dropout(x), self.delta_weight(x.dtype))


def wrap_reference_smoa(model: nn.Module, paths: Sequence[str], **kwargs: Any) -> dict[str, ReferenceSMoALinear]:
    """Replace the nn.Linear modules at ``paths`` (transformers names) with :class:`ReferenceSMoALinear`."""
    wrapped = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = ReferenceSMoALinear(getattr(parent, name), **kwargs)
        setattr(parent, name, layer)
        wrapped[path] = layer
    return wrapped


def save_reference_adapter(model: nn.Module, folder: Path, config: dict) -> None:
    """The reference's files: ``adapter_model.safetensors`` with per-block keys, ``adapter_config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, layer in _layers(model).items():
        for k, (r_k, a, b) in enumerate(zip(layer.ranks, layer.lora_A, layer.lora_B)):
            if r_k > 0:
                tensors[f"{PREFIX}{path}.lora_A.{k}.weight"] = a.weight.detach().contiguous()
                tensors[f"{PREFIX}{path}.lora_B.{k}.weight"] = b.weight.detach().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "SMOA", **config}, indent=2))


def load_reference_adapter(model: nn.Module, folder: Path) -> dict[str, ReferenceSMoALinear]:
    """Wrap the modules named in a reference-format adapter and load its factors (every tensor must be used)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "SMOA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not SMOA")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    paths = sorted({key[len(PREFIX) :].split(".lora_")[0] for key in tensors})
    layers = wrap_reference_smoa(
        model,
        paths,
        r=config["r"],
        num_blocks=config["num_blocks"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config.get("lora_dropout", 0.0),
        branch_ranks=config.get("branch_ranks"),
    )
    state = {}
    for path, layer in layers.items():
        for k, r_k in enumerate(layer.ranks):
            if r_k > 0:
                state[f"{path}.lora_A.{k}.weight"] = tensors.pop(f"{PREFIX}{path}.lora_A.{k}.weight")
                state[f"{path}.lora_B.{k}.weight"] = tensors.pop(f"{PREFIX}{path}.lora_B.{k}.weight")
    if tensors:
        raise ValueError(f"{folder}: tensors not used by any layer: {sorted(tensors)[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            path, _, leaf = key.partition(".lora_")
            target = getattr(layers[path], "lora_" + leaf.split(".")[0])[int(leaf.split(".")[1])].weight
            if target.shape != value.shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(value.shape)}, the layer {tuple(target.shape)}")
            target.copy_(value)
    return layers


def _layers(model: nn.Module) -> dict[str, ReferenceSMoALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ReferenceSMoALinear)}
