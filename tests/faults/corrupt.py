"""Ways to break an adapter folder's files, each a pure function of the good bytes (and a seeded RNG).

``WEIGHT_FORMS`` rewrite ``adapters.safetensors``, ``CONFIG_FORMS`` rewrite ``adapter_config.json``; every form is
something a crash, a bad download, a hand edit or a hostile file really produces. Each returns the new bytes and
what the promise is: the file that has to be named in the error.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Callable

import numpy as np

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"


# -- safetensors at the byte level --------------------------------------------------------------------------
DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def encode(arrays: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    """A well-formed safetensors file of numpy arrays (any dtype safetensors knows)."""
    names = {np.dtype(t): n for n, t in DTYPES.items()}
    header, body, offset = {}, b"", 0
    if metadata:
        header["__metadata__"] = metadata
    for key, value in arrays.items():
        value = np.ascontiguousarray(value)
        data = value.tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(data)]}
        body += data
        offset += len(data)
    return join(header, body)


def decode(raw: bytes) -> tuple[dict[str, np.ndarray], dict]:
    header, body = split(raw)
    metadata = header.pop("__metadata__", {})
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out, metadata


def _retensor(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[bytes, random.Random], bytes]:
    def form(raw: bytes, rng: random.Random) -> bytes:
        arrays, metadata = decode(raw)
        change(arrays)
        return encode(arrays, metadata)

    return form


def _first(arrays: dict, suffix: str) -> str:
    return sorted(k for k in arrays if k.endswith(suffix))[0]


def _set(suffix: str, fn: Callable[[np.ndarray], np.ndarray]):
    def change(arrays):
        key = _first(arrays, suffix)
        arrays[key] = fn(arrays[key])

    return _retensor(change)


def _poison(value: float, suffix: str):
    def fn(a):
        a = a.copy()
        a.flat[a.size // 2] = value
        return a

    return _set(suffix, fn)


def _dup_order(a):
    a = a.copy()
    a[1] = a[0]
    return a


def _offsets_past_end(raw: bytes, rng: random.Random) -> bytes:
    header, body = split(raw)
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, end + 10**9]
    return join(header, body)


def _deep_header(raw: bytes, rng: random.Random) -> bytes:
    text = b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return struct.pack("<Q", len(text)) + text


WEIGHT_FORMS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "empty": lambda raw, rng: b"",
    "truncated": lambda raw, rng: raw[: rng.randrange(1, len(raw) - 1)],
    "random bytes": lambda raw, rng: bytes(rng.randrange(256) for _ in range(rng.randrange(8, 4096))),
    "non-JSON header": lambda raw, rng: struct.pack("<Q", 16) + b"this is no json!" + raw[8:],
    "huge header length": lambda raw, rng: struct.pack("<Q", 2**62) + raw[8:],
    "header past the end": lambda raw, rng: struct.pack("<Q", len(raw)) + raw[8:],
    "offsets past EOF": _offsets_past_end,
    "deeply nested header": _deep_header,
    "no tensors": lambda raw, rng: encode({}, {"format": "mlx"}),
    "float64 factors": _set("smoa_b.0", lambda a: a.astype(np.float64)),
    "int32 factors": _set("smoa_a.0", lambda a: (a * 100).astype(np.int32)),
    "NaN in B": _poison(float("nan"), "smoa_b.0"),
    "inf in A": _poison(float("inf"), "smoa_a.1"),
    "row_order duplicate": _set("row_order", _dup_order),
    "row_order -1": _set("row_order", lambda a: np.where(a == a.max(), -1, a).astype(a.dtype)),
    "row_order out of range": _set("row_order", lambda a: np.where(a == a.max(), 10**6, a).astype(a.dtype)),
    "col_order float": _set("col_order", lambda a: a.astype(np.float32)),
    "A of the wrong shape": _set("smoa_a.0", lambda a: np.zeros((a.shape[0] + 1, a.shape[1]), a.dtype)),
    "2-D row_order": _set("row_order", lambda a: a.reshape(2, -1)),
    "missing col_order": _retensor(lambda arrays: arrays.pop(_first(arrays, "col_order"))),
    "unknown tensor": _retensor(lambda arrays: arrays.__setitem__("model.layers.0.mlp.gate_proj.smoa_x",
                                                                  np.zeros(3, np.float32))),
}


# -- adapter_config.json ------------------------------------------------------------------------------------
def _edit(change: Callable[[dict], None]) -> Callable[[bytes, random.Random], bytes]:
    def form(raw: bytes, rng: random.Random) -> bytes:
        data = json.loads(raw)
        change(data)
        return json.dumps(data, indent=2).encode()  # NaN / Infinity written as JSON's non-standard literals

    return form


def _smoa(key: str, value):
    return _edit(lambda d: d["smoa_parameters"].__setitem__(key, value))


def _top(key: str, value):
    return _edit(lambda d: d.__setitem__(key, value))


def _fingerprint(change: Callable[[dict], None]):
    def edit(d):
        module = next(iter(d["base_fingerprint"]["modules"].values()))
        change(module)

    return _edit(edit)


CONFIG_FORMS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "empty file": lambda raw, rng: b"",
    "not JSON": lambda raw, rng: raw[: len(raw) // 2],
    "a JSON list": lambda raw, rng: b"[1, 2, 3]",
    "not UTF-8": lambda raw, rng: b"\xff\xfe" + raw,
    "deeply nested": lambda raw, rng: b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "alpha NaN": _smoa("alpha", float("nan")),
    "alpha Infinity": _smoa("alpha", float("inf")),
    "alpha a string": _smoa("alpha", "big"),
    "blocks 1e9": _smoa("blocks", 1_000_000_000),
    "rank and blocks 1e9": _edit(lambda d: d["smoa_parameters"].update(rank=10**9, blocks=10**9)),
    "blocks 0": _smoa("blocks", 0),
    "blocks 2.0": _smoa("blocks", 2.0),
    "blocks true": _smoa("blocks", True),
    "rank -1": _smoa("rank", -1),
    "rank a string": _smoa("rank", "4"),
    "dropout 1.5": _smoa("dropout", 1.5),
    "dropout NaN": _smoa("dropout", float("nan")),
    "branch_ranks wrong sum": _smoa("branch_ranks", [1, 1]),
    "branch_ranks strings": _smoa("branch_ranks", ["2", "2"]),
    "target_modules a number": _smoa("target_modules", 5),
    "num_layers a string": _smoa("num_layers", "all"),
    "smoa_parameters a list": _top("smoa_parameters", [4, 2]),
    "smoa_parameters unknown key": _smoa("ranks", 4),
    "fine_tune_type a number": _top("fine_tune_type", 5),
    "fine_tune_type unknown": _top("fine_tune_type", "smoa2"),
    "base_fingerprint a string": _top("base_fingerprint", "abc"),
    "base_fingerprint without modules": _top("base_fingerprint", {"version": 1}),
    "fingerprint without probes": _fingerprint(lambda m: m.pop("probes")),
    "fingerprint probes strings": _fingerprint(lambda m: m.__setitem__("probes", ["a"] * len(m["probes"]))),
    "fingerprint rms NaN": _fingerprint(lambda m: m.__setitem__("rms", float("nan"))),
    "fingerprint shape wrong type": _fingerprint(lambda m: m.__setitem__("shape", "64x64")),
    "model not a string": _top("model", ["x"]),
}
