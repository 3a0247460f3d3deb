"""One token per row of a batch in one call: logit bias, penalties, a token mask, temperature,
top-k, top-p, min-p and seeded per-row randomness (native/README.md has the exact semantics).

`fused_sample` runs the compiled primitive (`mlx_serving._native.fused_sample`) when the
extension has a kernel for the default device's backend and that backend is in `NATIVE_ON`
(the Metal kernel has never been compiled or run: Metal takes the fallback), else `fallback`:
the same semantics in plain MLX ops, batched (one sort of the probabilities when a row asks for
top-p, a top-k selection when rows ask only for top-k). Both give the same token for the same
inputs wherever their floats agree: the sums that pick the top-p threshold and the sampled
token are exact integer sums (32.32 fixed point), so only `exp` itself can differ between them.

The helpers build the per-row inputs from Python values: `row_key` (a 63-bit seed to the
row's 32-bit key), `pack_keys`, `pack_history`, `pack_bias` and `pack_mask`.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import NoReturn

import mlx.core as mx
import numpy as np

from . import native

# Backends whose kernel fused_sample uses (the CPU's and CUDA's are tested against the fallback
# in tests/engine/test_fused_sample.py; Metal's is an untested sketch).
NATIVE_ON = ("cpu", "cuda")
FIXED_ONE = 2**32  # sums of p and w (each in [0, 1]) add floor(x * 2^32) as uint64
_LOW24 = 0xFFFFFF
_GOLDEN = 0x9E3779B9
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B


def fused_sample(
    logits: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    min_p: mx.array,
    history: mx.array,
    repetition_penalty: mx.array,
    presence_penalty: mx.array,
    frequency_penalty: mx.array,
    bias_ids: mx.array,
    bias_values: mx.array,
    keys: mx.array,
    mask: mx.array | None = None,
) -> mx.array:
    """One token per row of `logits` (B, V): (B,) int32, -1 where the mask allows nothing.

    temperature, top_p, min_p and the three penalties (B,) float; top_k (B,) int; history
    (B, L) int32, -1 padded; bias_ids (B, K) int32, -1 padded, with bias_values (B, K); keys
    (B, 2) uint32: (row key, step); mask (B, ceil(V / 32)) uint32, bit j of word w allowing
    token 32 w + j. Shapes that do not fit raise ValueError.
    """
    arguments = (
        logits,
        temperature,
        top_k,
        top_p,
        min_p,
        history,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        bias_ids,
        bias_values,
        keys,
        mask,
    )
    module = _native_here()
    if module is None:
        return fallback(*arguments)
    # Checked here too: the op checks, but an exception thrown by the CUDA build of the
    # extension crashed the process on the GPU machine (native/README.md).
    _validate(*arguments)
    return module.fused_sample(*arguments)


def uses_native() -> bool:
    """Whether `fused_sample` runs the compiled primitive on the default device now."""
    return _native_here() is not None


def _native_here():
    module = native.extension_for_device()
    return module if module is not None and native.device_backend() in NATIVE_ON else None


# ---- the pure-MLX fallback ---------------------------------------------------------------------


def fallback(
    logits: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    min_p: mx.array,
    history: mx.array,
    repetition_penalty: mx.array,
    presence_penalty: mx.array,
    frequency_penalty: mx.array,
    bias_ids: mx.array,
    bias_values: mx.array,
    keys: mx.array,
    mask: mx.array | None = None,
) -> mx.array:
    """`fused_sample` in MLX ops, every row at once (native/README.md, steps 1-8)."""
    _validate(
        logits,
        temperature,
        top_k,
        top_p,
        min_p,
        history,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        bias_ids,
        bias_values,
        keys,
        mask,
    )
    B, V = logits.shape
    if B == 0:
        return mx.zeros((0,), mx.int32)
    f32 = mx.float32
    temperature, top_p, min_p = (a.astype(f32) for a in (temperature, top_p, min_p))
    top_k = top_k.astype(mx.int32)
    rows = mx.arange(B)[:, None]
    x = logits.astype(f32)

    # 1. Bias (duplicates add up); ids outside [0, V) land on a spare column.
    if bias_ids.shape[1]:
        ids = mx.where((bias_ids >= 0) & (bias_ids < V), bias_ids, V)
        spare = mx.concatenate([x, mx.zeros((B, 1), f32)], axis=1)
        x = spare.at[rows, ids].add(bias_values.astype(f32))[:, :V]

    # 2. Penalties, each distinct history token once (the frequency one times its count).
    if history.shape[1]:
        tokens = mx.where((history >= 0) & (history < V), history, V)
        counts = mx.zeros((B, V + 1), f32).at[rows, tokens].add(1.0)[:, :V]
        seen = counts > 0
        r = repetition_penalty.astype(f32)[:, None]
        x = mx.where(seen & (r != 1), mx.where(x < 0, x * r, x / r), x)
        x = mx.where(seen, x - presence_penalty.astype(f32)[:, None], x)
        x = mx.where(seen, x - frequency_penalty.astype(f32)[:, None] * counts, x)

    # 3. Mask.
    if mask is not None:
        bits = (mask[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
        x = mx.where(bits.reshape(B, -1)[:, :V] == 1, x, -mx.inf)

    # 4. Greedy: the first index of the largest logit.
    m = mx.max(x, axis=-1, keepdims=True)
    empty = m[:, 0] == -mx.inf
    greedy = mx.argmax(x, axis=-1).astype(mx.int32)
    m = mx.where(empty[:, None], 0.0, m)

    # 5. Thresholds on p = exp(x - m).
    p = mx.exp(x - m)
    t = mx.zeros((B,), f32)
    want_k = (top_k > 0) & (top_k < V)
    want_p = top_p < 1
    # Which filters apply, read on the host: the settings are host-made arrays (no device work
    # to wait for), where an `.item()` of a device reduction would wait for the whole stream.
    host_top_k, host_top_p = np.asarray(top_k), np.asarray(top_p)
    any_p = bool((host_top_p < 1).any())
    any_k = bool(((host_top_k > 0) & (host_top_k < V)).any())
    if any_p or any_k:
        if any_p:
            descending = mx.sort(p, axis=-1)[:, ::-1]
            k_index = mx.clip(top_k - 1, 0, V - 1)
        else:
            widest = int(np.where((host_top_k > 0) & (host_top_k < V), host_top_k, 1).max())
            descending = mx.sort(mx.topk(p, widest, axis=-1), axis=-1)[:, ::-1]
            k_index = mx.clip(top_k - 1, 0, widest - 1)
        if any_k:
            t_k = mx.take_along_axis(descending, k_index[:, None], axis=-1)[:, 0]
            t = mx.where(want_k, t_k, t)
        if any_p:
            sums = mx.cumsum(_to_fixed(descending), axis=-1)
            target = _top_p_target(sums[:, -1], top_p)
            first = mx.sum(sums < target[:, None], axis=-1)
            t_p = mx.take_along_axis(descending, mx.minimum(first, V - 1)[:, None], axis=-1)
            t = mx.maximum(t, mx.where(want_p & (first < V), t_p[:, 0], 0.0))
    t = mx.maximum(t, mx.where(min_p > 0, min_p, 0.0))
    t = mx.minimum(t, 1.0)  # the largest p (1) is always kept
    kept = (p > 0) & (p >= t[:, None])

    # 6-8. Weights, the row's random point, the first index whose running sum passes it.
    sampled = temperature > 0
    safe_temperature = mx.where(sampled, temperature, 1.0)[:, None]
    w = mx.where(kept, mx.exp((x - m) / safe_temperature), 0.0)
    running = mx.cumsum(_to_fixed(w), axis=-1)
    point = _scale24_floor(running[:, -1], _random24(keys))
    index = mx.sum(running <= point[:, None], axis=-1).astype(mx.int32)
    last_kept = (V - 1 - mx.argmax(kept[:, ::-1], axis=-1)).astype(mx.int32)
    token = mx.where(index < V, index, last_kept)
    return mx.where(empty, -1, mx.where(sampled, token, greedy)).astype(mx.int32)


def _to_fixed(x: mx.array) -> mx.array:
    return (x * FIXED_ONE).astype(mx.uint64)


def _scale24_floor(total: mx.array, r: mx.array) -> mx.array:
    """floor(total * r / 2^24), exactly, for r <= 2^24 (uint64)."""
    return (total >> 24) * r + (((total & _LOW24) * r) >> 24)


def _top_p_target(total: mx.array, top_p: mx.array) -> mx.array:
    """ceil(total * floor(top_p * 2^24) / 2^24), at least 1 (uint64)."""
    p24 = mx.where(top_p > 0, mx.minimum(top_p, 1.0) * 2**24, 0.0).astype(mx.uint64)
    target = (total >> 24) * p24 + (((total & _LOW24) * p24 + _LOW24) >> 24)
    return mx.maximum(target, 1)


def _mix_mx(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * mx.array(_MIX_1, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(_MIX_2, mx.uint32)
    return x ^ (x >> 16)


def _random24(keys: mx.array) -> mx.array:
    key, step = keys[:, 0], keys[:, 1]
    u32 = _mix_mx(key ^ _mix_mx(step + mx.array(_GOLDEN, mx.uint32)))
    return (u32 >> 8).astype(mx.uint64)


def _shape(a: mx.array) -> str:
    return f"shape {tuple(a.shape)} and dtype {a.dtype}"


def _validate(
    logits: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    min_p: mx.array,
    history: mx.array,
    repetition_penalty: mx.array,
    presence_penalty: mx.array,
    frequency_penalty: mx.array,
    bias_ids: mx.array,
    bias_values: mx.array,
    keys: mx.array,
    mask: mx.array | None,
) -> None:
    """The native op's checks, with its messages (ValueError)."""

    def fail(message: str) -> NoReturn:
        raise ValueError(f"fused_sample: {message}")

    if logits.ndim != 2 or logits.shape[1] < 1 or not mx.issubdtype(logits.dtype, mx.floating):
        fail(f"logits must be a floating (B, V) array with V >= 1, got {_shape(logits)}")
    B, V = logits.shape
    floats = {
        "temperature": temperature,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
    }
    for name, a in floats.items():
        if a.ndim != 1 or a.shape[0] != B or a.dtype == mx.complex64:
            fail(
                f"{name} must be a real (B,) array with B = {B} (the rows of logits), "
                f"got {_shape(a)}"
            )
    integral = mx.issubdtype(top_k.dtype, mx.integer) or top_k.dtype == mx.bool_
    if top_k.ndim != 1 or top_k.shape[0] != B or not integral:
        fail(f"top_k must be an integer (B,) array with B = {B}, got {_shape(top_k)}")
    for name, a in (("history", history), ("bias_ids", bias_ids)):
        if a.ndim != 2 or a.shape[0] != B or a.dtype != mx.int32:
            fail(f"{name} must be a int32 (B, n) array with B = {B}, got {_shape(a)}")
    if (
        bias_values.ndim != 2
        or bias_values.shape != bias_ids.shape
        or bias_values.dtype == mx.complex64
    ):
        fail(
            f"bias_values must be a real array of bias_ids' shape {_shape(bias_ids)}, "
            f"got {_shape(bias_values)}"
        )
    if keys.ndim != 2 or keys.shape[0] != B or keys.shape[1] != 2 or keys.dtype != mx.uint32:
        fail(
            f"keys must be a uint32 (B, 2) array of (row key, step) with B = {B}, "
            f"got {_shape(keys)}"
        )
    if mask is not None:
        words = (V + 31) // 32
        if (
            mask.ndim != 2
            or mask.shape[0] != B
            or mask.shape[1] != words
            or mask.dtype != mx.uint32
        ):
            fail(
                f"mask must be a uint32 (B, ceil(V / 32)) = ({B}, {words}) array, "
                f"got {_shape(mask)}"
            )


