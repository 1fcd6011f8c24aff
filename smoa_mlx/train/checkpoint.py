"""Resumable checkpoints: adapter weights plus what an exact continuation needs (optimizer state, step, RNG).

The training state file is written last and names the numbered weight file it belongs to, so a crash between
the two writes leaves the previous, consistent checkpoint in charge. The data order needs no saving: the batch
stream is a pure function of the seed and the step (see ``loop.BatchStream``). A resumed run must be the same run:
same adapter (``IDENTITY_KEYS``) and same schedule and data order (``SCHEDULE_KEYS``), else it is refused; and
it reads nothing but this folder's own files (the state names a checkpoint by step, never by path).
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
from ..errors import AdapterError, CheckpointError, ResumeMismatchError

STATE_FILE = "training_state.safetensors"
# Hyperparameters that define the adapter's shape or the meaning of its weights: a resumed run must match them.
IDENTITY_KEYS = ("fine_tune_type", "rank", "blocks", "alpha", "branch_ranks", "target_modules", "num_layers", "model",
                 "grad_accumulation_steps")
# Options that fix the learning-rate schedule, the optimizer and the data order: continuing with others would not
# continue the run (``--iters`` sets where the cosine decay ends and the default warmup).
SCHEDULE_KEYS = ("iters", "learning_rate", "warmup", "lr_schedule", "optimizer", "optimizer_config", "batch_size",
                 "seed", "dropout", "max_seq_length", "mask_prompt")


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
    schedule: dict[str, Any] = field(default_factory=dict)


def save_state(folder: Path, optimizer: optim.Optimizer, state: TrainingState) -> None:
    arrays = dict(tree_flatten(optimizer.state))
    mx.eval(arrays)
    meta = {
        "step": str(state.step),
        "rng": json.dumps(state.rng),
        "weights": state.weights,
        "history": json.dumps(state.history),
        "identity": json.dumps(state.identity, sort_keys=True),
        "schedule": json.dumps(state.schedule, sort_keys=True),
    }
    atomic_save_safetensors(folder / STATE_FILE, arrays, metadata=meta)


def _inside(folder: Path, name: str) -> bool:
    """``folder / name`` is a file of ``folder`` itself (no ``..``, no absolute path, no symlink out)."""
    target = folder / name
    return Path(name).name == name and target.resolve().parent == folder.resolve()


def _parse_state(meta: dict, file: Path) -> TrainingState:
    """The metadata of a training state, every field checked for type (the file may be damaged or hand-edited)."""
    try:
        step = int(meta["step"])
        rng = json.loads(meta["rng"])
        history = json.loads(meta["history"])
        identity = json.loads(meta["identity"])
        schedule = json.loads(meta.get("schedule", "{}"))
        weights = meta["weights"]
    except KeyError as e:
        raise CheckpointError(f"{file}: not a training state (no {e.args[0]!r} in its metadata)") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: not a readable training state ({type(e).__name__}: {e})") from None
    if step < 0 or not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
        raise CheckpointError(f"{file}: bad step {step} or RNG key {rng!r}")
    if not isinstance(history, dict) or not all(isinstance(history.get(k, []), list) for k in ("train", "val", "pending")):
        raise CheckpointError(f"{file}: history must hold lists 'train', 'val' and 'pending'")
    if not isinstance(identity, dict) or not isinstance(schedule, dict):
        raise CheckpointError(f"{file}: identity and schedule must be JSON objects")
    return TrainingState(step, rng, weights, history, identity, schedule)


def load_state(folder: Path) -> tuple[TrainingState, dict[str, mx.array]]:
    """(state, flat optimizer arrays) of the checkpoint in ``folder``; errors name the file.

    Only this folder's own files are read: the state must be a plain file of the folder, and the weights it names
    must be the folder's checkpoint of that very step (``0000007_adapters.safetensors``), not a path elsewhere.
    """
    file = folder / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"--resume: no {STATE_FILE} in {folder} (no checkpoint to resume from; train without --resume)"
        )
    if not _inside(folder, STATE_FILE):
        raise CheckpointError(f"{file} points outside {folder}; --resume reads only the folder's own files")
    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:  # MLX's bare errors for a damaged file
        raise CheckpointError(f"{file}: truncated or not a safetensors file ({e})") from None
    state = _parse_state(meta, file)
    want = checkpoint_name(state.step)
    if state.weights != want or not _inside(folder, want):
        raise CheckpointError(
            f"{file} names the weight file {state.weights!r}; the checkpoint of step {state.step} must be {want} "
            f"in {folder} itself (--resume reads only the folder's own files)"
        )
    if not (folder / state.weights).is_file():
        raise FileNotFoundError(f"{file} names the checkpoint {state.weights}, which is missing from {folder}")
    return state, arrays


def packed_factor_state(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    """Optimizer state saved before a layer held its factors in one array (``<path>.smoa_a.<k>.<leaf>`` and
    ``<path>.smoa_b.<k>.<leaf>`` per block) as the state of ``<path>.smoa_factors.<leaf>``: the blocks' arrays
    flattened in the layer's order (A_0 .. A_K-1, B_0 .. B_K-1), so such a checkpoint resumes exactly."""
    groups: dict[tuple[str, str], dict[tuple[int, int], mx.array]] = {}
    out = {}
    for key, value in arrays.items():
        parts = key.split(".")
        kind = next((i for i in range(len(parts) - 2) if parts[i] in ("smoa_a", "smoa_b") and parts[i + 1].isdigit()),
                    None)
        if kind is None:
            out[key] = value
            continue
        path, leaf = ".".join(parts[:kind]), ".".join(parts[kind + 2:])
        groups.setdefault((path, leaf), {})[(parts[kind] == "smoa_b", int(parts[kind + 1]))] = value
    for (path, leaf), blocks in groups.items():
        flat = [mx.reshape(blocks[k], (-1,)) for k in sorted(blocks)]
        out[f"{path}.smoa_factors.{leaf}"] = mx.concatenate(flat)
    return out


