"""SMoALinear at inference: eval mode runs on a cached W0 + Delta W that follows the adapter and never serves training."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import smoa_mlx.layer as layer_module
from smoa_mlx import SMoALinear


def _layer(quantized=False, bias=True, dropout=0.0, seed=0):
    mx.random.seed(seed)
    base = nn.Linear(64, 48, bias=bias)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layer = SMoALinear.from_base(base, rank=6, blocks=2, dropout=dropout)
    layer.smoa_b = [mx.random.normal(b.shape) * 0.5 for b in layer.smoa_b]
    mx.eval(layer.parameters())
    return layer


def _live(layer, x):
    """The training path's formula with dropout off: base(x) + x Delta W^T."""
    return layer.linear(x) + x @ layer.delta_weight().T


def _close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.array(a, dtype=np.float64), np.array(b, dtype=np.float64), rtol=tol, atol=tol)


def _count_update_builds(monkeypatch):
    """How often the layer computes its update (live or merged), by counting the kernels' entry points."""
    calls = {"n": 0}
    fused_weight = layer_module.fused_weight

    def counting(entry):
        def counting_fn(layout, dtype=None):
            fn = entry(layout, dtype)

            def run(*args):
                calls["n"] += 1
                return fn(*args)

            return run

        return counting_fn

    def counting_fused_weight(*args):
        calls["n"] += 1
        return fused_weight(*args)

    for name in ("delta_fn", "linear_fn"):  # the update alone (dropout), or fused with the base
        monkeypatch.setattr(layer_module, name, counting(getattr(layer_module, name)))
    monkeypatch.setattr(layer_module, "fused_weight", counting_fused_weight)  # the merged weight (eval mode)
    return calls


@pytest.mark.parametrize("quantized,bias", [(False, True), (False, False), (True, True)])
def test_eval_mode_equals_live_and_fused(quantized, bias):
    layer = _layer(quantized, bias)
    x = mx.random.normal((2, 5, 64))
    layer.train()
    training_out = layer(x)
    layer.eval()
    out = layer(x)
    _close(out, training_out)
    _close(out, _live(layer, x))
    assert mx.array_equal(out, layer.fuse()(x))  # the same merged weight as fuse writes


def test_eval_mode_builds_the_update_once(monkeypatch):
    layer = _layer()
    calls = _count_update_builds(monkeypatch)
    layer.eval()
    x = mx.random.normal((1, 1, 64))
    for _ in range(5):
        mx.eval(layer(x))
    assert calls["n"] == 1  # decoding 5 tokens merges once; the live form computed the update 5 times
    layer.train()
    for _ in range(3):
        mx.eval(layer(x))
    assert calls["n"] == 4  # training mode computes it live on every call


def test_cache_follows_factor_updates_and_optimizer_steps():
    layer = _layer()
    x = mx.random.normal((3, 64))
    layer.eval()
    before = layer(x)
    layer.update({"smoa_factors": layer.smoa_factors * 2})
    after = layer(x)
    assert not mx.allclose(before, after)
    _close(after, _live(layer, x))

    layer.train()
    optimizer = optim.SGD(learning_rate=0.1)
    grad_fn = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())
    _, grads = grad_fn(x)
    optimizer.update(layer, grads)
    mx.eval(layer.parameters())
    layer.eval()
    _close(layer(x), _live(layer, x))

    layer.linear.weight = layer.linear.weight * 0.5  # a new base weight (load_weights, set_dtype) counts too
    _close(layer(x), _live(layer, x))


def test_training_mode_drops_the_cache_and_never_reads_it():
    layer = _layer(dropout=0.5)
    x = mx.random.normal((4, 64))
    layer.eval()
    mx.eval(layer(x))
    assert "_inference_cache" in layer.__dict__
    layer.train()
    assert "_inference_cache" not in layer.__dict__  # memory back as soon as training resumes
    outs = [layer(x) for _ in range(2)]
    assert not mx.allclose(outs[0], outs[1])  # dropout is live: the update path runs, not a merged weight
    assert "_inference_cache" not in layer.__dict__
    # A factor changed in place keeps its identity: training mode still sees it, the eval cache cannot.
    layer.dropout_p = 0.0
    layer.eval()
    mx.eval(layer(x))
    layer.smoa_factors[:] = 0.0
    layer.train()
    _close(layer(x), _live(layer, x))


def test_gradients_unaffected_by_the_cache():
    layer = _layer()
    x = mx.random.normal((4, 64))
    target = mx.random.normal((4, 48))
    grad_fn = nn.value_and_grad(layer, lambda x: ((layer(x) - target) ** 2).sum())
    layer.train()
    loss_train, g_train = grad_fn(x)
    layer.eval()
    mx.eval(layer(x))  # cache built outside the transform
    loss_eval, g_eval = grad_fn(x)
    _close(loss_eval, loss_train, tol=1e-3)
    u, v = g_eval["smoa_factors"], g_train["smoa_factors"]
    assert mx.abs(u).max().item() > 0
    _close(u, v, tol=1e-3)


def test_compiled_forward_follows_updates():
    layer = _layer()
    layer.eval()
    x = mx.random.normal((2, 64))
    state = [layer.state]
    forward = mx.compile(lambda x: layer(x), inputs=state, outputs=state)
    _close(forward(x), _live(layer, x))
    layer.update({"smoa_factors": layer.smoa_factors * -1})
    _close(forward(x), _live(layer, x))
    _close(layer(x), _live(layer, x))


def test_switch_keeps_the_live_form(monkeypatch):
    layer = _layer()
    monkeypatch.setattr(SMoALinear, "cache_merged_weight", False)
    layer.eval()
    x = mx.random.normal((2, 64))
    _close(layer(x), _live(layer, x))
    assert "_inference_cache" not in layer.__dict__


def test_cache_stays_off_where_the_device_memory_would_not_hold_it(monkeypatch):
    """A device whose working set cannot take the merged copy keeps the live form (same outputs), warning once."""
    layer = _layer(quantized=True)
    layer.eval()
    x = mx.random.normal((3, 64))
    want = _live(layer, x)
    monkeypatch.setattr(layer_module, "_CACHE_WARNED", False)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1024})
    with pytest.warns(RuntimeWarning, match="live block form"):
        got = layer(x)
    _close(got, want)
    assert layer.__dict__["_inference_cache"][1] is None  # decided once for these arrays, not per call
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1 << 40})
    layer.clear_inference_weight()
    _close(layer(x), want)
    assert layer.__dict__["_inference_cache"][1] is not None


def test_validation_during_training_builds_no_merged_copies(tmp_path, monkeypatch):
    """Validation inside a training run stays on the live form (peak memory as in training); the cache is
    still there for inference afterwards."""
    from train_helpers import build_data_folder, build_model_folder

    from smoa_mlx.train import run

    merges = {"n": 0}
    merged_weight = SMoALinear.merged_weight

    def counting(self):
        merges["n"] += 1
        return merged_weight(self)

    monkeypatch.setattr(SMoALinear, "merged_weight", counting)
    before = SMoALinear.cache_merged_weight
    run(dict(model=str(build_model_folder(tmp_path / "model")), data=str(build_data_folder(tmp_path / "data")),
             adapter_path=str(tmp_path / "adapter"), iters=4, batch_size=2, steps_per_eval=2, val_batches=1,
             save_every=4, warmup=0, preview=False))
    assert merges["n"] == 0
    assert SMoALinear.cache_merged_weight == before  # switched back on after the run
