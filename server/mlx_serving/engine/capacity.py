"""How many sequences a model's batch holds, from the memory its KV caches may take.

A fixed batch size suits no machine: 32 queues half of 64 streams on a GPU with room for
hundreds, and lets a burst of long prompts exhaust a small one. So, unless configured, a model's
batch size and KV byte budget are derived at its load from what its caches cost per token and
what memory is free then (see `model_capacity`).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .config import EngineConfig

# The derived batch size's bounds: one sequence always runs; past 1024 a decode step's host
# work, not memory, is the limit.
MIN_BATCH_SIZE = 1
MAX_BATCH_SIZE = 1024
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Capacity:
    """A model's batch limits (see `model_capacity`)."""

    # What one token's keys and values take, all layers together.
    kv_bytes_per_token: int
    # The tokens a typical sequence holds, which the batch size is sized for.
    context_tokens: int
    # The KV bytes the running sequences may reserve together (see scheduler.admissible).
    kv_budget: int
    # Most sequences decoded together.
    batch_size: int
    # The memory free at the load, which the budget was derived from; None: max_kv_bytes.
    free_bytes: int | None = None


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token adds to the model's cache, all layers together.

    From the model's arguments where its cache is plain KVCache per layer (Llama, Qwen,
    Mistral...): layers x KV heads x head dim x 2 (keys, values) x the activations' dtype size.
    Any other cache (sliding windows, state-space layers, an unusual config) is measured: one
    token through a fresh cache.
    """
    derived = kv_bytes_from_args(model)
    return derived if derived else measured_kv_bytes_per_token(model)


def kv_bytes_from_args(model: Any) -> int | None:
    """`kv_bytes_per_token` from the model's arguments; None where they do not say it."""
    args = getattr(model, "args", None)
    caches = make_prompt_cache(model)
    if args is None or not caches or any(type(c) is not KVCache for c in caches):
        return None
    heads = getattr(args, "num_attention_heads", None)
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None)
    if not head_dim and heads and isinstance(getattr(args, "hidden_size", None), int):
        head_dim = args.hidden_size // heads
    dtype = activation_dtype(model)
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int) and dtype is not None):
        return None
    return len(caches) * kv_heads * head_dim * 2 * dtype.size


def activation_dtype(model: Any) -> mx.Dtype | None:
    """The dtype of the model's floating weights (a quantized model's scales), which its
    activations, and so its keys and values, take."""
    weights = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    for _, weight in weights:
        if isinstance(weight, mx.array) and mx.issubdtype(weight.dtype, mx.floating):
            return weight.dtype
    return None


def measured_kv_bytes_per_token(model: Any) -> int:
    """Run one token through a fresh cache and count what each layer keeps per token (a
    layer whose state does not grow with the sequence counts nothing)."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    total = 0
    for layer in cache:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        # A quantized cache keeps tuples of arrays (data, scales, biases), each per token.
        arrays = [
            a for kv in (keys, values) for a in (kv if isinstance(kv, tuple | list) else [kv])
        ]
        for item in arrays:
            if isinstance(item, mx.array) and item.ndim == 4 and item.shape[2]:
                mx.eval(item)
                total += item.nbytes // item.shape[2]
    return total


def available_memory() -> int:
    """Bytes free for KV caches now: MLX's memory limit less what MLX holds (the loaded
    weights among it), and on a GPU no more than the device has free (CUDA) or Metal's
    recommended working set less what MLX holds; on the CPU no more than the system's
    MemAvailable (the weights, already read, are out of it)."""
    active = mx.get_active_memory()
    limit = mx.get_memory_limit()
    room = max(0, limit - active) if limit > 0 else None
    candidates = [room] if room is not None else []
    if mx.default_device().type == mx.gpu:
        info = mx.device_info()
        free = info.get("free_memory")  # CUDA: the whole device's, MLX's own cache counted used
        total = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if isinstance(free, int):
            candidates.append(free + mx.get_cache_memory())
        elif isinstance(total, int):
            candidates.append(max(0, total - active))
    else:
        free = meminfo_available()
        if free is not None:
            candidates.append(free)
    return min(candidates) if candidates else 0


def meminfo_available(path: Path = MEMINFO) -> int | None:
    """The system's MemAvailable in bytes (Linux), or None where there is none."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def kv_budget(config: EngineConfig, available_bytes: int) -> int:
    """The KV bytes a model's running sequences may reserve: `max_kv_bytes` if set, else
    `kv_memory_fraction` of the memory free at its load (the rest covers batch padding,
    activations and other models)."""
    if config.max_kv_bytes > 0:
        return config.max_kv_bytes
    return int(config.kv_memory_fraction * available_bytes)


def batch_capacity(kv_bytes_per_token: int, context_tokens: int, available_bytes: int) -> int:
    """How many sequences of `context_tokens` tokens fit in `available_bytes` of KV cache,
    between MIN_BATCH_SIZE and MAX_BATCH_SIZE."""
    per_sequence = max(1, kv_bytes_per_token) * max(1, context_tokens)
    return min(MAX_BATCH_SIZE, max(MIN_BATCH_SIZE, available_bytes // per_sequence))


def capacity_context(config: EngineConfig, model_context: int) -> int:
    """The tokens a typical sequence holds: `capacity_context_tokens` (a chat turn's prompt
    and reply, 2048 by default), no more than the model's context. Not the model's whole
    context: few sequences use it, and the KV budget, not the batch size, keeps the long ones
    from exhausting memory."""
    context = model_context or config.default_context_length
    return max(1, min(config.capacity_context_tokens, context))


def model_capacity(
    model: Any, model_context: int, config: EngineConfig, available_bytes: int | None = None
) -> Capacity:
    """A model's batch limits: `max_batch_size` and `max_kv_bytes` where configured (not 0),
    else derived from `available_bytes` (by default `available_memory()` now)."""
    per_token = kv_bytes_per_token(model)
    context = capacity_context(config, model_context)
    free = None
    if config.max_kv_bytes > 0:
        budget = config.max_kv_bytes
    else:
        free = available_memory() if available_bytes is None else available_bytes
        budget = kv_budget(config, free)
    batch_size = config.max_batch_size or batch_capacity(per_token, context, budget)
    return Capacity(per_token, context, budget, batch_size, free)


def format_bytes(size: int) -> str:
    """`size` in the largest binary unit that keeps it at least 1, for the log."""
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), 4)
    return f"{size / 1024**exponent:.1f} {'BKMGT'[exponent]}iB"
