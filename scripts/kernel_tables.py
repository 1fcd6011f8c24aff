"""The tables of ``scripts/bench_kernels.py``'s results files (its ``--markdown``, ``--across`` and ``--join``): read
from the JSON alone, so any machine renders a GPU run's figures, old files included (their columns come and go with
the rounds; docs/BENCHMARKS.md says which).
"""

from __future__ import annotations

import statistics
from typing import Optional

DEFAULT_TOKENS = 8192  # activations per step of every results file (bench_kernels.TOKENS), where one does not say


def verified(row: dict) -> bool:
    """Within the type's tolerance of float64, and (where the run has it) no worse than twice the pure-MLX
    reference's own error in the same type on the same device (plus float32 rounding)."""
    worst = max(row[f"{form}_rel_err"] for form in ("kernel", "kernel_delta", "merged", "merged_blocks",
                                                    "merged_blocks_side") if f"{form}_rel_err" in row)
    return worst < row["tol"] and ("reference_rel_err" not in row or worst <= 2 * row["reference_rel_err"] + 1e-5)


def _auto(row: dict) -> tuple[float, str]:
    """(ms, form) of what SMoALinear runs on this layer by default on a GPU (no dropout): the merged form, its
    gradients block by block where block_grads_pay says."""
    from smoa_mlx.kernels import block_grads_pay

    t = row["ms"]
    if block_grads_pay(row["d_out"], row["d_in"], row["blocks"]):
        return t["smoa_merged_blocks"], "merged, block grads"
    return t["smoa_merged"], "merged"


def _launch_label(row: dict) -> str:
    """The launch variant of a bandwidth row (``--gathers`` sweeps); "-" for runs that swept nothing."""
    if "tt" not in row or row["step"] in ("modulate", "merge-mlx") or (
            row["step"] == "merge" and "merge_ti" not in row):
        return "-"
    if row["step"] == "merge":  # merge_unroll: the rank loop unrolled or not, in the run at 78f3eb4
        loop = {True: ", unrolled", False: ", loop"}.get(row.get("merge_unroll"), "")
        return f"{row['merge_ti']} rows / thread{loop}"
    if row["step"] == "hadamard":
        return f"{row['hadamard_ti']} rows / thread"
    # "strided": a mapping measured in December 2026 (benchmarks/bench_gathers.json) and dropped
    tt = row.get("scatter_tt", row["tt"]) if row["step"].startswith("scatter") else row["tt"]  # one TT before f45b8b6
    label = f"{tt} tokens / thread" + {0: ", consecutive", 1: ", 32 apart"}.get(row.get("strided"), "")
    if row["step"].startswith("gather") and "gather_along" in row:
        label += f", K={row['blocks']} blocks along {row['gather_along']}"
    return label


def across(runs: dict) -> str:
    """The two ratios ``auto``'s size rules rest on, for every shape and K of several per-layer runs ({name: results}):
    the block form's time over the dense form's (dropout layers: GPU_BLOCK_MIN_WEIGHTS), and the merged form's with
    block gradients over its time with full ones, by the work the blocks save per gathered element
    (MERGED_BLOCK_GRADS_MIN_SAVING). One run's spread is as large as the margins, so the rules read several."""
    ratios = {}  # (weights, shape, K) -> {run: (block / dense, block grads / full grads, saving)}
    for name, data in runs.items():
        for r in data.get("bench", []):
            t, k = r["ms"], r["blocks"]
            key = (r["d_out"] * r["d_in"], f"{r['d_out']}x{r['d_in']}", k)
            saving = r["d_out"] * r["d_in"] * (1 - 1 / k) / (r["d_out"] + r["d_in"])
            dense = t["smoa"] / t["smoa_dense"] if "smoa" in t and "smoa_dense" in t else None
            grads = t["smoa_merged_blocks"] / t["smoa_merged"] if "smoa_merged_blocks" in t and "smoa_merged" in t \
                else None
            ratios.setdefault(key, {})[name] = (dense, grads, saving)
    names = list(runs)

    def cells(key, i):
        return " | ".join(f"{ratios[key][n][i]:.2f}" if n in ratios[key] and ratios[key][n][i] is not None else ""
                          for n in names)

    head = " | ".join(names)
    out = ["Block form / dense form (the update of a dropout layer):", "",
           f"| W0 | weights | K | {head} |", "|---|---|---|" + "---|" * len(names)]
    out += [f"| {key[1]} | {key[0] / 2**20:.0f}M | {key[2]} | {cells(key, 0)} |" for key in sorted(ratios, reverse=True)
            if any(v[0] is not None for v in ratios[key].values())]
    out += ["", "Merged form, block gradients / full gradients, by the work saved per gathered element:", "",
            f"| W0 | K | saved / gathered | {head} |", "|---|---|---|" + "---|" * len(names)]
    by_saving = sorted(ratios, key=lambda key: next(iter(ratios[key].values()))[2])
    out += [f"| {key[1]} | {key[2]} | {next(iter(ratios[key].values()))[2]:.0f} | {cells(key, 1)} |"
            for key in by_saving if any(v[1] is not None for v in ratios[key].values())]
    return "\n".join(out)


