"""The host-side cost of an adapted layer: how many graph nodes one compiled training step runs per adapted layer
(SMoA per form against mlx-lm's LoRA), what that costs where compute is negligible, and peak memory.

    python scripts/bench_graph.py --out benchmarks/bench_graph.json
    python scripts/bench_graph.py --markdown benchmarks/bench_graph.json   # table for docs/BENCHMARKS.md

Why: per layer at the 1B model's shapes SMoA's fwd+bwd beats LoRA's on an H200, yet its whole step was slower
(docs/BENCHMARKS.md). Every node of the compiled graph costs the host a dispatch, and every node that is not a view
is a kernel launch on a GPU; a step whose kernels are short stalls on the host. Counted here, on any machine:

- ``nodes``: the primitives of the compiled forward + backward (mlx-lm's default_loss under nn.value_and_grad, as
  the trainer compiles it) of a 16-layer llama with bench_train.py's five adapted projections per layer, divided
  by the 80 adapted layers; ``kernels`` counts those that are not views (reshapes, slices, transposes, broadcasts,
  dependencies: no kernel on a GPU); ``step_kernels`` the same for the trainer's whole step, AdamW's update of
  every factor array included. Deterministic for a given MLX.
- ``tiny_step_ms``: the median time of that compiled step at 64-wide layers and 8 tokens, where the work is
  nothing and the time is the per-node cost. CPU figures on a shared machine are noisy: the methods are timed
  interleaved in one process, and the ratio to LoRA is the figure to read.
- ``peak_mb``: MLX's peak memory over one compiled step of a 2-layer model with 1024-wide layers (2048 tokens,
  float32), after a warm-up step: catches a form that keeps a per-layer copy from the forward to the backward.

``--dtype bfloat16 --no-peak`` counts the graph of bf16 training, as on a GPU (its casts add kernels; MLX's CPU
back-end computes bf16 unreliably, so on a CPU take the counts only).

SMoA's orders are random permutations (the spectral step is not part of a training step); LoRA's rank is
rank / K (equal trainable parameters), as in bench_train.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (its model shape, targets and LoRA set-up)

VIEWS = {"Reshape", "Squeeze", "ExpandDims", "Slice", "Transpose", "Broadcast", "Depends", "Split", "Flatten",
         "Unflatten", "StopGradient", "AsStrided", "CustomTransforms"}
TINY = dict(hidden_size=64, num_hidden_layers=16, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=1, vocab_size=256)
MID = dict(hidden_size=1024, num_hidden_layers=2, intermediate_size=2048, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=512)
RANK = 16


DTYPE = "float32"  # the base weights' type (--dtype); bf16 training casts the factors per step, which adds nodes


def _model(method: str, blocks: int, shape: dict):
    import mlx.core as mx
    from mlx_lm.models import llama

    args = dict(bench_train.MODEL, **shape)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**args))
    model.set_dtype(getattr(mx, DTYPE))  # as bench_train.py does, before the adapters (float32 factors)
    bench_train.add_adapters(model, method, RANK, blocks)
    mx.eval(model.parameters())
    return model, args


def _step(model, args: dict, batch: int, seq: int, update: bool = False):
    """The compiled forward + backward; ``update``: the trainer's whole step, AdamW's update included (its
    outputs are then the loss and the new parameters)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    tokens = mx.random.randint(0, args["vocab_size"], (batch, seq + 1))
    lengths = mx.array([[0, seq]] * batch)
    value_and_grad = nn.value_and_grad(model, default_loss)
    if not update:
        state = [model.state, mx.random.state]
        compiled = mx.compile(lambda b, n: value_and_grad(model, b, n), inputs=state, outputs=state)
        return lambda: compiled(tokens, lengths)
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)  # smoa_mlx.train's default optimizer
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def whole(b, n):
        loss, grads = value_and_grad(model, b, n)
        optimizer.update(model, grads)
        return loss, model.trainable_parameters()

    return lambda: whole(tokens, lengths)


def _count(outputs) -> collections.Counter:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    (loss, _), grads = outputs
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(dot), loss, *[v for _, v in tree_flatten(grads)])
        return collections.Counter(re.findall(r'label ="([A-Za-z_]+)', dot.read_text()))


def _kernels(counts: collections.Counter) -> int:
    return sum(n for op, n in counts.items() if op not in VIEWS)