# ---- building the inputs -----------------------------------------------------------------------


def mix32(x: int) -> int:
    """The lowbias32 hash of README step 7, on Python ints."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * _MIX_1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * _MIX_2) & 0xFFFFFFFF
    return x ^ (x >> 16)


def row_key(seed: int) -> int:
    """A row's 32-bit key from its (up to 63-bit) seed: both halves hashed in. Different seeds
    can share a key (2^63 seeds, 2^32 keys); one seed always gives the same key."""
    return mix32((seed & 0xFFFFFFFF) ^ mix32((seed >> 32) ^ _GOLDEN))


def random_unit(key: int, step: int) -> float:
    """The row's u in [0, 1) at `step` (README step 7), as the kernels draw it."""
    return (mix32(key ^ mix32(step + _GOLDEN)) >> 8) * 2.0**-24


def pack_keys(keys: Iterable[tuple[int, int]]) -> mx.array:
    """(row key, step) pairs as the (B, 2) uint32 `keys` input."""
    pairs = [(k & 0xFFFFFFFF, s & 0xFFFFFFFF) for k, s in keys]
    return mx.array(np.array(pairs, np.uint32).reshape(len(pairs), 2))


def pack_history(rows: Sequence[Sequence[int]], length: int | None = None) -> mx.array:
    """Each row's last `length` tokens (default: the longest row) as a (B, length) int32
    array, -1 padded at the end; the order within a row does not matter to the penalties."""
    width = max((len(r) for r in rows), default=0) if length is None else length
    table = np.full((len(rows), width), -1, np.int32)
    for i, tokens in enumerate(rows):
        tail = list(tokens)[-width:] if width else []
        table[i, : len(tail)] = tail
    return mx.array(table)


