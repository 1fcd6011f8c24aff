"""The embedded SmolLM2-135M-Instruct: loaded right (perplexity, a sensible answer), saved as a stock mlx-lm folder."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
import mlx_lm
from mlx_lm import generate

from smoa_mlx.loading import load_model, load_model_with_adapter
from smoa_mlx.models import llamacpp_permute, llamacpp_unpermute, save_embedded, save_model_folder

TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. When it is heated, its molecules move faster and "
    "faster until they escape into the air as steam. At higher altitudes the air pressure is lower, so water "
    "boils at a lower temperature, and food takes longer to cook. This is why mountain climbers often use "
    "pressure cookers to prepare their meals."
)


def perplexity(model, tokenizer, text: str = TEXT) -> float:
    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())


def greedy_answer(model, tokenizer, question: str, max_tokens: int = 24) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_permutation_roundtrip():
    w = mx.arange(12 * 5).reshape(12, 5)
    assert mx.array_equal(llamacpp_unpermute(llamacpp_permute(w, 3), 3), w)
    assert not mx.array_equal(llamacpp_permute(w, 3), w)


def test_perplexity_and_wrong_permutation(embedded_model):
    model, tokenizer = embedded_model
    right = perplexity(model, tokenizer)
    # The weights exactly as stored in the GGUF, i.e. llama.cpp's permutation left in place.
    layers = [layer.self_attn for layer in model.model.layers]
    saved = [(a.q_proj.weight, a.k_proj.weight) for a in layers]
    try:
        for a in layers:
            a.q_proj.weight = llamacpp_permute(a.q_proj.weight, a.n_heads)
            a.k_proj.weight = llamacpp_permute(a.k_proj.weight, a.n_kv_heads)
        wrong = perplexity(model, tokenizer)
    finally:
        for a, (q, k) in zip(layers, saved):
            a.q_proj.weight, a.k_proj.weight = q, k
    print(f"perplexity: un-permuted {right:.2f}, as stored in the GGUF {wrong:.2f} ({wrong / right:.1f}x)")
    assert right < 25, right  # a 135M model on plain English; a broken load gives hundreds or more
    assert wrong > 3 * right, (right, wrong)
    assert perplexity(model, tokenizer) == pytest.approx(right, rel=1e-6)  # the fixture was put back


def test_greedy_answer(embedded_model):
    model, tokenizer = embedded_model
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")


def test_tokenizer(embedded_model):
    _, tokenizer = embedded_model
    text = "Hello world! 12345 héllo\n  indented"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("2024") == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]  # digits split singly
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.count(im_start) == 3  # system, user, assistant: the markers are single special tokens
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id in tokenizer.eos_token_ids


def test_saved_quantized_folder_loads_with_stock_mlx_lm(tmp_path, embedded_model):
    model, tokenizer = embedded_model
    folder = save_embedded(tmp_path / "smollm2-q4", quantized=True)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["tie_word_embeddings"] is True
    qmodel, qtok = mlx_lm.load(str(folder))
    assert isinstance(qmodel.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(qmodel.model.embed_tokens, nn.QuantizedEmbedding)
    # Q4_1 is exactly MLX's affine 4-bit format: the packed model computes what the dequantized one does.
    # (A short input: MLX's quantized matmuls on a CPU are ~20x slower than dense float32, see README.)
    ids = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert mx.allclose(qmodel(ids), model(ids), atol=1e-3, rtol=1e-3)
    assert qtok.encode(TEXT) == tokenizer.encode(TEXT)
    chat = [{"role": "user", "content": "Hi"}]
    assert qtok.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert "<|im_end|>" not in qtok.decode(tokenizer.encode("a<|im_end|>b"), skip_special_tokens=True)
    with pytest.raises(FileExistsError, match="already exists"):
        save_embedded(folder)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_model_with_adapter(None, tmp_path / "no-adapter")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"fine_tune_type": "prefix"}')
    (tmp_path / "bad" / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown fine_tune_type 'prefix'"):
        load_model_with_adapter(None, tmp_path / "bad")


def _tiny_folder(path, tokenizer, hidden: int):
    """A 2-layer llama with the embedded tokenizer, saved as a stock mlx-lm folder (tiny, so adapters are cheap)."""
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer.vocab),
        "tie_word_embeddings": True,
    }
    mx.random.seed(hidden)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return save_model_folder(path, model, tokenizer, config)


def _randomize(model, leaf: str):
    params = [(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten([(k, v) for k, v in params if leaf in k]))


def test_load_model_with_adapter_smoa_and_lora(tmp_path, embedded_model):
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from smoa_mlx import SMoAConfig, apply_smoa, save_adapter
    from smoa_mlx.adapters import apply_adapter

    _, tokenizer = embedded_model
    folder = _tiny_folder(tmp_path / "tiny", tokenizer, hidden=64)
    other, _ = load_model(str(_tiny_folder(tmp_path / "other", tokenizer, hidden=32)))
    ids = mx.array([tokenizer.encode("The quick brown fox")])

    # SMoA adapter, recording its base: model=None finds it through adapter_config.json.
    model = mlx_lm_load_model(folder)[0]
    plain = model(ids)
    config = SMoAConfig(rank=4, blocks=2, target_modules=["q_proj", "v_proj"])
    apply_smoa(model, config)
    _randomize(model, "smoa_factors")
    want = model(ids)
    assert not mx.allclose(want, plain, atol=1e-4)
    save_adapter(model, tmp_path / "smoa", config, extra_config={"model": str(folder)})
    loaded, _ = load_model_with_adapter(None, tmp_path / "smoa")
    assert mx.allclose(loaded(ids), want, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        apply_adapter(other, tmp_path / "smoa")

    # mlx-lm LoRA adapter, written the way mlx_lm.lora writes one.
    model = mlx_lm_load_model(folder)[0]
    model.freeze()
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    linear_to_lora_layers(model, 2, lora)
    _randomize(model, "lora_b")
    want = model(ids)
    (tmp_path / "lora").mkdir()
    mx.save_safetensors(str(tmp_path / "lora" / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (tmp_path / "lora" / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora})
    )
    loaded, _ = load_model_with_adapter(str(folder), tmp_path / "lora")
    assert mx.allclose(loaded(ids), want, atol=1e-5)
    with pytest.raises(ValueError, match="lora adapter .* does not fit"):
        apply_adapter(other, tmp_path / "lora")


def test_weights_match_an_independent_q4_1_decoder(embedded_model):
    """transformers' own GGUF reader and Q4_1 dequantizer (torch, no MLX) decode the same values."""
    torch = pytest.importorskip("torch")
    gguf = pytest.importorskip("transformers.integrations.gguf.reader")
    from transformers.integrations.gguf.dequant import dequantize

    from smoa_mlx.models import embedded_gguf_path

    model, _ = embedded_model
    header = gguf.GgufHeader.from_file(str(embedded_gguf_path()))
    tensors, infos = gguf.load_gguf_state_dict(header), {i.name: i for i in header.tensors}
    layer = model.model.layers[3]
    heads = layer.self_attn.n_heads, layer.self_attn.n_kv_heads
    ours = {
        "blk.3.attn_q.weight": llamacpp_permute(layer.self_attn.q_proj.weight, heads[0]),  # back to file order
        "blk.3.attn_k.weight": llamacpp_permute(layer.self_attn.k_proj.weight, heads[1]),
        "blk.3.attn_v.weight": layer.self_attn.v_proj.weight,
        "blk.3.ffn_down.weight": layer.mlp.down_proj.weight,
        "blk.3.attn_norm.weight": layer.input_layernorm.weight,
        "token_embd.weight": model.model.embed_tokens.weight,
    }
    for name, mine in ours.items():
        raw = tensors[name][...]
        if raw.dtype == torch.uint8:
            raw = dequantize(raw.reshape(-1), infos[name].ggml_type).reshape(infos[name].shape)
        assert mx.array_equal(mine, mx.array(raw.float().numpy())), name