def markdown(data: dict) -> str:
    """Every table a results file has the data for (the per-layer run, breakdown, bandwidth, movers' check,
    verification, CPU forms), as docs/BENCHMARKS.md quotes them."""
    tokens = data.get("tokens", DEFAULT_TOKENS)
    out = [f"Command: `{data['command']}`  ",
           f"Device: {data['device']}; MLX {data['mlx']}, torch {data.get('torch', '-')}.", ""]
    if "bench" in data:
        out += ["| W0 (out x in) | K | r | LoRA r | frozen | floor | merged | x floor | merged, block grads | x floor "
                "| block form | x floor | dense form | x floor | auto runs | MLX LoRA | PyTorch ref SMoA | PyTorch LoRA "
                "| auto / MLX LoRA | ref / auto |",
                "|" + "---|" * 20]
        nan = float("nan")
        for r in data["bench"]:
            t, fl = r["ms"], r["floor_ms"]
            auto, name = _auto(r)
            out.append(
                f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {r['rank']} | {r['lora_rank']} | {t['frozen_mlx']:.2f} "
                f"| {fl:.2f} | {t.get('smoa_merged', nan):.2f} | {t.get('smoa_merged', nan) / fl:.2f}x "
                f"| {t.get('smoa_merged_blocks', nan):.2f} | {t.get('smoa_merged_blocks', nan) / fl:.2f}x "
                f"| {t['smoa']:.2f} | {t['smoa'] / fl:.2f}x | {t['smoa_dense']:.2f} | {t['smoa_dense'] / fl:.2f}x "
                f"| {name} | {t['lora_mlx']:.2f} | {t['smoa_torch_ref']:.2f} | {t['lora_torch']:.2f} "
                f"| {auto / t['lora_mlx']:.2f}x | {t['smoa_torch_ref'] / auto:.2f}x |")
        out += ["", _goal_summary(data["bench"]), ""]
        if "copy_gbps" in data:
            out += _design_floor_table(data["bench"], data["copy_gbps"], tokens)
        out += _merge_kernel_table(data["bench"])
        out += _variant_tables(data["bench"])
        out += _amortized_table(data["bench"])
    if "breakdown" in data:
        out += ["The merged form's steps alone (bf16, ms per launch; compiled: replayed by mx.compile, as a training "
                "step runs them):", "", "| W0 | K | step | eager ms | compiled ms |", "|---|---|---|---|---|"]
        out += [f"| {r['d_out']}x{r['d_in']} | {r.get('blocks', '-')} | {r['step']} | {r['ms']:.3f} "
                f"| {r['ms_compiled']:.3f} |" if "ms_compiled" in r else
                f"| {r['d_out']}x{r['d_in']} | {r.get('blocks', '-')} | {r['step']} | {r['ms']:.3f} | - |"
                for r in data["breakdown"]]
        out.append("")
    if "bandwidth" in data:
        out += [f"Memory-bound steps (bf16, {tokens} tokens; copy ceiling measured in the same run: "
                f"{data.get('copy_gbps', float('nan')):.0f} GB/s):", "",
                "| W0 | step | launch | GB moved | eager ms | GB/s | % of copy | compiled ms | GB/s | % of copy |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        copy = data.get("copy_gbps", float("nan"))
        for r in data["bandwidth"]:  # runs before the compiled timing have no compiled columns
            compiled = (f"{r['ms_compiled']:.3f} | {r['gbps_compiled']:.0f} | {100 * r['gbps_compiled'] / copy:.0f}%"
                        if "ms_compiled" in r else "- | - | -")
            out.append(f"| {r['d_out']}x{r['d_in']} | {r['step']} | {_launch_label(r)} | {r['gb']:.3f} "
                       f"| {r['ms']:.3f} | {r['gbps']:.0f} | {100 * r['gbps'] / copy:.0f}% | {compiled} |")
        out.append("")
    if "movers_check" in data:
        bad = [r for r in data["movers_check"] if not r["ok"]]
        merges = sum(r["kernel"].startswith("merge") for r in data["movers_check"])
        what = [f"gathers and scatters against plain MLX, {tokens} tokens"] * (merges < len(data["movers_check"]))
        what += ["merge-kernel variants against the shipped merge, full-size weights"] * (merges > 0)
        joined = " and ".join(what)
        out += [f"{joined[0].upper() + joined[1:]}, bf16 and f32: "
                f"{len(data['movers_check']) - len(bad)} of {len(data['movers_check'])} bit-exact.", ""]
        out += [f"- MISMATCH {r['kernel']} width {r['width']} K={r['blocks']} {r['dtype']} "
                f"TT={r.get('tt', '-')}: "
                f"{r['mismatches']} elements differ, {r['nans']} NaN" for r in bad]
        out.append("")
    if "verify" in data:
        # The side-stream column only for runs that verified it (f1410eb; the option is gone).
        side = any("merged_blocks_side_rel_err" in v for v in data["verify"])
        forms = ("kernel", "kernel_delta", "merged", "merged_blocks") + (("merged_blocks_side",) if side else ())
        out += ["Correctness (max relative error over y, dx, dA_k, dB_k against float64 numpy):", "",
                "| W0 | K | r (per block) | bits | dtype | tokens | block form (fused base) | block form (update alone) "
                "| merged | merged, block grads " + ("| the same, side stream " if side else "")
                + "| pure-MLX reference | tol | ok |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if side else "")]
        for v in data["verify"]:
            ranks = v["branch"] if v["branch"] else v["rank"]
            out.append(f"| {v['d_out']}x{v['d_in']} | {v['blocks']} | {ranks} | {v['bits'] or '-'} | {v['dtype']} "
                       f"| {v['tokens']} | "
                       + " | ".join(f"{v[name + '_rel_err']:.1e}" if name + "_rel_err" in v else "-"
                                    for name in (*forms, "reference"))
                       + f" | {v['tol']:.0e} | {verified(v)} |")
    if "cpu" in data:
        out += ["", "| form (CPU, float32) | rep | ms |", "|---|---|---|"]
        out += [f"| {r['form']} | {r['rep']} | {r['ms']:.1f} |" for r in data["cpu"]]
    return "\n".join(out)


def design_floor(row: dict, copy_gbps: float, tokens: int = DEFAULT_TOKENS) -> dict:
    """What the default (merged) form cannot go below on this device, from the same run's measurements: its
    layer-matmuls at the frozen step's pace (2 + 1/K with block gradients, else 3, against the frozen step's 2) plus
    the bytes its memory-bound passes must move at the copy ceiling (bf16: each build of W0 + Delta W by the merge
    kernel reads W0 and writes W, twice per step; block gradients gather x and dy and read G_k and
    the anchors to write H; full gradients read G and W0 to write s G * W0). An estimate, not a strict bound: it
    leaves out the rank-r products, the factors' small passes and every launch's own cost, but scales the frozen
    step's fixed cost with its matmuls, which overstates the floor (by an eighth of that cost at 2.25 layer-matmuls,
    by half at 3: enough on a small layer that a form ran below it, 1024x4096 at K = 2, December 2026). Why: a goal
    well below it on large layers is out of reach of any kernel of this design."""
    from smoa_mlx.kernels import block_grads_pay

    d_out, d_in, k = row["d_out"], row["d_in"], row["blocks"]
    weights, two = d_out * d_in, 2  # bf16 bytes
    blocks = block_grads_pay(d_out, d_in, k)
    matmuls = 2 + 1 / k if blocks else 3
    moved = 2 * 2 * two * weights  # two builds of W0 + Delta W (the merge kernel: W0 in, W out)
    if blocks:
        moved += 2 * two * tokens * (d_in + d_out) + 3 * two * weights / k
    else:
        moved += 3 * two * weights
    ms = row["ms"]["frozen_mlx"] * matmuls / 2 + moved / copy_gbps / 1e6
    return {"ms": ms, "matmuls": matmuls, "gb_moved": moved / 1e9, "vs_lora": ms / row["ms"]["lora_mlx"]}


def _design_floor_table(rows: list[dict], copy_gbps: float, tokens: int = DEFAULT_TOKENS) -> list[str]:
    # A joined run (--join) keeps each part's copy ceiling on its rows: the parts may have run on two machines.
    ceilings = sorted({round(r.get("copy_gbps", copy_gbps)) for r in rows})
    out = ["The merged form's own floor (`design_floor`: its layer-matmuls at the frozen step's pace plus its passes' "
           f"bytes at the copy ceiling, {' and '.join(map(str, ceilings))} GB/s; an estimate, see below):", "",
           "| W0 | K | layer-matmuls | GB moved | floor ms | auto ms | auto / floor | MLX LoRA | floor / MLX LoRA |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, auto = design_floor(r, r.get("copy_gbps", copy_gbps), tokens), _auto(r)[0]
        out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {f['matmuls']:.2f} | {f['gb_moved']:.2f} "
                   f"| {f['ms']:.2f} | {auto:.2f} | {auto / f['ms']:.2f}x | {r['ms']['lora_mlx']:.2f} "
                   f"| {f['vs_lora']:.2f}x |")
    out.append("")
    for k in sorted({r["blocks"] for r in rows}):
        med = statistics.median(design_floor(r, r.get("copy_gbps", copy_gbps), tokens)["vs_lora"]
                                for r in rows if r["blocks"] == k)
        out.append(f"K={k}: the floor is {med:.2f}x MLX LoRA's time (median over the shapes).  ")
    return out + [""]


# Variants timed per layer beside the default (``smoa_merged_blocks_<v>``, and ``smoa_merged_<v>`` where the variant
# touches both merged forms) and with several layers per call (``smoa_auto_<v>``), and what each was: the gathers'
# blocks along the grid's x (the run at 4628c29, where z still shipped; x since), the block gradients on a second
# stream of the device (f1410eb; no faster, removed), the merge kernel's rank loop unrolled at 8 and 4 rows per thread
# (78f3eb4) and its loop at 4 and 2 rows per thread (ef65f8c): none faster, none shipped.
VARIANTS = {"gather_x": "the gathers along x", "side": "the block grads on a side stream",
            "merge_unrolled": "the merge's rank loop unrolled", "merge_unrolled_ti4": "the merge unrolled, 4 rows",
            "merge_ti4": "the merge at 4 rows per thread", "merge_ti2": "the merge at 2 rows per thread"}


def _amortized_table(rows: list[dict]) -> list[str]:
    """The per-layer times with ``amortized`` layers of a shape per call (runs since the column existed), with the
    variants a run timed (:data:`VARIANTS`; auto's own time where a shape takes no block gradients)."""
    rows = [r for r in rows if "ms_amortized" in r]
    if not rows:
        return []
    n = rows[0]["ms_amortized"]["amortized"]
    variants = [v for v in VARIANTS if any(f"smoa_auto_{v}" in r["ms_amortized"] for r in rows)]
    out = [f"{n} layers of a shape per compiled call (each its own weights and inputs), ms per layer; the ratios "
           "with one layer per call beside them:", "",
           "| W0 | K | frozen | MLX LoRA | auto | auto / MLX LoRA | one per call |"
           + "".join(f" auto, {VARIANTS[v]} | / MLX LoRA |" for v in variants),
           "|---|---|---|---|---|---|---|" + "---|---|" * len(variants)]
    ratios = {}
    for r in rows:
        a = r["ms_amortized"]
        one = _auto(r)[0] / r["ms"]["lora_mlx"]
        ratio = a["smoa_auto"] / a["lora_mlx"]
        line = (f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {a['frozen_mlx']:.2f} | {a['lora_mlx']:.2f} "
                f"| {a['smoa_auto']:.2f} | {ratio:.2f}x | {one:.2f}x |")
        timed = [a.get(f"smoa_auto_{v}", a["smoa_auto"]) for v in variants]
        ratios.setdefault(r["blocks"], []).append((ratio, one, *(t / a["lora_mlx"] for t in timed)))
        out.append(line + "".join(f" {t:.2f} | {t / a['lora_mlx']:.2f}x |" for t in timed))
    out.append("")
    for k, v in sorted(ratios.items()):
        med = [statistics.median(c) for c in zip(*v)]
        out.append(f"K={k}, medians over the shapes: auto / MLX LoRA {med[0]:.2f}x ({n} per call), "
                   f"{med[1]:.2f}x (one per call)"
                   + "".join(f"; with {VARIANTS[name]} {m:.2f}x" for name, m in zip(variants, med[2:])) + ".  ")
    return out + [""]


def _variant_tables(rows: list[dict]) -> list[str]:
    """Per variant a run timed (:data:`VARIANTS`): the merged form with block gradients as shipped and as the
    variant, and what auto / MLX LoRA would be with it (only where auto takes block gradients)."""
    out = []
    for v, label in VARIANTS.items():
        timed = [r for r in rows if f"smoa_merged_blocks_{v}" in r["ms"]]
        if not timed:
            continue
        what = ("Auto (the merged form, with the gradients it picks)" if f"smoa_merged_{v}" in timed[0]["ms"]
                else "The merged form with block gradients")
        out += [f"{what}, as shipped and with {label} (ms):", "",
                "| W0 | K | auto runs | shipped | variant | variant / shipped | auto / MLX LoRA | with the variant |",
                "|---|---|---|---|---|---|---|---|"]
        with_v = {}
        for r in timed:
            auto, name = _auto(r)
            if f"smoa_merged_{v}" in r["ms"]:  # a variant of both merged forms: auto as shipped and with it
                base, var = auto, r["ms"][f"smoa_merged{'_blocks' if 'block' in name else ''}_{v}"]
                auto_v = var
            else:  # a variant of the block gradients alone (the runs until f1410eb)
                base, var = r["ms"]["smoa_merged_blocks"], r["ms"][f"smoa_merged_blocks_{v}"]
                auto_v = var if "block" in name else auto
            lora = r["ms"]["lora_mlx"]
            with_v.setdefault(r["blocks"], []).append(auto_v / lora)
            out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {name} | {base:.2f} | {var:.2f} "
                       f"| {var / base:.2f} | {auto / lora:.2f}x | {auto_v / lora:.2f}x |")
        out.append("")
        out += [f"K={k}: auto / MLX LoRA with {label} {statistics.median(m):.2f}x (median over the shapes).  "
                for k, m in sorted(with_v.items())]
        out.append("")
    return out


def _merge_kernel_table(rows: list[dict]) -> list[str]:
    """The default against the same form with MLX's rank-r matmul + fused pass building W0 + Delta W (runs since the
    merge kernel; earlier ones have no such column)."""
    rows = [r for r in rows if "smoa_merged_mlx_merge" in r["ms"]]
    if not rows:
        return []
    out = ["W0 + Delta W by the merge kernel (the default) or by MLX's rank-r matmul + fused pass, the rest of the "
           "step the same (ms):", "", "| W0 | K | auto runs | merge kernel | MLX's merge | kernel / MLX |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        auto, name = _auto(r)
        other = r["ms"]["smoa_merged_blocks_mlx_merge" if "block" in name else "smoa_merged_mlx_merge"]
        out.append(f"| {r['d_out']}x{r['d_in']} | {r['blocks']} | {name} | {auto:.2f} | {other:.2f} "
                   f"| {auto / other:.2f} |")
    return out + [""]


def _goal_summary(rows: list[dict]) -> str:
    lines = []
    for blocks in sorted({r["blocks"] for r in rows}):
        sel = [r for r in rows if r["blocks"] == blocks]
        med = lambda f: statistics.median(f(r) for r in sel)  # noqa: E731
        ratio = lambda f: f"{min(f(r) for r in sel):.2f} to {max(f(r) for r in sel):.2f}"  # noqa: E731
        lines.append(
            f"K={blocks}, medians over the shapes: auto {med(lambda r: _auto(r)[0] / r['floor_ms']):.2f}x floor "
            f"(block form {med(lambda r: r['ms']['smoa'] / r['floor_ms']):.2f}x, dense form "
            f"{med(lambda r: r['ms']['smoa_dense'] / r['floor_ms']):.2f}x); "
            f"auto / MLX LoRA {med(lambda r: _auto(r)[0] / r['ms']['lora_mlx']):.2f}; "
            f"PyTorch ref / auto {med(lambda r: r['ms']['smoa_torch_ref'] / _auto(r)[0]):.2f}; "
            f"auto / dense form {ratio(lambda r: _auto(r)[0] / r['ms']['smoa_dense'])}.")
    return "  \n".join(lines)


def join(parts: list[dict], names: Optional[list[str]] = None) -> dict:
    """One results file from a run split over device calls (``--shapes``, a call's time limit): the first part's
    fields, every part's commands, per-layer rows and bandwidth rows, each per-layer row with its own part's copy
    ceiling (the calls may have had different machines). Parts that timed other token counts, devices or MLX
    versions do not make one run: a ValueError names the first that differs (``names``: the parts' files)."""
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    for key in ("tokens", "device", "mlx"):
        for name, p in zip(names[1:], parts[1:]):
            if p.get(key) != parts[0].get(key):
                raise ValueError(f"{name}: {key} {p.get(key)!r}, but {names[0]} has {parts[0].get(key)!r}")
    out = dict(parts[0], command=" ; ".join(p["command"] for p in parts))
    for key in ("bench", "bandwidth"):
        if any(key in p for p in parts):
            out[key] = [dict(r, **({"copy_gbps": p["copy_gbps"]} if key == "bench" and "copy_gbps" in p else {}))
                        for p in parts for r in p.get(key, [])]
    return out


