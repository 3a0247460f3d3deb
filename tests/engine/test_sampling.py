"""The per-request sampler: draw for draw the same as mlx-lm's own under one PRNG key, and
each control (top-k, top-p, min-p) narrows what can be drawn exactly as it says.

Our sampler holds a key of its own, `mx.random.key(seed)`, and on each step splits it and
samples with the second half. mlx-lm's sampler draws from the global key instead, and
`mx.random.seed(seed)` sets that to the same `key(seed)`, which each draw splits the same way;
so from one seed both samplers see the same key at every step, and the draws must be equal.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

from mlx_serving.engine.requests import SamplingParams
from mlx_serving.engine.sampling import make_sampler

SEED = 1234
VOCAB = 32
ROWS = 256  # rows of one batch: each step draws a token for every row
STEPS = 8


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def varied_logprobs() -> mx.array:
    """A fixed batch of different distributions, as a model's rows would be."""
    return log_softmax(2.0 * mx.random.normal((ROWS, VOCAB), key=mx.random.key(7)))


# One distribution on every row: token RANKED[i] has probability proportional to DECAY**i, so
# a control's expected set of tokens can be worked out here, far from any boundary.
DECAY = math.exp(-0.2)
RANKED = np.random.default_rng(3).permutation(VOCAB)  # the argmax is not token 0
PROBS = np.zeros(VOCAB)
PROBS[RANKED] = DECAY ** np.arange(VOCAB) / (DECAY ** np.arange(VOCAB)).sum()


def one_distribution() -> mx.array:
    row = mx.log(mx.array(PROBS, dtype=mx.float32))
    return mx.broadcast_to(row, (ROWS, VOCAB))


def ours(logprobs: mx.array, temperature: float, **controls) -> list[list[int]]:
    sampler = make_sampler(SamplingParams(temperature=temperature, seed=SEED, **controls))
    assert sampler is not None
    return [sampler(logprobs).tolist() for _ in range(STEPS)]


def mlx_lms(logprobs: mx.array, temperature: float, **controls) -> list[list[int]]:
    sampler = mlx_lm_sampler(
        temp=temperature,
        top_p=controls.get("top_p", 1.0),  # 1 (or 0) is off for both
        min_p=controls.get("min_p", 0.0),
        top_k=controls.get("top_k", 0),
    )
    mx.random.seed(SEED)  # the global key becomes key(SEED), as ours starts
    return [sampler(logprobs).tolist() for _ in range(STEPS)]


def drawn(logprobs: mx.array, temperature: float = 1.0, **controls) -> set[int]:
    return {token for step in ours(logprobs, temperature, **controls) for token in step}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(
    "controls",
    [
        {},
        {"top_k": 5},
        {"top_p": 0.5},
        {"min_p": 0.2},
        {"top_k": 5, "min_p": 0.2},
        {"top_p": 0.5, "min_p": 0.2},
        {"top_k": 5, "top_p": 0.5},
        {"top_k": 20, "top_p": 0.9, "min_p": 0.01},
    ],
    ids=lambda controls: "-".join(f"{k}={v}" for k, v in controls.items()) or "none",
)
def test_draws_match_mlx_lm_under_the_same_key(controls, temperature):
    logprobs = varied_logprobs()
    expected = mlx_lms(logprobs, temperature, **controls)
    assert ours(logprobs, temperature, **controls) == expected
    if controls:  # the control changed the draws: a sampler ignoring it would fail above
        assert expected != mlx_lms(logprobs, temperature)


def test_a_seed_gives_the_same_draws_and_another_seed_others():
    logprobs = varied_logprobs()
    params = SamplingParams(temperature=1.0, seed=5, top_k=10)
    first, again = make_sampler(params), make_sampler(params)
    other = make_sampler(SamplingParams(temperature=1.0, seed=6, top_k=10))
    a, b, c = ([s(logprobs).tolist() for _ in range(3)] for s in (first, again, other))
    assert a == b != c
    assert a[0] != a[1]  # the key moves on each step


def test_without_controls_most_tokens_are_drawn():
    assert len(drawn(one_distribution())) > 20


def test_top_k_one_is_greedy():
    """top_k = 1 is the batch's argmax (no sampler), as mlx-lm's top_k = 1 sampler draws."""
    assert make_sampler(SamplingParams(temperature=1.0, top_k=1)) is None
    draws = mlx_lms(one_distribution(), 1.0, top_k=1)
    assert {token for step in draws for token in step} == {int(RANKED[0])}


@pytest.mark.parametrize("top_k", [2, 5])
def test_top_k_draws_only_the_k_most_likely(top_k):
    assert drawn(one_distribution(), top_k=top_k) == set(RANKED[:top_k].tolist())


@pytest.mark.parametrize(("top_p", "kept"), [(0.01, 1), (0.5, 4), (0.6, 5)])
def test_top_p_draws_only_the_nucleus(top_p, kept):
    """The smallest set of most likely tokens whose probability sums to top_p."""
    mass = np.cumsum(np.sort(PROBS)[::-1])
    assert mass[kept - 2] < top_p <= mass[kept - 1] if kept > 1 else top_p <= mass[0]
    assert drawn(one_distribution(), top_p=top_p) == set(RANKED[:kept].tolist())


@pytest.mark.parametrize(("min_p", "kept"), [(0.99, 1), (0.5, 4), (0.27, 7)])
def test_min_p_draws_only_tokens_near_the_most_likely(min_p, kept):
    """Tokens at least min_p times as likely as the most likely one."""
    assert sum(PROBS >= min_p * PROBS.max()) == kept
    assert drawn(one_distribution(), min_p=min_p) == set(RANKED[:kept].tolist())


def test_combined_controls_keep_what_each_keeps():
    # top-k and min-p commute: the intersection of what each keeps.
    assert drawn(one_distribution(), top_k=3, min_p=0.5) == set(RANKED[:3].tolist())
    assert drawn(one_distribution(), top_k=6, min_p=0.5) == set(RANKED[:4].tolist())
    assert drawn(one_distribution(), top_p=0.6, min_p=0.5) == set(RANKED[:4].tolist())


def test_temperature_sharpens_and_flattens():
    logprobs = one_distribution()
    cold, warm = drawn(logprobs, temperature=0.02), drawn(logprobs, temperature=1.0)
    assert len(cold) <= 2 < len(warm)
