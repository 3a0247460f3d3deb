"""The decode attention kernel: when it runs, what fused attention hands it, what it computes.

The kernel itself needs CUDA (the GPU tests run on the lent H100; CI has no GPU). On any
machine, fused attention is checked to route a batched decode step to it with arguments that,
given MLX's own masked attention as the kernel, reproduce the model's outputs exactly.
"""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache
from test_fusion import ATOL, copy_of, small_llama

from mlx_serving.engine import decode_attention
from mlx_serving.engine.fusion import fuse_projections

needs_cuda = pytest.mark.skipif(not decode_attention.on_cuda(), reason="needs MLX on CUDA")


def masked_attention(queries, keys, values, left_padding, scale):
    """What the kernel must compute, by MLX's own masked attention, laid out as the kernel's."""
    B, H, _, D = queries.shape
    length = keys.shape[2]
    mask = (mx.arange(length)[None] >= left_padding[:, None]).reshape(B, 1, 1, length)
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, 1, H * D)


def attention_inputs(B=3, H=8, Hkv=2, D=64, length=37, dtype=mx.float32):
    """Keys and values as a batch cache holds them: a slice of a longer buffer."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(3), 4)
    queries = mx.random.normal((B, H, 1, D), key=k1).astype(dtype)
    keys = mx.random.normal((B, Hkv, 256, D), key=k2).astype(dtype)[..., :length, :]
    values = mx.random.normal((B, Hkv, 256, D), key=k3).astype(dtype)[..., :length, :]
    left_padding = mx.random.randint(0, length, (B,), key=k4)
    left_padding[0] = 0
    return queries, keys, values, left_padding


def test_applies_only_to_a_batched_decode_step_on_cuda(monkeypatch):
    queries, keys, _, _ = attention_inputs()
    batch_cache = BatchKVCache([0, 0, 0])
    assert decode_attention.applies(queries, keys, batch_cache) is decode_attention.on_cuda()
    monkeypatch.setattr(decode_attention, "on_cuda", lambda: True)
    assert decode_attention.applies(queries, keys, batch_cache)
    prefill = mx.concatenate([queries, queries], axis=2)
    assert not decode_attention.applies(prefill, keys, batch_cache)
    assert not decode_attention.applies(queries, keys, KVCache())
    odd_heads = attention_inputs(D=80)
    assert not decode_attention.applies(odd_heads[0], odd_heads[1], batch_cache)
    assert not decode_attention.applies(queries.astype(mx.int32), keys, batch_cache)
    batch_cache.prepare(right_padding=[0, 2, 0])
    assert not decode_attention.applies(queries, keys, batch_cache)


def batch_logits(model, prompts):
    """A left-padded batch prefill (MLX's attention), then two decode steps (maybe the kernel)."""
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])
    steps = [model(tokens, cache=cache)[:, -1:]]
    for token in ([5], [9]):
        steps.append(model(mx.array([token] * len(prompts)), cache=cache))
    return mx.concatenate(steps, axis=1)


PROMPTS = [[1, 5, 9, 200, 300, 17, 44], [3, 900], [8, 7, 6, 5]]
HEAD_DIM_64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)


def test_fused_attention_hands_the_kernel_what_reproduces_the_mask(monkeypatch):
    plain = small_llama(**HEAD_DIM_64)
    fused = copy_of(plain, lambda: small_llama(**HEAD_DIM_64))
    fuse_projections(fused)
    expected = batch_logits(plain, PROMPTS)
    calls = []

    def kernel_by_mask(*args):
        calls.append(args)
        return masked_attention(*args)

    monkeypatch.setattr(decode_attention, "on_cuda", lambda: True)
    monkeypatch.setattr(decode_attention, "decode_attention", kernel_by_mask)
    assert mx.allclose(batch_logits(fused, PROMPTS), expected, atol=ATOL)
    assert len(calls) == 2 * len(fused.layers)  # every layer of both decode steps, no prefill


def test_the_kernel_can_be_turned_off(monkeypatch):
    model = small_llama(**HEAD_DIM_64)
    fuse_projections(model, decode_kernel=False)
    assert all(layer.self_attn.decode_kernel is False for layer in model.layers)
    monkeypatch.setattr(decode_attention, "on_cuda", lambda: True)
    monkeypatch.setattr(
        decode_attention, "decode_attention", lambda *args: pytest.fail("the kernel ran")
    )
    batch_logits(model, PROMPTS)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (32, 8)])
def test_the_kernel_matches_masked_attention(dtype, D, H, Hkv):
    queries, keys, values, left_padding = attention_inputs(B=5, H=H, Hkv=Hkv, D=D, dtype=dtype)
    scale = D**-0.5
    out = decode_attention.decode_attention(queries, keys, values, left_padding, scale)
    exact = masked_attention(
        *(x.astype(mx.float32) for x in (queries, keys, values)), left_padding, scale
    )
    tolerance = {mx.float32: 1e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}[dtype]
    assert out.shape == (5, 1, H * D) and out.dtype == dtype
    assert mx.abs(out.astype(mx.float32) - exact).max().item() < tolerance


@pytest.mark.gpu
@needs_cuda
def test_a_fused_model_on_cuda_decodes_through_the_kernel():
    plain = small_llama(**HEAD_DIM_64)
    fused = copy_of(plain, lambda: small_llama(**HEAD_DIM_64))
    fuse_projections(fused)
    assert mx.allclose(batch_logits(fused, PROMPTS), batch_logits(plain, PROMPTS), atol=ATOL)
