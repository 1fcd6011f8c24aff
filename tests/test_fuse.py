"""smoa_mlx.fuse: fused folders give the unfused model's logits, load in stock mlx-lm, and refuse bad input."""

import json
import math

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from tiny_llm import make_model_folder, make_smoa_adapter

from smoa_mlx import fuse
from smoa_mlx.loading import load_model_with_adapter
from smoa_mlx.layer import dequantized_weight
from smoa_mlx.quant_check import WARN_DROPPED, quantization_report

TOKENS = mx.array([[3, 10, 20, 33, 41, 2, 4, 12, 50, 63, 7, 8]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A dense float32 and a 4-bit tiny llama, each with a trained-looking SMoA adapter."""
    root = tmp_path_factory.mktemp("fuse")
    out = {}
    for name, bits in (("dense", None), ("q4", 4)):
        model = make_model_folder(root / name, quantize_bits=bits, seed=3)
        out[name] = (model, make_smoa_adapter(model, root / f"{name}_adapter"))
    out["root"] = root
    return out


def logits(model):
    out = model(TOKENS)
    mx.eval(out)
    return out


def run_fuse(*argv):
    return fuse.main([str(a) for a in argv])


def fuse_error(*argv):
    """Exit status of the CLI, user errors reported on stderr as the command line does."""
    return fuse.run(fuse.main, "smoa_mlx.fuse", [str(a) for a in argv])


@pytest.mark.parametrize("base", ["dense", "q4"])
def test_fused_logits_equal_unfused(tiny, tmp_path, base):
    model_dir, adapter = tiny[base]
    live, _ = load_model_with_adapter(str(model_dir), adapter)
    plain, _ = mlx_lm.load(str(model_dir))
    assert run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "fused") == 0

    fused, _ = mlx_lm.load(str(tmp_path / "fused"))  # stock mlx-lm, no smoa_mlx involved
    assert not any(k.endswith((".scales", "smoa_a.0")) for k, _ in tree_flatten(fused.parameters()))
    want, got, before = logits(live), logits(fused), logits(plain)
    # The adapter really moves the logits, so equality below is not the base model agreeing with itself.
    assert mx.abs(want - before).max().item() > 0.5
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config


def test_fused_folder_generates_like_live_adapter(tiny, tmp_path):
    model_dir, adapter = tiny["dense"]
    run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "fused")
    live, tok = load_model_with_adapter(str(model_dir), adapter)
    fused, fused_tok = mlx_lm.load(str(tmp_path / "fused"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert fused_tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True) == prompt
    want = mlx_lm.generate(live, tok, prompt, max_tokens=12)
    assert len(want) > 0
    assert mlx_lm.generate(fused, fused_tok, prompt, max_tokens=12) == want


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_mlx_lm_adapters_fuse(tiny, tmp_path, kind):
    """mlx-lm's own adapters: LoRA / DoRA fuse through their own .fuse(); a full fine-tune is saved as loaded."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from smoa_mlx.atomic import atomic_save_safetensors

    model_dir, _ = tiny["dense"]
    model, _ = mlx_lm.load(str(model_dir))
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    if kind == "full":
        chosen = {k: v for k, v in tree_flatten(model.parameters()) if k.startswith("model.layers.1.self_attn.q")}
    else:
        model.freeze()
        linear_to_lora_layers(model, 2, params, use_dora=kind == "dora")
        chosen = dict(tree_flatten(model.trainable_parameters()))
    mx.random.seed(5)
    trained = {k: v + mx.random.normal(v.shape) * 0.3 for k, v in chosen.items()}
    model.load_weights(list(trained.items()), strict=False)
    adapter = tmp_path / kind
    adapter.mkdir()
    atomic_save_safetensors(adapter / "adapters.safetensors", trained)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": kind, "num_layers": 2, "lora_parameters": params})
    )
    assert run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "fused") == 0
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    plain, _ = mlx_lm.load(str(model_dir))
    want = logits(model)
    assert mx.abs(want - logits(plain)).max().item() > 0.5
    assert mx.allclose(logits(fused), want, atol=1e-4, rtol=1e-4).item()


def test_quantize_report_matches_saved_model_and_warns(tiny, tmp_path, capsys):
    """A small update on a 4-bit base rounds back to the base's grid: measured, reported, warned (mlx-lm #1172)."""
    model_dir, _ = tiny["q4"]
    adapter = make_smoa_adapter(model_dir, tmp_path / "small", b_scale=0.01)
    live, _ = load_model_with_adapter(str(model_dir), adapter)
    report = quantization_report(live, group_size=32, bits=4)
    # Only the groups' extreme entries (reproduced exactly by affine quantization) keep their update.
    assert report.dropped > 0.5 and report.warning(), report.summary()
    assert 0 < report.erased_max <= report.update_max

    assert run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "fused", "-q") == 0
    captured = capsys.readouterr()
    assert "4-bit quantization (group size 32) keeps" in captured.out
    assert "WARNING: quantization erases" in captured.err

    # Recompute one layer from the saved folder: what the quantized fused model changes relative to the same
    # quantization of the base, projected on the float update.
    saved, _ = mlx_lm.load(str(tmp_path / "fused"))
    path = "model.layers.1.mlp.down_proj"
    layer = dict(live.named_modules())[path]
    base = dequantized_weight(layer.linear)
    update = layer.delta_weight(mx.float32)
    kept = dequantized_weight(dict(saved.named_modules())[path]) - mx.dequantize(
        *mx.quantize(base, group_size=32, bits=4), group_size=32, bits=4
    )
    entry = next(l for l in report.layers if l.path == path)
    assert math.isclose(entry.update_sq, mx.sum(update * update).item(), rel_tol=1e-3)
    assert math.isclose(entry.kept_dot, mx.sum(kept * update).item(), rel_tol=1e-3, abs_tol=1e-6)