def restore_optimizer(optimizer: optim.Optimizer, params: dict, arrays: dict[str, mx.array]) -> None:
    """Initialise the optimizer for ``params`` and overwrite its state with the saved arrays (shapes checked)."""
    optimizer.init(params)
    current = dict(tree_flatten(optimizer.state))
    arrays = packed_factor_state(arrays)
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


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_adapter_path(folder: Path, identity: dict[str, Any], resume: bool, force: bool,
                       schedule: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Refuse to overwrite an adapter that is there already, unless resuming (the same run) or forced.

    Returns a short description of what is there, or None for an empty/new folder. Reads only; writes nothing.
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
        if not config_file.exists() and (folder / ADAPTER_WEIGHTS).exists():
            what = f" ({ADAPTER_WEIGHTS} without {ADAPTER_CONFIG}: an interrupted first save?)"
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
            raise ResumeMismatchError(
                f"--resume: the adapter in {folder} was trained with other settings ({'; '.join(diffs)}); "
                "use the same flags, or --force to start over"
            )
        check_same_schedule(folder, saved.schedule, schedule or {})
    return None


def check_same_schedule(folder: Path, saved: dict[str, Any], asked: dict[str, Any]) -> None:
    """A resumed run continues the saved run's learning-rate schedule and data order, so those options must not
    change (a checkpoint from before they were recorded checks what it has)."""
    diffs = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != asked.get(k)]
    if not diffs:
        return
    listed = "; ".join(f"{_flag(k)}: saved {saved[k]!r}, asked {asked.get(k)!r}" for k in diffs)
    why = ""
    if "iters" in diffs:
        why = (f" --iters fixed the run's learning-rate schedule (warmup {saved.get('warmup')} steps, then cosine "
               f"decay to 0 at step {saved['iters']}), so a run cannot be extended by resuming it.")
    raise ResumeMismatchError(
        f"--resume: the run in {folder} was started with other settings ({listed}).{why} Resume with the saved "
        f"values, or start over with --force and the new ones (this replaces the adapter in {folder})."
    )