def pack_bias(
    rows: Sequence[Mapping[int, float] | Iterable[tuple[int, float]]],
) -> tuple[mx.array, mx.array]:
    """Per-row {token: bias} (or (token, bias) pairs) as `bias_ids` (B, K) int32, -1 padded,
    and `bias_values` (B, K) float32; K is the longest row's count (0 when none has any)."""
    pairs = [list(r.items()) if isinstance(r, Mapping) else list(r) for r in rows]
    width = max((len(p) for p in pairs), default=0)
    ids = np.full((len(pairs), width), -1, np.int32)
    values = np.zeros((len(pairs), width), np.float32)
    for i, row in enumerate(pairs):
        for j, (token, value) in enumerate(row):
            ids[i, j], values[i, j] = token, value
    return mx.array(ids), mx.array(values)


def pack_mask(allowed: np.ndarray) -> mx.array:
    """A (B, V) boolean array of allowed tokens as the (B, ceil(V / 32)) uint32 `mask`."""
    allowed = np.asarray(allowed, dtype=bool)
    B, V = allowed.shape
    padded = np.zeros((B, (V + 31) // 32 * 32), dtype=bool)
    padded[:, :V] = allowed
    packed = np.packbits(padded, axis=1, bitorder="little")
    return mx.array(packed.view("<u4").astype(np.uint32))
