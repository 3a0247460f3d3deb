"""Per-request samplers that can share one batch.

Each sampled request carries its own PRNG key, split once per step, so a seeded request
yields the same tokens whatever else is in the batch (the global `mx.random.seed` would not).
"""

import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
from mlx_lm.sample_utils import make_logits_processors as mlx_lm_logits_processors

from .requests import SamplingParams

Sampler = Callable[[mx.array], mx.array]


def make_sampler(params: SamplingParams) -> Sampler | None:
    """None means greedy, which the batch generator runs as one batched argmax."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    key = mx.random.key(seed)
    inverse_temperature = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        # mlx-lm's order (make_sampler): top-p, min-p, then top-k.
        if params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * inverse_temperature, key=step_key)

    return sample


def make_logits_processors(params: SamplingParams) -> list[Callable]:
    """Penalties and logit bias as mlx-lm logits processors, each seeing its own sequence."""
    return mlx_lm_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
        repetition_context_size=params.penalty_context,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.penalty_context,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.penalty_context,
    )


def ban_until(token_ids: list[int], count: int) -> Callable:
    """A logits processor that rules `token_ids` out of a sequence's first `count` tokens
    (min_tokens: end-of-sequence and stop tokens cannot end it sooner)."""
    banned = mx.array(token_ids)
    calls = 0

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal calls
        calls += 1
        if calls > count:
            return logits
        logits[:, banned] = -mx.inf
        return logits

    return process
