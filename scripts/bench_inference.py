"""Decoding speed with a live SMoA adapter against the fused model of the same adapter, in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/bench_inference.py --out benchmarks/inference.json

Variants, on the embedded SmolLM2-135M-Instruct (float32) with one adapter (``--adapter-path``, else the default
SMoA settings with random B factors, so the update is not zero):
  fused            the adapter merged into the weights (what ``smoa_mlx.fuse`` saves), plain mlx-lm linears;
  live             base + adapter as chat/generate load it: eval mode, SMoA layers on their cached W0 + Delta W;
  live_block_form  the same layers with the cache switched off (``SMoALinear.cache_merged_weight = False``), the
                   block-modulated update recomputed for every token, as before the cache existed.
Rounds alternate the variants so that a busy machine slows them alike; each measures greedy decoding of
``--tokens`` tokens after the prompt (mlx-lm's ``generate_step``, no early stop at EOS; the first token, which
carries the prefill, is not counted). The medians, the best runs (least disturbed by other work) and their ratios
go to ``--out``, with whether live and fused produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from smoa_mlx import SMoAConfig, SMoALinear, apply_smoa, save_adapter
from smoa_mlx.convert.hf_export import fuse_adapters
from smoa_mlx.layer import dequantized_weight
from smoa_mlx.loading import load_model, load_model_with_adapter

PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


def random_adapter(folder: Path, seed: int) -> None:
    """The default SMoA settings on the embedded model, with B factors random so the update is not zero."""
    model, _ = load_model(None)
    config = SMoAConfig()
    apply_smoa(model, config)
    mx.random.seed(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, SMoALinear):
            layer.smoa_b = [mx.random.normal(b.shape) * 0.5 for b in layer.smoa_b]
    mx.eval(model.parameters())
    save_adapter(model, folder, config)


def decode(model, prompt: mx.array, tokens: int) -> tuple[float, list[int]]:
    """Tokens per second over ``tokens`` greedy steps after the first, and the tokens."""
    out = []
    steps = generate_step(prompt, model, max_tokens=tokens + 1, sampler=make_sampler(temp=0.0))
    token, _ = next(steps)  # prefill + first token
    out.append(int(token))
    start = time.perf_counter()
    for token, _ in steps:
        out.append(int(token))
    return tokens / (time.perf_counter() - start), out


def merge_times(model, rounds: int) -> dict:
    """Seconds to build every SMoA layer's W0 + Delta W, the inference cache's one-time cost (and ``fuse``'s):
    ``merged_weight`` (W0 (1 + s B_full A_full)) against the dense reference W0 + ``delta_weight`` (dense_delta),
    alternating, medians over ``rounds``."""
    layers = [m for _, m in model.named_modules() if isinstance(m, SMoALinear)]

    def reference(layer):
        w0 = dequantized_weight(layer.linear)
        return (w0.astype(mx.float32) + layer.delta_weight(mx.float32)).astype(w0.dtype)

    times = {"merged_weight": [], "dense_delta": []}
    for _ in range(rounds):
        for name, build in (("merged_weight", lambda layer: layer.merged_weight()), ("dense_delta", reference)):
            start = time.perf_counter()
            for layer in layers:
                mx.eval(build(layer))
            times[name].append(time.perf_counter() - start)
    return {"layers": len(layers), **{name: round(statistics.median(v), 3) for name, v in times.items()}}


def run(adapter: Path, tokens: int, block_tokens: int, rounds: int) -> dict:
    live, tokenizer = load_model_with_adapter(None, adapter)
    fused, _ = load_model_with_adapter(None, adapter)
    fuse_adapters(fused)
    mx.eval(fused.parameters())
    prompt = mx.array(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))

    def block_form(n):
        SMoALinear.cache_merged_weight = False
        try:
            return decode(live, prompt, n)
        finally:
            SMoALinear.cache_merged_weight = True

    variants = {
        "fused": lambda: decode(fused, prompt, tokens),
        "live": lambda: decode(live, prompt, tokens),
        "live_block_form": lambda: block_form(block_tokens),
    }
    for fn in variants.values():  # warm-up: first-call allocations, the cache's one-time merge
        fn()
    merge = merge_times(live, rounds)
    speeds = {name: [] for name in variants}
    outputs = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            tps, out = fn()
            speeds[name].append(tps)
            outputs[name] = out
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    best = {name: max(v) for name, v in speeds.items()}
    return {
        "tokens_per_second": {name: round(v, 2) for name, v in medians.items()},
        "best_tokens_per_second": {name: round(v, 2) for name, v in best.items()},
        "all_runs": {name: [round(x, 2) for x in v] for name, v in speeds.items()},
        "live_over_fused": round(medians["live"] / medians["fused"], 3),
        "live_over_fused_best": round(best["live"] / best["fused"], 3),
        "block_form_over_fused": round(medians["live_block_form"] / medians["fused"], 3),
        "same_tokens_live_and_fused": outputs["live"] == outputs["fused"],
        "merge_seconds": merge,
        "tokens": tokens,
        "block_form_tokens": block_tokens,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter-path", type=Path, default=None, help="an SMoA adapter of the embedded model")
    parser.add_argument("--tokens", type=int, default=48, help="decoded tokens per fused / live measurement")
    parser.add_argument("--block-tokens", type=int, default=8, help="decoded tokens per block-form measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter_path
        if adapter is None:
            adapter = Path(tmp) / "adapter"
            random_adapter(adapter, args.seed)
        result = run(adapter, args.tokens, args.block_tokens, args.rounds)
    result["adapter"] = str(args.adapter_path) if args.adapter_path else "default SMoA settings, random B (seed 0)"
    result["machine"] = f"{platform.system()} {platform.machine()}, MLX {mx.default_device()}"
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
