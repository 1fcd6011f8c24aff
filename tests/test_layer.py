"""SMoALinear against the float64 numpy reference: groups, Delta W, outputs, gradients, fuse, memory, errors."""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from smoa_mlx import SMoALinear
from smoa_mlx.kernels import factor_views
from reference_numpy import ref_delta, ref_dequantize, ref_dequantize_fp, ref_groups, ref_layer, ref_order, ref_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_peak import step_peak  # noqa: E402


def _base(d_in, d_out, bias=True, seed=0):
    mx.random.seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    mx.eval(base.parameters())
    return base


def _randomize_b(layer, seed=1):
    mx.random.seed(seed)
    layer.smoa_b = [mx.random.normal(b.shape) * 0.5 for b in layer.smoa_b]
    mx.eval(layer.parameters())


def _np(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _dense_weight(layer):
    base = layer.linear
    if isinstance(base, nn.QuantizedLinear) and base.mode != "affine":
        return ref_dequantize_fp(np.array(base.weight), np.array(base.scales), base.group_size, base.bits, base.mode)
    if isinstance(base, nn.QuantizedLinear):
        return ref_dequantize(np.array(base.weight), _np(base.scales), _np(base.biases), base.group_size, base.bits)
    return _np(base.weight)


MODES = ["mxfp4", "nvfp4", "mxfp8"]  # MLX's quantization modes without biases (8-bit scale codes)


def _microscaled(mode, d_in=64, d_out=48, dtype=mx.float32):
    """A QuantizedLinear in ``mode`` with a bias, from a ``dtype`` linear (the mode keeps no float weight array)."""
    base = _base(d_in, d_out)
    base.set_dtype(dtype)
    quantized = nn.QuantizedLinear.from_linear(base, mode=mode)
    quantized.bias = base.bias
    return quantized


CASES = [
    # d_in, d_out, rank, blocks, branch_ranks
    (32, 32, 8, 2, None),  # square
    (48, 20, 6, 2, None),  # wide
    (20, 52, 6, 2, None),  # tall
    (37, 29, 5, 3, None),  # dims and rank not divisible by K
    (40, 24, 6, 3, [3, 0, 3]),  # explicit branch ranks with an empty block
    (24, 40, 4, 2, [1, 3]),
    (30, 18, 4, 1, None),  # K = 1: HiRA
]


@pytest.mark.parametrize("d_in,d_out,rank,blocks,branch_ranks", CASES)
def test_matches_numpy_reference(d_in, d_out, rank, blocks, branch_ranks):
    base = _base(d_in, d_out)
    layer = SMoALinear.from_base(base, rank=rank, blocks=blocks, alpha=2.0 * rank, branch_ranks=branch_ranks)
    _randomize_b(layer)
    w = _np(base.weight)

    row_order, col_order = ref_order(w)
    for got, want in zip(layer.row_groups, ref_groups(row_order, blocks)):
        np.testing.assert_array_equal(np.array(got), want)
    for got, want in zip(layer.col_groups, ref_groups(col_order, blocks)):
        np.testing.assert_array_equal(np.array(got), want)
    ranks = ref_ranks(rank, blocks, branch_ranks)
    assert layer.ranks == ranks
    for k, (rows, cols) in enumerate(zip(ref_groups(row_order, blocks), ref_groups(col_order, blocks))):
        assert layer.smoa_a[k].shape == (ranks[k], len(cols))
        assert layer.smoa_b[k].shape == (len(rows), ranks[k])
    assert layer.scale == 2.0

    a_np = [_np(a) for a in layer.smoa_a]
    b_np = [_np(b) for b in layer.smoa_b]
    want = ref_delta(w, a_np, b_np, blocks, layer.scale)
    np.testing.assert_allclose(_np(layer.delta_weight()), want, rtol=1e-5, atol=1e-6)

    x = mx.random.normal((2, 3, d_in))
    y_want = _np(x) @ (w + want).T + _np(base.bias)
    np.testing.assert_allclose(_np(layer(x)), y_want, rtol=1e-4, atol=1e-5)


def _orders_and_delta(layer):
    """(W0, Delta W) in float64 from the reference on the dequantized base, after checking the layer's row and
    column orders and its Delta W against them."""
    w = _dense_weight(layer)
    orders = ref_order(w)
    np.testing.assert_array_equal(np.array(layer.row_order), orders[0])
    np.testing.assert_array_equal(np.array(layer.col_order), orders[1])
    delta = ref_delta(w, [_np(a) for a in layer.smoa_a], [_np(b) for b in layer.smoa_b], layer.blocks, layer.scale)
    np.testing.assert_allclose(_np(layer.delta_weight()), delta, rtol=1e-5, atol=1e-6)
    return w, delta


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_reads_dequantized_anchors(bits):
    base = nn.QuantizedLinear.from_linear(_base(64, 48), group_size=32, bits=bits)
    layer = SMoALinear.from_base(base, rank=4, blocks=2)
    _randomize_b(layer)
    _, want = _orders_and_delta(layer)
    x = mx.random.normal((5, 64))
    y_want = _np(base(x)) + _np(x) @ want.T
    np.testing.assert_allclose(_np(layer(x)), y_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_microscaled_base_orders_fuses_and_caches(mode):
    """An mxfp4 / nvfp4 / mxfp8 base: the spectral order and Delta W from its weight as the formats define it
    (reference_numpy's own decoding), fused as MLX dequantizes these modes (bfloat16: every value exact), re-quantized
    in its own mode, group size and bits, and at inference a merged copy in the input's type."""
    base = _microscaled(mode)
    layer = SMoALinear.from_base(base, rank=4, blocks=2)
    assert (layer.layout.mode, layer.layout.group_size, layer.layout.bits) == (mode, base.group_size, base.bits)
    assert len(layer.weight_parts()) == 2  # weight and scales: no biases in these modes
    _randomize_b(layer)
    w, delta = _orders_and_delta(layer)
    x = mx.random.normal((5, 64))
    live = layer(x)
    np.testing.assert_allclose(_np(live), _np(x) @ (w + delta).T + _np(base.bias), rtol=1e-4, atol=1e-5)

    fused = layer.fuse()
    assert type(fused) is nn.Linear and fused.weight.dtype == mx.bfloat16  # as mlx-lm's fuse leaves these modes
    np.testing.assert_allclose(_np(fused.weight), w + delta, rtol=2**-8, atol=1e-6)  # one bfloat16 rounding
    requant = layer.fuse(dequantize=False)
    assert isinstance(requant, nn.QuantizedLinear)
    assert (requant.mode, requant.group_size, requant.bits) == (mode, base.group_size, base.bits)
    np.testing.assert_array_equal(_np(requant.bias), _np(base.bias))
    want_w, want_scales = mx.quantize(fused.weight, mode=mode)  # W0 + Delta W quantized as the base was
    assert mx.array_equal(requant.weight, want_w).item() and mx.array_equal(requant.scales, want_scales).item()

    layer.eval()  # the inference cache: W0 + Delta W in the input's type, rebuilt for another type
    np.testing.assert_allclose(_np(layer(x)), _np(live), rtol=1e-5, atol=1e-5)
    assert layer.__dict__["_inference_cache"][1].dtype == mx.float32
    half = x.astype(mx.float16)
    assert layer(half).dtype == base(half).dtype  # float32 here: the base's float32 bias promotes both
    assert layer.__dict__["_inference_cache"][1].dtype == mx.float16


@pytest.mark.parametrize("form", ["auto", "merged", "dense", "mlx"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("mode", MODES)
def test_microscaled_base_trains_in_every_form(mode, dtype, form, monkeypatch):
    """At B = 0 the layer is its base; with B random, y, dx and every factor's gradient against float64 numpy on the
    dequantized weight, in each form a user can pick (``kernel``, the block form through the GPU kernels: under the
    Metal shim in test_kernels_metal_shim.py)."""
    monkeypatch.setenv("SMOA_MLX_KERNEL", form)
    base = _microscaled(mode, 64, 48, dtype)
    layer = SMoALinear.from_base(base, rank=6, blocks=3)
    tol = 1e-4 if dtype == mx.float32 else 1e-2
    mx.random.seed(2)
    x = mx.random.normal((2, 3, 64)).astype(dtype)
    cot = mx.random.normal((2, 3, 48)).astype(dtype)
    assert layer(x).dtype == dtype
    np.testing.assert_allclose(_np(layer(x)), _np(base(x)), rtol=tol, atol=tol)
    _randomize_b(layer)

    def call(x, factors):
        layer.smoa_factors = factors
        return layer(x)

    factors = layer.smoa_factors
    y, (dx, dfactors) = mx.vjp(call, [x, factors], [cot])
    layer.smoa_factors = factors
    da, db = factor_views(layer.layout, dfactors)
    want = ref_layer(_dense_weight(layer), _np(x), _np(cot), [_np(a) for a in layer.smoa_a],
                     [_np(b) for b in layer.smoa_b], 3, layer.scale,
                     (np.asarray(layer.row_order), np.asarray(layer.col_order)))
    want[0] = want[0] + _np(base.bias)
    for name, got, w in zip(["y", "dx", "dA0", "dA1", "dA2", "dB0", "dB1", "dB2"], [y[0], dx, *da, *db], want):
        got = _np(got).reshape(w.shape)
        err = np.linalg.norm(got - w) / np.linalg.norm(w)
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_unsupported_quantized_bases_name_the_layer():
    for mode, bits in (("int4", 4), ("mxfp4", 8), ("affine", 1)):
        base = _microscaled("mxfp4") if mode != "affine" else nn.QuantizedLinear.from_linear(_base(64, 48), bits=4)
        base.mode, base.bits = mode, bits
        with pytest.raises(ValueError, match=rf"mlp\.up: SMoA supports quantized bases in affine 2/3/4/5/6/8-bit; "
                                             rf"mxfp4 4-bit; nvfp4 4-bit; mxfp8 8-bit, got mode='{mode}' bits={bits}"):
            SMoALinear.from_base(base, name="mlp.up")
    base = _microscaled("nvfp4")
    base.global_scale = mx.array([2.0])
    with pytest.raises(ValueError, match=r"mlp\.up: SMoA does not support quantized bases with a global_scale"):
        SMoALinear.from_base(base, name="mlp.up")


def test_zero_b_forward_is_the_base_layer():
    """A fresh adapter is the base layer: bit for bit on a dense base (W0 * (1 + 0) is W0); on a quantized one the
    merged form multiplies by the dequantized weight where the base runs quantized_matmul, equal to rounding."""
    for base in (_base(40, 24), nn.QuantizedLinear.from_linear(_base(64, 32), group_size=32, bits=4)):
        layer = SMoALinear.from_base(base, rank=4, blocks=2)
        x = mx.random.normal((3, base.weight.shape[1] * (32 // getattr(base, "bits", 32))))
        if isinstance(base, nn.QuantizedLinear):
            np.testing.assert_allclose(_np(layer(x)), _np(base(x)), rtol=1e-5, atol=1e-6)
        else:
            assert mx.array_equal(layer(x), base(x))


def test_gradients_match_dense_autograd():
    base = _base(36, 28)
    layer = SMoALinear.from_base(base, rank=5, blocks=3)
    _randomize_b(layer)
    x = mx.random.normal((4, 36))
    target = mx.random.normal((4, 28))

    def loss_fast(params, x):
        layer.update(params)
        return ((layer(x) - target) ** 2).sum()

    def loss_dense(params, x):
        layer.update(params)
        return ((base(x) + x @ layer.delta_weight().T - target) ** 2).sum()

    params = layer.trainable_parameters()
    g_fast, gx_fast = mx.grad(loss_fast, argnums=(0, 1))(params, x)
    g_dense, gx_dense = mx.grad(loss_dense, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(_np(g_fast["smoa_factors"]), _np(g_dense["smoa_factors"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(gx_fast), _np(gx_dense), rtol=1e-4, atol=1e-5)
    trainable = {k.split(".")[0] for k, _ in tree_flatten(params)}
    assert trainable == {"smoa_factors"}  # one array per layer, whatever K


def test_dropout_only_touches_the_update_path():
    base = _base(32, 16)
    layer = SMoALinear.from_base(base, rank=4, blocks=2, dropout=0.5)
    x = mx.random.normal((8, 32))
    assert mx.array_equal(layer(x), base(x))  # B = 0: dropout on x must not leak into the base path
    _randomize_b(layer)
    layer.eval()
    np.testing.assert_allclose(_np(layer(x)), _np(base(x) + x @ layer.delta_weight().T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_fuse_equals_base_plus_delta(quantized):
    base = _base(64, 48)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=8)
    layer = SMoALinear.from_base(base, rank=6, blocks=2)
    _randomize_b(layer)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    want = _dense_weight(layer) + _np(layer.delta_weight())
    np.testing.assert_allclose(_np(fused.weight), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_np(fused.bias), _np(base.bias))
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(_np(fused(x)), _np(layer(x)), rtol=1e-4, atol=1e-4)
    if quantized:
        requant = layer.fuse(dequantize=False)
        assert isinstance(requant, nn.QuantizedLinear) and requant.bits == 8 and requant.group_size == 32
        np.testing.assert_allclose(_np(requant(x)), _np(layer(x)), rtol=0.05, atol=0.05)


def test_layer_keeps_no_anchor_copy():
    """Besides the base, the layer holds only the factors and int32 indices: the orders, their inverses and the
    block-major plan and the whole-weight takes (kernels/plan.py), nothing of the base's size."""
    base = _base(256, 192)
    layer = SMoALinear.from_base(base, rank=8, blocks=2)
    own = [v for k, v in layer.items() if k != "linear"]
    arrays = []

    def collect(node):
        if isinstance(node, mx.array):
            arrays.append(node)
        elif isinstance(node, (list, tuple)):
            for n in node:
                collect(n)
        elif isinstance(node, dict):
            for n in node.values():
                collect(n)

    collect(own)
    indices = [a for a in arrays if a is not layer.smoa_factors]
    assert all(a.dtype == mx.int32 for a in indices)
    n_factors = layer.smoa_factors.size
    # Orders, inverses, block-major sources and slots: 4 per row and column; the packed take and its way back: 2 per
    # factor entry (the groups here are equal: no padding); the whole-weight forms' take parameters (3 per row, 4 per
    # column, and the r rank slots) and their way back (1 per factor entry). Nothing grows with rank x (d_out + d_in)
    # beyond the factors.
    assert sum(a.size for a in indices) == 4 * (192 + 256) + 2 * n_factors + (3 * 192 + 4 * 256 + 8) + n_factors
    assert sum(a.nbytes for a in arrays) < base.weight.nbytes / 4


@pytest.mark.parametrize("blocks", [2, 4])
def test_training_step_never_builds_the_dense_update(blocks, monkeypatch):
    """The block form's forward + backward peak memory stays far below what a dense Delta W (the reference's way)
    costs. (On the CPU ``auto`` runs the dense form, measured faster there, whose transient product is accepted.)"""
    monkeypatch.setenv("SMOA_MLX_KERNEL", "mlx")
    d = 1024
    base = _base(d, d, bias=False)
    layer = SMoALinear.from_base(base, rank=8, blocks=blocks)
    _randomize_b(layer)
    x = mx.random.normal((16, d))
    mx.eval(x)
    dense_bytes = d * d * 4

    step = nn.value_and_grad(layer, lambda x: layer(x).sum())

    def dense_loss(params):
        layer.update(params)
        return (base(x) + x @ layer.delta_weight().T).sum()

    dense_step = mx.value_and_grad(dense_loss)
    smoa_peak = step_peak(lambda: step(x))
    dense_peak = step_peak(lambda: dense_step(layer.trainable_parameters()))
    assert dense_peak > 2 * dense_bytes  # the measurement sees dense matrices when they are there
    assert smoa_peak < dense_peak / 3
    if blocks == 4:
        assert smoa_peak < 1.5 * dense_bytes  # K blocks of 1/4 the dense size, a few of them alive at once


def _compiled_step(n_layers: int, bits: int = 0, d: int = 256, loss=lambda y: y.sum()):
    """(a compiled forward + backward of ``n_layers`` SMoA layers of d x d, as the trainer compiles its step; its
    input)."""
    mx.random.seed(0)
    bases = [nn.Linear(d, d, bias=False) for _ in range(n_layers)]
    if bits:
        bases = [nn.QuantizedLinear.from_linear(b, group_size=64, bits=bits) for b in bases]
    layers = [SMoALinear.from_base(b, rank=8, blocks=2) for b in bases]
    for layer in layers:
        _randomize_b(layer)
    model = nn.Sequential(*layers)
    x = mx.random.normal((8, d))
    mx.eval(model.parameters(), x)
    step = mx.compile(nn.value_and_grad(model, lambda x: loss(model(x))), inputs=[model.state],
                      outputs=[model.state])
    return step, x


def _compiled_step_peak(n_layers: int, bits: int = 0) -> float:
    """Extra peak memory of one :func:`_compiled_step` of ``n_layers`` layers of 256 x 256."""
    step, x = _compiled_step(n_layers, bits)
    return step_peak(lambda: step(x))


@pytest.mark.parametrize("kernel,bits,bound", [("merged", 0, 6), ("dense", 0, 6), ("mlx", 0, 6), ("merged", 4, 12)])
def test_compiled_step_keeps_no_per_layer_weight_copy(kernel, bits, bound, monkeypatch):
    """Every form rebuilds its d_out x d_in (or block-sized) products in the backward, the dequantized W0 of a
    quantized base included. Built from the same inputs as the forward's, mx.compile's common-subexpression pass
    would merge them and keep one copy per layer alive from the forward to the backward: peak memory would grow by
    about a weight per layer. And each layer's products wait for its input, its dx for its factor gradient
    (kernels.plan.after_input / after_factor_grads): without that, MLX's breadth-first evaluation ran the factor
    gradients of many layers side by side (up to MLX_BFS_MAX_WIDTH of them, 20 by default), each holding its
    transients. Measured, 8 -> 24 layers of 256x256: 17.5 float32 weights' worth sharing the merged weight
    (SMOA_MLX_MERGED_KEEP=1); 7.8 rebuilding it, unordered (the side-by-side gradients); 1.5 (merged), 1.5
    (dense), 0.7 (mlx) as it is (dense base; the bound of 6 leaves room for the allocator); on a 4-bit base the residual of MLX's CPU dequantize (a chain of shifts and a concatenation; the
    GPUs have a kernel for it) adds to it. A training step is compiled, as the trainer's is."""
    monkeypatch.setenv("SMOA_MLX_KERNEL", kernel)
    weight_bytes = 256 * 256 * 4
    assert _compiled_step_peak(24, bits) - _compiled_step_peak(8, bits) < bound * weight_bytes


def test_merged_keep_trades_a_weight_per_layer_for_the_rebuild(monkeypatch):
    """SMOA_MLX_MERGED_KEEP=1: the backward uses the forward's W0 + Delta W. The same loss and gradients, bit for bit
    (the same arrays, computed once), and about one weight per layer more at peak (16 more layers: 17.5 weights'
    worth measured, against 1.5 without it, the test above)."""
    weight_bytes = 256 * 256 * 4

    def grads(n_layers):
        step, x = _compiled_step(n_layers, d=64, loss=lambda y: (y**2).sum())
        loss, g = step(x)
        return loss, tree_flatten(g)

    monkeypatch.setenv("SMOA_MLX_MERGED_KEEP", "0")
    rebuilt = grads(3)
    grown_rebuilt = _compiled_step_peak(24) - _compiled_step_peak(8)
    monkeypatch.setenv("SMOA_MLX_MERGED_KEEP", "1")
    kept = grads(3)
    grown_kept = _compiled_step_peak(24) - _compiled_step_peak(8)
    assert mx.array_equal(rebuilt[0], kept[0])
    assert [k for k, _ in rebuilt[1]] == [k for k, _ in kept[1]]
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(rebuilt[1], kept[1]))
    assert grown_kept - grown_rebuilt > 8 * weight_bytes


def test_bad_input_names_the_layer_and_values():
    base = _base(16, 12)
    with pytest.raises(ValueError, match=r"attn\.q: block 0 is 6x8, too small for rank 7"):
        SMoALinear.from_base(base, rank=14, blocks=2, name="attn.q")
    with pytest.raises(ValueError, match=r"attn\.q: blocks=13 exceeds the smaller dimension of its 12x16"):
        SMoALinear.from_base(base, rank=13, blocks=13, name="attn.q")
    with pytest.raises(ValueError, match=r"branch_ranks \[1, 2\] must be 2 non-negative ranks summing to rank=4"):
        SMoALinear.from_base(base, rank=4, blocks=2, branch_ranks=[1, 2], name="attn.q")
    with pytest.raises(TypeError, match=r"embed: SMoA wraps nn.Linear or nn.QuantizedLinear, not Embedding"):
        SMoALinear.from_base(nn.Embedding(10, 4), name="embed")
    with pytest.raises(ValueError, match="row_order must be a permutation of range\\(12\\)"):
        SMoALinear.from_base(base, rank=2, row_order=np.zeros(12), col_order=np.arange(16))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        SMoALinear.from_base(base, rank=0)


def test_factors_are_one_array_with_per_block_views():
    """One trainable array per layer whatever K (the optimizer updates one array), its views per block; assigning a
    list repacks it, a list of the wrong shapes is refused with the layer named, and optimizer state saved per block
    (before the factors were packed) becomes the packed array's state, element for element."""
    import mlx.optimizers as optim

    from smoa_mlx.train.checkpoint import packed_factor_state

    layer = SMoALinear.from_base(_base(40, 24), rank=6, blocks=3, branch_ranks=[3, 0, 3], name="q_proj")
    assert [k for k, _ in tree_flatten(layer.trainable_parameters())] == ["smoa_factors"]
    new_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    a_before = [np.asarray(a) for a in layer.smoa_a]
    layer.smoa_b = new_b
    for got, want in zip(layer.smoa_b, new_b):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(layer.smoa_a, a_before):  # the other half kept
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="q_proj: smoa_a must have the shapes"):
        layer.smoa_a = [mx.zeros((2, 2))] * 3

    per_block = {}
    for kind, parts in (("smoa_a", layer.smoa_a), ("smoa_b", layer.smoa_b)):
        for k, p in enumerate(parts):
            per_block[f"layers.0.q_proj.{kind}.{k}.m"] = p * 2
            per_block[f"layers.0.q_proj.{kind}.{k}.v"] = p * 3
    per_block["step"] = mx.array(7)
    packed = packed_factor_state(per_block)
    assert sorted(packed) == ["layers.0.q_proj.smoa_factors.m", "layers.0.q_proj.smoa_factors.v", "step"]
    for leaf, times in (("m", 2), ("v", 3)):
        got = np.asarray(packed[f"layers.0.q_proj.smoa_factors.{leaf}"])
        np.testing.assert_array_equal(got, np.asarray(layer.smoa_factors * times))
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(layer.trainable_parameters())
    assert opt.state["smoa_factors"]["m"].shape == packed["layers.0.q_proj.smoa_factors.m"].shape
