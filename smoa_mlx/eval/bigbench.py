"""BIG-bench multiple-choice tasks as prompt/option examples, split deterministically into train / valid / test.

The split is a function of the text alone (a SHA-256 of a grouping key), so it does not depend on file order, on
NumPy's RNG or on which subset is asked for, and any machine reproduces it. Examples that share a group (the same
Winograd sentence judged with different reasons in WinoWhy; an identical question in Social IQa) land in the same
split, so a test sentence is never seen in training with another reason attached.

Training records are mlx-lm "completions" (``prompt`` / ``completion`` = the correct option), trained with the
prompt masked; scoring ranks the options by their log-likelihood given the same prompt (:mod:`smoa_mlx.choice_eval`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from ..atomic import atomic_write_text

PathLike = Union[str, os.PathLike]

DATA_ENV = "SMOA_MLX_BIGBENCH"  # folder holding <task>.json; overrides the search below
SPLITS = ("train", "valid", "test")
FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}


@dataclass(frozen=True)
class Example:
    prompt: str
    options: tuple[str, ...]
    answer: int  # index into options
    group: str  # examples with the same group share a split

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.options[self.answer]}


def _social_iqa(row: dict, meta: dict) -> tuple[str, str]:
    """BIG-bench appends the choices to the input for this task (``append_choices_to_input``); so do we."""
    options = "\n".join(f"- {o}" for o in row["target_scores"])
    prompt = f"{row['input'].strip()}\nOptions:\n{options}\nAnswer with the correct option."
    return prompt, row["input"].strip()


def _winowhy(row: dict, meta: dict) -> tuple[str, str]:
    """The task's own prefix, then the statement; grouped by the Winograd sentence before its explanation."""
    prefix = (meta.get("task_prefix") or "").strip()
    statement = row["input"].strip()
    prompt = f"{prefix}\n{statement}\nIs the above reasoning correct or incorrect?".strip()
    return prompt, statement.split(" The '")[0]


TASKS: dict[str, Callable[[dict, dict], tuple[str, str]]] = {"social_iqa": _social_iqa, "winowhy": _winowhy}


def data_root(explicit: Optional[PathLike] = None) -> Path:
    """Where the task files are: ``explicit``, else ``$SMOA_MLX_BIGBENCH``, else ``../shared/data/bigbench`` next
    to the repository, else ``.bigbench/`` inside it (the copy carried to a GPU host by scripts/split_gguf.sh)."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates += [repo.parent / "shared" / "data" / "bigbench", repo / ".bigbench"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"BIG-bench task folder not found (tried {tried}); pass --data-root or set {DATA_ENV}")


def load_task(name: str, root: Optional[PathLike] = None) -> list[Example]:
    """Every example of a BIG-bench task file, options in the file's order, answer = the option scored 1."""
    if name not in TASKS:
        raise ValueError(f"unknown BIG-bench task {name!r} (known: {', '.join(TASKS)})")
    file = data_root(root) / f"{name}.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such task file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    out = []
    for i, row in enumerate(data.get("examples") or []):
        scores = row.get("target_scores") if isinstance(row, dict) else None
        if not isinstance(scores, dict) or "input" not in row or len(scores) < 2:
            raise ValueError(f"{file}: examples[{i}] lacks 'input' or a 'target_scores' with two or more options")
        best = [k for k, v in scores.items() if v == max(scores.values())]
        if len(best) != 1:
            raise ValueError(f"{file}: examples[{i}] has {len(best)} top-scored options; expected exactly one")
        prompt, group = TASKS[name](row, data)
        options = tuple(scores)
        out.append(Example(prompt, options, options.index(best[0]), group))
    if not out:
        raise ValueError(f"{file}: no examples")
    return out


def _position(task: str, group: str) -> float:
    digest = hashlib.sha256(f"{task}\x00{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_task(name: str, examples: list[Example]) -> dict[str, list[Example]]:
    """70 / 10 / 20 percent of the groups (not the examples) by hash position; within a split, examples are in
    hash order, so ``[:n]`` is a deterministic, unbiased subset."""
    out: dict[str, list[tuple[float, str, int, Example]]] = {s: [] for s in SPLITS}
    for ex in examples:
        pos = _position(name, ex.group)
        split = "train" if pos < FRACTIONS["train"] else "valid" if pos < 1.0 - FRACTIONS["test"] else "test"
        out[split].append((_position(name, f"{ex.group}\x00{ex.prompt}"), ex.prompt, ex.answer, ex))
    return {s: [row[-1] for row in sorted(rows, key=lambda t: t[:3])] for s, rows in out.items()}


def task_splits(name: str, root: Optional[PathLike] = None, limits: Optional[dict[str, int]] = None
                ) -> dict[str, list[Example]]:
    """The task's splits, each cut to ``limits[split]`` examples when given (None or <= 0: all)."""
    splits = split_task(name, load_task(name, root))
    for split, n in (limits or {}).items():
        if n and n > 0:
            splits[split] = splits[split][:n]
    return splits


def write_completions(splits: dict[str, list[Example]], folder: PathLike) -> Path:
    """train/valid/test.jsonl in mlx-lm's completions format (the correct option as the completion)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(ex.record()) + "\n" for ex in rows))
    return folder


def reference_accuracies(train: list[Example], test: list[Example]) -> dict[str, float]:
    """Floors that need no model: chance (uniform over options) and, when every example offers the same options
    (WinoWhy: correct / incorrect), always answering the one most often correct in training."""
    out = {"chance": sum(1.0 / len(ex.options) for ex in test) / max(len(test), 1)}
    if train and test and len({ex.options for ex in train + test}) == 1:
        counts = [0] * len(train[0].options)
        for ex in train:
            counts[ex.answer] += 1
        top = counts.index(max(counts))
        out["majority"] = sum(ex.answer == top for ex in test) / len(test)
    return out
