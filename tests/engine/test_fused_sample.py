"""The fused batched sampler: the native primitive (native/fused_sample/) against its pure-MLX
fallback (engine/fused_sample.py), both against the distribution they draw from, and the edges.

Everything runs on the default device: here the CPU kernel; on the GPU machine the CUDA one.
Both implementations sum in exact fixed point and compute `exp` as MLX does on that device, so
they must agree token for token, top-p included (where float sums would leave a few borderline
rows apart).
"""

import math
import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_serving.engine import fused_sample as fs
from mlx_serving.engine import native


def missing_reason() -> str:
    if native.extension() is not None:
        return f"mlx_serving._native has no kernel for the {native.device_backend()} backend"
    if os.environ.get(native.DISABLE_ENV) == "0":
        return f"{native.DISABLE_ENV}=0 turns mlx_serving._native off"
    return "mlx_serving._native is not built (pip install -e .)"


@pytest.fixture(scope="module")
def ext():
    """The extension, for the tests comparing it with the fallback."""
    module = native.extension_for_device()
    if module is None:
        pytest.skip(missing_reason())
    return module


@pytest.fixture(scope="module")
def maybe_ext():
    """The extension if it runs here, else None (the fallback is then checked alone)."""
    return native.extension_for_device()


def batch(rows, V, seed=0, logits=None, dtype=mx.float32, mask=None):
    """The op's arguments for `rows` (dicts of per-row settings; defaults: plain sampling)."""
    rng = np.random.default_rng(seed)
    if logits is None:
        logits = rng.normal(0, 3, (len(rows), V)).astype(np.float32)
    floats = lambda name, default: mx.array(  # noqa: E731
        np.array([r.get(name, default) for r in rows], np.float32)
    )
    args = dict(
        logits=mx.array(logits).astype(dtype),
        temperature=floats("temperature", 1.0),
        top_k=mx.array(np.array([r.get("top_k", 0) for r in rows], np.int32)),
        top_p=floats("top_p", 1.0),
        min_p=floats("min_p", 0.0),
        history=fs.pack_history([r.get("history", []) for r in rows]),
        repetition_penalty=floats("repetition", 1.0),
        presence_penalty=floats("presence", 0.0),
        frequency_penalty=floats("frequency", 0.0),
    )
    args["bias_ids"], args["bias_values"] = fs.pack_bias([r.get("bias", {}) for r in rows])
    args["keys"] = fs.pack_keys([(r.get("key", i), r.get("step", 0)) for i, r in enumerate(rows)])
    args["mask"] = None if mask is None else fs.pack_mask(mask)
    return args


def with_step(args, step):
    keys = np.array(args["keys"])
    keys[:, 1] = step
    return {**args, "keys": mx.array(keys)}


def both(ext, args):
    native_tokens = ext.fused_sample(**args)
    fallback_tokens = fs.fallback(**args)
    mx.eval(native_tokens, fallback_tokens)
    return np.array(native_tokens), np.array(fallback_tokens)


def random_rows(n, V, seed, top_p=False):
    """Rows mixing every setting (top-p only when asked)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = {
            "key": fs.row_key(int(rng.integers(0, 2**63))),
            "temperature": float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.7])),
            "top_k": int(rng.choice([0, 1, 3, 40, V - 1, V, V + 5])),
            "min_p": float(rng.choice([0.0, 0.0, 0.02, 0.3])),
            "repetition": float(rng.choice([1.0, 1.0, 1.2, 0.8])),
            "presence": float(rng.choice([0.0, 0.4, -0.7])),
            "frequency": float(rng.choice([0.0, 0.25])),
            "history": [int(t) for t in rng.integers(-1, V, int(rng.integers(0, 70)))],
            "bias": {int(t): float(rng.normal(0, 4)) for t in rng.integers(0, V, 3)},
        }
        if top_p:
            row["top_p"] = float(rng.choice([1.0, 0.95, 0.9, 0.5, 0.1, 0.0]))
        rows.append(row)
    return rows


# ---- native against the fallback ---------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_native_equals_fallback_without_top_p(ext, masked):
    V, n = 3000, 48
    rows = random_rows(n, V, seed=1)
    rng = np.random.default_rng(2)
    mask = None
    if masked:
        density = rng.choice([1.0, 0.3, 0.01, 0.0], (n, 1))
        mask = rng.random((n, V)) < density
    args = batch(rows, V, seed=3, mask=mask)
    for step in range(6):
        a, b = both(ext, with_step(args, step))
        np.testing.assert_array_equal(a, b)


def test_native_equals_fallback_with_top_p(ext):
    """Top-p's threshold and the final draw are exact integer sums in both: all identical (the
    brief's floor is 99%; a float implementation would differ on a few borderline rows)."""
    V, n = 2000, 64
    rows = random_rows(n, V, seed=4, top_p=True)
    args = batch(rows, V, seed=5)
    same = total = 0
    for step in range(10):
        a, b = both(ext, with_step(args, step))
        same += int((a == b).sum())
        total += n
    assert same / total >= 0.99
    assert same == total


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_logits(ext, dtype):
    V, n = 1000, 32
    rows = random_rows(n, V, seed=6, top_p=True)
    args = batch(rows, V, seed=7, dtype=dtype)
    for step in range(4):
        a, b = both(ext, with_step(args, step))
        np.testing.assert_array_equal(a, b)
    # Greedy reads the same values as their float32 cast.
    greedy = batch([{"temperature": 0.0}] * 4, V, seed=8, dtype=dtype)
    a, b = both(ext, greedy)
    expected = np.array(mx.argmax(greedy["logits"].astype(mx.float32), axis=-1))
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)


