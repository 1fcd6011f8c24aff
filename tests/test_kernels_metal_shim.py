"""The Metal rendering of the SMoA kernels, proven on the CPU: MLX's generated Metal source, compiled by g++
against tests/metal_shim/shim.h and run under its threadgroup emulator (outputs poisoned with NaN first), inside the
block form's forward and custom VJP, must match float64 numpy: ragged groups, a zero-rank block, K = 1, dense and
2/4/8-bit bases (3-bit and mxfp4/nvfp4/mxfp8: the kernels' gathers with plain-MLX anchors), float16/bfloat16/float32,
gradients included;
the gathers and scatters with 16-byte vectors and with their narrower fallbacks (widths not a multiple of 8), and
alone, bit for bit against plain MLX over several threadgroups, ragged padded blocks and token counts that are not
a multiple of a thread's tokens. The shim is built with UBSan's alignment check, so an access through a 16-byte
vector at a misaligned address stops the run: these runs also prove the alignment."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import check_against_float64, make_layer
from smoa_mlx.kernels import source
from smoa_mlx.kernels.blocks import KernelOps, MlxOps, block_fn
from smoa_mlx.kernels.gpu import Launch
from smoa_mlx.kernels.plan import BlockLayout, build_plan, padded_dims

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the Metal shim")

CASES = [
    # d_in, d_out, rank, blocks, dtype, bits, group_size, branch_ranks, lead shape, with_base
    pytest.param(70, 150, 6, 3, mx.float32, 0, 64, None, (2, 37), True, id="dense-f32-K3-ragged"),
    pytest.param(128, 96, 8, 2, mx.float16, 4, 32, None, (20,), True, id="q4-f16-K2"),
    pytest.param(128, 72, 8, 4, mx.bfloat16, 8, 64, [3, 0, 2, 3], (9,), True, id="q8-bf16-K4-zero-rank-block"),
    pytest.param(128, 40, 5, 1, mx.bfloat16, 2, 32, None, (11,), False, id="q2-bf16-K1-update-alone"),
    pytest.param(96, 64, 40, 2, mx.float16, 0, 64, None, (5,), False, id="dense-f16-rank20-per-block"),
    pytest.param(192, 50, 6, 2, mx.float32, 3, 64, None, (7,), True, id="q3-f32-mlx-anchors"),
    # MLX's other quantization modes: the kernels' gathers and scatters, plain-MLX anchors (never the kernels').
    pytest.param(128, 96, 8, 2, mx.bfloat16, "mxfp4", 0, None, (20,), True, id="mxfp4-bf16-K2"),
    pytest.param(64, 70, 6, 3, mx.float16, "nvfp4", 0, None, (2, 9), False, id="nvfp4-f16-K3-update-alone"),
    pytest.param(128, 72, 8, 4, mx.float32, "mxfp8", 0, [3, 0, 2, 3], (9,), True, id="mxfp8-f32-K4-zero-rank-block"),
]
TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}

# The elements per gather/scatter thread (VEC) these cases must launch: 16-byte vectors for the block-major sides
# (M, N multiples of 8), the widest power of two dividing d for the scatters into the original basis.
VEC_CASES = [
    # d_in, d_out, rank, blocks, dtype, lead, with_base, {(kernel, VEC) launched}
    pytest.param(75, 300, 6, 3, mx.float16, (13,), True,
                 {("gather", 8), ("scatter_add", 4), ("scatter_add", 1)}, id="f16-d300-vec4-d75-scalar"),
    pytest.param(45, 33, 4, 2, mx.bfloat16, (3, 5), False,
                 {("gather", 8), ("scatter", 1)}, id="bf16-odd-widths-scalar"),
    pytest.param(33, 27, 4, 3, mx.float32, (9,), True,
                 {("gather", 4), ("scatter_add", 1)}, id="f32-odd-widths-scalar"),
    pytest.param(64, 48, 4, 2, mx.float32, (17,), False,
                 {("gather", 4), ("scatter", 4)}, id="f32-all-vectors"),
]


def _recording(launches: list):
    from metal_emulator import run_launch

    def run(launch: Launch):
        launches.append(launch)
        return run_launch(launch)

    run.backend = run_launch.backend
    return run


@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,bits,gs,branch,lead,with_base", CASES)
def test_metal_rendering_matches_float64(d_in, d_out, rank, blocks, dtype, bits, gs, branch, lead, with_base):
    launches: list[Launch] = []
    layer = make_layer(d_in, d_out, rank, blocks, dtype, bits, gs, branch, seed=d_in + d_out)
    fn = block_fn(layer.layout, KernelOps(_recording(launches)), with_base)
    check_against_float64(layer, fn, lead, with_base, TOL[dtype])
    kernels = {la.kernel for la in launches}
    assert kernels >= {"gather", "scatter_add" if with_base else "scatter"}
    # The anchored kernels read dense and 2/4/8-bit affine bases themselves, and nothing else.
    assert (kernels >= set(source.BLOCK_ANCHORED)) == (bits in (0, 2, 4, 8))
    assert "merge" not in kernels  # the merged form's
    assert any(la.quantized for la in launches) == (bits in (2, 4, 8))


@pytest.mark.parametrize("d_in,d_out,rank,blocks,dtype,lead,with_base,vecs", VEC_CASES)
def test_vector_and_scalar_paths_match_float64(d_in, d_out, rank, blocks, dtype, lead, with_base, vecs):
    launches: list[Launch] = []
    layer = make_layer(d_in, d_out, rank, blocks, dtype, seed=d_in + d_out)
    check_against_float64(layer, block_fn(layer.layout, KernelOps(_recording(launches)), with_base), lead,
                          with_base, TOL[dtype])
    launched = {(la.kernel, dict(la.template)["VEC"]) for la in launches if la.kernel in source.MOVERS}
    assert launched == vecs


def _bits(a: mx.array) -> np.ndarray:
    """The raw bits: equal bits mean an exact copy, and the shim's NaN poison never equals a written value."""
    return np.asarray(a.view({mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}[a.dtype]))


