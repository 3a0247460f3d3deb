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
from collections import deque
from collections.abc import Iterable, Iterator

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


# The shortest chunk a paced step prefills per row, measured first: about a pass's fixed cost.
MIN_PACED_TOKENS = BUCKETS[0]
# Decode-only steps whose times give the steady p99 a paced step is held against.
DECODE_WINDOW = 500
# Prefill steps after which a chunk length's measured cost is stale: tried again if it may fit.
STALE_STEPS = 32
# A step's prefill may always take this many times the shortest chunk's (about the fixed
# cost of a pass): chunks grow until their tokens take about as long as the fixed cost.
EFFICIENCY = 2.0


class ChunkCost:
    """The measured extra time of a step that prefills chunks of one length (an EMA)."""

    __slots__ = ("seconds", "step")

    def __init__(self, seconds: float, step: int):
        self.seconds = seconds
        self.step = step


class PrefillPacer:
    """How many prompt tokens each row prefills in a step while other sequences decode.

    mlx-lm's batch step decodes every running sequence, then prefills one chunk of each
    arriving prompt: with fixed chunks of `prefill_step_size`, an 8,000-token prompt stalls
    every running stream for as many long steps. Paced, each step prefills the longest chunk
    (a bucket length: bucketed prefill meets no new shape) whose measured extra time (the
    step's time less the mean decode-only step's) fits `ratio - 1` times the p99 of recent
    decode-only steps, so that the running streams' p99 inter-token latency while a prompt
    prefills stays near `ratio` times their steady p99. An idle batch prefills whole steps.

    A prefill pass has a large fixed cost (its own graph, and the synchronous evaluation that
    ends its overlap with the next decode step) and a small one per token. So each chunk
    length's extra time is measured as itself (per group size), never divided into a per-token
    rate, which charges the fixed cost to the tokens and makes every chunk look too dear. Longer
    lengths are tried one at a time while a line through the last two measures says the next
    fits; one that overshoots is left for the length below until its measure is stale, and the
    shortest is measured again as often (on the CPU every pass grew dearer with the context).

    A step's prefill may always take `EFFICIENCY` times the shortest chunk's time, about the
    fixed cost: chunks grow until their tokens take about as long as it. Where the fixed cost
    is over half the budget this gives the budget up, and the running streams slow beyond
    `ratio`, so that the prompt's passes spend no more than about half their time on the fixed
    cost instead of reading 16 tokens a step (an 8,000-token prompt so took 8 s on an H200).
    """

    def __init__(self, step_size: int, ratio: float):
        self.step_size = step_size
        self.ratio = ratio
        self.lengths = shape_lengths(step_size)
        self.decode_seconds: float | None = None
        self.decode_p99: float | None = None
        self._decode_window: deque[float] = deque(maxlen=DECODE_WINDOW)
        self.costs: dict[tuple[int, int], ChunkCost] = {}
        self._steps = 0
        self._decodes = 0
        self._pending: tuple[int, int] | None = None

    @property
    def budget(self) -> float:
        """The extra seconds a step's prefill may take while sequences decode."""
        return (self.ratio - 1) * (self.decode_p99 or 0.0)

    def chunk(self, decoding: int, prefilling: int, longest: int | None = None) -> int:
        """This step's chunk per row, for `prefilling` rows whose longest remaining prompt
        (where known) is `longest` tokens."""
        self._pending = None
        if not decoding or self.ratio <= 0 or self.decode_p99 is None or longest == 0:
            return self.step_size
        rows = max(prefilling, 1)
        chosen = self._choose(rows)
        width = chosen
        if longest is not None and longest < chosen:
            width = next(n for n in self.lengths if n >= longest)
        self._pending = (rows, width)
        return chosen

    def _known(self, rows: int) -> dict[int, ChunkCost]:
        return {n: c for (r, n), c in self.costs.items() if r == rows}

    def _choose(self, rows: int) -> int:
        known = self._known(rows)
        lengths = self.lengths
        shortest = known.get(lengths[0])
        if shortest is None or self._steps - shortest.step >= STALE_STEPS:
            return lengths[0]  # the fixed cost, measured (again: it grows with the context)
        budget = max(self.budget, EFFICIENCY * shortest.seconds)
        best = max(n for n in lengths if n in known and known[n].seconds <= budget)
        at = lengths.index(best)
        if at + 1 == len(lengths):
            return best
        longer = lengths[at + 1]
        cost = known.get(longer)
        if cost is not None and self._steps - cost.step < STALE_STEPS:
            return best  # measured to overshoot, lately
        below = max((n for n in known if n < best), default=None)
        if below is None:
            slope = known[best].seconds / best  # as if it all grew with length
        else:
            slope = (known[best].seconds - known[below].seconds) / (best - below)
        predicted = known[best].seconds + max(slope, 0.0) * (longer - best)
        return longer if predicted <= budget else best

    def observe(
        self, seconds: float, decoded: bool, prompt_tokens: int, prompting: bool = False
    ) -> None:
        """A step took `seconds`: decoding only, or prefilling `prompt_tokens` as well.
        `prompting`: prompt rows progressed or joined the decoding batch (whose caches it
        copies), so the step is no measure of a decode step even with no tokens prefilled."""
        pending, self._pending = self._pending, None
        if prompt_tokens == 0:
            if decoded and not prompting:
                self.decode_seconds = ema(self.decode_seconds, seconds)
                self._decode_window.append(seconds)
                self._decodes += 1
                if self.decode_p99 is None or self._decodes % 8 == 0:
                    self.decode_p99 = percentile(self._decode_window, 0.99)
        elif decoded and pending is not None and self.decode_seconds is not None:
            self._steps += 1
            extra = max(seconds - self.decode_seconds, 0.0)
            cost = self.costs.get(pending)
            if cost is None or self._steps - cost.step > STALE_STEPS:
                self.costs[pending] = ChunkCost(extra, self._steps)  # a stale measure is replaced
            else:
                cost.seconds = ema(cost.seconds, extra)
                cost.step = self._steps


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ema(average: float | None, value: float, weight: float = 0.3) -> float:
    return value if average is None else average + weight * (value - average)
