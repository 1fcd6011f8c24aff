"""SMoA hyperparameters, as saved in ``adapter_config.json`` and read back by the loader."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass
class SMoAConfig:
    """What :func:`smoa_mlx.apply_smoa` needs to turn a model's linears into SMoA layers.

    ``alpha=None`` means alpha = rank (scale 1), the reference default. ``target_modules`` are matched
    against the last component of a module's path inside a transformer block (``q_proj``) or its whole path
    (``self_attn.q_proj``), as mlx-lm's ``lora_parameters.keys`` are. ``num_layers=-1`` means every block.
    """

    rank: int = 8
    blocks: int = 2
    alpha: Optional[float] = None
    dropout: float = 0.0
    branch_ranks: Optional[list[int]] = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    num_layers: int = -1

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"SMoAConfig: rank must be >= 0, got {self.rank}")
        if self.blocks < 1:
            raise ValueError(f"SMoAConfig: blocks must be >= 1, got {self.blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SMoAConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.branch_ranks is not None:
            self.branch_ranks = [int(r) for r in self.branch_ranks]
            if len(self.branch_ranks) != self.blocks or sum(self.branch_ranks) != self.rank:
                raise ValueError(
                    f"SMoAConfig: branch_ranks {self.branch_ranks} must have blocks={self.blocks} entries "
                    f"summing to rank={self.rank}"
                )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.effective_alpha / self.rank if self.rank > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SMoAConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SMoAConfig: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data)
