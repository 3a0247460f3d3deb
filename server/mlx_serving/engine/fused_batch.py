"""A batch step whose sampled rows draw their tokens in one fused call (fused_sample.py).

mlx-lm's GenerationBatch samples with one call only when every row shares one sampler object;
rows with settings of their own each sample on their own slice — a sort of the vocabulary per
row per step, plus a few graph nodes per logits processor — the step that grows with the batch
and the vocabulary. Here a row whose settings the fused sampler covers carries a `FusedRow`
(its settings, its seeded key, its step count) as its sampler, and `FusedGenerationBatch._step`
gathers those rows into one `fused_sample` call; greedy rows take one argmax, and any other row
(a constrained one, one with a repetition penalty or min_tokens) keeps its own sampler.
"""

import secrets
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch

from .fused_sample import fused_sample, row_key
from .requests import SamplingParams


def fused_eligible(params: SamplingParams, constrained: bool, min_tokens: int) -> bool:
    """Whether `fused_sample` samples this row as mlx-lm's per-row sampler would mean it.

    Not a constrained row (its own masked sampler), not min_tokens (a ban of its own), and no
    repetition penalty: the sampler sees log-probabilities, on which the multiplicative
    penalty would not mean what it means on logits (presence, frequency and bias are shifts).
    """
    return (
        not params.greedy
        and not constrained
        and min_tokens == 0
        and params.repetition_penalty == 1.0
    )