def test_large_vocabulary(ext):
    V, n = 128256, 8
    rows = [
        {"temperature": 0.8, "top_p": 0.9, "presence": 0.5, "frequency": 0.3, "key": 11 + i}
        for i in range(n)
    ]
    for row in rows:
        row["history"] = list(range(0, 64 * 7, 7))
    args = batch(rows, V, seed=9)
    for step in range(3):
        a, b = both(ext, with_step(args, step))
        np.testing.assert_array_equal(a, b)


def test_the_dispatcher_takes_the_native_op(ext):
    args = batch(random_rows(8, 500, seed=10, top_p=True), 500, seed=11)
    assert fs.uses_native() == (native.device_backend() in fs.NATIVE_ON)
    if not fs.uses_native():
        pytest.skip(f"fused_sample leaves the {native.device_backend()} kernel out")
    np.testing.assert_array_equal(
        np.array(fs.fused_sample(**args)), np.array(ext.fused_sample(**args))
    )


# ---- the distribution ---------------------------------------------------------------------------


def implementations(ext_or_none):
    found = {"fallback": fs.fallback}
    if ext_or_none is not None:
        found["native"] = ext_or_none.fused_sample
    return found


def draw(sample, logits, row, rows=200, steps=100):
    """rows x steps draws of one logits row under `row`'s settings, each (row, step) its key."""
    V = logits.shape[0]
    settings = [{**row, "key": fs.row_key(1000 + i)} for i in range(rows)]
    args = batch(settings, V, logits=np.tile(logits, (rows, 1)))
    counts = np.zeros(V, np.int64)
    for step in range(steps):
        tokens = np.array(sample(**with_step(args, step)))
        counts += np.bincount(tokens, minlength=V)
    return counts


def check_frequencies(counts, expected):
    """Chi-square over the tokens with any probability, and no draw outside them."""
    n = counts.sum()
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    support = expected > 0
    e = expected[support] * n
    chi2 = float((((counts[support] - e) ** 2) / e).sum())
    df = int(support.sum()) - 1
    # About the 0.9999 quantile: chi2(df) < df + 3.7 sqrt(2 df) + 10.
    assert chi2 < df + 3.7 * math.sqrt(2 * df) + 10, (chi2, df)
    assert np.abs(counts / n - expected).max() < 0.015


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("name", ["fallback", "native"])
def test_plain_sampling_draws_softmax(maybe_ext, name):
    sample = implementations(maybe_ext).get(name)
    if sample is None:
        pytest.skip(missing_reason())
    logits = np.random.default_rng(12).normal(0, 1.5, 16).astype(np.float32)
    counts = draw(sample, logits, {"temperature": 1.0})
    check_frequencies(counts, softmax(logits.astype(np.float64)))


@pytest.mark.parametrize("name", ["fallback", "native"])
def test_filtered_sampling_draws_the_renormalized_rest(maybe_ext, name):
    sample = implementations(maybe_ext).get(name)
    if sample is None:
        pytest.skip(missing_reason())
    logits = np.random.default_rng(13).normal(0, 2, 24).astype(np.float32)
    row = {"temperature": 0.7, "top_p": 0.8, "top_k": 12, "min_p": 0.01}
    p = softmax(logits.astype(np.float64))  # p / max p = exp(l - m)
    ratio = p / p.max()
    order = np.sort(ratio)[::-1]
    t_k = order[row["top_k"] - 1]
    total = ratio.sum()
    t_p = next(v for v in order if ratio[ratio >= v].sum() >= row["top_p"] * total)
    kept = ratio >= max(t_k, t_p, row["min_p"])
    weights = np.where(kept, np.exp((logits - logits.max()) / row["temperature"]), 0.0)
    counts = draw(sample, logits, row)
    check_frequencies(counts, weights / weights.sum())


