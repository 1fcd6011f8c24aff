"""Where the no-flags training run spends its time before (and in) its first steps: docs/training_demo.md.

Runs the real ``smoa_mlx.train.run`` (embedded SmolLM2-135M-Instruct, packaged data, this backend's defaults) for a
few steps, twice: first with an empty spectral-order cache, then with the cache the first run filled. The stages are
timed by wrapping the functions the runner calls; a step's time is mlx-lm's own (one report per step).

    python scripts/profile_start.py [--steps 3] [--json benchmarks/start_profile.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time

t0 = time.perf_counter()
import mlx.core as mx  # noqa: E402

from smoa_mlx.train import runner  # noqa: E402

IMPORT_S = time.perf_counter() - t0


def instrument(marks: dict):
    """Wrap the runner's stages so each call adds its duration to ``marks``; returns the undo function."""
    originals = []

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)
        originals.append((owner, name, inner))

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                marks.setdefault(label, []).append(round(time.perf_counter() - start, 3))

        setattr(owner, name, wrapper)

    from mlx_lm.tuner import trainer

    timed(runner, "load_model", "load GGUF + dequantize + tokenizer")
    timed(runner.Method, "apply", "spectral orders + wrap 150 layers")
    timed(runner, "answer", "held-out answer (32 tokens max)")
    timed(trainer, "evaluate", "validation")
    timed(runner, "_figures", "loss curve + figures")
    timed(runner._Saver, "save", "save adapter + checkpoint")
    report = runner.Recorder.on_train_loss_report

    def per_step(self, info):  # steps_per_report=1: each report window is one step
        report(self, info)
        marks.setdefault("training steps (first holds compilation)", []).append(round(self.windows[-1][1], 3))

    originals.append((runner.Recorder, "on_train_loss_report", report))
    runner.Recorder.on_train_loss_report = per_step

    def undo() -> None:
        for owner, name, inner in originals:
            setattr(owner, name, inner)

    return undo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SMOA_MLX_CACHE"] = os.path.join(tmp, "cache")
        for name in ("empty order cache", "orders cached by the first run"):
            marks: dict = {}
            undo = instrument(marks)
            start = time.perf_counter()
            runner.run(adapter_path=os.path.join(tmp, name.split()[0]), iters=a.steps, steps_per_report=1,
                       steps_per_eval=a.steps + 1, force=True)
            marks["run total"] = round(time.perf_counter() - start, 3)
            undo()
            runs[name] = marks
    out = {
        "command": f"python scripts/profile_start.py --steps {a.steps}",
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, MLX {mx.default_device()}",
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "import smoa_mlx.train (s)": round(IMPORT_S, 3),
        "runs (s)": runs,
    }
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
