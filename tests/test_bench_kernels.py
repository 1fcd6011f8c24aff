"""scripts/bench_kernels.py and its tables (scripts/kernel_tables.py): the cross-run ratios that auto's size rules
(GPU_BLOCK_MIN_WEIGHTS, MERGED_BLOCK_GRADS_MIN_SAVING) are read from, and the other tables. Synthetic timings, but
for one test that runs the per-layer benchmark on a tiny shape on the CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_kernels  # noqa: E402
import kernel_tables  # noqa: E402


def _row(d_out, d_in, k, block, dense, merged=None, merged_blocks=None):
    ms = {"smoa": block, "smoa_dense": dense}
    if merged is not None:
        ms.update(smoa_merged=merged, smoa_merged_blocks=merged_blocks)
    return {"d_out": d_out, "d_in": d_in, "blocks": k, "ms": ms}


def test_across_puts_each_runs_ratio_under_its_name():
    runs = {"old": {"bench": [_row(4096, 4096, 2, 2.0, 4.0, 3.0, 2.7), _row(1024, 4096, 2, 1.5, 1.0)]},
            "new": {"bench": [_row(4096, 4096, 2, 3.0, 4.0)]}}
    table = kernel_tables.across(runs)
    dropout, grads = table.split("Merged form")
    assert "| 4096x4096 | 16M | 2 | 0.50 | 0.75 |" in dropout  # block / dense, run by run
    assert "| 1024x4096 | 4M | 2 | 1.50 |  |" in dropout  # a shape one run lacks: an empty cell
    assert dropout.index("4096x4096") < dropout.index("1024x4096")  # largest layers first
    # Block grads / full grads by the saving 4096 * 4096 / 2 / 8192 = 1024; the run without merged timings is empty.
    assert "| 4096x4096 | 2 | 1024 | 0.90 |  |" in grads
    assert "1024x4096" not in grads


def test_design_floor_counts_the_merged_forms_matmuls_and_bytes():
    row = {"d_out": 4096, "d_in": 4096, "blocks": 4, "ms": {"frozen_mlx": 2.0, "lora_mlx": 4.0}}
    f = kernel_tables.design_floor(row, copy_gbps=1000.0, tokens=8192)
    weights = 4096 * 4096
    moved = 8 * weights + 4 * 8192 * 8192 + 6 * weights / 4  # two merges; gathers of x and dy; the Hadamard pass
    assert f["matmuls"] == 2.25  # block gradients pay at this size: 2 + 1/K
    assert abs(f["ms"] - (2.0 * 2.25 / 2 + moved / 1e12 * 1e3)) < 1e-9
    assert abs(f["vs_lora"] - f["ms"] / 4.0) < 1e-12
    small = kernel_tables.design_floor({**row, "d_out": 1024}, copy_gbps=1000.0)
    assert small["matmuls"] == 3  # full gradients below the block-grads threshold: G as one more matmul
    assert abs(small["gb_moved"] - 14 * 1024 * 4096 / 1e9) < 1e-12  # two merges (8 B) + s G * W0 (6 B) per weight


def test_breakdown_runs_every_step_eager_and_compiled(monkeypatch):
    """The per-step breakdown the device round runs (block-gradient steps included: forced here, as the CPU's
    small layers would not take them). Its figures are not checked: only that every step runs and is reported."""
    import smoa_mlx.kernels as kernels

    monkeypatch.setattr(kernels, "block_grads_pay", lambda d_out, d_in, blocks: True)
    rows = bench_kernels.breakdown(kernels._MLX_OPS, (96, 128), blocks=4, rank=8, reps=2, tokens=32)
    steps = [r["step"] for r in rows]
    assert "gather x (block-major)" in steps and "block factor grads (G_k, Hadamard kernel, products, takes)" in steps
    assert len(steps) == 12 and all(r["ms"] > 0 and r["ms_compiled"] > 0 for r in rows)
    table = kernel_tables.markdown({"command": "-", "device": "-", "mlx": "-", "torch": "-", "breakdown": rows})
    assert "| 96x128 | 4 | G_k = dy_k^T x_k (batched) |" in table


def test_merge_kernel_table_compares_the_form_auto_runs():
    """The merge kernel's table: the default's time beside the same form with MLX's merge, for the gradients auto
    takes at each shape (block gradients at 4096x4096, K = 4; full ones at 1024x4096); runs before it, no table."""
    ms = {"smoa_merged": 2.0, "smoa_merged_blocks": 1.8, "smoa_merged_mlx_merge": 2.2,
          "smoa_merged_blocks_mlx_merge": 2.0}
    rows = [{"d_out": 4096, "d_in": 4096, "blocks": 4, "ms": ms}, {"d_out": 1024, "d_in": 4096, "blocks": 4, "ms": ms}]
    table = "\n".join(kernel_tables._merge_kernel_table(rows))
    assert "| 4096x4096 | 4 | merged, block grads | 1.80 | 2.00 | 0.90 |" in table
    assert "| 1024x4096 | 4 | merged | 2.00 | 2.20 | 0.91 |" in table
    assert kernel_tables._merge_kernel_table([_row(4096, 4096, 2, 2.0, 4.0, 3.0, 2.7)]) == []


def test_bandwidth_times_the_merge_both_ways():
    """``--bandwidth --steps merge,merge-mlx``: the merge (here plain MLX's, as on the CPU) and MLX's merge, the same
    bytes (W0 in, W out), each timed eagerly and compiled."""
    import smoa_mlx.kernels as kernels

    rows = bench_kernels.kernel_bandwidth(kernels._MLX_OPS, [(64, 128)], reps=2, only=("merge", "merge-mlx"))
    assert [r["step"] for r in rows] == ["merge", "merge-mlx"]
    assert all(r["gb"] == 2 * 64 * 128 * 2 / 1e9 and r["ms"] > 0 and r["ms_compiled"] > 0 for r in rows)


def test_rows_of_the_run_that_compared_gather_axes_are_labelled():
    """The 4628c29 run's ``--gathers --gather-along z,x`` rows say which axis and K they timed (the flag has gone
    since x shipped; its rows are still rendered)."""
    row = dict(step="gather x", blocks=4, tt=8, hadamard_ti=4, gather_along="z")
    assert kernel_tables._launch_label(row) == "8 tokens / thread, K=4 blocks along z"
    assert kernel_tables._launch_label(dict(row, step="scatter")) == "8 tokens / thread"  # one TT for all, then


def test_sweep_rows_label_each_mover_with_its_own_tokens_per_thread():
    """Since f45b8b6 the scatters run 4 tokens per thread and the gathers 8: an unswept run's rows say so, and a
    ``--tt`` sweep sets both."""
    from smoa_mlx.kernels import blocks

    _, shipped = bench_kernels._with_variant(lambda: None)
    assert (shipped["tt"], shipped["scatter_tt"]) == (8, 4)
    assert kernel_tables._launch_label(dict(step="scatter+add", **shipped)) == "4 tokens / thread"
    assert kernel_tables._launch_label(dict(step="gather dy", **shipped)) == "8 tokens / thread"
    seen, swept = bench_kernels._with_variant(lambda: (blocks.TT, blocks.SCATTER_TT), tt=16)
    assert seen == (16, 16) and swept["scatter_tt"] == 16 and (blocks.TT, blocks.SCATTER_TT) == (8, 4)


def test_gather_along_table_reads_the_x_column_where_auto_takes_block_grads():
    """The per-layer rows' gathers-along-x column: x / z per shape, and auto / MLX LoRA as it would be with x (only
    where auto takes block gradients; 1024x4096 keeps full ones)."""
    big = _row(4096, 4096, 4, 2.0, 4.0, 2.2, 2.1)
    big["ms"].update(smoa_merged_blocks_gather_x=1.9, lora_mlx=2.0)
    small = _row(1024, 4096, 4, 1.0, 1.2, 0.9, 1.0)
    small["ms"].update(smoa_merged_blocks_gather_x=0.95, lora_mlx=1.2)
    table = "\n".join(kernel_tables._variant_tables([big, small]))
    assert "| 4096x4096 | 4 | merged, block grads | 2.10 | 1.90 | 0.90 | 1.05x | 0.95x |" in table
    assert "| 1024x4096 | 4 | merged | 1.00 | 0.95 | 0.95 | 0.75x | 0.75x |" in table
    assert "K=4: auto / MLX LoRA with the gathers along x 0.85x" in table
    assert kernel_tables._variant_tables([_row(4096, 4096, 2, 2.0, 4.0, 3.0, 2.7)]) == []


def test_layers_step_runs_each_layer_on_its_own_inputs():
    """The amortized columns' call: every layer's forward + backward on its own scaled copy of x and the cotangent,
    the same values as one vjp per layer (nothing shared or dropped by the compiled call)."""
    import mlx.core as mx
    import numpy as np

    fn0, t0 = bench_kernels._lora_layer(24, 16, 2)
    fn1, t1 = bench_kernels._frozen_layer(24, 16)
    x, cot = mx.random.normal((5, 16)).astype(mx.bfloat16), mx.random.normal((5, 24)).astype(mx.bfloat16)
    got = bench_kernels._layers_step([(fn0, t0), (fn1, t1)], x, cot)()
    for i, (fn, trainable) in enumerate([(fn0, t0), (fn1, t1)]):
        scale = 1 + i / 64
        want = mx.vjp(fn, [x * scale, *trainable], [cot * scale])
        for g, w in zip(got[i][0] + got[i][1], want[0] + want[1]):
            assert np.array_equal(np.asarray(g.astype(mx.float32)), np.asarray(w.astype(mx.float32)))
    assert len(got[0][1]) == 3 and len(got[1][1]) == 1  # LoRA: dx, dA, dB; frozen: dx


def test_amortized_table_reports_both_ways_per_call():
    row = _row(4096, 4096, 4, 2.0, 4.0, 2.2, 2.1)
    row["ms"]["lora_mlx"] = 2.0
    row["ms_amortized"] = dict(amortized=8, frozen_mlx=0.9, lora_mlx=1.5, smoa_auto=1.2)
    table = "\n".join(kernel_tables._amortized_table([row]))
    assert "| 4096x4096 | 4 | 0.90 | 1.50 | 1.20 | 0.80x | 1.05x |\n" in table
    assert "K=4, medians over the shapes: auto / MLX LoRA 0.80x (8 per call), 1.05x (one per call).  " in table
    row["ms_amortized"]["smoa_auto_gather_x"] = 1.14  # the run at 4628c29 also timed the gathers along x
    table = "\n".join(kernel_tables._amortized_table([row]))
    assert "| 4096x4096 | 4 | 0.90 | 1.50 | 1.20 | 0.80x | 1.05x | 1.14 | 0.76x |" in table
    assert "1.05x (one per call); with the gathers along x 0.76x.  " in table
    assert kernel_tables._amortized_table([_row(4096, 4096, 2, 2.0, 4.0, 3.0, 2.7)]) == []


def test_join_keeps_each_parts_rows_and_copy_ceiling():
    """A per-layer run split over two device calls joins into one file whose floor table reads each row against its
    own machine's copy ceiling."""
    a = dict(command="python scripts/bench_kernels.py --shapes 4096x4096", copy_gbps=1000.0,
             bench=[_row(4096, 4096, 4, 2.0, 4.0, 2.2, 2.1)], bandwidth=[dict(step="gather x")])
    b = dict(command="python scripts/bench_kernels.py --shapes 1024x4096", copy_gbps=3300.0,
             bench=[_row(1024, 4096, 4, 1.0, 1.2, 0.9, 1.0)])
    for part in (a, b):
        part["bench"][0]["ms"].update(frozen_mlx=1.0, lora_mlx=2.0)
        part["bench"][0]["rank"] = 16
    joined = kernel_tables.join([a, b])
    assert joined["command"] == a["command"] + " ; " + b["command"]
    assert [r["copy_gbps"] for r in joined["bench"]] == [1000.0, 3300.0] and len(joined["bandwidth"]) == 1
    table = "\n".join(kernel_tables._design_floor_table(joined["bench"], joined["copy_gbps"]))
    assert "copy ceiling, 1000 and 3300 GB/s" in table
    small = [line for line in table.splitlines() if line.startswith("| 1024x4096")][0]
    floor_ms = float(small.split("|")[5])
    assert floor_ms == round(kernel_tables.design_floor(joined["bench"][1], 3300.0)["ms"], 2) != round(
        kernel_tables.design_floor(joined["bench"][1], 1000.0)["ms"], 2)


