"""Which modules apply_smoa adapts on a mixture-of-experts model (a real mlx-lm Mixtral, tiny): its experts are
SwitchLinear layers, which SMoA does not wrap (mlx-lm's LoRA does); a user must hear that, not find out later."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import mixtral

from smoa_mlx.adapters.apply import apply_smoa, unadapted_matches
from smoa_mlx.config import SMoAConfig


def _moe():
    mx.random.seed(0)
    return mixtral.Model(mixtral.ModelArgs(model_type="mixtral", vocab_size=64, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=4))


def test_experts_matching_the_targets_are_named_and_the_linears_adapted():
    model = _moe()
    assert sorted(unadapted_matches(model, ["up_proj", "down_proj"])) == ["SwitchLinear"]
    with pytest.warns(UserWarning, match=r"left unadapted.*4 SwitchLinear \(model\.layers\.0\.block_sparse_moe"):
        paths = apply_smoa(model, SMoAConfig(rank=4, blocks=2))
    assert paths and all("self_attn" in p for p in paths)  # q, k, v of both blocks: the defaults that are linears
    tokens = mx.array([[1, 2, 3, 4]])
    assert model(tokens).shape == (1, 4, 64)  # the adapted model still runs


def test_nothing_adaptable_names_what_matched():
    with pytest.raises(ValueError, match=r"in any block; SMoA wraps nn\.Linear .* 2 SwitchLinear"):
        apply_smoa(_moe(), SMoAConfig(rank=4, blocks=2, target_modules=["up_proj"]))
