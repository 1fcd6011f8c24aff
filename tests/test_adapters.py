"""apply_smoa on real mlx-lm models, and the adapter folder: round trip, atomic writes, mismatches."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from smoa_mlx import SMoAConfig, apply_smoa, load_adapter, save_adapter, smoa_layers, target_paths
from smoa_mlx.adapters import folder as adapters_mod


def _llama(layers=3, seed=0, quantize=False):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def _perturb(model, seed=5):
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) * 0.2 for b in layer.smoa_b]
    mx.eval(model.parameters())


TOKENS = mx.array([[3, 14, 15, 92, 65, 35]])


def test_selection_matches_mlx_lm_lora():
    """Same blocks and keys as mlx-lm's linear_to_lora_layers."""
    model = _llama(layers=4)
    paths = target_paths(model, ["q_proj", "v_proj", "mlp.down_proj"], num_layers=2)
    assert paths == [
        "model.layers.2.mlp.down_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
        "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
    ]
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = _llama(layers=4)
    lora.freeze()
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    linear_to_lora_layers(lora, 2, {"rank": 4, "scale": 1.0, "dropout": 0.0, "keys": keys})
    lora_paths = sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(lora.trainable_parameters())})
    assert sorted(paths) == lora_paths


def test_apply_freezes_everything_else_and_starts_at_the_base_model():
    model = _llama()
    before = model(TOKENS)
    paths = apply_smoa(model, SMoAConfig(rank=4, blocks=2))
    assert len(paths) == 3 * 5
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(n.endswith(".smoa_factors") for n in names)
    assert mx.array_equal(model(TOKENS), before)


@pytest.mark.parametrize("quantize", [False, True])
def test_save_load_round_trip(tmp_path, quantize):
    model = _llama(quantize=quantize)
    config = SMoAConfig(rank=6, blocks=3, alpha=12, target_modules=["q_proj", "down_proj"], num_layers=2)
    apply_smoa(model, config)
    _perturb(model)
    want = model(TOKENS)
    save_adapter(model, tmp_path / "ad", config, extra_config={"model": "tiny"})

    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "smoa" and saved["num_layers"] == 2 and saved["model"] == "tiny"
    assert saved["lora_parameters"]["scale"] == 2.0 and saved["smoa_parameters"]["blocks"] == 3
    keys = mx.load(str(tmp_path / "ad" / "adapters.safetensors")).keys()
    assert "model.layers.2.self_attn.q_proj.row_order" in keys
    assert "model.layers.2.mlp.down_proj.smoa_b.2" in keys

    fresh = _llama(quantize=quantize)
    import smoa_mlx.layer as layer_mod

    def no_spectral(*a, **k):
        raise AssertionError("loading must not rerun the spectral step")

    original = layer_mod.spectral_order
    layer_mod.spectral_order = no_spectral
    try:
        loaded = load_adapter(fresh, tmp_path / "ad")
    finally:
        layer_mod.spectral_order = original
    assert loaded == config
    assert mx.allclose(fresh(TOKENS), want, atol=1e-5).item()
    assert set(smoa_layers(fresh)) == set(smoa_layers(model))


def test_other_architecture(tmp_path):
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101, tie_word_embeddings=False,
    )

    def build():
        mx.random.seed(0)  # same seed: same base weights, attention biases included
        return qwen2.Model(args)

    model = build()
    config = SMoAConfig(rank=4)
    apply_smoa(model, config)
    _perturb(model)
    save_adapter(model, tmp_path, config)
    fresh = build()
    load_adapter(fresh, tmp_path)
    assert mx.allclose(fresh(TOKENS), model(TOKENS), atol=1e-5).item()


def test_crash_mid_save_keeps_the_last_good_adapter(tmp_path, monkeypatch):
    model = _llama()
    config = SMoAConfig(rank=4)
    apply_smoa(model, config)
    save_adapter(model, tmp_path, config)
    good = (tmp_path / "adapters.safetensors").read_bytes()
    good_config = (tmp_path / "adapter_config.json").read_text()
    _perturb(model)

    def broken_save(path, arrays, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters_mod.mx, "save_safetensors", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, config)
    assert (tmp_path / "adapters.safetensors").read_bytes() == good
    assert (tmp_path / "adapter_config.json").read_text() == good_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


def test_mismatched_adapter_is_refused_and_model_untouched(tmp_path):
    model = _llama()
    config = SMoAConfig(rank=4, target_modules=["q_proj"])
    apply_smoa(model, config)
    save_adapter(model, tmp_path / "ok", config)

    # Shapes: a model with a different width.
    mx.random.seed(0)
    wide = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=96, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101, tie_word_embeddings=True,
    ))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: row_order must be a permutation"):
        load_adapter(wide, tmp_path / "ok")
    assert not smoa_layers(wide)

    # Keys: a module the model does not have.
    shallow = _llama(layers=2)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj: module .* not found"):
        load_adapter(shallow, tmp_path / "ok")
    assert not smoa_layers(shallow)

    # A factor of the wrong shape in the file.
    weights = mx.load(str(tmp_path / "ok" / "adapters.safetensors"))
    weights["model.layers.1.self_attn.q_proj.smoa_a.0"] = mx.zeros((3, 7))
    (tmp_path / "bad").mkdir()
    mx.save_safetensors(str(tmp_path / "bad" / "adapters.safetensors"), weights)
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    fresh = _llama()
    with pytest.raises(ValueError, match=r"q_proj\.smoa_a\.0 has shape \(3, 7\), expected \(2, 32\)"):
        load_adapter(fresh, tmp_path / "bad")
    assert not smoa_layers(fresh)

    # Same architecture and shapes, other base weights: the recorded fingerprint catches it.
    from smoa_mlx import BaseModelMismatchError

    other = _llama(seed=7)
    with pytest.raises(BaseModelMismatchError, match=r"adapter_config\.json: the adapter was trained on a different base"):
        load_adapter(other, tmp_path / "ok")
    assert not smoa_layers(other)
    load_adapter(other, tmp_path / "ok", verify_base=False)
    assert smoa_layers(other)

    # A LoRA adapter folder is not an SMoA adapter.
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: fine_tune_type='lora' is not an SMoA adapter"):
        load_adapter(fresh, tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_adapter(fresh, tmp_path / "missing")


def test_config_validation():
    with pytest.raises(ValueError, match=r"branch_ranks \[1, 1\] must be 2 non-negative ranks summing to rank=4"):
        SMoAConfig(rank=4, blocks=2, branch_ranks=[1, 1])
    with pytest.raises(ValueError, match=r"unknown keys \['ranks'\]"):
        SMoAConfig.from_dict({"ranks": 4})
    with pytest.raises(ValueError, match="no module of Model matches target_modules=\\['nope'\\]"):
        apply_smoa(_llama(), SMoAConfig(target_modules=["nope"]))
    assert SMoAConfig(rank=8, alpha=16).scale == 2.0 and SMoAConfig(rank=8).scale == 1.0
