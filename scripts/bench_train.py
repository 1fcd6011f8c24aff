"""End-to-end training throughput and peak memory: SMoA vs mlx-lm LoRA at equal trainable parameters, on a
1B-class llama-shaped model with random weights (speed does not depend on the values), bf16 and 4-bit base.

    python scripts/bench_train.py --out benchmarks/bench_train.json        # on the GPU machine
    python scripts/bench_train.py --markdown benchmarks/bench_train.json   # table for docs/BENCHMARKS.md

Each configuration runs in its own process (clean peak-memory counter) through mlx_lm.tuner.trainer.train, the
loop smoa_mlx.train drives, with SMoA applied by smoa_mlx.apply_smoa (random row/column orders stand in for the
spectral step, which costs the same for every run and is not part of a training step) and LoRA by mlx-lm's own
linear_to_lora_layers, at rank / K for each SMoA block count (equal trainable parameters). Methods: ``smoa`` is the
default form (SMOA_MLX_KERNEL=auto), ``smoa-kernel`` and ``smoa-dense`` force one form on every layer. Tokens/s is
the trainer's own figure, averaged over the reports after the first (which
includes compilation); peak memory is MLX's peak over training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's smoa_mlx, also in the children

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
MODEL = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
             num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
             rope_theta=500000.0, tie_word_embeddings=True)  # Llama-3.2-1B's shape
SHAPES = {  # --shape: the model dims over MODEL's (llama-1b is MODEL itself)
    "llama-1b": {},
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),  # the embedded model's shape, for CPU runs
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),  # a smoke test of the script
}
METHODS = ("lora", "smoa", "smoa-keep", "smoa-mlx-merge", "smoa-kernel", "smoa-dense")
# The environment per method, read when a step is traced: smoa is the default (auto: the merged form), smoa-keep the
# merged form whose backward reuses the forward's W0 + Delta W (SMOA_MLX_MERGED_KEEP=1: speed for a weight copy per
# layer), smoa-mlx-merge the default with W0 + Delta W built by MLX's matmul + fused pass instead of the merge
# kernel (SMOA_MLX_MERGE_KERNEL=0), the others force one form on every layer (smoa-kernel: the block form with the
# GPU kernels; smoa-dense: the dense HiRA form, the base apart). The run at 4628c29 also had smoa-gather-x, the
# default with its gathers' blocks along the grid's x, which has shipped since; the one at f1410eb smoa-side-stream,
# the block gradients on a second stream (SMOA_MLX_SIDE_STREAM=1), no faster and removed.
_ENV = {m: {"SMOA_MLX_KERNEL": kernel, "SMOA_MLX_MERGED_KEEP": "1" if m == "smoa-keep" else "0",
            "SMOA_MLX_MERGE_KERNEL": "0" if m == "smoa-mlx-merge" else "1"}
        for m, kernel in (("smoa", "auto"), ("smoa-keep", "auto"), ("smoa-mlx-merge", "auto"),
                          ("smoa-kernel", "kernel"), ("smoa-dense", "dense"))}
_ENV["lora"] = {}  # mlx-lm's LoRA reads none of them


def _use(method: str) -> None:
    """Set what ``method``'s step reads when it is traced: its environment."""
    os.environ.update(_ENV[method])


_T0 = None


def _progress(msg: str) -> None:
    """A timestamped line on stderr, which the parent passes through as it comes: a run cut by a time limit shows
    where its time went (building, compiling, which window)."""
    global _T0
    _T0 = _T0 or time.perf_counter()
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _dataset(kind: str, n: int, seq: int, vocab: int, rng) -> list:
    """``random``: uniform tokens (speed runs: nothing to learn but the sequences themselves). ``bigram``: every
    token has 4 possible successors in a fixed random table over 1024 tokens (fewer in --tiny), so a model can lower
    its loss from ln(vocab) towards ln(4) within tens of steps: loss curves that can tell two implementations apart."""
    if kind == "random":
        return [(rng.integers(0, vocab, seq + 1).tolist(), 0) for _ in range(n)]
    n_words = min(1024, vocab)
    words = rng.choice(vocab, n_words, replace=False)
    nxt = rng.integers(0, n_words, (n_words, 4))
    out = []
    for _ in range(n):
        t = [int(rng.integers(0, n_words))]
        for _ in range(seq):
            t.append(int(nxt[t[-1], rng.integers(0, 4)]))
        out.append(([int(words[i]) for i in t], 0))
    return out


