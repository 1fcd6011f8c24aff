"""The embedded model's load choices side by side: dequantized float32 / float16 against native 4-bit (Q4_1).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/bench_embedded.py --out benchmarks/embedded.json

For each variant (same process, same text): load time, forward time over the text (median of --repeats, after
one warm-up), and perplexity of the text. The Q4_1 variant and the float32 one hold the same weight values, so
their perplexities should agree; the timing ratio is what decides the default on a given machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from smoa_mlx.models import load_embedded

TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. When it is heated, its molecules move faster and "
    "faster until they escape into the air as steam. At higher altitudes the air pressure is lower, so water "
    "boils at a lower temperature, and food takes longer to cook. This is why mountain climbers often use "
    "pressure cookers to prepare their meals."
)
VARIANTS = {
    "float32 (default)": dict(dtype=mx.float32),
    "float16": dict(dtype=mx.float16),
    "q4_1 native (quantized=True, float32 scales)": dict(dtype=mx.float32, quantized=True),
}


def run(repeats: int) -> dict:
    results = {}
    for name, kw in VARIANTS.items():
        start = time.perf_counter()
        model, tokenizer = load_embedded(**kw)
        load_s = time.perf_counter() - start
        ids = mx.array([tokenizer.encode(TEXT)])

        def forward():
            logits = model(ids[:, :-1]).astype(mx.float32)
            loss = nn.losses.cross_entropy(logits, ids[:, 1:]).mean()
            mx.eval(loss)
            return loss

        forward()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            loss = forward()
            times.append(time.perf_counter() - start)
        results[name] = {
            "load_s": round(load_s, 3),
            "forward_s": round(statistics.median(times), 4),
            "tokens": int(ids.shape[1] - 1),
            "perplexity": round(math.exp(loss.item()), 4),
        }
        print(name, results[name], flush=True)
        del model
    base = results["float32 (default)"]["forward_s"]
    for r in results.values():
        r["forward_vs_float32"] = round(r["forward_s"] / base, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results = {
        "command": "python scripts/bench_embedded.py" + (f" --out {args.out}" if args.out else ""),
        "machine": f"{platform.system()} {platform.machine()}, mlx {mx.__version__}, device {mx.default_device()}",
        "results": run(args.repeats),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