def _config(method: str) -> tuple[str, int, str]:
    """("lora" | "smoa", K, SMOA_MLX_KERNEL) from a name like ``smoa-merged-k2``; ``smoa-keep-kK`` is the merged
    form with SMOA_MLX_MERGED_KEEP=1 (its backward reuses the forward's W0 + Delta W)."""
    parts = method.split("-")
    form = parts[1] if parts[0] == "smoa" else "auto"
    return parts[0], int(parts[-1][1:]), "merged" if form == "keep" else form


def _set_env(method: str) -> tuple[str, int, str]:
    """Set the variables the step reads when it is traced, for ``method``; its _config."""
    config = _config(method)
    os.environ["SMOA_MLX_KERNEL"] = config[2]
    os.environ["SMOA_MLX_MERGED_KEEP"] = "1" if method.startswith("smoa-keep") else "0"
    return config


def measure(methods: list[str], reps: int, peak: bool = True) -> dict:
    import mlx.core as mx

    n_adapted = TINY["num_hidden_layers"] * len(bench_train.TARGETS)
    rows, steps = {}, {}
    for method in methods:
        kind, blocks, _ = _set_env(method)  # read when the step is traced (its first call, just below)
        model, args = _model(kind, blocks, TINY)
        steps[method] = _step(model, args, 1, 8)
        counts = _count(steps[method]())
        whole = _count(_step(model, args, 1, 8, update=True)())
        rows[method] = dict(nodes_per_layer=sum(counts.values()) / n_adapted,
                            kernels_per_layer=_kernels(counts) / n_adapted,
                            step_kernels_per_layer=_kernels(whole) / n_adapted,
                            counts={op: n for op, n in counts.most_common()})
        mx.eval(steps[method]())
    times = {m: [] for m in methods}
    for _ in range(reps):  # interleaved, so load from other processes falls on every method alike
        for method, step in steps.items():
            mx.synchronize()
            start = time.perf_counter()
            mx.eval(step())
            mx.synchronize()
            times[method].append((time.perf_counter() - start) * 1e3)
    for method in methods:
        rows[method]["tiny_step_ms"] = statistics.median(times[method])
        rows[method]["tiny_step_spread_ms"] = [min(times[method]), max(times[method])]
    steps.clear()
    for method in methods:
        rows[method]["peak_mb"] = _peak(method) if peak else float("nan")
    base = {_config(m)[1]: rows[m] for m in methods if m.startswith("lora")}
    for method in methods:
        ref = base.get(_config(method)[1])
        if ref is not None:
            rows[method]["vs_lora"] = {k: rows[method][k] / ref[k]
                                       for k in ("nodes_per_layer", "kernels_per_layer", "step_kernels_per_layer",
                                                 "tiny_step_ms", "peak_mb")}
    return rows


def _peak(method: str) -> float:
    """Peak MB of one compiled step, in a child process (a clean allocator)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_graph as g; "
            f"g.DTYPE = {DTYPE!r}; print(g._peak_here({method!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_here(method: str) -> float:
    import mlx.core as mx

    kind, blocks, _ = _set_env(method)
    model, args = _model(kind, blocks, MID)
    step = _step(model, args, 8, 256)
    mx.eval(step())
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(step())
    return mx.get_peak_memory() / 2**20


def markdown(data: dict) -> str:
    lines = ["| method | nodes / adapted layer | kernels / adapted layer | with AdamW's update | tiny step (ms) "
             "| peak memory (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for method, row in data["rows"].items():
        rel = row.get("vs_lora", {})

        def cell(key: str, fmt: str) -> str:
            ratio = f" ({rel[key]:.2f}x)" if key in rel and not method.startswith("lora") else ""
            return f"{row[key]:{fmt}}{ratio}"

        lines.append(f"| {method} | {cell('nodes_per_layer', '.1f')} | {cell('kernels_per_layer', '.1f')} | "
                     f"{cell('step_kernels_per_layer', '.1f')} | {cell('tiny_step_ms', '.1f')} | "
                     f"{cell('peak_mb', '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python scripts/bench_graph.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora-k2,smoa-merged-k2,smoa-dense-k2,smoa-mlx-k2,lora-k4,smoa-merged-k4",
                        help="comma-separated: lora-kK, smoa-<SMOA_MLX_KERNEL>-kK")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="the base weights' type (bf16 on MLX's CPU back-end: counts only)")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", metavar="JSON", help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    import mlx.core as mx

    global DTYPE
    DTYPE = args.dtype
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    data = dict(mlx=mx.__version__, device=str(mx.default_device()), commit=commit,
                command=" ".join(["python scripts/bench_graph.py", *sys.argv[1:]]),
                dtype=DTYPE, rows=measure(args.methods.split(","), args.reps, not args.no_peak))
    print(markdown(data))
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