def test_tokenizer_matches_transformers_gguf_conversion(embedded_model):
    """transformers' own GGUF tokenizer conversion (written independently) encodes the same ids."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from smoa_mlx.models import embedded_gguf_path

    _, tokenizer = embedded_model
    arch, tokens, config = mapping.get_gguf_tokenizer(str(embedded_gguf_path()))
    theirs, _ = mapping.convert_gguf_tokenizer(arch, tokens)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(tokenizer, name) == config[name], name
    for text in (TEXT, "Hello world! héllo\n  indented <|im_start|>user\nHi<|im_end|>", "In 2024, 12345 ünïcödé 🙂"):
        assert tokenizer.encode(text) == theirs.encode(text).ids, text


def test_gguf_metadata_errors_name_the_key():
    from smoa_mlx.models.gguf import gguf_config, read_gguf
    from smoa_mlx.models.gguf_tokenizer import gguf_tokenizer

    with pytest.raises(ValueError, match="general.architecture is 'qwen2'"):
        gguf_config({"general.architecture": "qwen2"}, "x.gguf")
    with pytest.raises(ValueError, match="x.gguf: metadata key 'llama.block_count' is missing"):
        meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4}
        gguf_config({**meta, "llama.vocab_size": 100}, "x.gguf")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'llama-bpe' is not supported"):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}, "x.gguf")
    with pytest.raises(ValueError, match="only byte-level BPE"):
        gguf_tokenizer({"tokenizer.ggml.model": "llama"}, "x.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        read_gguf("/nonexistent/model.gguf")
