"""Fine-tuning: ``python -m smoa_mlx.train`` and :func:`run`, on mlx-lm's own training loop.

Reading order: :mod:`.runner` (what a run does, start to end), :mod:`.args` (flags, YAML, defaults),
:mod:`.data` (jsonl checks and tokenizing), :mod:`.methods` (SMoA / HiRA / LoRA / DoRA behind one interface),
:mod:`.loop` (the hooks into ``mlx_lm.tuner.trainer.train``), :mod:`.checkpoint` (exact resume),
:mod:`.report` (summary and loss curve).
"""

from ..errors import TrainingDiverged
from .runner import main, run, train_adapter

__all__ = ["run", "train_adapter", "main", "TrainingDiverged"]
