"""A fused SMoA model exported as a transformers checkpoint gives the MLX logits in PyTorch."""

import json

import pytest
from convert_helpers import assert_close, make_hf_llama, mlx_logits, smoa_model, torch_logits

from smoa_mlx.convert import UnsupportedArchitectureError, export_hf


def test_export_hf_matches_mlx_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    base_dir = tmp_path / "base"
    make_hf_llama(base_dir, tokenizer=True)
    model, _, config = smoa_model(base_dir)
    want = mlx_logits(model)
    out = export_hf(model, load_tokenizer(base_dir), config, tmp_path / "fused")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging dir removed
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and "quantization" not in saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    assert_close(torch_logits(hf), want, base=torch_logits(base))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w5 w9")["input_ids"] == [5, 9]


def test_export_hf_dequantizes_quantized_base(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import quantize_model

    base_dir = tmp_path / "base"
    make_hf_llama(base_dir, tokenizer=True)
    from convert_helpers import load_mlx

    model, config = load_mlx(base_dir)
    model, config = quantize_model(model, config, group_size=32, bits=8)
    want = mlx_logits(model)
    out = export_hf(model, load_tokenizer(base_dir), config, tmp_path / "deq")
    saved = json.loads((out / "config.json").read_text())
    assert "quantization" not in saved and "quantization_config" not in saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert_close(torch_logits(hf), want, rtol=1e-3)


def test_export_hf_refuses_unknown_family(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        export_hf(None, None, {"model_type": "gpt2"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