# ---- edges --------------------------------------------------------------------------------------


def run_all(maybe_ext, args):
    """The tokens of every implementation here (they must agree)."""
    results = [np.array(sample(**args)) for sample in implementations(maybe_ext).values()]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    return results[0]


def test_top_k_beyond_the_vocabulary_and_top_p_one_filter_nothing(maybe_ext):
    V = 300
    plain = [{"key": 5, "temperature": 1.3}] * 4
    loose = [{"key": 5, "temperature": 1.3, "top_k": k, "top_p": 1.0} for k in (V, V + 1, 10**6, 0)]
    for step in range(20):
        a = run_all(maybe_ext, with_step(batch(plain, V, seed=14), step))
        b = run_all(maybe_ext, with_step(batch(loose, V, seed=14), step))
        np.testing.assert_array_equal(a, b)


def test_min_p_zero_and_top_k_one(maybe_ext):
    V = 200
    logits = np.random.default_rng(15).normal(0, 2, (1, V)).astype(np.float32)
    top1 = batch([{"top_k": 1, "temperature": 2.0, "min_p": 0.0}], V, logits=logits)
    for step in range(10):
        assert run_all(maybe_ext, with_step(top1, step))[0] == int(logits.argmax())


def test_greedy_applies_bias_and_penalties(maybe_ext):
    V = 50
    logits = np.linspace(-2, 3, V, dtype=np.float32)[None, :].repeat(4, axis=0)
    top = V - 1
    rows = [
        {"temperature": 0.0},
        {"temperature": 0.0, "presence": 10.0, "history": [top, top, -1]},
        {"temperature": 0.0, "frequency": 0.1, "history": [top] * 5 + [top - 1]},
        {"temperature": 0.0, "bias": {3: 100.0}, "repetition": 2.0, "history": [3]},
    ]
    tokens = run_all(maybe_ext, batch(rows, V, logits=logits))
    # Row 2: top - 0.5 < (top - 1) - 0.1 > top - 2. Row 3: 3's logit, -2 + 3 * 5 / 49 + 100,
    # then / 2 (positive), is still the largest.
    assert tokens.tolist() == [top, top - 1, top - 1, 3]


def test_repetition_penalty_divides_positive_and_multiplies_negative(maybe_ext):
    V = 4
    logits = np.array([[2.0, 1.9, -0.1, -0.2]], np.float32)
    down = batch([{"temperature": 0.0, "repetition": 1.5, "history": [0]}], V, logits=logits)
    assert run_all(maybe_ext, down)[0] == 1  # 2 / 1.5 < 1.9
    logits = np.array([[-1.0, -1.2, -5.0, -6.0]], np.float32)
    up = batch([{"temperature": 0.0, "repetition": 0.5, "history": [1]}], V, logits=logits)
    assert run_all(maybe_ext, up)[0] == 1  # -1.2 * 0.5 > -1


def test_ids_outside_the_vocabulary_are_ignored(maybe_ext):
    V = 20
    logits = np.zeros((1, V), np.float32)
    logits[0, 7] = 1.0
    row = {"temperature": 0.0, "bias": {V: 50.0, V + 9: 50.0, -3: 50.0}, "presence": 5.0}
    row["history"] = [V, V + 1, 10**6, -2]
    assert run_all(maybe_ext, batch([row], V, logits=logits))[0] == 7


def test_a_fully_masked_row_gives_minus_one(maybe_ext):
    V = 70
    allowed = np.ones((3, V), bool)
    allowed[1] = False
    allowed[2] = False
    allowed[2, 65] = True
    rows = [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.5}, {"temperature": 0.0}]
    tokens = run_all(maybe_ext, batch(rows, V, mask=allowed))
    assert tokens[1] == -1
    assert tokens[2] == 65
    assert 0 <= tokens[0] < V
    greedy = batch([{"temperature": 0.0}], V, mask=np.zeros((1, V), bool))
    assert run_all(maybe_ext, greedy)[0] == -1


def test_masked_tokens_are_never_drawn(maybe_ext):
    V, n = 500, 64
    rng = np.random.default_rng(16)
    allowed = rng.random((n, V)) < 0.05
    rows = [{"key": i, "temperature": 1.5} for i in range(n)]
    args = batch(rows, V, mask=allowed)
    for step in range(5):
        tokens = run_all(maybe_ext, with_step(args, step))
        assert all(allowed[i, t] for i, t in enumerate(tokens) if allowed[i].any())


