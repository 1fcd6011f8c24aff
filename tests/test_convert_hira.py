"""SMoA -> stock PEFT HiRA and PEFT HiRA -> SMoA (K=1), checked by logits of transformers + stock peft vs MLX."""

import json

import mlx.core as mx
import numpy as np

import pytest
from convert_helpers import assert_close, load_mlx, make_hf_llama, mlx_logits, perturb_torch, smoa_model, torch_logits

from smoa_mlx import load_adapter, save_adapter
from smoa_mlx.convert import hira_to_smoa, smoa_to_hira
from smoa_mlx.convert.__main__ import main
from smoa_mlx.spectral import split_rank, split_sizes

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: not this code's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("blocks,rank", [(2, 8), (3, 7)])
def test_smoa_to_hira(tmp_path, blocks, rank):
    torch_base = make_hf_llama(tmp_path / "base")
    base_logits = torch_logits(torch_base)
    model, cfg, _ = smoa_model(tmp_path / "base", rank=rank, blocks=blocks, alpha=2.0 * rank)
    want = mlx_logits(model)
    save_adapter(model, tmp_path / "smoa", cfg)
    if blocks == 3:  # through the CLI, loading --base itself
        assert main(["to-hira", str(tmp_path / "smoa"), str(tmp_path / "hira"), "--base", str(tmp_path / "base")]) == 0
        out = tmp_path / "hira"
    else:
        base, _ = load_mlx(tmp_path / "base")
        out = smoa_to_hira(tmp_path / "smoa", tmp_path / "hira", base=base)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
    factors = mx.load(str(out / "adapter_model.safetensors"))
    a = np.asarray(factors["base_model.model.model.layers.0.self_attn.q_proj.hira_A"])
    block_entries = sum(r * c for r, c in zip(split_rank(rank, blocks), split_sizes(64, blocks)))
    assert a.shape == (rank, 64) and np.count_nonzero(a) == block_entries  # block-sparse: about 1/K of A
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(out)).eval()
    assert type(peft_model.peft_config["default"]).__name__ == "HiraConfig"
    assert_close(torch_logits(peft_model), want, base=base_logits)


def test_hira_to_smoa(tmp_path):
    torch_base = make_hf_llama(tmp_path / "base")
    base_logits = torch_logits(torch_base)
    peft_model = peft.get_peft_model(torch_base, peft.HiraConfig(r=6, target_modules=["k_proj", "up_proj", "lm_head"]))
    perturb_torch(peft_model, "hira_", seed=7, std=0.4)
    want = torch_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "hira"), save_embedding_layers=False)  # the adapter only, not the base lm_head
    base, _ = load_mlx(tmp_path / "base")
    out = hira_to_smoa(tmp_path / "hira", tmp_path / "smoa", base=base)
    model, _ = load_mlx(tmp_path / "base")
    config = load_adapter(model, out)
    assert config.blocks == 1 and config.rank == 6 and config.scale == 1.0
    assert_close(mlx_logits(model), want, base=base_logits)
