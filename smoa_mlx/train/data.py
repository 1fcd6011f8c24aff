"""Training data in mlx-lm's formats (jsonl ``text`` / ``chat`` / ``completions``, a folder with train, valid and
test files, or a Hugging Face dataset id), checked up front so bad input fails before the model is touched.

mlx-lm's own loader would fail mid-run on a malformed line, silently train on ragged records, and warn at every
batch about long sequences; here every line is checked, errors name the file and line, and long examples are
truncated once with one warning per split.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.datasets import CacheDataset, create_dataset

from ..errors import DataError

PACKAGED_DATA = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "valid", "test")
FORMAT_KEYS = {"completions": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
# Roles chat templates know (OpenAI's fine-tuning format plus tool results); anything else is most likely a typo.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file, blank lines skipped; malformed lines raise with file and line number."""
    rows = []
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        row["_line"] = number
        rows.append(row)
    return rows


def detect_format(row: dict, where: str) -> str:
    """mlx-lm's precedence (completions, then chat, then text), decided by the first record."""
    for name, keys in FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return name
    raise DataError(
        f"{where}: no known format: expected keys 'text', 'messages', or 'prompt' + 'completion' "
        f"(got {sorted(k for k in row if k != '_line')})"
    )


def _check_record(row: dict, fmt: str, where: str) -> None:
    """One record's keys, types and content: what mlx-lm would otherwise crash on mid-run (an empty text) or
    silently train on (a null content rendered as "None", a misspelt role, a record with nothing to learn)."""
    for key in FORMAT_KEYS[fmt]:
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (the file's first record is in {fmt} format)")
    if fmt == "chat":
        _check_messages(row["messages"], where)
        return
    for key in FORMAT_KEYS[fmt]:
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {_type(row[key])}")
    learned = "text" if fmt == "text" else "completion"  # the part the loss is on (a prompt may be empty)
    if not row[learned].strip():
        raise DataError(f"{where}: {learned!r} is empty: the record has nothing to learn")


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: {key} must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {key}.role is {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if content is None and m.get("tool_calls"):  # an assistant turn that only calls tools (OpenAI format)
            continue
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}.content must be a string, got {_type(content)}")
    if not any(isinstance(m.get("content"), str) and m["content"].strip() for m in messages):
        raise DataError(f"{where}: every messages[].content is empty: the record has nothing to learn")


class TokenizedSplit:
    """A fully tokenized split (what mlx-lm's ``CacheDataset`` yields), long examples cut to ``max_seq_length``.

    Not a ``CacheDataset``, so mlx-lm's batcher sorts examples by their token count (for a CacheDataset it sorts
    by the raw record's ``len``) and batches examples of similar length together.
    """

    def __init__(self, items: list[tuple[list[int], int]], name: str):
        self.items = items
        self.name = name

    def __getitem__(self, idx: int) -> tuple[list[int], int]:
        return self.items[idx]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t, _ in self.items)


def _where(dataset: Any, i: int, name: str) -> str:
    row = dataset[i]
    line = row.get("_line") if isinstance(row, dict) else None
    return f"{name}, line {line}" if line else f"{name}, example {i + 1}"


def tokenize_split(dataset: Any, name: str, max_seq_length: int,
                   warn: Callable[[str], object] = print) -> TokenizedSplit:
    """Tokenize every example; cut long ones to ``max_seq_length`` (one warning), refuse ones too short to train
    on (mlx-lm would fail mid-run reshaping an empty batch), and drop, with one warning, examples whose prompt
    fills the whole window (``--mask-prompt``: no token left to learn, and a batch of only those has a NaN loss)."""
    cache = CacheDataset(dataset)
    items, too_long, longest, no_target = [], 0, 0, []
    for i in range(len(cache)):
        tokens, offset = cache[i]
        tokens = list(tokens)
        if len(tokens) < 2:
            raise DataError(f"{_where(dataset, i, name)}: {len(tokens)} token(s) after tokenizing; a training "
                            "example needs at least 2 (an input and the token it predicts)")
        longest = max(longest, len(tokens))
        if len(tokens) > max_seq_length:
            too_long += 1
            tokens = tokens[:max_seq_length]
        if offset >= len(tokens):
            no_target.append(i)
            continue
        items.append((tokens, offset))
    if too_long:
        warn(
            f"[WARNING] {name}: {too_long} of {len(cache)} examples are longer than --max-seq-length "
            f"{max_seq_length} tokens (longest {longest}); they are truncated."
        )
    if no_target:
        message = (f"{len(no_target)} of {len(cache)} examples have no completion token within --max-seq-length "
                   f"{max_seq_length} (first: {_where(dataset, no_target[0], name)})")
        if not items:
            raise DataError(f"{name}: {message}; raise --max-seq-length")
        warn(f"[WARNING] {name}: {message}; they are left out.")
    return TokenizedSplit(items, name)


