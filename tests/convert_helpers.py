"""Tiny twin models for the conversion tests: one llama in transformers (PyTorch) and the same weights in mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from smoa_mlx import SMoAConfig, apply_smoa, smoa_layers

VOCAB = 96
TOKENS = [[1, 5, 9, 17, 33, 2, 64, 80, 7, 3, 11, 95]]


ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "phi3": ("Phi3Config", "Phi3ForCausalLM")}


def make_hf_llama(folder: Path, seed: int = 0, tokenizer: bool = False, arch: str = "llama"):
    """A 2-layer, hidden-64 model (llama; or qwen2, with biases; or phi3, fused qkv) saved as a transformers
    checkpoint; returns the torch model (eval, float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHS[arch])
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # a wider init than HF's 0.02 so that adapters move the logits visibly
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("proj.bias"):
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(str(folder))
    # transformers 5 writes rope_theta only inside rope_parameters, where mlx-lm 0.32 does not look (its qwen2
    # then defaults to 1e6): write it at the top level too, as checkpoints saved by transformers 4 have it.
    config_file = Path(folder) / "config.json"
    saved = json.loads(config_file.read_text())
    saved.setdefault("rope_theta", (saved.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    config_file.write_text(json.dumps(saved, indent=2))
    if tokenizer:
        make_tokenizer(folder)
    return model


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2", bos_token="w1").save_pretrained(
        str(folder)
    )


def load_mlx(folder: Path):
    from mlx_lm.utils import load_model

    model, config = load_model(Path(folder))
    return model, config


def mlx_logits(model) -> np.ndarray:
    out = model(mx.array(TOKENS))
    return np.asarray(out.astype(mx.float32))


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def assert_close(got: np.ndarray, want: np.ndarray, base: np.ndarray | None = None, rtol: float = 2e-4) -> None:
    """Agreement to float32 tolerance, relative to the logits' scale; with ``base``, also that the adapter mattered."""
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * {scale:.3g}"
    if base is not None:
        moved = float(np.abs(want - base).max())
        assert moved > 100 * max(err, 1e-7), f"the adapter barely changed the logits ({moved:.3g})"


def randomize_factors(model, seed: int = 1, std: float = 0.5) -> None:
    """Non-zero SMoA factors (B starts at zero), so the update is visible in the logits."""
    rng = np.random.default_rng(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_a = [mx.array(rng.normal(0, std, a.shape).astype(np.float32)) for a in layer.smoa_a]
        layer.smoa_b = [mx.array(rng.normal(0, std, b.shape).astype(np.float32)) for b in layer.smoa_b]


def smoa_model(folder: Path, rank: int = 8, blocks: int = 2, alpha: float | None = 16.0, targets=None):
    model, config = load_mlx(folder)
    cfg = SMoAConfig(rank=rank, blocks=blocks, alpha=alpha, target_modules=targets or ["q_proj", "v_proj", "down_proj"])
    apply_smoa(model, cfg)
    randomize_factors(model)
    return model, cfg, config


def perturb_torch(model, marker: str, seed: int, std: float) -> None:
    """Random adapter factors in a torch model (parameters named with ``marker``), then eval mode.

    DoRA magnitudes are jittered around their init (the base row norms) rather than replaced.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                noise = torch.randn(p.shape, generator=gen)
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * noise)
                else:
                    p.copy_(std * noise)
    model.eval()
