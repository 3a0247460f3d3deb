"""One kernel for a batched decode step's attention, instead of about fifteen graph nodes.

A batch of sequences of different lengths is left-padded in mlx-lm's BatchKVCache, so every
decode step attends under a mask, and MLX has no fused kernel for a masked attention on CUDA or
the CPU: it falls back to scale, two batched matmuls, a select and a softmax, plus the views
around them, in every layer. On a GPU the step is bound by the host dispatching that graph. The
native op (`mlx_serving._native.decode_attention`, native/decode_attention/) reads the cache's
left padding instead of a mask (what the mask says, and all it says, for a single new query),
and writes its output already laid out for the output projection.

Fused attention (fusion.py) takes this path only where it is faster than MLX's own attention:
where the extension has a kernel for the default device's backend and that kernel was measured
faster (`FASTER_ON`). Elsewhere attention is left to MLX. `decode_attention` itself always
works: without a native kernel it computes the same thing with MLX's masked attention.
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from . import native

HEAD_DIMS = (64, 128, 256)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

# Backends whose native kernel beats MLX's masked attention in a batched decode step: CUDA
# (the same kernel, then compiled at run time, on an H100: docs/BENCHMARKS.md) and the CPU
# (docs/ARCHITECTURE.md, "Native extension"). Metal is not measured, so MLX's own attention
# (which has a masked vector kernel there) stays.
FASTER_ON = ("cuda", "cpu")


def applies(queries: mx.array, keys: mx.array, cache) -> bool:
    """A decode step (one query per sequence) over a left-padded batch cache, where faster."""
    return (
        queries.shape[2] == 1
        and isinstance(cache, BatchKVCache)
        and cache._right_padding is None
        and queries.shape[-1] in HEAD_DIMS
        and keys.shape[-1] == queries.shape[-1]
        and queries.dtype in DTYPES
        and keys.dtype == queries.dtype
        and kernel_here()
    )


def kernel_here() -> bool:
    """Whether the default device runs the native kernel, and it is the faster path there."""
    return native.extension_for_device() is not None and native.device_backend() in FASTER_ON


def decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array, scale: float
) -> mx.array:
    """Softmax attention of each sequence's one query over its keys past its left padding.

    queries (B, H, 1, D) and keys and values (B, H_kv, S, D) of one dtype (float32, float16,
    bfloat16), D in HEAD_DIMS, H a multiple of H_kv, any strides; left_padding (B,) integers
    below S (the step's own key is always there). Returns (B, 1, H * D), the heads side by
    side, in queries' dtype. Bad shapes or dtypes raise ValueError.
    """
    module = native.extension_for_device()
    if module is not None:
        return module.decode_attention(queries, keys, values, left_padding, scale)
    return masked_attention(queries, keys, values, left_padding, scale)


def masked_attention(
    queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array, scale: float
) -> mx.array:
    """The same contract with MLX's own attention under the mask the padding stands for."""
    check(queries, keys, values, left_padding)
    B, H, _, D = queries.shape
    length = keys.shape[2]
    mask = (mx.arange(length)[None] >= left_padding[:, None]).reshape(B, 1, 1, length)
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, 1, H * D)


def check(queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array) -> None:
    """The native op's argument checks, for the fallback."""
    if queries.ndim != 4 or queries.shape[2] != 1:
        raise ValueError(f"[decode_attention] queries must be (B, H, 1, D), got {queries.shape}")
    if keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(
            "[decode_attention] keys and values must be (B, H_kv, S, D) of one shape, got "
            f"{keys.shape} and {values.shape}"
        )
    B, H, _, D = queries.shape
    if keys.shape[0] != B or keys.shape[3] != D:
        raise ValueError(
            f"[decode_attention] keys {keys.shape} do not match queries {queries.shape} "
            "(batch and head dim)"
        )
    if D not in HEAD_DIMS:
        raise ValueError(f"[decode_attention] head dim must be 64, 128 or 256, got {D}")
    if keys.shape[1] == 0 or H % keys.shape[1]:
        raise ValueError(
            f"[decode_attention] query heads ({H}) must be a multiple of key/value heads "
            f"({keys.shape[1]})"
        )
    if queries.dtype not in DTYPES:
        raise ValueError(
            f"[decode_attention] queries must be float32, float16 or bfloat16, got {queries.dtype}"
        )
    if keys.dtype != queries.dtype or values.dtype != queries.dtype:
        raise ValueError(
            f"[decode_attention] keys and values must have queries' dtype {queries.dtype}, got "
            f"{keys.dtype} and {values.dtype}"
        )
    if left_padding.shape != (B,):
        raise ValueError(
            f"[decode_attention] left_padding must be (B,) = ({B},), got {left_padding.shape}"
        )
    if not mx.issubdtype(left_padding.dtype, mx.integer):
        raise ValueError(
            f"[decode_attention] left_padding must be integers, got {left_padding.dtype}"
        )
