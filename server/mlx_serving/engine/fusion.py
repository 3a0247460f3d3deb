"""Fewer, wider kernels for Llama and Qwen layers: q/k/v as one projection, gate/up as another.

A batched decode step is bound by the host launching kernels, not by the device running them,
and a matmul is the dearest kernel to launch. Concatenating the weights of projections that read
the same input turns five matmuls per layer into two, computing the same dot products; where
nothing stands between the projection and RoPE (Llama, Qwen2), queries and keys then take their
rotary embedding in one call instead of two. Only modules of exactly mlx-lm's Llama, Qwen2 and
Qwen3 classes are touched: any other architecture is left as it was loaded.

Where the host's Python is what a small batch's decode step waits for, a Llama or Qwen2 layer's
decode also runs as two compiled functions around its attention (`CompiledDecodeBlock`): the
norm, fused projection, head split and RoPE before, and the output projection, residuals, norm
and MLP after, each built once per batch size instead of op by op every step.
"""

import weakref
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache

from . import decode_attention, native


def split_heads(self, x: mx.array) -> mx.array:
    """The fused projection of x, one row per head: (B, L, H + 2 Hkv, head_dim)."""
    B, L, _ = x.shape
    return self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, -1)


def rotate(self, x: mx.array, offset) -> mx.array:
    """RoPE from `offset` (None: from 0, no cache)."""
    return self.rope(x) if offset is None else self.rope(x, offset=offset)


def attend(self, queries, keys, values, mask, cache) -> mx.array:
    return self.o_proj(attention(self, queries, keys, values, mask, cache))


def attention(self, queries, keys, values, mask, cache) -> mx.array:
    """The heads' attention, side by side (B, L, H * D), before the output projection."""
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    if self.decode_kernel and decode_attention.applies(queries, keys, cache):
        return decode_attention.decode_attention(
            queries, keys, values, cache.left_padding, self.scale
        )
    output = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=self.scale, mask=mask
    )
    B, _, L, _ = output.shape
    return output.transpose(0, 2, 1, 3).reshape(B, L, -1)


def project(self, x: mx.array, offset) -> tuple[mx.array, mx.array, mx.array]:
    """Queries, keys and values of x, queries and keys rotated from `offset`."""
    qkv = split_heads(self, x).transpose(0, 2, 1, 3)
    qk, values = mx.split(qkv, [self.n_heads + self.n_kv_heads], axis=1)
    # Heads are independent under RoPE: queries and keys rotate in one kernel.
    queries, keys = mx.split(rotate(self, qk, offset), [self.n_heads], axis=1)
    return queries, keys, values


class FusedAttention(llama.Attention):
    decode_kernel = True
    # Llama's ModelArgs types num_key_value_heads `int | None`; its __post_init__ fills it in.
    n_kv_heads: int

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        queries, keys, values = project(self, x, None if cache is None else cache.offset)
        return attend(self, queries, keys, values, mask, cache)


class FusedQwen2Attention(qwen2.Attention):
    decode_kernel = True
    __call__ = FusedAttention.__call__


class FusedQwen3Attention(qwen3.Attention):
    """Queries and keys have norms of their own before RoPE, so they rotate apart."""

    decode_kernel = True

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        queries, keys, values = mx.split(
            split_heads(self, x), [self.n_heads, self.n_heads + self.n_kv_heads], axis=2
        )
        offset = None if cache is None else cache.offset
        queries = rotate(self, self.q_norm(queries).transpose(0, 2, 1, 3), offset)
        keys = rotate(self, self.k_norm(keys).transpose(0, 2, 1, 3), offset)
        return attend(self, queries, keys, values.transpose(0, 2, 1, 3), mask, cache)


def fused_mlp_call(self, x: mx.array) -> mx.array:
    gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
    return self.down_proj(swiglu(gate, up))


def before_attention(block, x: mx.array, offset: mx.array):
    return project(block.self_attn, block.input_layernorm(x), offset)


def after_attention(block, x: mx.array, heads: mx.array) -> mx.array:
    h = x + block.self_attn.o_proj(heads)
    return h + block.mlp(block.post_attention_layernorm(h))


def plain_block(block, x: mx.array, mask: mx.array | None, cache) -> mx.array:
    """mlx-lm's Llama and Qwen2 decoder layer, op by op."""
    h = x + block.self_attn(block.input_layernorm(x), mask, cache)
    return h + block.mlp(block.post_attention_layernorm(h))


# Batch sizes whose decode step runs compiled: each is traced once (a few milliseconds, and on a
# GPU its fused kernels built), so a batch whose size wanders over hundreds of values would pay
# that hundreds of times; past a handful of rows the step's Python is shared by many tokens anyway.
COMPILED_BATCH = 8
# Backends where the compiled decode is the default (fuse_projections' compile_decode=None).
COMPILED_ON = ("cuda",)