def read_local(folder: Path) -> dict[str, tuple[list[dict], str]]:
    """Every split file of a local data folder, read and checked record by record: (rows, path) per split.

    Needs no tokenizer, so a bad file is reported before the model is loaded (minutes for a large model)."""
    out = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.exists():
            continue
        rows = read_jsonl(path)
        if not rows:
            raise DataError(f"{path}: the file holds no examples")
        fmt = detect_format(rows[0], f"{path}, line {rows[0]['_line']}")
        for row in rows:
            _check_record(row, fmt, f"{path}, line {row['_line']}")
        out[split] = (rows, str(path))
    return out


def check_data(data: Optional[str], need: Sequence[str] = ("train",)) -> Optional[dict[str, tuple[list[dict], str]]]:
    """The checks of :func:`load_splits` that need no tokenizer, for a local folder (None for a hub id, which
    only the hub can check). Pass the result to :func:`load_splits` so the files are read once."""
    folder = PACKAGED_DATA if data is None else Path(data)
    if folder.is_file():
        raise DataError(f"--data {folder}: expected a folder holding train.jsonl / valid.jsonl / test.jsonl")
    if not folder.exists():
        return None
    rows = read_local(folder)
    _require(rows, need, folder)
    return rows


def _require(present: dict, need: Sequence[str], folder: Path) -> None:
    for split in need:
        if split not in present:
            raise DataError(f"--data {folder}: no {split}.jsonl (or it is empty); it is needed here")


def _load_hub(data_id: str, options: types.SimpleNamespace, tokenizer) -> dict[str, Any]:
    try:
        from mlx_lm.tuner.datasets import load_hf_dataset
        import datasets  # noqa: F401  (mlx-lm's hub loader needs it)
    except ImportError:
        raise DataError(
            f"--data {data_id}: no such folder, and reading Hugging Face datasets needs `pip install datasets`"
        ) from None
    try:
        splits = load_hf_dataset(data_id, tokenizer, options)
    except Exception as e:  # the hub client raises many kinds; name the id and the cause
        raise DataError(f"--data {data_id}: not a local folder, and loading it from the hub failed: {e}") from None
    return {name: (s, f"{data_id}[{name}]") for name, s in zip(SPLITS, splits) if len(s)}


def load_splits(
    data: Optional[str],
    tokenizer: TokenizerWrapper,
    max_seq_length: int,
    batch_size: int,
    mask_prompt: bool = False,
    need: Sequence[str] = ("train",),
    warn: Callable[[str], object] = print,
    checked: Optional[dict[str, tuple[list[dict], str]]] = None,
) -> dict[str, TokenizedSplit]:
    """Tokenized splits of ``data`` (None = the set that ships with the package), checked for size.

    ``need`` lists the splits the run cannot do without; a missing ``valid`` only warns (training proceeds
    without validation, as in mlx-lm).
    """
    options = types.SimpleNamespace(mask_prompt=mask_prompt)
    folder = PACKAGED_DATA if data is None else Path(data)
    local = checked if checked is not None else check_data(data, need)
    if local is not None:
        raw = {split: (create_dataset(rows, tokenizer, options), where) for split, (rows, where) in local.items()}
    else:  # a hub id: only now can its splits be checked
        raw = _load_hub(str(data), options, tokenizer)
        _require(raw, need, folder)
    out = {}
    for split, (dataset, where) in raw.items():
        tokenized = tokenize_split(dataset, where, max_seq_length, warn)
        if len(tokenized) < batch_size:
            raise DataError(
                f"{where}: {len(tokenized)} examples, fewer than --batch-size {batch_size}; "
                "add examples or lower --batch-size"
            )
        out[split] = tokenized
    if "train" in need and "valid" not in out:
        warn(f"[WARNING] --data {folder}: no valid.jsonl; training proceeds without validation.")
    return out
