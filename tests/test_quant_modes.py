"""SMoA on an mlx-lm model quantized in mxfp4, as mlx-community's gpt-oss models are: it trains through the project's
own entry point, its adapter saves and loads back onto the same base with the same outputs (through the reference
SMoA format too), and fuse keeps the base's mode when asked to re-quantize. (The layer's numerics in every mode and form: test_layer.py and the kernel
tests.)"""

from __future__ import annotations

import json
import math
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from tiny_llm import make_model_folder
from train_helpers import build_data_folder

from smoa_mlx import SMoAConfig, apply_smoa, fuse, save_adapter, smoa_layers
from smoa_mlx.convert import FragileGroupingWarning, reference_to_smoa, smoa_to_reference
from smoa_mlx.loading import load_model_with_adapter
from smoa_mlx.layer import dequantized_weight
from smoa_mlx.quant_check import quantization_report
from smoa_mlx.train import run

TOKENS = mx.array([[3, 10, 20, 33, 41, 2, 4, 12, 50, 63, 7, 8]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama quantized to mxfp4 by mlx-lm (``nn.quantize(..., mode="mxfp4")`` inside), its data, and an SMoA
    adapter trained on it with smoa_mlx.train."""
    root = tmp_path_factory.mktemp("mxfp4")
    model = make_model_folder(root / "model", quantize_bits=4, group_size=32, quantize_mode="mxfp4", seed=3)
    data = build_data_folder(root / "data", n_train=16, n_valid=8)
    adapter = root / "adapter"
    result = run(dict(model=str(model), data=str(data), adapter_path=str(adapter), iters=8, batch_size=4,
                      learning_rate=2e-2, warmup=0, rank=4, steps_per_report=1, steps_per_eval=8, save_every=100,
                      val_batches=-1, seed=0))
    return model, data, adapter, result


def logits(model) -> mx.array:
    out = model(TOKENS)
    mx.eval(out)
    return out


def test_smoa_trains_on_an_mxfp4_model(trained):
    model_dir, _, adapter, result = trained
    quantization = json.loads((model_dir / "config.json").read_text())["quantization"]
    assert (quantization["mode"], quantization["bits"], quantization["group_size"]) == ("mxfp4", 4, 32)
    losses = [loss for _, loss in result["train_losses"]]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses  # it learns, on the base's mxfp4 weights
    assert result["final_val_loss"] < result["initial_val_loss"]
    weights = mx.load(str(adapter / "adapters.safetensors"))
    assert any(k.endswith("smoa_b.0") for k in weights)
    assert max(mx.abs(v).max().item() for k, v in weights.items() if ".smoa_b." in k) > 0

    live, _ = load_model_with_adapter(str(model_dir), adapter)  # the base's fingerprint checked
    layers = smoa_layers(live)
    assert layers and all(isinstance(m.linear, nn.QuantizedLinear) and m.linear.mode == "mxfp4"
                          for m in layers.values())
    plain, _ = mlx_lm.load(str(model_dir))
    assert mx.abs(logits(live) - logits(plain)).max().item() > 0.1


def test_adapter_round_trips_onto_the_same_mxfp4_base(trained, tmp_path):
    model_dir = trained[0]
    model, _ = mlx_lm.load(str(model_dir))
    config = SMoAConfig(rank=4, blocks=2)
    mx.random.seed(4)
    apply_smoa(model, config)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    want = logits(model)
    save_adapter(model, tmp_path / "adapter", config, extra_config={"model": str(model_dir)})
    loaded, _ = load_model_with_adapter(str(model_dir), tmp_path / "adapter")
    assert mx.array_equal(logits(loaded), want).item()
    plain, _ = mlx_lm.load(str(model_dir))
    assert mx.abs(want - logits(plain)).max().item() > 0.5  # the update is there to be lost
    # Through the reference SMoA format and back: its groups recomputed from the dequantized mxfp4 base.
    with warnings.catch_warnings():  # near ties in the tiny random base: both ways run the same ordering
        warnings.simplefilter("ignore", FragileGroupingWarning)
        smoa_to_reference(tmp_path / "adapter", tmp_path / "reference", plain)
        reference_to_smoa(tmp_path / "reference", tmp_path / "back", plain)
    back, _ = load_model_with_adapter(str(model_dir), tmp_path / "back")
    assert mx.array_equal(logits(back), want).item()


def fuse_cli(*argv) -> int:
    return fuse.run(fuse.main, "smoa_mlx.fuse", [str(a) for a in argv])


def test_fuse_dequantizes_or_keeps_the_mxfp4_mode(trained, tmp_path, capsys):
    model_dir, _, adapter, _ = trained
    live, _ = load_model_with_adapter(str(model_dir), adapter)
    plain, _ = mlx_lm.load(str(model_dir))
    want, effect = logits(live), mx.abs(logits(live) - logits(plain)).mean().item()
    args = ["--model", model_dir, "--adapter-path", adapter]

    assert fuse_cli(*args, "--save-path", tmp_path / "dense") == 0
    dense, _ = mlx_lm.load(str(tmp_path / "dense"))  # stock mlx-lm; bfloat16 weights, as mlx-lm dequantizes mxfp4
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    assert mx.abs(logits(dense) - want).mean().item() < 0.05 * effect

    capsys.readouterr()
    assert fuse_cli(*args, "--save-path", tmp_path / "kept", "--no-dequantize") == 0
    out = capsys.readouterr().out
    assert "mxfp4 quantization (4-bit, group size 32) keeps" in out
    assert "fused and mxfp4 (4-bit, group size 32)" in out  # the loss check on the adapter's validation data
    assert "(mxfp4, 4-bit, group size 32;" in out
    config = json.loads((tmp_path / "kept" / "config.json").read_text())["quantization"]
    assert (config["mode"], config["bits"], config["group_size"]) == ("mxfp4", 4, 32)
    kept, _ = mlx_lm.load(str(tmp_path / "kept"))
    modes = {m.mode for _, m in kept.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert modes == {"mxfp4"}
    # The report measured what the saved model does: Q(W0 + dW) - Q(W0) projected on dW, Q in mxfp4 (recomputed
    # here for one layer from the folder on disk; an affine Q would give another number).
    report = quantization_report(live, group_size=32, bits=4, mode="mxfp4")
    path = "model.layers.1.mlp.down_proj"
    layer = dict(live.named_modules())[path]
    base, update = dequantized_weight(layer.linear).astype(mx.float32), layer.delta_weight(mx.float32)
    on_grid = mx.dequantize(*mx.quantize(base, mode="mxfp4"), mode="mxfp4", dtype=mx.float32)
    assert mx.array_equal(on_grid, base).item()  # the base's own weights land back on their grid
    moved = dequantized_weight(dict(kept.named_modules())[path]).astype(mx.float32) - on_grid
    entry = next(entry for entry in report.layers if entry.path == path)
    assert math.isclose(entry.kept_dot, mx.sum(moved * update).item(), rel_tol=1e-2)
    assert math.isclose(entry.update_sq, mx.sum(update * update).item(), rel_tol=1e-2)  # dW rounded to bfloat16
    affine = mx.dequantize(*mx.quantize(base, group_size=32, bits=4), group_size=32, bits=4)
    assert not mx.allclose(affine, on_grid).item()

    # mxfp4 has one format: other bits need another mode, said before anything is written or (with --q-mode) loaded.
    assert fuse_cli(*args, "--save-path", tmp_path / "q8", "-q", "--q-bits", "8") == 2
    assert "the base's mode mxfp4 quantizes at 4 bits, group size 32 only" in capsys.readouterr().err
    assert not (tmp_path / "q8" / "config.json").exists()
    with pytest.raises(SystemExit):
        fuse.main([str(a) for a in (*args, "--save-path", tmp_path / "q8", "-q", "--q-mode", "mxfp4",
                                    "--q-bits", "8")])
    assert "--q-mode mxfp4 quantizes at 4 bits, group size 32 only" in capsys.readouterr().err
    assert fuse_cli(*args, "--save-path", tmp_path / "q8", "-q", "--q-mode", "affine", "--q-bits", "8",
                    "--val-batches", "0") == 0
    config = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]
    assert (config["mode"], config["bits"], config["group_size"]) == ("affine", 8, 64)
