"""Decode attention: when fused attention takes it, what it hands it, and what it computes.

The native op (mlx_serving._native, native/decode_attention/) runs here on the CPU; its CUDA
kernel runs in the GPU tests (the lent GPU machine, after scripts/build_native_gpu.sh; CI has
no GPU). Both are checked against MLX's own masked attention, which is also the pure-MLX
fallback of the same contract.
"""

import os
import re

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache
from test_fusion import ATOL, copy_of, small_llama

from mlx_serving.engine import decode_attention, native
from mlx_serving.engine.fusion import fuse_projections


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


needs_cuda = pytest.mark.skipif(not on_cuda(), reason="needs MLX on CUDA")

# Largest |difference| from exact (float32) attention, per dtype: the output's rounding and, in
# low precision, that of the inputs' products.
TOLERANCE = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def ext():
    """The extension; it is built by the project's install, so missing it fails (unless off)."""
    module = native.extension()
    if module is None:
        if os.environ.get(native.DISABLE_ENV) == "0":
            pytest.skip(f"{native.DISABLE_ENV}=0 turns the native extension off")
        pytest.fail("mlx_serving._native does not import: reinstall (pip install -e .)")
    return module


def kernel_device():
    """The default device where the extension has a kernel for it, else the CPU."""
    return mx.default_device() if native.device_backend() in native.backends() else mx.cpu


def masked_attention(queries, keys, values, left_padding, scale):
    """What the kernel must compute, by MLX's own masked attention, laid out as the kernel's."""
    return decode_attention.masked_attention(queries, keys, values, left_padding, scale)


def exact(queries, keys, values, left_padding, scale):
    """The same in float32, from the same (rounded) inputs."""
    return masked_attention(
        *(x.astype(mx.float32) for x in (queries, keys, values)), left_padding, scale
    )


def attention_inputs(B=3, H=8, Hkv=2, D=64, length=37, dtype=mx.float32, seed=3, paddings=None):
    """Keys and values as a batch cache holds them: a slice of a longer buffer."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(seed), 4)
    queries = mx.random.normal((B, H, 1, D), key=k1).astype(dtype)
    keys = mx.random.normal((B, Hkv, length + 64, D), key=k2).astype(dtype)[..., :length, :]
    values = mx.random.normal((B, Hkv, length + 64, D), key=k3).astype(dtype)[..., :length, :]
    if paddings is None:
        left_padding = mx.random.randint(0, length, (B,), key=k4)
        left_padding[0] = 0
        left_padding[-1] = length - 1
    else:
        left_padding = mx.array(paddings)
    return queries, keys, values, left_padding


def largest_error(out, expected) -> float:
    return mx.abs(out.astype(mx.float32) - expected).max().item()


# ---- when fused attention takes it ------------------------------------------------------------


def test_applies_only_to_a_batched_decode_step_where_the_kernel_is_faster(monkeypatch):
    queries, keys, _, _ = attention_inputs()
    batch_cache = BatchKVCache([0, 0, 0])
    assert decode_attention.applies(queries, keys, batch_cache) is decode_attention.kernel_here()
    monkeypatch.setattr(decode_attention, "kernel_here", lambda: True)
    assert decode_attention.applies(queries, keys, batch_cache)
    prefill = mx.concatenate([queries, queries], axis=2)
    assert not decode_attention.applies(prefill, keys, batch_cache)
    assert not decode_attention.applies(queries, keys, KVCache())
    odd_heads = attention_inputs(D=80)
    assert not decode_attention.applies(odd_heads[0], odd_heads[1], batch_cache)
    assert not decode_attention.applies(queries.astype(mx.int32), keys, batch_cache)
    batch_cache.prepare(right_padding=[0, 2, 0])
    assert not decode_attention.applies(queries, keys, batch_cache)


def test_the_kernel_is_taken_where_the_extension_has_it_and_it_is_faster(monkeypatch, ext):
    backend = native.device_backend()
    expected = backend in native.backends() and backend in decode_attention.FASTER_ON
    assert decode_attention.kernel_here() is expected
    if mx.default_device() == mx.cpu:
        assert decode_attention.kernel_here(), "the CPU kernel is the faster path"
    monkeypatch.setattr(decode_attention, "FASTER_ON", ())
    assert not decode_attention.kernel_here()


def test_without_the_extension_decode_attention_is_the_fallback(monkeypatch):
    inputs = attention_inputs()
    monkeypatch.setattr(native, "extension", lambda: None)
    assert not decode_attention.kernel_here()
    out = decode_attention.decode_attention(*inputs, 0.125)
    assert mx.array_equal(out, masked_attention(*inputs, 0.125))


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

    monkeypatch.setattr(decode_attention, "kernel_here", lambda: True)
    monkeypatch.setattr(decode_attention, "decode_attention", kernel_by_mask)
    assert mx.allclose(batch_logits(fused, PROMPTS), expected, atol=ATOL)
    assert len(calls) == 2 * len(fused.layers)  # every layer of both decode steps, no prefill


def test_the_kernel_can_be_turned_off(monkeypatch):
    model = small_llama(**HEAD_DIM_64)
    fuse_projections(model, decode_kernel=False)
    assert all(layer.self_attn.decode_kernel is False for layer in model.layers)
    monkeypatch.setattr(decode_attention, "kernel_here", lambda: True)
    monkeypatch.setattr(
        decode_attention, "decode_attention", lambda *args: pytest.fail("the kernel ran")
    )
    batch_logits(model, PROMPTS)


def test_a_fused_model_decodes_through_the_native_kernel_as_the_plain_model(monkeypatch, ext):
    """On this machine's default device (the CPU here), end to end, with the real op."""
    if not decode_attention.kernel_here():
        pytest.skip("the native kernel is not the path on this device")
    plain = small_llama(**HEAD_DIM_64)
    fused = copy_of(plain, lambda: small_llama(**HEAD_DIM_64))
    fuse_projections(fused)
    calls = []
    op = ext.decode_attention

    class Counting:
        def __getattr__(self, name):
            return getattr(ext, name)

        def decode_attention(self, *args):
            calls.append(args)
            return op(*args)

    monkeypatch.setattr(native, "extension_for_device", lambda: Counting())
    assert mx.allclose(batch_logits(fused, PROMPTS), batch_logits(plain, PROMPTS), atol=ATOL)
    assert len(calls) == 2 * len(fused.layers)


