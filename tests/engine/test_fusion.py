"""Fused projections compute what mlx-lm's separate ones do, and touch only Llama layers."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.models import llama, qwen3
from mlx_lm.models.cache import make_prompt_cache

from mlx_serving.engine.fusion import FusedAttention, FusedMLP, fuse_projections
from mlx_serving.engine.loading import load_model
from mlx_serving.engine.models import ModelSource

TOKENS = mx.array([[1, 5, 9, 200, 300, 17, 44, 1000], [3, 3, 3, 3, 2, 900, 12, 7]])


def logits_in_two_calls(model):
    """A prefill, then one decode step on its cache: both of the model's paths."""
    cache = make_prompt_cache(model)
    first = model(TOKENS[:, :-1], cache=cache)
    return mx.concatenate([first, model(TOKENS[:, -1:], cache=cache)], axis=1)


def small_llama(**overrides) -> llama.Model:
    args = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=1024,
    )
    model = llama.Model(llama.ModelArgs(**(args | overrides)))
    mx.eval(model.parameters())
    return model


def copy_of(model: nn.Module, make) -> nn.Module:
    twin = make()
    twin.update(model.parameters())
    return twin


def test_the_test_model_fuses_and_keeps_its_outputs(model_path):
    plain, _ = load(str(model_path))
    fused, _ = load(str(model_path))
    layers = len(fused.model.layers)
    assert fuse_projections(fused) == 2 * layers
    block = fused.model.layers[0]
    assert type(block.self_attn) is FusedAttention and type(block.mlp) is FusedMLP
    assert "q_proj" not in block.self_attn and "gate_proj" not in block.mlp
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=1e-4)


LLAMA3_ROPE = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "mlp_bias": True}, LLAMA3_ROPE, {"rope_traditional": True}],
    ids=["plain", "biases", "llama3-rope", "traditional-rope"],
)
def test_fused_layers_compute_the_same(overrides):
    plain = small_llama(**overrides)
    fused = copy_of(plain, lambda: small_llama(**overrides))
    assert fuse_projections(fused) == 4
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=1e-4)


def test_quantized_projections_fuse_and_compute_the_same():
    plain = small_llama()
    nn.quantize(plain, group_size=32, bits=4)
    fused = small_llama()
    nn.quantize(fused, group_size=32, bits=4)
    fused.update(plain.parameters())
    assert fuse_projections(fused) == 4
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=1e-4)


def test_mixed_projection_kinds_are_left_alone():
    """q quantized but k and v not (a mixed-precision checkpoint): nothing to concatenate."""
    model = small_llama()
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, _: "q_proj" in path)
    assert fuse_projections(model) == 2  # the MLPs only
    assert type(model.model.layers[0].self_attn) is llama.Attention


def test_other_architectures_are_served_as_loaded():
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=1024,
        max_position_embeddings=512,
        rope_theta=10000.0,
        head_dim=16,
        tie_word_embeddings=True,
    )
    model = qwen3.Model(args)
    before = logits_in_two_calls(model)
    assert fuse_projections(model) == 0
    assert mx.array_equal(before, logits_in_two_calls(model))


@pytest.mark.parametrize("fuse", [True, False])
def test_loading_fuses_only_when_asked(model_path, fuse):
    loaded = load_model(ModelSource(local_path=str(model_path)), "tiny", fuse=fuse)
    attention = type(loaded.model.model.layers[0].self_attn)
    assert attention is (FusedAttention if fuse else llama.Attention)