def _rounding_share(model) -> dict:
    """Over every SMoA layer: how many of Delta W's non-zero entries vanish when W0 + Delta W is rounded to the
    base's type, as the merged form's forward does (docs/BENCHMARKS.md, numerics)."""
    import mlx.core as mx

    from smoa_mlx import smoa_layers
    from smoa_mlx.layer import dequantized_weight

    lost = nonzero = 0
    for layer in smoa_layers(model).values():
        w0 = dequantized_weight(layer.linear)
        delta = layer.delta_weight(mx.float32)
        nz = delta != 0
        lost += int(mx.sum(nz & ((w0.astype(mx.float32) + delta).astype(w0.dtype) == w0)).item())
        nonzero += int(mx.sum(nz).item())
    return dict(nonzero=nonzero, lost=lost, lost_share=lost / max(nonzero, 1))


def _split_times(model, optimizer, batch: int, seq: int, reps: int = 10) -> dict:
    """Where a training step's time goes: ms of the compiled forward + backward alone (mlx-lm's default_loss under
    nn.value_and_grad, the gradients evaluated), and of the trainer's whole compiled step (the same plus the
    optimizer update), each the median of ``reps`` device-synchronised calls after warm-up."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    tokens = mx.random.randint(0, MODEL["vocab_size"], (batch, seq + 1))
    lengths = mx.array([[0, seq]] * batch)
    value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]
    grads_only = mx.compile(lambda b, n: value_and_grad(model, b, n), inputs=state, outputs=state)

    @partial(mx.compile, inputs=state, outputs=state)
    def whole(b, n):
        (loss, toks), grad = value_and_grad(model, b, n)
        optimizer.update(model, grad)
        return loss, toks

    out = {}
    for name, fn in (("fwd_bwd_ms", lambda: mx.eval(grads_only(tokens, lengths))),
                     ("step_ms", lambda: mx.eval(whole(tokens, lengths), state))):
        times = []
        for i in range(reps + 3):
            mx.synchronize()
            t0 = time.perf_counter()
            fn()
            mx.synchronize()
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def add_adapters(model, kind: str, rank: int, blocks: int, dropout: float = 0.0) -> None:
    """``kind`` "lora": mlx-lm's LoRA at rank / K, as mlx_lm.lora adds it (base frozen first); "smoa": SMoA at
    ``rank`` with K = ``blocks`` (the same trainable parameters), random row/column orders standing in for the
    spectral step (which is not part of a training step). Both on TARGETS in every layer."""
    import numpy as np
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from smoa_mlx import SMoAConfig, apply_smoa, target_paths
    from smoa_mlx.adapters import get_module
    from smoa_mlx.layer import base_dims

    if kind == "lora":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": rank // blocks, "scale": 1.0, "dropout": dropout,
                                                          "keys": TARGETS})
        return
    rng = np.random.default_rng(0)
    paths = target_paths(model, TARGETS)
    orders = {p: tuple(rng.permutation(n) for n in base_dims(get_module(model, p))) for p in paths}
    apply_smoa(model, SMoAConfig(rank=rank, blocks=blocks, dropout=dropout, target_modules=TARGETS), orders=orders)


def _build(method: str, bits: int, rank: int, blocks: int, dtype: str, dropout: float):
    """The benchmark model (random weights, seed 0) with ``method``'s adapters, its trainable parameter count, and
    the seconds its start-up took: the base model, the GPU kernels' first-use probe (SMoA only), the adapters."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    t0 = time.perf_counter()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**MODEL))
    model.set_dtype(getattr(mx, dtype))  # bf16 on a GPU; float32 on MLX's CPU back-end, whose bf16 is unreliable
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    _use(method)
    startup = {"base_s": time.perf_counter() - t0}
    if method != "lora":  # the probe runs when the first SMoA layer is built: timed apart from the adapters
        from smoa_mlx.kernels import _ops

        t0 = time.perf_counter()
        _ops(quantized=bool(bits), dtypes=(getattr(mx, dtype),))  # as the layers ask: their base's float type
        startup["probe_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    add_adapters(model, "lora" if method == "lora" else "smoa", rank, blocks, dropout)
    mx.eval(model.parameters())
    startup["adapters_s"] = time.perf_counter() - t0
    _progress(f"{method}: built, " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
    return model, sum(v.size for _, v in tree_flatten(model.trainable_parameters())), startup


def _train_window(model, optimizer, dataset, iters: int, report_every: int, batch: int, seq: int) -> list:
    """mlx-lm's trainer for ``iters`` steps; its loss reports (tokens/s, peak memory, loss)."""
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train

    reports = []

    class Cb(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArgs(batch_size=batch, iters=iters, steps_per_report=report_every, steps_per_eval=10**9,
                            steps_per_save=10**9, max_seq_length=seq + 1, adapter_file=f"{d}/adapters.safetensors")
        train(model, optimizer, dataset, None, args, training_callback=Cb())
    return reports


def _summary(reports: list) -> dict:
    steady = reports[1:] or reports  # the first report's steps include compiling the step
    return dict(tokens_per_second=sum(r["tokens_per_second"] for r in steady) / len(steady),
                final_loss=reports[-1]["train_loss"], losses=[(r["iteration"], r["train_loss"]) for r in reports])


def child(method: str, bits: int, rank: int, blocks: int, iters: int, batch: int, seq: int, lr: float = 1e-4,
          report_every: int = 0, data: str = "random", split: bool = False, dtype: str = "bfloat16",
          dropout: float = 0.0) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    model, trainable, startup = _build(method, bits, rank, blocks, dtype, dropout)
    dataset = _dataset(data, 4 * batch, seq, MODEL["vocab_size"], np.random.default_rng(1))
    split_ms = _split_times(model, optim.Adam(learning_rate=0.0), batch, seq) if split else {}
    mx.reset_peak_memory()
    reports = _train_window(model, optim.Adam(learning_rate=lr), dataset, iters, report_every or max(1, iters // 4),
                            batch, seq)
    return dict(method=method, bits=bits, dtype=dtype, dropout=dropout, rank=rank, blocks=blocks,
                trainable=int(trainable), tokens_per_step=batch * seq, iters=iters, **_summary(reports),
                peak_memory_gb=max(r["peak_memory"] for r in reports), lr=lr, data=data, **split_ms,
                startup_s=startup, **({} if method == "lora" else {"rounding": _rounding_share(model)}))


def child_rounds(methods: list, bits: int, rank: int, blocks: int, rounds: int, window: int, batch: int, seq: int,
                 lr: float = 1e-4, data: str = "random", split: bool = False, dtype: str = "bfloat16",
                 dropout: float = 0.0) -> list:
    """Every method in one process, each on its own copy of the model, trained in alternating windows of ``window``
    steps (``rounds`` of them per method, the order reversed every other round), after one warm-up window each.

    Why: on the shared H200 the same configuration has measured 15% apart from one process to the next, and a
    process spends most of its minute building the model and compiling kernels. Windows that alternate in one
    process compare the methods under the same conditions, many times, for one compilation each. Peak memory: each
    window's peak minus the arrays the other methods' models and optimizers hold (their parameters and optimizer
    state, counted exactly), an estimate of the method's peak alone; the process-per-configuration mode measures
    it directly."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    dataset = _dataset(data, 4 * batch, seq, MODEL["vocab_size"], np.random.default_rng(1))
    report = 2 if window >= 4 else 1
    runs = {}
    for m in methods:
        _progress(f"K={blocks} {m}: building")
        model, trainable, startup = _build(m, bits, rank, blocks, dtype, dropout)
        opt = optim.Adam(learning_rate=lr)
        t0 = time.perf_counter()
        split_ms = _split_times(model, optim.Adam(learning_rate=0.0), batch, seq) if split else {}
        startup["split_s"] = time.perf_counter() - t0
        _progress(f"K={blocks} {m}: warm-up window" + "".join(f", {k} {v:.1f}" for k, v in split_ms.items()))
        t0 = time.perf_counter()
        _train_window(model, opt, dataset, 2 * report, report, batch, seq)  # warm-up: compile, kernels, Adam state
        startup["warmup_s"] = time.perf_counter() - t0
        runs[m] = (model, opt, trainable, dict(split_ms, startup_s=startup))  # extra fields of its runs

    def held(m):  # bytes of method m's parameters and optimizer state
        model, opt = runs[m][:2]
        return sum(v.nbytes for _, v in tree_flatten([model.parameters(), opt.state]) if isinstance(v, mx.array))

    held_bytes = {m: held(m) for m in methods}
    out = []
    for r in range(rounds):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            model, opt, trainable, extra = runs[m]
            _use(m)
            mx.reset_peak_memory()
            _progress(f"K={blocks} {m}: round {r}")
            reports = _train_window(model, opt, dataset, window, report, batch, seq)
            others = sum(b for k, b in held_bytes.items() if k != m) / 1e9
            peak = max(x["peak_memory"] for x in reports)
            out.append(dict(method=m, bits=bits, dtype=dtype, dropout=dropout, rank=rank, blocks=blocks,
                            trainable=int(trainable), tokens_per_step=batch * seq, iters=window, round=r,
                            **_summary(reports), peak_memory_gb=peak - others, peak_memory_shared_gb=peak, lr=lr,
                            data=data, **extra))
    return out


def _spread(values: list, fmt: str, unit: str = "") -> str:
    """The median of ``values``, with their range when there are several (rounds of one configuration)."""
    mid = f"{statistics.median(values):{fmt}}{unit}"
    return mid if len(values) < 2 else f"{mid} ({min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})"


def _base_label(bits: int, dtype: str) -> str:
    """A run's base in the tables: "4-bit", or its float type ("bf16" for bfloat16)."""
    return f"{bits}-bit" if bits else {"bfloat16": "bf16"}.get(dtype, dtype)


def markdown(data: dict) -> str:
    """The table for docs/BENCHMARKS.md. With several rounds of a configuration (``round`` in the runs): the median
    and range of its tokens/s, and of its ratio to LoRA taken round by round (each SMoA round against the LoRA run
    of the same round)."""
    runs = data["runs"]
    split = any("step_ms" in r for r in runs)  # --split: the compiled forward + backward and whole step, in ms
    out = [f"Command: `{data['command']}`  ", f"Device: {data.get('device', '?')}; model: {data.get('model', MODEL)}",
           "", "| base | K | method | trainable | tokens/s | vs LoRA | peak GB | vs LoRA |"
           + (" fwd+bwd ms | step ms |" if split else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|---|" if split else "")]
    for bits in sorted({r["bits"] for r in runs}):
        for blocks in sorted({r.get("blocks", 2) for r in runs}):
            here = [r for r in runs if r["bits"] == bits and r.get("blocks", 2) == blocks]
            lora = {r.get("round", 0): r for r in here if r["method"] == "lora" and "error" not in r}
            for m in METHODS:
                mine = [r for r in here if r["method"] == m]
                if not mine:
                    continue
                r = mine[0]
                base = _base_label(bits, r.get("dtype", "bfloat16"))
                failed = [x for x in mine if "error" in x]
                if failed:
                    out.append(f"| {base} | {blocks} | {m} | - | failed: {failed[0]['error'][-80:]} | | | |"
                               + (" | |" if split else ""))
                    continue
                paired = [x for x in mine if x.get("round", 0) in lora and m != "lora"]
                tps = [x["tokens_per_second"] / lora[x.get("round", 0)]["tokens_per_second"] for x in paired]
                mem = [x["peak_memory_gb"] / lora[x.get("round", 0)]["peak_memory_gb"] for x in paired]
                rank = r["rank"] // r["blocks"] if m == "lora" else r["rank"]
                out.append(f"| {base} | {blocks} | {m} (r={rank}) | {r['trainable']:,} "
                           f"| {_spread([x['tokens_per_second'] for x in mine], '.0f')} "
                           f"| {'1.00x' if m == 'lora' else _spread(tps, '.2f', 'x') if tps else '-'} "
                           f"| {_spread([x['peak_memory_gb'] for x in mine], '.2f')} "
                           f"| {'1.00x' if m == 'lora' else _spread(mem, '.2f', 'x') if mem else '-'} |"
                           + (f" {r['fwd_bwd_ms']:.1f} | {r['step_ms']:.1f} |" if split and "step_ms" in r else
                              (" - | - |" if split else "")))
    started = [r for r in runs if "startup_s" in r and r.get("round", 0) == 0]
    if started:  # once per model: the seconds before its first measured window
        keys = [k for k in ("base_s", "probe_s", "adapters_s", "split_s", "warmup_s")
                if any(k in r["startup_s"] for r in started)]
        out += ["", "Start-up, seconds, in run order (a later process can start faster: docs/BENCHMARKS.md):", "",
                "| base | K | method | " + " | ".join(k[:-2] for k in keys) + " |",
                "|---|---|---|" + "---|" * len(keys)]
        for r in started:
            base = _base_label(r["bits"], r.get("dtype", "bfloat16"))
            out.append(f"| {base} | {r.get('blocks', 2)} | {r['method']} | "
                       + " | ".join(f"{r['startup_s'][k]:.1f}" if k in r["startup_s"] else "-" for k in keys) + " |")
    return "\n".join(out)


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the device name is decoration: MLX's own device where there is no CUDA
        import platform

        import mlx.core as mx

        return f"{mx.default_device()} ({platform.machine()}, {os.cpu_count()} cores)"


def _commit() -> str:
    """The checkout's commit (``+`` if it has changes), or "?" outside git (the device machine's copy has none)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True)
        return rev.stdout.strip() + ("+" if dirty.stdout.strip() else "") if rev.returncode == 0 else "?"
    except OSError:
        return "?"


def _run_child(cmd: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, the end of stderr) of one child. Its stdout (the RESULT line) is captured; its stderr
    (progress, a traceback) is passed through line by line as it comes, so a run cut by a time limit shows where it
    was, and its last lines are kept for the results' error field."""
    import threading

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()))  # both pipes drain at once
        reader.start()
        tail: deque[str] = deque(maxlen=40)
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
        reader.join()
    return proc.returncode, "".join(stdout), "".join(tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--markdown")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--blocks", default="2,4", help="SMoA block counts (LoRA gets rank / K: equal parameters)")
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--bits", default="0,4", help="base precisions: 0 = unquantized (--dtype), 4 = 4-bit")
    ap.add_argument("--methods", default="lora,smoa,smoa-kernel")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--report-every", type=int, default=0, help="steps per loss report (default iters / 4)")
    ap.add_argument("--data", choices=("random", "bigram"), default="random",
                    help="training tokens: random (speed) or a learnable bigram table (loss curves)")
    ap.add_argument("--split", action="store_true",
                    help="also time the compiled forward + backward alone and the whole step (before training)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="the model's dims (default llama-1b)")
    ap.add_argument("--tiny", action="store_true", help="--shape tiny (a smoke test of the script)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="the base weights' type (float32 on a CPU)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="run every method in one process per base and K, in this many alternating windows "
                         "(child_rounds); 0: one process per configuration, --iters steps each")
    ap.add_argument("--window", type=int, default=8, help="steps per window with --rounds")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout on the adapter path, every method (with it SMoA's update runs apart from the base)")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    MODEL.update(SHAPES["tiny" if args.tiny else args.shape])
    if args.child:
        method, bits = args.child[0], int(args.child[1])
        if args.rounds:
            res = child_rounds(method.split(","), bits, args.rank, int(args.blocks), args.rounds, args.window,
                               args.batch, args.seq, args.lr, args.data, args.split, args.dtype, args.dropout)
        else:
            res = [child(method, bits, args.rank, int(args.blocks), args.iters, args.batch, args.seq, args.lr,
                         args.report_every, args.data, args.split, args.dtype, args.dropout)]
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    data = {"command": "python scripts/bench_train.py " + " ".join(sys.argv[1:]), "device": _device(),
            "commit": _commit(), "model": dict(MODEL), "runs": [],
            # MLX's own knobs (MLX_MAX_OPS_PER_BUFFER, MLX_USE_CUDA_GRAPHS, ...) and ours, as the children see them
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MLX_", "SMOA_MLX_"))}}
    # One process per configuration, or with --rounds one per base and K holding every method.
    groups = [[m] for m in args.methods.split(",")] if not args.rounds else [args.methods.split(",")]
    for bits in map(int, args.bits.split(",")):
        for blocks in map(int, args.blocks.split(",")):
            for methods in groups:
                cmd = [sys.executable, __file__, "--child", ",".join(methods), str(bits), "--rank", str(args.rank),
                       "--blocks", str(blocks), "--iters", str(args.iters), "--batch", str(args.batch), "--seq",
                       str(args.seq), "--lr", str(args.lr), "--report-every", str(args.report_every), "--data",
                       args.data, "--shape", args.shape, "--dtype", args.dtype, "--dropout", str(args.dropout),
                       "--rounds", str(args.rounds), "--window", str(args.window)]
                cmd += ["--split"] if args.split else []
                returncode, stdout, stderr_tail = _run_child(cmd + (["--tiny"] if args.tiny else []))
                before = len(data["runs"])
                lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
                if lines:
                    got = json.loads(lines[-1][7:])
                    for run in got if not args.rounds else []:  # a method listed again: the next round of it
                        run["round"] = sum(x["method"] == run["method"] and x["bits"] == bits
                                           and x.get("blocks") == blocks for x in data["runs"])
                    data["runs"] += got
                else:
                    error = f"exit status {returncode}: " + (stderr_tail or stdout)[-1500:]
                    data["runs"] += [dict(method=m, bits=bits, blocks=blocks, error=error) for m in methods]
                for run in data["runs"][before:]:
                    print(json.dumps(run)[:2000], flush=True)
                if args.out:  # after every process: a run cut short by a time limit keeps what it measured
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(data, indent=1))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
