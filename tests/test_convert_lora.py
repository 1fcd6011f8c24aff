"""mlx-lm LoRA/DoRA <-> PEFT LoRA/DoRA, checked by logits of real transformers + stock peft against mlx-lm."""

import json

import mlx.core as mx
import numpy as np
import pytest
from convert_helpers import assert_close, load_mlx, make_hf_llama, mlx_logits, perturb_torch, torch_logits
from mlx.utils import tree_flatten

from smoa_mlx.convert import mlx_lora_to_peft, peft_lora_to_mlx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: not this code's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj"]
# qwen2's q/k/v carry biases (DoRA rescales before adding them); phi3 fuses qkv_proj and gate_up_proj.
CASES = [("llama", False), ("llama", True), ("qwen2", True), ("phi3", False)]


def _mlx_lora_adapter(folder, base_dir, dora, seed=3):
    """An mlx-lm LoRA/DoRA adapter, as mlx-lm's trainer saves it, with non-trivial weights."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load_mlx(base_dir)
    model.freeze()
    params = {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": KEYS}
    linear_to_lora_layers(model, 1, params, use_dora=dora)  # last block only, as --num-layers 1 would
    rng = np.random.default_rng(seed)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    new = {}
    for name, value in trainable.items():
        noise = rng.normal(0, 0.3, value.shape).astype(np.float32)
        new[name] = mx.array(noise) if not name.endswith(".m") else value * mx.array(1 + 0.2 * noise)
    model.load_weights(list(new.items()), strict=False)
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), new)
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": 1, "lora_parameters": params}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("arch,dora", CASES, ids=[f"{a}-{'dora' if d else 'lora'}" for a, d in CASES])
def test_mlx_lora_to_peft(tmp_path, arch, dora):
    torch_base = make_hf_llama(tmp_path / "base", arch=arch)
    base_logits = torch_logits(torch_base)
    mlx_model = _mlx_lora_adapter(tmp_path / "mlx", tmp_path / "base", dora)
    base, _ = load_mlx(tmp_path / "base")
    out = mlx_lora_to_peft(tmp_path / "mlx", tmp_path / "peft", base=base)
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(out)).eval()
    assert isinstance(peft_model.peft_config["default"], peft.LoraConfig)
    assert peft_model.peft_config["default"].use_dora is dora
    assert_close(torch_logits(peft_model), mlx_logits(mlx_model), base=base_logits)


@pytest.mark.parametrize("arch,dora", CASES, ids=[f"{a}-{'dora' if d else 'lora'}" for a, d in CASES])
def test_peft_lora_to_mlx(tmp_path, arch, dora):
    from mlx_lm.tuner.utils import load_adapters

    torch_base = make_hf_llama(tmp_path / "base", arch=arch)
    base_logits = torch_logits(torch_base)
    targets = ["qkv_proj", "gate_up_proj", "o_proj"] if arch == "phi3" else ["q_proj", "up_proj", "o_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_dora=dora)
    peft_model = peft.get_peft_model(torch_base, cfg)
    perturb_torch(peft_model, "lora_", seed=5, std=0.3)
    want = torch_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    base, _ = load_mlx(tmp_path / "base")
    out = peft_lora_to_mlx(tmp_path / "peft", tmp_path / "mlx", base=base)
    model, _ = load_mlx(tmp_path / "base")
    load_adapters(model, str(out))  # stock mlx-lm loader: rejects any tensor it does not expect
    assert_close(mlx_logits(model), want, base=base_logits)