# ---- what the native op computes (on the default device where it has a kernel, else the CPU) ---

SHAPES = [
    # B, H, H_kv, S
    (1, 4, 4, 1),
    (2, 4, 1, 300),
    (3, 8, 2, 37),
    (5, 8, 8, 129),
    (8, 8, 4, 64),
    (4, 4, 2, 300),
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_the_native_op_is_the_fallback_within_the_dtype_tolerance(ext, D, dtype):
    for seed, (B, H, Hkv, S) in enumerate(SHAPES):
        inputs = attention_inputs(B=B, H=H, Hkv=Hkv, D=D, length=S, dtype=dtype, seed=seed)
        scale = D**-0.5
        expected = exact(*inputs, scale)
        out = ext.decode_attention(*inputs, scale, stream=kernel_device())
        assert out.shape == (B, 1, H * D) and out.dtype == dtype
        assert largest_error(out, expected) < TOLERANCE[dtype], (B, H, Hkv, S)
        fallback = masked_attention(*inputs, scale)
        assert largest_error(out, fallback.astype(mx.float32)) < 2 * TOLERANCE[dtype]


def test_paddings_from_none_to_all_but_the_last_key(ext):
    S = 50
    inputs = attention_inputs(B=6, length=S, paddings=[0, 1, 17, S - 2, S - 1, 0])
    out = ext.decode_attention(*inputs, 0.125, stream=kernel_device())
    assert largest_error(out, exact(*inputs, 0.125)) < TOLERANCE[mx.float32]
    # The row padded to its last key attends to that key alone: its values, per head.
    queries, keys, values, _ = inputs
    last = values[4, :, -1, :]  # (H_kv, D)
    per_head = mx.repeat(last, queries.shape[1] // keys.shape[1], axis=0).reshape(-1)
    assert largest_error(out[4, 0], per_head) < 1e-6


def test_a_row_with_no_key_left_is_zeros_and_a_negative_padding_counts_as_none(ext):
    S = 20
    inputs = attention_inputs(B=3, length=S, paddings=[S, -4, 3])
    out = ext.decode_attention(*inputs, 0.125, stream=kernel_device())
    assert mx.array_equal(out[0], mx.zeros_like(out[0]))
    unpadded = attention_inputs(B=3, length=S, paddings=[0, 0, 3])
    assert largest_error(out[1:], exact(*unpadded, 0.125)[1:]) < TOLERANCE[mx.float32]


def test_any_strides(ext):
    """Views as the batch cache and fused projections make them, and worse."""
    B, H, Hkv, S, D = 4, 8, 2, 45, 64
    k1, k2, k3 = mx.random.split(mx.random.key(11), 3)
    # Queries split off a fused q/k/v projection: (B, 1, H + 2 H_kv, D) -> heads, a view.
    qkv = mx.random.normal((B, 1, H + 2 * Hkv, D), key=k1)
    queries = qkv.transpose(0, 2, 1, 3)[:, :H]
    # Keys laid out (B, S, H_kv, D) and transposed; values every other row of a wider buffer
    # with every other element of a doubled head dim (a last stride of 2).
    keys = mx.random.normal((B, S + 9, Hkv, D), key=k2).transpose(0, 2, 1, 3)[:, :, 3 : 3 + S]
    values = mx.random.normal((B, Hkv, 2 * S, 2 * D), key=k3)[:, :, ::2, ::2]
    left_padding = mx.array([0, 7, 44, 2, 9, 1, 3, 3])[::2]  # strided too
    mx.eval(queries, keys, values, left_padding)  # views of their buffers, as laid out above
    out = ext.decode_attention(queries, keys, values, left_padding, 0.1, stream=kernel_device())
    contiguous = [mx.array(x) for x in (queries, keys, values)]
    assert largest_error(out, exact(*contiguous, left_padding, 0.1)) < TOLERANCE[mx.float32]


def test_left_padding_of_any_integer_type(ext):
    inputs = attention_inputs(paddings=[0, 3, 36])
    expected = ext.decode_attention(*inputs, 0.125, stream=kernel_device())
    for dtype in (mx.int64, mx.uint8, mx.int16):
        padding = inputs[3].astype(dtype)
        assert mx.array_equal(
            ext.decode_attention(*inputs[:3], padding, 0.125, stream=kernel_device()), expected
        )


def bad_arguments():
    q, k, v, lp = attention_inputs()
    return {
        "queries must be (B, H, 1, D)": (mx.concatenate([q, q], axis=2), k, v, lp),
        "keys and values must": (q, k, v[:, :, :5], lp),
        "do not match queries": (q, k[:2], v[:2], lp),
        "head dim must be 64, 128 or 256": (q[..., :32], k[..., :32], v[..., :32], lp),
        "must be a multiple of key/value heads": (q[:, :7], k, v, lp),
        "queries must be float32, float16 or bfloat16": tuple(x.astype(mx.int32) for x in (q, k, v))
        + (lp,),
        "must have queries' dtype": (q, k.astype(mx.float16), v.astype(mx.float16), lp),
        "left_padding must be (B,)": (q, k, v, lp[:2]),
        "left_padding must be integers": (q, k, v, lp.astype(mx.float32)),
    }


@pytest.mark.parametrize("message", list(bad_arguments()))
def test_bad_arguments_are_a_clear_error(ext, message):
    args = bad_arguments()[message]
    with pytest.raises(ValueError, match=re.escape(message)):
        ext.decode_attention(*args, 0.125, stream=kernel_device())
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_attention.masked_attention(*args, 0.125)


def test_the_op_is_lazy_and_composes(ext):
    """A graph node like any other: under mx.compile, and twice in one graph."""

    def op(*args):
        return ext.decode_attention(*args, stream=kernel_device())

    inputs = attention_inputs()
    expected = exact(*inputs, 0.2)
    both = op(*inputs, 0.2) + op(*inputs, 0.2)
    assert largest_error(both, 2 * expected) < 2 * TOLERANCE[mx.float32]
    compiled = mx.compile(lambda q: op(q, *inputs[1:], 0.2) * 1.0)
    assert largest_error(compiled(inputs[0]), expected) < TOLERANCE[mx.float32]


# ---- on CUDA ----------------------------------------------------------------------------------


@pytest.fixture
def cuda_ext(ext):
    if "cuda" not in native.backends():
        pytest.skip("the extension has no CUDA kernel: build it with scripts/build_native_gpu.sh")
    return ext


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (32, 8)])
def test_the_cuda_kernel_matches_masked_attention(cuda_ext, dtype, D, H, Hkv):
    inputs = attention_inputs(B=5, H=H, Hkv=Hkv, D=D, length=300, dtype=dtype)
    scale = D**-0.5
    out = cuda_ext.decode_attention(*inputs, scale)
    assert out.shape == (5, 1, H * D) and out.dtype == dtype
    assert largest_error(out, exact(*inputs, scale)) < TOLERANCE[dtype]


