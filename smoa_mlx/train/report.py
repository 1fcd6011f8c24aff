"""The end-of-run summary and the loss-curve PNG written next to the adapter."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes


def plot_losses(history: dict, path: Path, title: str) -> Path:
    """Train and validation loss against the global step; Agg backend, so it works without a display."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for key, style in (("train", "-"), ("val", "o-")):
        points = history.get(key) or []
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{key} loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def format_summary(result: dict[str, Any]) -> str:
    def loss(key):
        v = result.get(key)
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"method            {result['method']} (rank {result['rank']}"
        + (f", blocks {result['blocks']})" if result["method"] in ("smoa", "hira") else ")"),
        f"trainable params  {result['trainable_parameters']:,} of {result['total_parameters']:,} "
        f"({result['trainable_percent']:.3f}%)",
        f"steps             {result['start_step']} -> {result['steps']}",
        f"val loss          {loss('initial_val_loss')} -> {loss('final_val_loss')}",
        f"train loss        {loss('final_train_loss')} (last report)",
        f"throughput        {result['tokens_per_second']:,.0f} tokens/s ({result['trained_tokens']:,} tokens)",
        f"peak memory       {result['peak_memory_gb']:.3f} GB",
        f"wall time         {result['wall_time_s']:.1f} s",
        f"adapter           {result['adapter_path']}",
    ]
    if result.get("test_loss") is not None:
        lines.insert(5, f"test loss         {loss('test_loss')}")
    preview = result.get("preview")
    if preview:
        at = lines.index(next(line for line in lines if line.startswith("val loss"))) + 1
        lines[at:at] = [f"held-out question {preview['question']}", f"  before          {preview['before']}",
                        f"  after           {preview['after']}"]
    if result.get("loss_curve"):
        lines.append(f"loss curve        {result['loss_curve']}")
    return "\n".join(lines)
