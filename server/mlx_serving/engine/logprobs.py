"""Log probabilities for callers: of each generated token with its likeliest alternatives, and
of a prompt's tokens.

They come from the model's own distribution, log_softmax of its logits, before temperature,
penalties, logit bias, truncation (top-k, top-p, min-p) and any constraint, as vLLM's default
("raw_logprobs"). mlx-lm's batch step hands back the distribution after the logits processors,
so a sequence with processors keeps the raw one itself (`RawLogprobs`).
"""

from collections import deque

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .requests import TokenLogprobs


class RawLogprobs:
    """A sequence's first logits processor: keeps the model's own distribution of each step,
    which the processors after it change. Steps are taken out in order (`take`)."""

    def __init__(self):
        self.steps: deque[mx.array] = deque()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.steps.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return logits

    def take(self) -> mx.array:
        return self.steps.popleft()


class Pieces:
    """Each token's own text, decoded once per model."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}

    def __getitem__(self, token: int) -> str:
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = self.tokenizer.decode([token])
        return text


def token_logprobs(
    distributions: list[mx.array], tokens: list[int], tops: list[int], pieces: Pieces
) -> list[TokenLogprobs]:
    """For each row: the logprob of its token in its distribution, and its `tops[i]` likeliest
    tokens; one device round trip for all rows."""
    rows = mx.stack([d.reshape(-1) for d in distributions])
    chosen = mx.take_along_axis(rows, mx.array(tokens)[:, None], axis=-1)[:, 0]
    k = max(tops)
    top_ids: list = []
    top_values: list = []
    if k:
        ids = mx.argpartition(-rows, kth=k - 1, axis=-1)[:, :k]
        values = mx.take_along_axis(rows, ids, axis=-1)
        mx.eval(chosen, ids, values)
        top_ids, top_values = ids.tolist(), values.tolist()  # type: ignore[assignment]
    else:
        mx.eval(chosen)
    logprobs: list = chosen.tolist()  # type: ignore[assignment]
    entries = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        top: tuple = ()
        if tops[i]:
            ranked = sorted(zip(top_values[i], top_ids[i], strict=True), reverse=True)[: tops[i]]
            top = tuple((t, pieces[t], v) for v, t in ranked)
        entries.append(TokenLogprobs((token, pieces[token], logprob), top))
    return entries


def prompt_logprobs(
    model, prompt: tuple[int, ...], top: int, pieces: Pieces, chunk: int
) -> tuple[TokenLogprobs, ...]:
    """Each prompt token after the first, given the ones before it: one more forward pass over
    the prompt, `chunk` tokens at a time, outside the batch."""
    cache = make_prompt_cache(model)
    entries: list[TokenLogprobs] = []
    for start in range(0, len(prompt) - 1, chunk):
        inputs = prompt[start : start + chunk]
        targets = prompt[start + 1 : start + 1 + len(inputs)]
        logits = model(mx.array(inputs)[None], cache=cache)[0, : len(targets)]
        logits = logits.astype(mx.float32)
        distributions = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        entries += token_logprobs(list(distributions), list(targets), [top] * len(targets), pieces)
    return tuple(entries)