class FusedRow:
    """One sequence's settings for the batch's fused sampler; also a sampler on its own (the
    first step of a new row runs in a batch of its own, row by row)."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int]):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.key = row_key(seed)
        # Draws made so far: the hash's counter (see native/README.md).
        self.step = 0
        self.penalized = bool(params.presence_penalty or params.frequency_penalty)
        # The penalties' window on the first step, before the batch holds the row's tokens.
        self.prompt_tail = list(prompt[-params.penalty_context :]) if self.penalized else []

    def __call__(self, logprobs: mx.array) -> mx.array:
        return RowSettings([self]).sample(logprobs, pack_tokens([self.prompt_tail]))


def pack_tokens(rows: list[list[int]]) -> mx.array:
    """Token lists as one (rows, longest) int32 array, right-aligned, -1 before."""
    length = max(map(len, rows))
    window = np.full((len(rows), length), -1, np.int32)
    for i, tokens in enumerate(rows):
        if tokens:
            window[i, length - len(tokens) :] = tokens
    return mx.array(window)


class RowSettings:
    """The fused call's per-row inputs for one set of rows, made once and kept on the device
    while the batch keeps its rows: each step only the draw counters move, on the device too
    (arrays made from host values every step would cost the host a dozen transfers a step)."""

    def __init__(self, rows: list[FusedRow]):
        self.rows = rows
        params = [row.params for row in rows]
        width = max(len(p.logit_bias) for p in params)
        bias_ids = np.full((len(rows), width), -1, np.int32)
        bias_values = np.zeros((len(rows), width), np.float32)
        for i, p in enumerate(params):
            for j, (token, value) in enumerate(p.logit_bias):
                bias_ids[i, j], bias_values[i, j] = token, value
        self.inputs = dict(
            temperature=mx.array([p.temperature for p in params], mx.float32),
            top_k=mx.array([p.top_k for p in params], mx.int32),
            top_p=mx.array([p.top_p for p in params], mx.float32),
            min_p=mx.array([p.min_p for p in params], mx.float32),
            repetition_penalty=mx.ones(len(rows), mx.float32),
            presence_penalty=mx.array([p.presence_penalty for p in params], mx.float32),
            frequency_penalty=mx.array([p.frequency_penalty for p in params], mx.float32),
            bias_ids=mx.array(bias_ids),
            bias_values=mx.array(bias_values),
        )
        self.row_keys = mx.array([row.key for row in rows], mx.uint32)
        self.steps = mx.array([row.step for row in rows], mx.uint32)

    def sample(self, logprobs: mx.array, history: mx.array) -> mx.array:
        """One token per row of `logprobs` (the rows in order); `history`: each row's penalty
        window (see pack_tokens)."""
        keys = mx.stack([self.row_keys, self.steps], axis=1)
        self.steps = self.steps + 1
        for row in self.rows:
            row.step += 1
        tokens = fused_sample(logprobs, history=history, keys=keys, **self.inputs)
        return tokens.astype(mx.uint32)


class FusedGenerationBatch(GenerationBatch):
    """mlx-lm's GenerationBatch (0.32.2) with `_step`'s sampling regrouped: FusedRow rows in
    one fused call, greedy rows in one argmax, the rest row by row as before."""

    _settings: RowSettings | None = None

    def _step(self):
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens

        logits = self.model(inputs[:, None], cache=self.prompt_cache)
        logits = logits[:, -1, :]

        token_context = []
        if any(self.logits_processors):
            processed_logits = []
            for e in range(len(self.uids)):
                sample_logits = logits[e : e + 1]
                processors = self.logits_processors[e] or ()
                if processors:
                    context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                    token_context.append(context)
                    for processor in processors:
                        sample_logits = processor(context, sample_logits)
                processed_logits.append(sample_logits)
            logits = mx.concatenate(processed_logits, axis=0)

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        self._next_tokens = self._sample(logprobs, inputs)
        self._next_logprobs = list(logprobs)
        mx.async_eval(self._next_tokens, self._next_logprobs, token_context)

        mx.eval(inputs, self._current_logprobs)
        inputs = inputs.tolist()
        for sti, ti in zip(self.tokens, inputs, strict=True):
            sti.append(ti)
        return inputs, self._current_logprobs

    def _sample(self, logprobs: mx.array, inputs: mx.array) -> mx.array:
        samplers: list[Any] = self.samplers or [self.fallback_sampler] * len(self.uids)
        fused = [e for e, s in enumerate(samplers) if isinstance(s, FusedRow)]
        if not fused:
            if all(s is samplers[0] for s in samplers):
                return samplers[0](logprobs)
            return mx.concatenate([s(logprobs[e : e + 1]) for e, s in enumerate(samplers)])
        rows = [samplers[e] for e in fused]
        if self._settings is None or self._settings.rows != rows:
            self._settings = RowSettings(rows)
        history = self._history(fused, rows, inputs)
        if len(fused) == len(samplers):
            return self._settings.sample(logprobs, history)
        pieces = [self._settings.sample(logprobs[mx.array(fused)], history)]
        order = fused[:]
        greedy = [e for e, s in enumerate(samplers) if s is self.fallback_sampler]
        if greedy:
            pieces.append(self.fallback_sampler(logprobs[mx.array(greedy)]).astype(mx.uint32))
            order += greedy
        taken = set(order)
        others = [e for e in range(len(samplers)) if e not in taken]
        for e in others:
            pieces.append(samplers[e](logprobs[e : e + 1]).astype(mx.uint32))
        order += others
        position = np.argsort(np.array(order))
        return mx.concatenate(pieces)[mx.array(position)]

    def _history(self, fused: list[int], rows: list[FusedRow], inputs: mx.array) -> mx.array:
        """The rows' penalty windows: their last tokens (prompt included), then this step's
        input, still on the device (reading it here would wait for the previous step)."""
        sizes = [row.params.penalty_context if row.penalized else 0 for row in rows]
        if not any(sizes):
            return mx.zeros((len(rows), 0), mx.int32)
        # This step's input is appended to self.tokens only after the step's eval.
        earlier = pack_tokens(
            [
                self.tokens[e][-(size - 1) :] if size > 1 else []
                for e, size in zip(fused, sizes, strict=True)
            ]
        )
        current = inputs[mx.array(fused)] if len(fused) < len(inputs) else inputs
        current = mx.where(mx.array(sizes) > 0, current.astype(mx.int32), -1)
        return mx.concatenate([earlier, current[:, None]], axis=1)
