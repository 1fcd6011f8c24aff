"""fuse -q: quantizes as the base was quantized, and checks the quantized model's behaviour on validation data."""

import re

import mlx_lm
import pytest
from tiny_llm import make_model_folder, make_smoa_adapter
from train_helpers import build_data_folder

from smoa_mlx import fuse
from smoa_mlx.quant_check import LossCheck, validation_loss
from smoa_mlx.train import run
from smoa_mlx.train.data import load_splits

LOSSES = re.compile(
    r"validation loss on (?P<data>\S+): base (?P<base>[\d.]+), fused (?P<fused>[\d.]+), fused and (?P<bits>\d)-bit "
    r"\(group size (?P<gs>\d+)\) (?P<quantized>[\d.]+)"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dense llama, its data, and an SMoA adapter trained on it (so it lowers the validation loss)."""
    root = tmp_path_factory.mktemp("fuse_q")
    model = make_model_folder(root / "model", seed=3)
    data = build_data_folder(root / "data", n_train=32, n_valid=8)
    adapter = root / "adapter"
    run(dict(model=str(model), data=str(data), adapter_path=str(adapter), iters=30, batch_size=4, learning_rate=2e-2,
             warmup=0, rank=8, dropout=0.0, steps_per_report=30, steps_per_eval=100, save_every=100, val_batches=-1,
             seed=0))
    return model, data, adapter


def fuse_cli(*argv):
    return fuse.run(fuse.main, "smoa_mlx.fuse", [str(a) for a in argv])


def test_quantize_defaults_to_the_base_quantization():
    from smoa_mlx.models.embedded import embedded_gguf_path, gguf_model

    # The embedded model loads dequantized (no quantization in its config), yet its own grid is the GGUF's.
    assert fuse._quant_defaults({}, None) == fuse._quant_defaults({}, "embedded") == (4, 32, "affine")
    _, _, config = gguf_model(embedded_gguf_path(), quantized=True)
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == fuse.EMBEDDED_QUANTIZATION
    assert fuse._quant_defaults({"quantization": {"bits": 8, "group_size": 128}}, "some/model") == (8, 128, "affine")
    assert fuse._quant_defaults({}, "some/dense_model") == (4, 64, "affine")  # never quantized: mlx-lm's defaults
    # Another mode: the base's own format, or the mode's (mlx-lm's defaults for affine) when --q-mode changes it.
    mxfp4 = {"quantization": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}
    assert fuse._quant_defaults(mxfp4, "some/model") == (4, 32, "mxfp4")
    assert fuse._quant_defaults({"quantization": {"mode": "nvfp4"}}, "some/model") == (4, 16, "nvfp4")
    assert fuse._quant_defaults(mxfp4, "some/model", "affine") == (4, 64, "affine")
    assert fuse._quant_defaults({}, "some/dense_model", "mxfp8") == (8, 32, "mxfp8")


def test_loss_check_reports_the_saved_models_losses(trained, tmp_path, capsys):
    model_dir, data, adapter = trained
    assert fuse_cli("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "q8", "-q",
                    "--q-bits", "8", "--val-batches", "-1") == 0
    out = capsys.readouterr()
    found = LOSSES.search(out.out)
    assert found, out.out
    assert found["data"].endswith("valid.jsonl") and (found["bits"], found["gs"]) == ("8", "64")
    assert "WARNING" not in out.err

    # The same three losses, recomputed from the models on disk: the base, a plain fuse, the saved 8-bit fuse.
    assert fuse_cli("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "dense") == 0
    _, tokenizer = mlx_lm.load(str(model_dir))
    split = load_splits(str(data), tokenizer, 2048, 4, need=("valid",))["valid"]
    for name, folder in (("base", model_dir), ("fused", tmp_path / "dense"), ("quantized", tmp_path / "q8")):
        loaded, _ = mlx_lm.load(str(folder))
        assert validation_loss(loaded, split, 4, -1, 2048) == pytest.approx(float(found[name]), abs=2e-4), name
    assert float(found["base"]) - float(found["fused"]) > 0.5  # the adapter learned something to lose


def test_loss_check_warns_when_quantization_breaks_the_adapter(trained, tmp_path, capsys):
    model_dir, _, adapter = trained
    assert fuse_cli("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "q2", "-q",
                    "--q-bits", "2") == 0
    out = capsys.readouterr()
    found = LOSSES.search(out.out)
    check = LossCheck("v", 2, 64, float(found["base"]), float(found["fused"]), float(found["quantized"]))
    assert check.perplexity_ratio > 1.1
    assert "fused model's validation perplexity is" in out.err and "WARNING" in out.err


def test_loss_check_data_choices(trained, tmp_path, capsys):
    model_dir, data, _ = trained
    bare = make_smoa_adapter(model_dir, tmp_path / "bare")  # records no training data
    args = ["--model", model_dir, "--adapter-path", bare, "-q"]
    assert fuse_cli(*args, "--save-path", tmp_path / "a") == 0
    assert "Loss check skipped: the adapter does not record its training data; pass --data" in capsys.readouterr().err
    assert fuse_cli(*args, "--save-path", tmp_path / "b", "--data", data) == 0
    assert LOSSES.search(capsys.readouterr().out)
    assert fuse_cli(*args, "--save-path", tmp_path / "c", "--data", data, "--val-batches", "0") == 0
    assert not LOSSES.search(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        fuse.main(["--model", str(model_dir), "--adapter-path", str(bare), "--data", str(data)])
    assert "add --quantize" in capsys.readouterr().err
