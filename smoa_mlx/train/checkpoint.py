"""Resumable checkpoints: adapter weights plus what an exact continuation needs (optimizer state, step, RNG).

The training state file is written last and names the numbered weight file it belongs to, so a crash between
the two writes leaves the previous, consistent checkpoint in charge. The data order needs no saving: the batch
stream is a pure function of the seed and the step (see ``loop.BatchStream``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, file_not_folder, read_adapter
from ..atomic import atomic_save_safetensors
from ..errors import AdapterError

STATE_FILE = "training_state.safetensors"
# Hyperparameters that define the adapter's shape or the meaning of its weights: a resumed run must match them.
IDENTITY_KEYS = ("fine_tune_type", "rank", "blocks", "alpha", "branch_ranks", "target_modules", "num_layers", "model",
                 "grad_accumulation_steps")


def checkpoint_name(step: int) -> str:
    return f"{step:07d}_{ADAPTER_WEIGHTS}"


def rng_key() -> list[int]:
    return [int(v) for v in mx.random.state[0].tolist()]


def set_rng_key(key: list[int]) -> None:
    """MLX's key for seed s is [s >> 32, s & 0xffffffff], so seeding with the packed key restores it exactly."""
    hi, lo = key
    mx.random.seed((int(hi) << 32) | int(lo))


@dataclass
class TrainingState:
    step: int
    rng: list[int]
    weights: str
    history: dict[str, list] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)


def save_state(folder: Path, optimizer: optim.Optimizer, state: TrainingState) -> None:
    arrays = dict(tree_flatten(optimizer.state))
    mx.eval(arrays)
    meta = {
        "step": str(state.step),
        "rng": json.dumps(state.rng),
        "weights": state.weights,
        "history": json.dumps(state.history),
        "identity": json.dumps(state.identity, sort_keys=True),
    }
    atomic_save_safetensors(folder / STATE_FILE, arrays, metadata=meta)


def load_state(folder: Path) -> tuple[TrainingState, dict[str, mx.array]]:
    """(state, flat optimizer arrays) of the checkpoint in ``folder``; errors name the file."""
    file = folder / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"--resume: no {STATE_FILE} in {folder} (no checkpoint to resume from; train without --resume)"
        )
    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
        state = TrainingState(
            step=int(meta["step"]),
            rng=json.loads(meta["rng"]),
            weights=meta["weights"],
            history=json.loads(meta["history"]),
            identity=json.loads(meta["identity"]),
        )
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: not a readable training state ({e})") from None
    if not (folder / state.weights).is_file():
        raise FileNotFoundError(f"{file} names the checkpoint {state.weights}, which is missing from {folder}")
    return state, arrays


def restore_optimizer(optimizer: optim.Optimizer, params: dict, arrays: dict[str, mx.array]) -> None:
    """Initialise the optimizer for ``params`` and overwrite its state with the saved arrays (shapes checked)."""
    optimizer.init(params)
    current = dict(tree_flatten(optimizer.state))
    missing = sorted(set(current) - set(arrays))
    extra = sorted(set(arrays) - set(current))
    if missing or extra:
        raise ValueError(
            f"--resume: the saved optimizer state does not fit this run (missing {missing[:4]}, "
            f"unexpected {extra[:4]}): was it saved with another --optimizer?"
        )
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"--resume: optimizer state {key} has shape {value.shape}, expected {current[key].shape}")
    # Assign leaf by leaf: the initialised tree also holds empty containers that a flat file cannot carry.
    for key, value in arrays.items():
        *parents, leaf = key.split(".")
        node = optimizer.state
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value


def check_adapter_path(folder: Path, identity: dict[str, Any], resume: bool, force: bool) -> Optional[str]:
    """Refuse to overwrite an adapter that is there already, unless resuming (with the same settings) or forced.

    Returns a short description of what is there, or None for an empty/new folder.
    """
    if folder.is_file():  # e.g. the adapters.safetensors of the run to continue
        raise FileExistsError(f"--adapter-path {file_not_folder(folder)}")
    config_file = folder / ADAPTER_CONFIG
    state_file = folder / STATE_FILE
    present = [p.name for p in (config_file, folder / ADAPTER_WEIGHTS, state_file) if p.exists()]
    if not present or force:
        return None if not present else f"overwriting {', '.join(present)} (--force)"
    if not resume:
        what = ""
        if config_file.is_file():
            try:
                old = read_adapter(folder)
                what = f" (fine_tune_type={old.kind}, rank={(old.lora or {}).get('rank')})"
            except AdapterError:
                what = " (unreadable adapter_config.json)"
        raise FileExistsError(
            f"--adapter-path {folder} already holds an adapter{what}: pass --resume to continue it, "
            "--force to overwrite it, or choose another --adapter-path"
        )
    if state_file.is_file():
        saved, _ = load_state(folder)
        diffs = [
            f"{k}: saved {saved.identity.get(k)!r}, asked {identity.get(k)!r}"
            for k in IDENTITY_KEYS
            if saved.identity.get(k) != identity.get(k)
        ]
        if diffs:
            raise ValueError(
                f"--resume: the adapter in {folder} was trained with other settings ({'; '.join(diffs)}); "
                "use the same flags, or --force to start over"
            )
    return None