@pytest.mark.gpu
@needs_cuda
def test_the_cuda_kernel_takes_any_strides_and_composes(cuda_ext):
    test_any_strides(cuda_ext)
    test_paddings_from_none_to_all_but_the_last_key(cuda_ext)
    test_a_row_with_no_key_left_is_zeros_and_a_negative_padding_counts_as_none(cuda_ext)
    # Under mx.compile, equal zero-filled outputs are merged: the second call cannot take its
    # buffer over and allocates its own (decode_attention.cu).
    inputs = attention_inputs()
    expected = exact(*inputs, 0.2)
    compiled = mx.compile(
        lambda q: (
            cuda_ext.decode_attention(q, *inputs[1:], 0.2)
            - cuda_ext.decode_attention(2 * q, *inputs[1:], 0.1)
        )
    )
    again = exact(2 * inputs[0], *inputs[1:], 0.1)
    assert largest_error(compiled(inputs[0]), expected - again) < 4 * TOLERANCE[mx.float32]


@pytest.mark.gpu
@needs_cuda
def test_a_fused_model_on_cuda_decodes_through_the_kernel(cuda_ext):
    assert decode_attention.kernel_here()
    plain = small_llama(**HEAD_DIM_64)
    fused = copy_of(plain, lambda: small_llama(**HEAD_DIM_64))
    fuse_projections(fused)
    assert mx.allclose(batch_logits(fused, PROMPTS), batch_logits(plain, PROMPTS), atol=ATOL)