def test_per_layer_run_times_the_variants(monkeypatch):
    """The per-layer run, end to end on a tiny shape with plain-MLX ops (as a GPU run, without kernels or PyTorch):
    every form timed, and a launch-constant variant in both merged forms and in auto with several layers per call,
    timed (and so traced) with its constants set and the shipped ones back afterwards, rendered as its own table."""
    from smoa_mlx.kernels import source
    from smoa_mlx.kernels.blocks import MlxOps

    monkeypatch.setattr(bench_kernels, "TOKENS", 32)
    monkeypatch.setattr(bench_kernels, "TIMED_VARIANTS", {"merge_ti4": dict(merge_ti=4)})
    monkeypatch.setitem(kernel_tables.VARIANTS, "merge_ti4", "the merge at 4 rows per thread")
    seen = []
    timed, amortized_ms = bench_kernels._median_time, bench_kernels._amortized_ms

    def recording(fn):
        def run(*args, **kwargs):
            seen.append(source.MERGE_TI)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(bench_kernels, "_median_time", recording(timed))
    monkeypatch.setattr(bench_kernels, "_amortized_ms", recording(amortized_ms))
    rows = bench_kernels.bench(MlxOps(), shapes=[(64, 48)], ranks=[8], with_torch=False, amortized=2)
    assert [r["blocks"] for r in rows] == list(bench_kernels.BLOCKS)
    for r in rows:
        assert all(r["ms"][f"smoa_merged{g}{v}"] > 0 for g in ("", "_blocks") for v in ("", "_merge_ti4"))
        assert r["ms_amortized"]["smoa_auto"] > 0 and r["ms_amortized"]["smoa_auto_merge_ti4"] > 0
    assert set(seen) == {8, 4} and source.MERGE_TI == 8
    table = kernel_tables.markdown({"command": "-", "mlx": "-", "device": "cpu", "torch": "-", "bench": rows})
    assert "as shipped and with the merge at 4 rows per thread" in table
    assert "auto, the merge at 4 rows per thread |" in table  # the amortized table's column
    line = next(ln for ln in table.splitlines() if ln.startswith("| 64x48 | 4 | merged |"))
    # a 64x48 layer takes full gradients: auto as shipped and its variant are the full-gradient merged form's
    assert float(line.split("|")[4]) == round(rows[1]["ms"]["smoa_merged"], 2)
    assert float(line.split("|")[5]) == round(rows[1]["ms"]["smoa_merged_merge_ti4"], 2)


