"""Fewer, wider kernels for Llama-family layers: q/k/v as one projection, gate/up as another.

A batched decode step is bound by the host launching kernels, not by the device running them,
and a matmul is the dearest kernel to launch. Concatenating the weights of projections that read
the same input turns five matmuls per layer into two, computing the same dot products; the
queries and keys then take their rotary embedding in one call instead of two.
Only modules of exactly mlx-lm's Llama classes are touched: any other architecture is left as
it was loaded.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention


class FusedAttention(llama.Attention):
    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        qk, values = mx.split(qkv, [self.n_heads + self.n_kv_heads], axis=1)
        # Heads are independent under RoPE: queries and keys rotate in one kernel.
        qk = self.rope(qk) if cache is None else self.rope(qk, offset=cache.offset)
        queries, keys = mx.split(qk, [self.n_heads], axis=1)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FusedMLP(llama.MLP):
    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


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
    mx.eval(fused.parameters())
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuses every Llama attention and MLP found in `model` in place; returns how many."""
    fused = 0
    for _, module in model.named_modules():
        if type(module) is llama.Attention:
            layer = concatenate_linears([module.q_proj, module.k_proj, module.v_proj])
            if layer is not None:
                for name in ("q_proj", "k_proj", "v_proj"):
                    del module[name]
                module.qkv_proj = layer
                module.__class__ = FusedAttention
                fused += 1
        elif type(module) is llama.MLP:
            layer = concatenate_linears([module.gate_proj, module.up_proj])
            if layer is not None:
                del module["gate_proj"], module["up_proj"]
                module.gate_up_proj = layer
                module.__class__ = FusedMLP
                fused += 1
    return fused