@pytest.mark.parametrize("dtype,tt", [(mx.float32, None), (mx.float16, None), (mx.bfloat16, None), (mx.bfloat16, 4),
                                      (mx.bfloat16, 16)], ids=["f32", "f16", "bf16", "bf16-tt4", "bf16-tt16"])
def test_movers_copy_exactly(dtype, tt, monkeypatch):
    """Gather, scatter (16-byte vectors: d = 2104) and scatter_add (scalar: d = 2105) alone against MlxOps, bit for
    bit: two threadgroups across the columns, the second partly idle, a block padded with -1 from 5 columns to 8
    (zeros out), 13 tokens (not a multiple of TT). ``tt``: the kernels launched at other tokens per thread than
    shipped, as ``bench_kernels.py --gathers --tt`` times them on a GPU."""
    if tt is not None:
        monkeypatch.setattr("smoa_mlx.kernels.blocks.TT", tt)
        monkeypatch.setattr("smoa_mlx.kernels.blocks.SCATTER_TT", tt)
    launches: list[Launch] = []
    ops, ref = KernelOps(_recording(launches)), MlxOps()
    rng = np.random.default_rng(7)
    n_tok, d_out, d_in = 13, 2104, 2105
    layout = BlockLayout((1100, 1004), (2100, 5), (1, 1), 1.0)
    K, M, N, _ = padded_dims(layout)
    plan = build_plan(layout, rng.permutation(d_out), rng.permutation(d_in))
    new = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)  # noqa: E731
    x, yb, base = new(n_tok, d_in), new(K, n_tok, M), new(n_tok, d_in)
    # col_slot scatters back into d_in = 2105 columns (the scalar path); row_slot into d_out = 2104 (vectors).
    xb = ref.gather(x, plan.col_src, K, N)
    assert np.array_equal(_bits(ops.gather(x, plan.col_src, K, N)), _bits(xb))
    assert np.array_equal(_bits(ops.scatter(yb, plan.row_slot, None, dtype)), _bits(ref.scatter(yb, plan.row_slot,
                                                                                                 None, dtype)))
    got = ops.scatter(xb, plan.col_slot, base, dtype)
    assert np.array_equal(_bits(got), _bits(ref.scatter(xb, plan.col_slot, base, dtype)))
    vec = source.vector_width(d_out, dtype)
    assert [(la.kernel, dict(la.template)["VEC"]) for la in launches] == list(zip(source.MOVERS,
                                                                                 (16 // dtype.size, vec, 1)))
    assert [dict(la.template)["TT"] for la in launches] == [tt or source.TT] + 2 * [tt or source.SCATTER_TT]
    threads = -(-N // (16 // dtype.size))  # one per VEC columns of a block, in whole groups
    per_block = -(-threads // source.GROUP) * source.GROUP
    assert launches[0].grid[0] == per_block * K and launches[0].grid[2] == 1  # the K blocks along x


def test_gather_of_four_ragged_blocks():
    """The gather with K = 4 ragged blocks (columns 300, 300, 299, 299: one thread group each, padded to 304, along
    the grid's x): the same bits as plain MLX, every block in its own place."""
    rng = np.random.default_rng(3)
    layout = BlockLayout((8, 8, 8, 8), (300, 300, 299, 299), (1, 1, 1, 1), 1.0)
    K, M, N, _ = padded_dims(layout)
    plan = build_plan(layout, rng.permutation(32), rng.permutation(1198))
    x = mx.array(rng.standard_normal((9, 1198)).astype(np.float32)).astype(mx.bfloat16)
    launches: list[Launch] = []
    got = KernelOps(_recording(launches)).gather(x, plan.col_src, K, N)
    assert np.array_equal(_bits(got), _bits(MlxOps().gather(x, plan.col_src, K, N)))
    assert launches[0].grid == (256 * K, 2, 1)


@pytest.mark.parametrize("bits,branch", [(0, [4, 0, 2]), (4, None)], ids=["dense-zero-rank-block", "q4"])
def test_merge_rows_per_thread_change_only_the_mapping(bits, branch, monkeypatch):
    """The merge kernel at 4 and 2 rows per thread writes the same bits as at 8 (source.MERGE_TI, shipped): the same
    sums in the same order. Ragged ranks, one of them 0, and blocks whose rows are not a multiple of 4 or 8."""
    from smoa_mlx.kernels.dense import full_factors, full_weight

    layer = make_layer(96, 75, 6, 3, mx.bfloat16, bits, 32, branch, seed=12)
    layout, parts = layer.layout, layer.weight_parts()
    plan = build_plan(layout, np.asarray(layer.index[0]), np.asarray(layer.index[1]))
    full = full_factors(layout, layer.index, layer.smoa_factors, mx.bfloat16)
    launches: list[Launch] = []
    ops = KernelOps(_recording(launches))
    outs = []
    for ti in (8, 4, 2):
        monkeypatch.setattr(source, "MERGE_TI", ti)
        outs.append(ops.merge(layout, plan, parts, *full, mx.bfloat16))
    assert [dict(la.template)["TI"] for la in launches] == [8, 4, 2]
    assert 0 in layout.ranks or branch is None
    assert all(np.array_equal(_bits(outs[0]), _bits(o)) for o in outs[1:])
    assert not np.array_equal(_bits(outs[0]), _bits(full_weight(parts, layout).astype(mx.bfloat16)))


@pytest.mark.parametrize("bits", [0, 4], ids=["dense", "q4"])
def test_hadamard_rows_per_thread_change_only_the_mapping(bits, monkeypatch):
    """The Hadamard kernel at 4 rows per thread (source.HADAMARD_TI, shipped) writes the same bits as at 16 (the
    modulate kernel's TI, shipped before), and matches plain MLX: ragged blocks whose rows are not a multiple of
    either, a 4-bit base's anchors dequantized in the kernel."""
    layer = make_layer(96, 75, 6, 3, mx.bfloat16, bits, 32, seed=11)
    K, M, N, _ = padded_dims(layer.layout)
    plan = build_plan(layer.layout, np.asarray(layer.index[0]), np.asarray(layer.index[1]))
    g = mx.array(np.random.default_rng(3).standard_normal((K, M, N)).astype(np.float32)).astype(mx.bfloat16)
    launches: list[Launch] = []
    ops = KernelOps(_recording(launches))
    monkeypatch.setattr(source, "HADAMARD_TI", 16)
    more = ops.hadamard(layer.layout, plan, layer.weight_parts(), g)
    monkeypatch.setattr(source, "HADAMARD_TI", 4)
    fewer = ops.hadamard(layer.layout, plan, layer.weight_parts(), g)
    assert [dict(la.template)["TI"] for la in launches] == [16, 4]
    assert launches[1].grid[1] == -(-M // 4) and launches[0].grid[1] == -(-M // 16)
    assert np.array_equal(_bits(more), _bits(fewer))
    # Plain MLX fills the padding from clamped anchors (nothing reads it); compare the blocks' own entries, within
    # bf16 roundings (plain MLX rounds a quantized base's dequantized anchors to bf16 first; the file's bf16 TOL).
    want = MlxOps().hadamard(layer.layout, plan, layer.weight_parts(), g)
    real = (np.array(plan.row_src).reshape(K, M, 1) >= 0) & (np.array(plan.col_src).reshape(K, 1, N) >= 0)
    got, ref = np.array(fewer.astype(mx.float32)), np.array(want.astype(mx.float32))
    np.testing.assert_allclose(got[real], ref[real], rtol=TOL[mx.bfloat16], atol=1e-4)
    assert not got[~real].any()


def test_scatter_rounds_once_into_a_narrower_type():
    """float32 block-major results plus a bfloat16 base into a bfloat16 output: each element summed in float and
    rounded once, as MLX does (VEC 8, set by the 2-byte output)."""
    rng = np.random.default_rng(3)
    layout = BlockLayout((300, 212), (8, 8), (1, 1), 1.0)
    K, M, _, _ = padded_dims(layout)
    plan = build_plan(layout, rng.permutation(512), rng.permutation(16))
    yb = mx.array(rng.standard_normal((K, 11, M)).astype(np.float32))
    base = mx.array(rng.standard_normal((11, 512)).astype(np.float32)).astype(mx.bfloat16)
    launches: list[Launch] = []
    got = KernelOps(_recording(launches)).scatter(yb, plan.row_slot, base, mx.bfloat16)
    assert np.array_equal(_bits(got), _bits(MlxOps().scatter(yb, plan.row_slot, base, mx.bfloat16)))
    assert dict(launches[0].template)["VEC"] == 8


def test_vector_width():
    assert source.vector_width(4096, mx.bfloat16) == 8 and source.vector_width(4096, mx.float32) == 4
    assert source.vector_width(300, mx.bfloat16) == 4 and source.vector_width(150, mx.float32) == 2
    assert source.vector_width(75, mx.float16) == 1
    assert source.vector_width(40, mx.bfloat16, mx.float32) == 4  # the widest type sets the 16 bytes


def test_misaligned_vector_store_faults_in_the_shim():
    """The shim's net under the alignment contract: rows of 12 halves (24 bytes) cannot take 16-byte stores. UBSan
    (metal_emulator._FLAGS) stops the run at the first store through a misaligned 16-byte vector."""
    from metal_emulator import run_launch

    inp = mx.arange(5 * 30).reshape(5, 30).astype(mx.float16)
    dims = mx.array([5, 30, 12, 256], dtype=mx.int32)  # n_tok, width, P, threads per block
    launch = Launch("gather", False, [inp, mx.arange(24, dtype=mx.int32), dims],
                    [("T", mx.float16), ("TT", source.TT), ("VEC", 8)], (256, 1, 2), (256, 1, 1),
                    [(2, 5, 12)],
                    [mx.float16])
    with pytest.raises(RuntimeError, match=r"(?s)emulated kernel failed.*misaligned address.*smoa_vec"):
        run_launch(launch)


def test_one_body_renders_both_backends():
    """The Metal and CUDA kernels differ only in the vocabulary spellings, never in the computation."""
    for kernel in source.KERNELS:
        for quantized in (False, True):
            metal = source.render(kernel, "metal", quantized)
            cuda = source.render(kernel, "cuda", quantized)
            assert metal.input_names == cuda.input_names and metal.output_names == cuda.output_names
            assert "thread_position_in_grid" in metal.source and "blockIdx" in cuda.source
            assert "blockIdx" not in metal.source and "thread_position_in_grid" not in cuda.source
            back = []
            for text, backend in ((metal.source, "metal"), (cuda.source, "cuda")):
                for token, spelled in sorted(source._VOCAB[backend].items(), key=lambda kv: -len(kv[1])):
                    text = text.replace(spelled, token)
                back.append(text)
            assert back[0] == back[1]
    with pytest.raises(ValueError, match="unknown SMoA kernel"):
        source.render("fused", "metal")


def test_probe_compiles_every_kernel_and_no_quantized_matmul(monkeypatch):
    """The first-use probe (kernels._probe) runs each kernel rendering a model can need, under the Metal shim here,
    and nothing else that compiles slowly: MLX's quantized matmuls took 19-28 s to compile each on CUDA, and the
    probe's group size would not be the model's. The quantized renderings are probed only for quantized bases."""
    import smoa_mlx.kernels as kernels

    monkeypatch.setattr(kernels, "_probed", {})
    launches, qmm = [], []
    real_qmm = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: qmm.append(1) or real_qmm(*a, **k))
    ops = KernelOps(_recording(launches))
    assert kernels._probe(ops)
    dense = {(launch.kernel, launch.quantized) for launch in launches}
    # The 16-byte vector paths a model's layers take, in every float type (the probe checks their values too).
    vector_bytes = {(la.kernel, dict(la.template)["VEC"] * dict(la.template)["OT"].size) for la in launches
                    if la.kernel in ("merge", "scatter_add")}
    assert vector_bytes == {("merge", 16), ("scatter_add", 16)}
    assert not any(q for _, q in dense)  # a model without quantized layers compiles no quantized rendering
    launches.clear()
    assert kernels._probe(ops, quantized=True)
    quantized = {(launch.kernel, launch.quantized) for launch in launches}
    every = {(k, False) for k in source.KERNELS} | {(k, True) for k in source.ANCHORED}
    assert dense | quantized == every
    assert qmm == []
    assert set(kernels._probed) == {(ops.name, q, t) for q in (False, True) for t in kernels.FLOAT_TYPES}


def test_probe_compiles_only_the_float_type_a_layer_computes_in(monkeypatch):
    """A bf16 model probes the bf16 instantiations alone (each float type is its own set of compiles: on an H200 the
    probe of all three took 30 s for a bf16 model); a later call in float32 probes float32 then, once."""
    import smoa_mlx.kernels as kernels
    from smoa_mlx.kernels import BlockLayout, linear_fn

    launches = []
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "_kernel_ops", {"metal": KernelOps(_recording(launches))})
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    layout = BlockLayout((8, 8), (16, 16), (2, 2), 1.0)
    linear_fn(layout, mx.bfloat16)
    types = lambda: {dict(la.template).get("T", dict(la.template).get("OT")) for la in launches}  # noqa: E731
    assert types() == {mx.bfloat16}
    launches.clear()
    linear_fn(layout, mx.bfloat16)
    assert launches == []  # probed once
    linear_fn(layout, mx.float32)
    assert types() == {mx.float32}


def test_probe_rejects_kernels_that_run_but_compute_wrong_values(monkeypatch):
    """A kernel that compiles and runs but returns wrong values (here the merge kernel's output scaled) fails the
    probe, with one warning, so the model trains through plain MLX instead of on a wrong W0 + Delta W."""
    import smoa_mlx.kernels as kernels
    from metal_emulator import run_launch

    def run(launch):
        out = run_launch(launch)
        return [o * 1.5 for o in out] if launch.kernel == "merge" else out

    run.backend = run_launch.backend
    monkeypatch.setattr(kernels, "_probed", {})
    with pytest.warns(RuntimeWarning, match="differs from plain MLX"):
        assert not kernels._probe(KernelOps(run))
    assert kernels._probe(KernelOps(run_launch), quantized=True)  # the real kernels agree


@pytest.mark.parametrize("form", ["auto", "kernel"])
@pytest.mark.parametrize("bits", ["mxfp4", 3])
def test_gpu_dispatch_of_a_base_the_kernels_cannot_read_launches_only_movers(form, bits, monkeypatch):
    """On a GPU (Metal, here its shim), an mxfp4 or a 3-bit affine base's layer as the dispatcher builds it
    (kernels.linear_fn, delta_fn): ``auto``'s merged form with block gradients (forced at this small size) and the
    block form (``kernel``) match float64 through the kernels' gathers and scatters; the probe runs the dense
    renderings only, and no kernel ever reads the base (its anchors come from MLX's own dequantization)."""
    import smoa_mlx.kernels as kernels

    launches: list[Launch] = []
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_probed", {})
    monkeypatch.setattr(kernels, "_kernel_ops", {"metal": KernelOps(_recording(launches))})
    monkeypatch.setattr(kernels, "MERGED_BLOCK_GRADS_MIN_SAVING", 0.0)  # block gradients, as for a large layer
    monkeypatch.setenv(kernels.KERNEL_ENV, form)
    layer = make_layer(96, 64, 6, 2, mx.float16, bits, group_size=32, seed=5)
    fn = kernels.linear_fn(layer.layout)
    assert {key[:2] for key in kernels._probed} == {("metal", False)}  # (backend, quantized) in every float type
    assert not any(la.quantized for la in launches)  # the probe: dense renderings only
    launches.clear()
    check_against_float64(layer, fn, (2, 5), True, TOL[mx.float16])
    if form == "kernel":
        check_against_float64(layer, kernels.delta_fn(layer.layout), (2, 5), False, TOL[mx.float16])
    assert "gather" in {la.kernel for la in launches}
    assert {la.kernel for la in launches} <= set(source.MOVERS)