def test_join_refuses_parts_of_different_runs(tmp_path, capsys):
    """Parts timed at other token counts are not one run: the error names the part that differs; an unreadable
    part is named too, and nothing is written."""
    a = dict(command="a", tokens=8192, device="NVIDIA H200", mlx="0.32.4", bench=[])
    b = dict(a, command="b", tokens=4096)
    with pytest.raises(ValueError, match="b.json: tokens 4096, but a.json has 8192"):
        kernel_tables.join([a, b], ["a.json", "b.json"])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "bad.json").write_text("{")
    out = tmp_path / "joined.json"
    with pytest.raises(SystemExit):
        bench_kernels.main(["--join", str(tmp_path / "a.json"), str(tmp_path / "bad.json"), "--out", str(out)])
    assert "bad.json" in capsys.readouterr().err and not out.exists()


def test_verification_runs_every_form_on_the_cpu():
    """The GPU verification's forms with plain-MLX steps on a small ragged case: each within float32's tolerance of
    float64; the side-stream column (f1410eb, since removed) shows only for the runs that have it."""
    from smoa_mlx.kernels.blocks import MlxOps

    rows = bench_kernels.verify(MlxOps(), [(30, 20, 3, 7, 0, None, 16)], 60, ("float32",))
    assert all(rows[0][f"{form}_rel_err"] < 1e-5 for form in bench_kernels.VERIFY_FORMS) and rows[0]["ok"]
    table = kernel_tables.markdown({"command": "-", "mlx": "-", "device": "cpu", "verify": rows})
    assert "side stream" not in table and "| 30x20 | 3 | 7 | - | float32 | 16 |" in table
    old = [dict(rows[0], merged_blocks_side_rel_err=2e-6)]
    assert "| the same, side stream |" in kernel_tables.markdown({"command": "-", "mlx": "-", "device": "cpu",
                                                                   "verify": old})


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")
def test_merge_variants_check_bit_for_bit_against_the_shipped_merge(monkeypatch):
    """The GPU run's check of the merge variants (here two of its rows per thread), with the Metal rendering under
    the CPU shim: every variant, shape, K and type compared, the launch constants in force while each variant runs,
    the shipped ones back after."""
    from metal_emulator import run_launch

    from smoa_mlx.kernels import source
    from smoa_mlx.kernels.blocks import KernelOps

    monkeypatch.setattr(bench_kernels, "TIMED_VARIANTS", {"merge_ti4": dict(merge_ti=4), "merge_ti2": dict(merge_ti=2)})
    rows_per_thread = []

    def run(launch):
        rows_per_thread.append(dict(launch.template)["TI"])
        return run_launch(launch)

    rows = bench_kernels.check_merge_variants(KernelOps(run), [(64, 48)], rank=8)
    assert len(rows) == len(bench_kernels.BLOCKS) * 2 * 2
    assert all(r["ok"] and r["mismatches"] == 0 for r in rows)
    assert {r["kernel"] for r in rows} == {"merge merge_ti4", "merge merge_ti2"}
    assert rows_per_thread[:3] == [8, 4, 2]  # the first shape, K and type: the shipped merge, then each variant
    assert source.MERGE_TI == 8