def test_quantize_keeps_large_update_without_warning(tiny, tmp_path, capsys):
    model_dir, adapter = tiny["dense"]
    args = ["--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "fused"]
    assert run_fuse(*args, "-q", "--q-bits", "8", "--q-group-size", "32") == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    live, _ = load_model_with_adapter(str(model_dir), adapter)
    report = quantization_report(live, group_size=32, bits=8)
    assert report.dropped < WARN_DROPPED and len(report.layers) == 10
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    # The 8-bit fused model keeps the fine-tune: it is far closer to the live adapter than the base is.
    saved, _ = mlx_lm.load(str(tmp_path / "fused"))
    plain, _ = mlx_lm.load(str(model_dir))
    error = mx.abs(logits(saved) - logits(live)).mean().item()
    effect = mx.abs(logits(plain) - logits(live)).mean().item()
    assert error < 0.2 * effect, (error, effect)


# -- bad input ----------------------------------------------------------------------------------------------
def test_existing_save_path_needs_force(tiny, tmp_path, capsys):
    model_dir, adapter = tiny["dense"]
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", model_dir, "--adapter-path", adapter, "--save-path", out]
    assert fuse_error(*args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_fuse(*args, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no staging or old folders left behind


def test_refuses_to_overwrite_its_inputs(tiny, capsys):
    model_dir, adapter = tiny["dense"]
    for target in (model_dir, adapter):
        args = ["--model", model_dir, "--adapter-path", adapter, "--save-path", target, "--force"]
        assert fuse_error(*args) == 2
        assert "which this command reads" in capsys.readouterr().err
    assert (model_dir / "config.json").is_file() and (adapter / "adapters.safetensors").is_file()


def test_missing_adapter_and_model_files(tiny, tmp_path, capsys):
    model_dir, adapter = tiny["dense"]
    cases = [
        (["--model", model_dir, "--adapter-path", tmp_path / "nope"], "nope"),
        (["--model", tmp_path / "no_model", "--adapter-path", adapter], "no_model"),
    ]
    for args, named in cases:
        assert fuse_error(*args, "--save-path", tmp_path / "out") == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "other, expected",
    [
        ({"hidden": 32}, ["does not fit", "model.layers.0.self_attn.q_proj"]),  # other shapes: named module
        ({"seed": 11}, ["different base model"]),  # same shapes, other weights: the recorded base fingerprint
    ],
)
def test_adapter_for_another_model_is_refused(tiny, tmp_path, capsys, other, expected):
    _, adapter = tiny["dense"]
    model = make_model_folder(tmp_path / "other", **other)
    assert fuse_error("--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    model_dir, adapter = tiny["dense"]

    def broken(tokenizer_self, *a, **k):
        raise OSError("disk full")

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    monkeypatch.setattr(TokenizerWrapper, "save_pretrained", broken, raising=False)
    with pytest.raises(OSError, match="disk full"):
        run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_hf_writes_the_same_fused_weights(tiny, tmp_path):
    """--export-hf goes through convert.hf_export: dense transformers-named weights equal to the fused folder's."""
    model_dir, adapter = tiny["q4"]
    out = tmp_path / "fused"
    assert run_fuse("--model", model_dir, "--adapter-path", adapter, "--save-path", out, "--export-hf") == 0
    hf = mx.load(str(tmp_path / "fused-hf" / "model.safetensors"))
    mlx_weights = mx.load(str(out / "model.safetensors"))
    assert sorted(hf) == sorted(mlx_weights)
    assert all(mx.array_equal(hf[k], mlx_weights[k]).item() for k in hf)
    config = json.loads((tmp_path / "fused-hf" / "config.json").read_text())
    assert "quantization" not in config and config["model_type"] == "llama"


def test_output_folders_held_by_another_writer_are_refused(tiny, tmp_path, capsys):
    """A fuse into a --save-path or --hf-path that another command holds (its lock) is refused by flag and folder
    before anything is loaded, and leaves the folder as it was, even with --force."""
    from smoa_mlx.folder_lock import FolderLock

    model_dir, adapter = tiny["dense"]
    out, hf = tmp_path / "fused", tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["--model", model_dir, "--adapter-path", adapter, "--force"]
    for flag, held, argv in (("--save-path", out, ["--save-path", out]),
                             ("--hf-path", hf, ["--save-path", tmp_path / "other", "--export-hf", "--hf-path", hf])):
        with FolderLock(held, "a test"):
            before = sorted(p.name for p in held.iterdir())
            assert fuse_error(*base, *argv) == 2
            err = capsys.readouterr().err
            assert f"{flag} {held} is in use by another run (pid " in err and "Loading" not in err
            assert sorted(p.name for p in held.iterdir()) == before
    assert (out / "keep.txt").read_text() == "mine" and not hf.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # the refused run created nothing