def test_rows_do_not_depend_on_the_batch(maybe_ext):
    V = 800
    rows = random_rows(12, V, seed=17, top_p=True)
    args = batch(rows, V, seed=18)
    logits = np.array(args["logits"])
    together = run_all(maybe_ext, args)
    for i, row in enumerate(rows):
        alone = run_all(maybe_ext, batch([row], V, logits=logits[i : i + 1]))
        assert alone[0] == together[i], i


def test_ties_at_the_top_k_threshold_are_kept(maybe_ext):
    V = 10
    logits = np.array([[5.0, 1.0, 5.0, 0.0, 5.0, -1.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    row = {"top_k": 2, "temperature": 1.0}
    args = batch([row], V, logits=logits)
    seen = set()
    for step in range(300):
        seen.add(int(run_all(maybe_ext, with_step(args, step))[0]))
    assert seen == {0, 2, 4}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"logits": mx.zeros((5,))}, "logits"),
        ({"temperature": mx.zeros((3,))}, "temperature"),
        ({"top_k": mx.zeros((2,), mx.float32)}, "top_k"),
        ({"history": mx.zeros((2, 3), mx.float32)}, "history"),
        ({"bias_values": mx.zeros((2, 5))}, "bias_values"),
        ({"keys": mx.zeros((2, 2), mx.int32)}, "keys"),
        ({"keys": mx.zeros((2, 3), mx.uint32)}, "keys"),
        ({"mask": mx.zeros((2, 3), mx.uint32)}, "mask"),
    ],
)
def test_bad_shapes_are_value_errors(maybe_ext, change, message):
    args = batch([{}, {}], 40, seed=19)
    args = {**args, **change}
    for sample in implementations(maybe_ext).values():
        with pytest.raises(ValueError, match=message):
            mx.eval(sample(**args))


def test_empty_history_and_bias_and_batch(maybe_ext):
    V = 33
    args = batch([{"temperature": 0.0}, {"temperature": 1.0}], V, seed=20)
    assert args["history"].shape == (2, 0) and args["bias_ids"].shape == (2, 0)
    run_all(maybe_ext, args)
    empty = batch([], V)
    empty["logits"] = mx.zeros((0, V))
    for sample in implementations(maybe_ext).values():
        assert sample(**empty).shape == (0,)


# ---- helpers ------------------------------------------------------------------------------------


def test_uint32_arithmetic_wraps_in_mlx():
    x = mx.array([0xFFFFFFFF, 0x12345678], mx.uint32)
    assert (x * mx.array(0x846CA68B, mx.uint32)).tolist() == [
        (v * 0x846CA68B) & 0xFFFFFFFF for v in (0xFFFFFFFF, 0x12345678)
    ]
    assert (x + mx.array(0x9E3779B9, mx.uint32)).tolist() == [
        (v + 0x9E3779B9) & 0xFFFFFFFF for v in (0xFFFFFFFF, 0x12345678)
    ]


def test_the_hash_is_the_same_in_python_and_mlx():
    values = [0, 1, 0x9E3779B9, 0xFFFFFFFF, 123456789]
    assert fs._mix_mx(mx.array(values, mx.uint32)).tolist() == [fs.mix32(v) for v in values]
    keys = fs.pack_keys([(fs.row_key(7), 3), (fs.row_key(2**62 + 5), 0)])
    expected = [int(fs.random_unit(k, s) * 2**24) for k, s in np.array(keys).tolist()]
    assert fs._random24(keys).tolist() == expected


def test_row_keys_are_32_bit_and_stable():
    assert fs.row_key(42) == fs.row_key(42)
    keys = {fs.row_key(seed) for seed in [0, 1, 2**32, 2**32 + 1, 2**62, 2**63 - 1]}
    assert len(keys) == 6
    assert all(0 <= k < 2**32 for k in keys)


def test_packing():
    history = fs.pack_history([[1, 2, 3], [], [4, 5, 6, 7, 8]], length=4)
    assert history.tolist() == [[1, 2, 3, -1], [-1] * 4, [5, 6, 7, 8]]
    assert fs.pack_history([[], []]).shape == (2, 0)
    ids, values = fs.pack_bias([{3: 1.5}, [(1, -2.0), (2, 0.5)], {}])
    assert ids.tolist() == [[3, -1], [1, 2], [-1, -1]]
    assert values.tolist() == [[1.5, 0.0], [-2.0, 0.5], [0.0, 0.0]]
    allowed = np.zeros((2, 40), bool)
    allowed[0, [0, 31, 32, 39]] = True
    words = fs.pack_mask(allowed)
    assert words.dtype == mx.uint32 and words.shape == (2, 2)
    assert words.tolist() == [[1 | 1 << 31, 1 | 1 << 7], [0, 0]]
