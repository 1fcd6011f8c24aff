"""A fused SMoA model exported as a transformers checkpoint gives the MLX logits in PyTorch."""

import json
import os

import pytest
from convert_helpers import assert_close, make_hf_llama, mlx_logits, smoa_model, torch_logits

from smoa_mlx import atomic
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


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_hf_replaces_an_existing_checkpoint_whole(tmp_path, monkeypatch):
    """An existing export is refused without force and replaced whole with it: a model sharded another way leaves
    no stale shard or index (loaders read every ``model*.safetensors``); after every rename of the export (where a
    kill could stop it) the folder holds the old checkpoint or the new one, never a mix; an export that fails half
    way leaves the old checkpoint complete, byte for byte."""
    pytest.importorskip("transformers")
    import mlx_lm.utils
    from convert_helpers import load_mlx
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    base_dir = tmp_path / "base"
    make_hf_llama(base_dir, tokenizer=True)
    model, config = load_mlx(base_dir)
    tokenizer = load_tokenizer(base_dir)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    real_shards = mlx_lm.utils.make_shards
    with monkeypatch.context() as m:  # the old checkpoint: one shard per tensor, with an index
        m.setattr(mlx_lm.utils, "make_shards", lambda weights: real_shards(weights, 0))
        export_hf(model, tokenizer, config, out)
    old = _files(out)
    assert "model.safetensors.index.json" in old and "model-00002-of-" in " ".join(old)

    with pytest.raises(FileExistsError, match="force=True"):
        export_hf(model, tokenizer, config, out)
    assert _files(out) == old

    def broken(self, *args, **kwargs):
        raise OSError("simulated failure while writing the tokenizer")

    with monkeypatch.context() as m:
        m.setattr(TokenizerWrapper, "save_pretrained", broken, raising=False)
        with pytest.raises(OSError, match="simulated"):
            export_hf(model, tokenizer, config, out, force=True)
    assert _files(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no staging folder left

    export_hf(model, tokenizer, config, fresh)
    new = _files(fresh)
    seen = []  # what the folder holds after each rename: where a kill could stop the export

    def watched(real):
        def rename(*args, **kwargs):
            result = real(*args, **kwargs)
            seen.append(_files(out) if out.is_dir() else None)
            return result

        return rename

    with monkeypatch.context() as m:
        m.setattr(os, "replace", watched(os.replace))
        m.setattr(atomic, "exchange", watched(atomic.exchange))
        export_hf(model, tokenizer, config, out, force=True)
    assert seen and all(files in (old, new) for files in seen)  # never new files beside old ones
    assert _files(out) == new  # nothing of the sharded checkpoint is left
    assert "model.safetensors" in new and not any(n.startswith("model-") for n in new)
