"""What a long prompt's prefill does to the streams already decoding.

`mlx-serving serve` runs `--streams` greedy generations of short prompts (each restarted when
it ends, so the batch stays full). After `--settle` seconds, the running streams' inter-token
gaps over `--steady-seconds` are the steady state; then one request with a `--long-tokens`
prompt arrives, and the gaps the running streams see from its arrival to its first token (its
prefill, chunked `engine.prefill_step_size` tokens a step between decode steps, or paced by
`engine.prefill_pacing`) are compared with them. Check: the gaps' p99 during the prefill is at
most 3x the steady p99. Every stream sees each step's gap, so a prefill of few steps has a p99
that is its worst step or two: the step that joins the long prompt to the batch counts too.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from . import report
from .client import RequestResult
from .cold_start import served_vocab_size
from .model_maker import add_model_arguments, chosen_model_path
from .options import engine_setting
from .servers import MlxServingBackend

COLUMNS = [
    report.Column("window", "window"),
    report.Column("gaps", "gaps"),
    report.Column("ITL p50 ms", "itl_p50_ms", ".2f"),
    report.Column("p99 ms", "itl_p99_ms", ".2f"),
    report.Column("max ms", "itl_max_ms", ".2f"),
    report.Column("long TTFT ms", "long_ttft_ms", ".0f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--steady-seconds", type=float, default=5.0)
    parser.add_argument("--engine", type=engine_setting, action="append", default=[])
    parser.add_argument("--startup-timeout", type=float, default=600.0)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


class Arrivals:
    """Every streamed message's arrival time and token count, per running stream."""

    def __init__(self):
        self.times: list[list[float]] = []
        self.stop = False

    def gaps(self, start: float, end: float) -> list[float]:
        """Per-token gaps of the messages that arrived in [start, end)."""
        gaps = []
        for times in self.times:
            gaps += [b - a for a, b in zip(times, times[1:], strict=False) if start <= b < end]
        return gaps


async def stream_forever(backend, arrivals: Arrivals, rng, vocab: int, args) -> None:
    while not arrivals.stop:
        times: list[float] = []
        arrivals.times.append(times)
        ids = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
        request = backend.pb.GenerateRequest(
            model_id="bench",
            tokens=backend.pb.TokenIds(ids=ids),
            max_tokens=args.max_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        async for reply in backend.stub.Generate(request):
            now = time.perf_counter()
            times += [now] * len(reply.token_ids)  # tokens of one message share its arrival
            if arrivals.stop:
                break


def row(window: str, gaps: list[float], long_ttft: float | None = None) -> dict:
    # Several tokens in one message show as gaps of 0: count messages' gaps only.
    gaps = [g * 1000 for g in gaps if g > 0]
    return {
        "window": window,
        "gaps": len(gaps),
        "itl_p50_ms": percentile(gaps, 0.5),
        "itl_p99_ms": percentile(gaps, 0.99),
        "itl_max_ms": max(gaps, default=None),
        "long_ttft_ms": long_ttft,
    }


async def measure(args, vocab: int) -> list[dict]:
    settings = dict(args.engine)
    backend = MlxServingBackend(chosen_model_path(args), args.startup_timeout, settings, [])
    rng = random.Random(0)
    arrivals = Arrivals()
    async with backend:
        streams = [
            asyncio.create_task(stream_forever(backend, arrivals, rng, vocab, args))
            for _ in range(args.streams)
        ]
        await asyncio.sleep(args.settle)
        steady_start = time.perf_counter()
        await asyncio.sleep(args.steady_seconds)
        arrived = time.perf_counter()
        ids = [rng.randrange(3, vocab) for _ in range(args.long_tokens)]
        long = RequestResult(start=arrived)
        reply_stream = backend.stub.Generate(
            backend.pb.GenerateRequest(
                model_id="bench", tokens=backend.pb.TokenIds(ids=ids), max_tokens=4
            )
        )
        async for reply in reply_stream:
            long.arrived(len(reply.token_ids), time.perf_counter())
        first = long.first or time.perf_counter()
        await asyncio.sleep(0.5)
        arrivals.stop = True
        await asyncio.gather(*streams, return_exceptions=True)
    long_ttft = (first - arrived) * 1000
    return [
        row("steady", arrivals.gaps(steady_start, arrived)),
        row("long prefill", arrivals.gaps(arrived, first + 0.05), long_ttft),
    ]


def run(args) -> dict:
    vocab = served_vocab_size(chosen_model_path(args))
    rows = asyncio.run(measure(args, vocab))
    steady, during = rows
    checks = []
    if steady["itl_p99_ms"] and during["itl_p99_ms"]:
        value = during["itl_p99_ms"] / steady["itl_p99_ms"]
        checks.append(report.check_entry("ITL p99 during/steady", value, "<= 3", value <= 3))
        checks.append(
            report.check_entry(
                "ITL p99 during / steady p50", during["itl_p99_ms"] / steady["itl_p50_ms"]
            )
        )
    return report.make_report("long-prompt", args, rows, checks=checks)