class CompiledDecodeBlock(llama.TransformerBlock):
    """A Llama (or Qwen2) layer whose one-token decode over a batch cache runs compiled around
    the attention, which stays eager: its cache's length changes every step."""

    compiled_decode = True
    _compiled: list | None = None

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        if not (
            self.compiled_decode
            and x.shape[1] == 1
            and x.shape[0] <= COMPILED_BATCH
            and isinstance(cache, BatchKVCache)
        ):
            return plain_block(self, x, mask, cache)
        compiled = self._compiled
        if compiled is None:
            # The weights, fixed once loaded, are the traced graphs' constants. The functions
            # hold the layer weakly: unloaded, it is freed at once, not by a cycle collection.
            # Set past Module.__setattr__, which would file a list as a parameter.
            compiled = [
                mx.compile(partial(part, weakref.proxy(self)))
                for part in (before_attention, after_attention)
            ]
            object.__setattr__(self, "_compiled", compiled)
        before, after = compiled
        queries, keys, values = before(x, cache.offset)
        return after(x, attention(self.self_attn, queries, keys, values, mask, cache))


class FusedMLP(llama.MLP):
    __call__ = fused_mlp_call


class FusedQwen2MLP(qwen2.MLP):
    __call__ = fused_mlp_call


class FusedQwen3MLP(qwen3.MLP):
    __call__ = fused_mlp_call


# mlx-lm class → (its projections to concatenate, the fused layer's name, the fused class)
FUSIONS: dict[type[nn.Module], tuple[tuple[str, ...], str, type[nn.Module]]] = {
    llama.Attention: (("q_proj", "k_proj", "v_proj"), "qkv_proj", FusedAttention),
    qwen2.Attention: (("q_proj", "k_proj", "v_proj"), "qkv_proj", FusedQwen2Attention),
    qwen3.Attention: (("q_proj", "k_proj", "v_proj"), "qkv_proj", FusedQwen3Attention),
    llama.MLP: (("gate_proj", "up_proj"), "gate_up_proj", FusedMLP),
    qwen2.MLP: (("gate_proj", "up_proj"), "gate_up_proj", FusedQwen2MLP),
    qwen3.MLP: (("gate_proj", "up_proj"), "gate_up_proj", FusedQwen3MLP),
}


def concatenate_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs side by side; None if they differ."""
    first = linears[0]
    kinds = {type(layer) for layer in linears}
    if len(kinds) != 1 or kinds.pop() not in (nn.Linear, nn.QuantizedLinear):
        return None
    if isinstance(first, nn.QuantizedLinear):
        settings = {(layer.group_size, layer.bits, getattr(layer, "mode", "")) for layer in linears}
        if len(settings) != 1:
            return None
    if len({"bias" in layer for layer in linears}) != 1:
        return None
    fused = type(first).__new__(type(first))
    nn.Module.__init__(fused)
    for name, value in vars(first).items():
        setattr(fused, name, value)
    for name in first.keys():
        value = first[name]
        if isinstance(value, mx.array):
            fused[name] = mx.concatenate([layer[name] for layer in linears], axis=0)
    return fused


def fuse_projections(
    model: nn.Module, decode_kernel: bool = True, compile_decode: bool | None = None
) -> int:
    """Fuses every attention and MLP of a known class in `model`, in place; returns how many.

    `decode_kernel`: whether fused attention may use decode_attention's kernel (where it is the
    faster path: decode_attention.kernel_here). `compile_decode`: whether a fused Llama or Qwen2
    layer's small-batch decode runs compiled (CompiledDecodeBlock); None: where COMPILED_ON.
    The fused weights are computed lazily, with the rest of a lazily loaded model's.
    """
    if compile_decode is None:
        compile_decode = native.device_backend() in COMPILED_ON
    fused = 0
    for _, module in model.named_modules():
        if type(module) not in FUSIONS:
            continue
        names, fused_name, fused_class = FUSIONS[type(module)]
        layer = concatenate_linears([module[name] for name in names])
        if layer is None:
            continue
        for name in names:
            del module[name]
        module[fused_name] = layer
        module.__class__ = fused_class
        if not decode_kernel and hasattr(fused_class, "decode_kernel"):
            module.decode_kernel = False
        fused += 1
    if compile_decode:
        for _, module in model.named_modules():
            if type(module) in COMPILED_BLOCKS and type(module.self_attn) in (
                FusedAttention,
                FusedQwen2Attention,
            ):
                module.__class__ = COMPILED_BLOCKS[type(module)]
    return fused


class CompiledQwen2DecodeBlock(qwen2.TransformerBlock):
    compiled_decode = True
    _compiled: list | None = None
    __call__ = CompiledDecodeBlock.__call__


COMPILED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    llama.TransformerBlock: CompiledDecodeBlock,
    qwen2.TransformerBlock: CompiledQwen2DecodeBlock,
}
