"""SMoA hyperparameters, and the one place that checks them.

:func:`check_smoa_values` is called by :class:`SMoAConfig` itself, by the training command line (messages name
``--rank``), by the adapter folder's reader (``adapter_config.json: smoa_parameters.rank``) and, through
:func:`resolve_ranks`, by the layer: a value refused in one place is refused, with the same words, in all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import OptionError
from .spectral import split_rank

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

Namer = Callable[[str], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_smoa_values(values: Mapping[str, Any], name: Namer = str, prefix: str = "") -> None:
    """Raise :class:`~smoa_mlx.errors.OptionError` for the first bad SMoA hyperparameter in ``values``.

    ``values`` may hold any subset of :class:`SMoAConfig`'s fields (missing ones are not checked, except that
    ``branch_ranks`` is checked against ``rank`` and ``blocks`` when all three are there). ``name`` turns a field
    into what the user wrote (``"--rank"``, ``"smoa_parameters.rank"``); ``prefix`` says where (``"file: "``).
    """

    def fail(message: str) -> None:
        raise OptionError(prefix + message)

    rank, blocks = values.get("rank"), values.get("blocks")
    for key in ("rank", "blocks"):
        if key in values and not _is_int(values[key]):
            fail(f"{name(key)} must be an integer, got {values[key]!r}")
        if key in values and values[key] < 1:
            fail(f"{name(key)} must be >= 1, got {values[key]!r}")
    alpha = values.get("alpha")
    if alpha is not None and not _is_number(alpha):
        fail(f"{name('alpha')} must be a finite number (or unset: alpha = rank), got {alpha!r}")
    dropout = values.get("dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        fail(f"{name('dropout')} must be a number in [0, 1), got {dropout!r}")
    num_layers = values.get("num_layers", -1)
    if not _is_int(num_layers) or not (num_layers == -1 or num_layers >= 1):
        fail(f"{name('num_layers')} must be -1 (every block) or an integer >= 1, got {num_layers!r}")
    targets = values.get("target_modules", list(DEFAULT_TARGETS))
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        fail(f"{name('target_modules')} must be a non-empty list of module names, got {targets!r}")
    branch = values.get("branch_ranks")
    if branch is not None:
        if not isinstance(branch, (list, tuple)) or not all(_is_int(r) and r >= 0 for r in branch):
            fail(f"{name('branch_ranks')} must be a list of non-negative integers, got {branch!r}")
        if "rank" in values and "blocks" in values and (len(branch) != blocks or sum(branch) != rank):
            fail(
                f"{name('branch_ranks')} {list(branch)} must be {blocks} non-negative ranks summing to "
                f"{name('rank')}={rank}"
            )
    elif "rank" in values and "blocks" in values and blocks > rank:
        # The default split gives blocks beyond the rank nothing: they would never train.
        fail(
            f"{name('blocks')} {blocks} is more than {name('rank')} {rank}: {blocks - rank} of the blocks would get "
            f"rank 0 and never train; use {name('blocks')} <= {name('rank')} (or {name('branch_ranks')} to place "
            "the ranks explicitly)"
        )


def resolve_ranks(rank: int, blocks: int, branch_ranks: Optional[list[int]] = None, where: str = "layer") -> list[int]:
    """Per-block ranks: ``branch_ranks`` as given, else the reference's split (``rank // blocks``, remainder first)."""
    values = {"rank": rank, "blocks": blocks, "branch_ranks": list(branch_ranks) if branch_ranks is not None else None}
    check_smoa_values(values, prefix=f"{where}: ")
    return split_rank(rank, blocks) if branch_ranks is None else [int(r) for r in branch_ranks]


@dataclass
class SMoAConfig:
    """What :func:`smoa_mlx.apply_smoa` needs to turn a model's linears into SMoA layers.

    ``alpha=None`` means alpha = rank (scale 1), the reference default. ``target_modules`` are matched
    against the last component of a module's path inside a transformer block (``q_proj``) or its whole path
    (``self_attn.q_proj``), as mlx-lm's ``lora_parameters.keys`` are. ``num_layers=-1`` means every block.
    Every value is checked on construction (:func:`check_smoa_values`).
    """

    rank: int = 8
    blocks: int = 2
    alpha: Optional[float] = None
    dropout: float = 0.0
    branch_ranks: Optional[list[int]] = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    num_layers: int = -1

    def __post_init__(self) -> None:
        self.check(prefix="SMoAConfig: ")

    def check(self, name: Namer = str, prefix: str = "") -> None:
        check_smoa_values(asdict(self), name, prefix)
        if self.branch_ranks is not None:
            self.branch_ranks = [int(r) for r in self.branch_ranks]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.effective_alpha / self.rank

    @property
    def ranks(self) -> list[int]:
        return resolve_ranks(self.rank, self.blocks, self.branch_ranks, "SMoAConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: Namer = str, prefix: str = "SMoAConfig: ") -> "SMoAConfig":
        """Build from a mapping (``smoa_parameters`` of an adapter_config.json, options); errors use ``name``."""
        if not isinstance(data, Mapping):
            raise OptionError(f"{prefix}expected a mapping of SMoA hyperparameters, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"{prefix}unknown keys {[name(k) for k in unknown]} (known: {sorted(known)})")
        check_smoa_values(data, name, prefix)
        return cls(**data)
