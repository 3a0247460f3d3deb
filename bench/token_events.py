"""What per-token events cost: our engine with no subscriber against one to token events.

The same batch runs with no subscriber, then with one subscribed to token events, alternating
within every round.

The engine sends TokenGenerated events only while someone subscribes to them (the Events
service does); this measures what that subscriber costs the generations. Ratio: with / without
tok/s, of the medians and round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from . import report
from .backends import MODEL_ID, engine_generate
from .client import make_prompts
from .model_maker import add_model_arguments, chosen_model_path

PROMPT_TOKENS = 16
PLAIN, WATCHED = "no subscriber", "token subscriber"

COLUMNS = [
    report.Column("variant", "variant"),
    report.Column("streams", "streams"),
    report.Column("tok/s (median)", "tok_s", ".1f"),
    report.Column("per round", "tok_s_rounds", ".1f"),
    report.Column("events (last round)", "token_events"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="tiny")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)


async def one_round(engine, prompts, max_tokens: int) -> float:
    """Aggregate tokens per second of concurrent greedy requests, one per prompt."""
    started = time.perf_counter()
    results = await asyncio.gather(*(engine_generate(engine, p.ids, max_tokens) for p in prompts))
    if failed := [r.error for r in results if r.error]:
        raise RuntimeError(f"a generation failed: {failed[0]}")
    return sum(r.tokens for r in results) / (time.perf_counter() - started)


async def watched_round(engine, prompts, max_tokens: int) -> tuple[float, int]:
    """One round while a subscriber reads every token event; (tok/s, token events it read,
    not counting the empty one that ends each stream)."""
    from mlx_serving.engine.events import TokenGenerated

    received = 0

    async def read(stream) -> None:
        nonlocal received
        async for event in stream:
            received += not event.payload.end_of_sequence

    stream = engine.subscribe(frozenset({TokenGenerated}))
    reader = asyncio.create_task(read(stream))
    try:
        tok_s = await one_round(engine, prompts, max_tokens)
        await asyncio.sleep(0.05)  # the last step's events are on their way
    finally:
        stream.close()
        reader.cancel()
    return tok_s, received


async def measure(args) -> tuple[dict[str, list[float]], int]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.engine import Engine
    from mlx_serving.engine.models import ModelSource

    path = chosen_model_path(args)
    count = args.streams * (2 * args.rounds + 1)
    pool = iter(make_prompts(load_tokenizer(path), count, PROMPT_TOKENS))
    engine = Engine()
    await engine.start()
    runs: dict[str, list[float]] = {PLAIN: [], WATCHED: []}
    events = 0
    try:
        await engine.load_model(ModelSource(local_path=str(path)), MODEL_ID)
        await one_round(engine, [next(pool) for _ in range(args.streams)], args.max_tokens)
        for i in range(args.rounds):
            for variant in (PLAIN, WATCHED) if i % 2 == 0 else (WATCHED, PLAIN):
                prompts = [next(pool) for _ in range(args.streams)]
                if variant == PLAIN:
                    runs[PLAIN].append(await one_round(engine, prompts, args.max_tokens))
                else:
                    tok_s, events = await watched_round(engine, prompts, args.max_tokens)
                    runs[WATCHED].append(tok_s)
                print(f"  round {i + 1}: {variant} {runs[variant][-1]:.1f} tok/s", flush=True)
    finally:
        await engine.shutdown(0)
    return runs, events


def run(args) -> dict:
    runs, events = asyncio.run(measure(args))
    rows = [
        {
            "variant": name,
            "streams": args.streams,
            "tok_s": statistics.median(values),
            "tok_s_rounds": values,
            "token_events": events if name == WATCHED else None,
        }
        for name, values in runs.items()
    ]
    plain, watched = runs[PLAIN], runs[WATCHED]
    ratio = report.median_ratio("token subscriber/no subscriber", watched, plain, metric="tok_s")
    expected = args.streams * args.max_tokens
    checks = [
        report.check_entry(
            "token events read in the last watched round",
            events,
            f"{expected} (one per token)",
            events == expected,
        )
    ]
    return report.make_report("token-events", args, rows, [ratio], checks)
