"""Fused projections compute what mlx-lm's separate ones do, and touch only the layers they know."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.models import gemma, llama, qwen2, qwen3
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlx_serving.engine import fusion
from mlx_serving.engine.fusion import (
    CompiledDecodeBlock,
    CompiledQwen2DecodeBlock,
    FusedAttention,
    FusedMLP,
    FusedQwen2Attention,
    FusedQwen3Attention,
    fuse_projections,
)
from mlx_serving.engine.loading import build_model

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=1024,
    rope_theta=10000.0,
)


# cuBLAS picks float32 matmul kernels by shape, some of reduced precision: on CUDA fused and
# separate projections differ by about 1e-3, on the CPU by about 1e-6.
ATOL = 1e-4 if mx.default_device() == mx.cpu else 5e-3

TOKENS = mx.array([[1, 5, 9, 200, 300, 17, 44, 1000], [3, 3, 3, 3, 2, 900, 12, 7]])


def logits_in_two_calls(model):
    """A prefill, then one decode step on its cache: both of the model's paths."""
    cache = make_prompt_cache(model)
    first = model(TOKENS[:, :-1], cache=cache)
    return mx.concatenate([first, model(TOKENS[:, -1:], cache=cache)], axis=1)


def small_llama(**overrides) -> llama.Model:
    args = llama.ModelArgs(model_type="llama", **(SHAPE | overrides))
    return randomized(llama.Model(args))


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter random, norms included (they start as ones, which hides a mix-up)."""
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(7), len(flat))
    values = [mx.random.normal(p.shape, key=k) * 0.2 for (_, p), k in zip(flat, keys, strict=True)]
    model.update(tree_unflatten([(name, v) for (name, _), v in zip(flat, values, strict=True)]))
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
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=ATOL)


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
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=ATOL)


def test_quantized_projections_fuse_and_compute_the_same():
    plain = small_llama()
    nn.quantize(plain, group_size=32, bits=4)
    fused = small_llama()
    nn.quantize(fused, group_size=32, bits=4)
    fused.update(plain.parameters())
    assert fuse_projections(fused) == 4
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=ATOL)


def test_mixed_projection_kinds_are_left_alone():
    """q quantized but k and v not (a mixed-precision checkpoint): nothing to concatenate."""
    model = small_llama()
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, _: "q_proj" in path)
    assert fuse_projections(model) == 2  # the MLPs only
    assert type(model.model.layers[0].self_attn) is llama.Attention


def small_qwen2() -> qwen2.Model:
    return qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **SHAPE))


def small_qwen3() -> qwen3.Model:
    args = qwen3.ModelArgs(
        model_type="qwen3",
        **SHAPE,
        max_position_embeddings=512,
        head_dim=16,
        tie_word_embeddings=True,
    )
    return qwen3.Model(args)


@pytest.mark.parametrize(
    "make, attention",
    [(small_qwen2, FusedQwen2Attention), (small_qwen3, FusedQwen3Attention)],
    ids=["qwen2", "qwen3"],
)
def test_qwen_layers_fuse_and_compute_the_same(make, attention):
    plain = randomized(make())
    fused = copy_of(plain, make)
    assert fuse_projections(fused) == 4
    assert type(fused.model.layers[0].self_attn) is attention
    assert mx.allclose(logits_in_two_calls(plain), logits_in_two_calls(fused), atol=ATOL)


def test_other_architectures_are_served_as_loaded():
    args = gemma.ModelArgs(model_type="gemma", **SHAPE, head_dim=16)
    model = gemma.Model(args)
    before = logits_in_two_calls(model)
    assert fuse_projections(model) == 0
    assert mx.array_equal(before, logits_in_two_calls(model))


@pytest.mark.parametrize("fuse", [True, False])
def test_loading_fuses_only_when_asked(model_path, fuse):
    model, _ = build_model(model_path, fuse=fuse)
    attention = type(model.model.layers[0].self_attn)
    assert attention is (FusedAttention if fuse else llama.Attention)


def batch_decode(model, prompts, steps: int = 6):
    """Left-padded prompts prefilled in a batch cache, then `steps` greedy decode steps: the
    tokens and the last step's logits."""
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])
    logits = model(tokens, cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        out.append(token.tolist())
        logits = model(token[:, None], cache=cache)[:, -1]
    return out, logits


PROMPTS = [[1, 5, 9, 200, 300, 17, 44], [3, 900], [8, 7, 6, 5]]


def random_qwen2() -> qwen2.Model:
    return randomized(small_qwen2())


@pytest.mark.parametrize("make", [small_llama, random_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_decode_computes_what_the_layers_do_op_by_op(make, rows, monkeypatch):
    plain = make()
    fused = copy_of(plain, make)
    fuse_projections(plain, compile_decode=False)
    fuse_projections(fused, compile_decode=True)
    assert type(fused.model.layers[0]) in (CompiledDecodeBlock, CompiledQwen2DecodeBlock)
    assert not any(isinstance(layer, CompiledDecodeBlock) for layer in plain.model.layers)
    traced = []
    compile_ = mx.compile
    monkeypatch.setattr(mx, "compile", lambda *a, **k: traced.append(1) or compile_(*a, **k))
    tokens, logits = batch_decode(fused, PROMPTS[:rows])
    monkeypatch.undo()
    assert len(traced) == 2 * len(fused.model.layers)  # built once, at the first decode step
    expected_tokens, expected_logits = batch_decode(plain, PROMPTS[:rows])
    assert tokens == expected_tokens
    assert mx.allclose(logits, expected_logits, atol=ATOL)


def test_compiled_decode_leaves_prefill_large_batches_and_its_switch_to_the_layers(monkeypatch):
    model = small_llama()
    fuse_projections(model, compile_decode=True)
    calls = []
    monkeypatch.setattr(fusion, "before_attention", lambda *a: calls.append(1) or pytest.fail())
    monkeypatch.setattr(fusion, "COMPILED_BATCH", 2)
    batch_decode(model, PROMPTS, steps=2)  # 3 rows: past COMPILED_BATCH
    model.model.layers[0].compiled_decode = False
    for layer in model.model.layers[1:]:
        layer.compiled_decode = False
    batch_decode(model, PROMPTS[:1], steps=2)
    assert not calls


def test_compiled_decode_is_the_default_only_where_measured_faster():
    model = small_llama()
    fuse_projections(model)
    compiled = type(model.model.layers[0]) is CompiledDecodeBlock
    assert compiled == (fusion.native.device_backend() in fusion.COMPILED_ON)


def test_a_compiled_model_is_freed_when_dropped():
    """The compiled functions must not keep the layer (and its weights) in a reference cycle:
    an unloaded model's memory comes back at once, not at some later garbage collection."""
    model = small_llama(hidden_size=256, intermediate_size=1024)
    fuse_projections(model, compile_decode=True)
    batch_decode(model, PROMPTS[:1], steps=2)
    held = mx.get_active_memory()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    del model
    assert held - mx.get_active_memory() >= weights


def test_the_test_model_decodes_compiled_in_mlx_lms_batch_as_mlx_lm_alone(model_path, reference):
    """Greedy, token for token: mlx-lm's BatchGenerator on the fused, compiled test model (rows
    joining and leaving a left-padded batch) against mlx-lm's own generate, prompt by prompt."""
    from mlx_lm.generate import BatchGenerator

    plain, tokenizer = reference
    model, _ = load(str(model_path))
    fuse_projections(model, compile_decode=True)
    assert all(type(layer) is CompiledDecodeBlock for layer in model.model.layers)
    prompts = [tokenizer.encode(text) for text in ("Once upon", "The quick brown fox", "42")]
    lengths = [20, 9, 14]
    generator = BatchGenerator(model, stop_tokens=None, completion_batch_size=8)
    uids = generator.insert(prompts, max_tokens=lengths)
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    while len(got) and any(len(got[u]) < n for u, n in zip(uids, lengths, strict=True)):
        for response in generator.next()[1]:
            got[response.uid].append(response.token)
    generator.close()
    for uid, prompt, n in zip(uids, prompts, lengths, strict=True):
        expected = [r.token for r in mlx_lm.stream_generate(plain, tokenizer, prompt, max_tokens=n)]
        assert got[uid] == expected
