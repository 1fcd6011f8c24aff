"""Bad input to the converters: each case a named error, naming the file/key/module, and nothing written."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama

from smoa_mlx import SMoAConfig, apply_smoa, save_adapter
from smoa_mlx.convert import (
    AdapterTypeError,
    BaseModelMismatchError,
    ConversionError,
    MissingKeysError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    hira_to_smoa,
    mlx_lora_to_peft,
    peft_lora_to_mlx,
    smoa_to_hira,
)
from smoa_mlx.convert.__main__ import main
from smoa_mlx.convert.names import to_hf, to_mlx
from smoa_mlx.adapters.fingerprint import check_fingerprint, fingerprint_modules

Q = "model.layers.1.self_attn.q_proj"


def tiny(seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def hira_folder(folder, config=None, **tensors):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "HIRA", "r": 4}))
    arrays = {f"base_model.model.{k}": v for k, v in tensors.items()}
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), arrays)
    return folder


def test_wrong_peft_type(tmp_path):
    src = hira_folder(tmp_path / "lora", {"peft_type": "LORA", "r": 4}, **{f"{Q}.hira_A": mx.zeros((4, 64))})
    with pytest.raises(AdapterTypeError, match=r"adapter_config.json: peft_type is 'LORA'.*expected 'HIRA'"):
        hira_to_smoa(src, tmp_path / "out", model_type="llama")
    assert not (tmp_path / "out").exists()


def test_mlx_folder_where_peft_expected(tmp_path):
    model = tiny()
    cfg = SMoAConfig(rank=4, blocks=2, target_modules=["q_proj"])
    apply_smoa(model, cfg)
    save_adapter(model, tmp_path / "smoa", cfg)
    with pytest.raises(AdapterTypeError, match="mlx-lm adapter"):
        peft_lora_to_mlx(tmp_path / "smoa", tmp_path / "out", model_type="llama")
    with pytest.raises(AdapterTypeError, match="fine_tune_type='smoa' is not a lora/dora adapter"):
        mlx_lora_to_peft(tmp_path / "smoa", tmp_path / "out", model_type="llama")


def test_missing_keys(tmp_path):
    src = hira_folder(tmp_path / "h", **{f"{Q}.hira_A": mx.zeros((4, 64))})
    with pytest.raises(MissingKeysError, match=rf"module {Q} lacks hira_B"):
        hira_to_smoa(src, tmp_path / "out", model_type="llama")


def test_shape_mismatch_with_base(tmp_path):
    src = hira_folder(tmp_path / "h", **{f"{Q}.hira_A": mx.zeros((4, 80)), f"{Q}.hira_B": mx.zeros((64, 4))})
    hira_to_smoa(src, tmp_path / "ok", model_type="llama")  # consistent on its own...
    with pytest.raises(ShapeMismatchError, match=rf"{Q}.hira_A has shape \(4, 80\), expected \(4, 64\)"):
        hira_to_smoa(src, tmp_path / "out", base=tiny())  # ...but not with the base model
    assert not (tmp_path / "out").exists()


def test_other_base_model_detected_and_nothing_overwritten(tmp_path):
    model = tiny(seed=0)
    cfg = SMoAConfig(rank=4, blocks=2, target_modules=["q_proj", "down_proj"])
    apply_smoa(model, cfg)
    save_adapter(model, tmp_path / "smoa", cfg)
    assert "base_fingerprint" in json.loads((tmp_path / "smoa" / "adapter_config.json").read_text())
    out = smoa_to_hira(tmp_path / "smoa", tmp_path / "out", base=tiny(seed=0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BaseModelMismatchError, match=r"(?s)different base model.*q_proj: weight fingerprint differs"):
        smoa_to_hira(tmp_path / "smoa", out, base=tiny(seed=1), force=True)  # even forced: checked before writing
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fingerprint_survives_quantization_not_another_model():
    from mlx_lm.utils import quantize_model

    paths = [Q, "model.layers.0.mlp.down_proj"]
    stored = fingerprint_modules({p: _module(tiny(0), p) for p in paths})
    quantized, _ = quantize_model(tiny(0), {}, group_size=32, bits=4)
    check_fingerprint(stored, fingerprint_modules({p: _module(quantized, p) for p in paths}), "q4")
    with pytest.raises(BaseModelMismatchError):
        check_fingerprint(stored, fingerprint_modules({p: _module(tiny(2), p) for p in paths}), "other")


def _module(model, path):
    from smoa_mlx.adapters import get_module

    return get_module(model, path)


def test_unsupported_architectures_and_modules(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        to_hf(Q, "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="qkv_proj"):
        to_hf("model.layers.0.self_attn.qkv_proj", "llama")
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0}})
    )
    mx.save_safetensors(
        str(folder / "adapters.safetensors"),
        {"model.embed_tokens.lora_a": mx.zeros((96, 4)), "model.embed_tokens.lora_b": mx.zeros((4, 64))},
    )
    with pytest.raises(UnsupportedArchitectureError, match="'model.embed_tokens'"):
        mlx_lora_to_peft(folder, tmp_path / "out", model_type="llama")
    assert not (tmp_path / "out").exists()


def test_name_maps():
    assert to_hf("model.layers.3.self_attn.qkv_proj", "phi3") == "model.layers.3.self_attn.qkv_proj"
    assert to_hf("model.layers.3.mlp.gate_up_proj", "phi3") == "model.layers.3.mlp.gate_up_proj"
    assert to_hf("language_model.model.layers.2.mlp.up_proj", "gemma3") == "model.language_model.layers.2.mlp.up_proj"
    assert to_mlx("model.language_model.layers.2.mlp.up_proj", "gemma3") == "language_model.model.layers.2.mlp.up_proj"
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        assert to_mlx(to_hf(Q, t), t) == Q
    assert to_hf("lm_head", "qwen2") == "lm_head"


def test_cli_reports_errors(tmp_path, capsys):
    src = hira_folder(tmp_path / "h", {"peft_type": "LORA", "r": 4}, **{f"{Q}.hira_A": mx.zeros((4, 64))})
    assert main(["from-hira", str(src), str(tmp_path / "out"), "--model-type", "llama"]) == 2
    assert "peft_type is 'LORA'" in capsys.readouterr().err
    assert main(["to-hira", str(tmp_path / "missing"), str(tmp_path / "out"), "--model-type", "llama"]) == 2


def test_cli_module_entry_point(tmp_path):
    rng = np.random.default_rng(0)
    src = hira_folder(
        tmp_path / "h",
        **{f"{Q}.hira_A": mx.array(rng.normal(size=(4, 64)).astype(np.float32)), f"{Q}.hira_B": mx.zeros((64, 4))},
    )
    cmd = ["-m", "smoa_mlx.convert", "from-hira", str(src), str(tmp_path / "smoa"), "--model-type", "llama"]
    run = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "smoa" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "smoa" and config["smoa_parameters"]["blocks"] == 1
    back = smoa_to_hira(tmp_path / "smoa", tmp_path / "hira2", model_type="llama")  # and back: bit-identical
    key = f"base_model.model.{Q}.hira_A"
    original = mx.load(str(src / "adapter_model.safetensors"))[key]
    again = mx.load(str(back / "adapter_model.safetensors"))[key]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(original))


def test_refuses_to_convert_into_the_input_folder(tmp_path):
    src = hira_folder(tmp_path / "h", **{f"{Q}.hira_A": mx.zeros((4, 64)), f"{Q}.hira_B": mx.zeros((64, 4))})
    before = (src / "adapter_config.json").read_text()
    with pytest.raises(ConversionError, match="is the input folder"):
        hira_to_smoa(src, src, model_type="llama")
    assert (src / "adapter_config.json").read_text() == before
