"""Prefill shapes from a small fixed set, compiled at a model's load.

On a GPU, MLX builds what each new shape needs the first time it runs it (kernels compiled by
NVRTC, cuBLAS plans, CUDA graphs), and every new prompt length (and prefill group size) is a
new shape: on a fresh H200 a closed loop of mixed-length prompts saw a TTFT p95 of 9 s until
the shapes had been seen. Padding each prefill chunk to one of `BUCKETS` bounds the shapes to
`len(BUCKETS)` lengths times `prefill_batch_size` group sizes, few enough to run each once
before the model serves (`warm_up`).

Padding goes on the right, as mlx-lm already pads prompts of different lengths: causal
attention never lets a real token see the padding after it, and the caches' `finalize` moves it
to the left padding the decode steps mask. So bucketing changes no output (greedy parity is
tested), only the work done: up to a third more prefill tokens. On the CPU, where a new shape
costs nothing extra, it is off by default (`engine.prefill_buckets: auto`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch, _right_pad_prompts

from .batch_cache import make_cache

log = logging.getLogger(__name__)

# Powers of two and the halfway points between them: at most a third of a chunk is padding.
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def buckets_wanted(setting: str) -> bool:
    """`engine.prefill_buckets`: on, off, or auto (on where new shapes cost compiles: GPUs)."""
    if setting == "auto":
        return mx.default_device() == mx.gpu
    return setting == "on"


def bucket_length(length: int, step_size: int) -> int:
    """The padded length of a chunk of `length` tokens: the next bucket, but no more than a
    prefill step; a longer prompt is whole steps and a bucketed remainder."""
    whole, rest = divmod(length, step_size)
    if rest == 0:
        return length
    bucket = next((b for b in BUCKETS if b >= rest), step_size)
    return whole * step_size + min(bucket, step_size)


def shape_lengths(step_size: int) -> list[int]:
    """Every padded chunk length a prefill can have with this step size."""
    return sorted({bucket_length(n, step_size) for n in [*BUCKETS, step_size] if n <= step_size})


class BucketedPromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch with each chunk right-padded to a bucket length."""

    def prompt(self, tokens: list[list[int]]) -> None:
        if len(self.uids) != len(tokens):
            raise ValueError("The batch length doesn't match the number of inputs")
        if not tokens:
            return
        for cached, chunk in zip(self.tokens, tokens, strict=True):
            cached += chunk
        lengths = [len(t) for t in tokens]
        width = bucket_length(max(lengths), self.prefill_step_size)
        padding = [width - n for n in lengths]
        padded = max(padding) > 0
        if padded:
            inputs = _right_pad_prompts(tokens, max_length=width)
            for cache in self.prompt_cache:
                cache.prepare(lengths=lengths, right_padding=padding)
        else:
            inputs = mx.array(tokens)
        while inputs.shape[1] > 0:
            n = min(self.prefill_step_size, inputs.shape[1])
            self.model(inputs[:, :n], cache=self.prompt_cache)
            mx.eval([c.state for c in self.prompt_cache])
            inputs = inputs[:, n:]
        if padded:
            for cache in self.prompt_cache:
                cache.finalize()
            mx.eval([c.state for c in self.prompt_cache])
        mx.clear_cache()


def warmup_shapes(prefill_batch_size: int, step_size: int) -> list[tuple[int, int, bool]]:
    """(group size, chunk length, padded) for every prefill shape a model can meet: padded and
    unpadded chunks take different attention masks, so different kernels."""
    return [
        (group, length, padded)
        for group in range(1, prefill_batch_size + 1)
        for length in shape_lengths(step_size)
        for padded in (False, True)
        if length > 1 or not padded
    ]


def warm_up_shape(model, group: int, length: int, padded: bool, step_size: int) -> None:
    """Prefill `group` dummy prompts whose chunk is `length` tokens once bucketed."""
    lengths = [length] * group
    if padded:
        lengths[-1] = length - 1
    batch = BucketedPromptBatch(
        model,
        list(range(group)),
        [make_cache(model) for _ in range(group)],
        prefill_step_size=step_size,
    )
    batch.prompt([[1] * n for n in lengths])


class WarmUp:
    """A model's warm-up, one shape at a time, so a load between batch steps stalls other
    models' decoding by one prefill at most."""

    def __init__(self, model_id: str, model, prefill_batch_size: int, step_size: int):
        self.model_id = model_id
        self.model = model
        self.step_size = step_size
        self.shapes = warmup_shapes(prefill_batch_size, step_size)
        self.total = len(self.shapes)
        self.seconds = 0.0
        self._next_report = time.monotonic() + 5.0

    def __iter__(self) -> Iterator[None]:
        log.info(
            "%s: compiling %d prefill shapes (group sizes 1-%d, %d chunk lengths)",
            self.model_id,
            self.total,
            max(g for g, _, _ in self.shapes),
            len({n for _, n, _ in self.shapes}),
        )
        for done, shape in enumerate(self.shapes, 1):
            started = time.perf_counter()
            warm_up_shape(self.model, *shape, self.step_size)
            self.seconds += time.perf_counter() - started
            if time.monotonic() >= self._next_report and done < self.total:
                log.info("%s: %d of %d prefill shapes compiled", self.model_id, done, self.total)
                self._next_report = time.monotonic() + 5.0
            yield
        log.info(
            "%s: %d prefill shapes compiled in %.1f s",
            self.model_id,
            self.total,
            self.seconds,
        )


# The fewest prompt tokens of one row a paced step prefills: a long prompt always progresses.
MIN_PACED_TOKENS = 16


class PrefillPacer:
    """How many prompt tokens each row prefills in a step while other sequences decode.

    mlx-lm's batch step decodes every running sequence, then prefills one chunk of each
    arriving prompt: with fixed chunks of `prefill_step_size`, an 8,000-token prompt stalls
    every running stream for as many long steps. Paced, a step's prefill takes about `ratio`
    times a decode-only step (both measured as they run), so running streams slow to at most
    about 1 + ratio times their steady inter-token latency; an idle batch prefills whole steps.
    Chunks are bucket lengths, so bucketed prefill meets no new shape.
    """

    def __init__(self, step_size: int, ratio: float):
        self.step_size = step_size
        self.ratio = ratio
        self.decode_seconds: float | None = None
        self.seconds_per_token: float | None = None

    def chunk(self, decoding: int, prefilling: int) -> int:
        if not decoding or self.ratio <= 0 or self.decode_seconds is None:
            return self.step_size
        if self.seconds_per_token is None:
            tokens = MIN_PACED_TOKENS * 4.0  # a first measure of the prefill's speed
        elif self.seconds_per_token <= 0:
            return self.step_size  # prefill cost nothing measurable beside the decode step
        else:
            tokens = self.ratio * self.decode_seconds / self.seconds_per_token
        per_row = tokens / max(prefilling, 1)
        fitting = [b for b in BUCKETS if b <= min(per_row, self.step_size)]
        return max(fitting[-1] if fitting else MIN_PACED_TOKENS, MIN_PACED_TOKENS)

    def observe(self, seconds: float, decoded: bool, prompt_tokens: int) -> None:
        """A step took `seconds`: decoding only, or prefilling `prompt_tokens` as well."""
        if prompt_tokens == 0:
            if decoded:
                self.decode_seconds = ema(self.decode_seconds, seconds)
        elif self.decode_seconds is not None:
            per_token = max(seconds - self.decode_seconds, 0.0) / prompt_tokens
            self.seconds_per_token = ema(self.seconds_per_token, per_token)


def ema(average: float | None, value: float, weight: float = 0.3) -> float:
    return value if average is None else average + weight * (value - average)
