"""What structured output costs: free generations against JSON-schema-constrained ones.

The same number of concurrent greedy requests runs free, then each constrained by a JSON
schema (an array of free-form strings that cannot end before max_tokens, so both variants
generate the same number of tokens and the constrained rows' masks are as large as they get),
alternating within every round, at each concurrency. Our engine in this process (no gRPC).
Ratio: constrained / free tok/s, of the medians and round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from . import report
from .backends import MODEL_ID, engine_generate
from .client import make_prompts
from .model_maker import add_model_arguments, chosen_model_path
from .options import int_list

PROMPT_TOKENS = 16
FREE, CONSTRAINED = "free", "json schema"
SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 100000}

COLUMNS = [
    report.Column("streams", "streams"),
    report.Column("variant", "variant"),
    report.Column("tok/s (median)", "tok_s", ".1f"),
    report.Column("per round", "tok_s_rounds", ".1f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="tiny")
    parser.add_argument("--concurrency", type=int_list, default=[1, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)


async def one_round(engine, prompts, max_tokens: int, constraint) -> float:
    """Aggregate tokens per second of concurrent greedy requests, one per prompt."""
    fields = {"constraint": constraint} if constraint else {}
    started = time.perf_counter()
    results = await asyncio.gather(
        *(engine_generate(engine, p.ids, max_tokens, **fields) for p in prompts)
    )
    if failed := [r.error for r in results if r.error]:
        raise RuntimeError(f"a generation failed: {failed[0]}")
    if short := [r.tokens for r in results if r.tokens != max_tokens]:
        raise RuntimeError(f"a generation ended early, after {short[0]} tokens")
    return sum(r.tokens for r in results) / (time.perf_counter() - started)


async def measure(args) -> dict[tuple[int, str], list[float]]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.engine import Engine
    from mlx_serving.engine.models import ModelSource
    from mlx_serving.engine.requests import Constraint

    path = chosen_model_path(args)
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    count = sum(args.concurrency) * (2 * args.rounds + 2)
    pool = iter(make_prompts(load_tokenizer(path), count, PROMPT_TOKENS))
    engine = Engine()
    await engine.start()
    runs: dict[tuple[int, str], list[float]] = {}
    try:
        await engine.load_model(ModelSource(local_path=str(path)), MODEL_ID)
        for streams in args.concurrency:
            for variant in (None, constraint):  # warm-up: first shapes, the grammar compiled
                prompts = [next(pool) for _ in range(streams)]
                await one_round(engine, prompts, args.max_tokens, variant)
            for i in range(args.rounds):
                order = (FREE, CONSTRAINED) if i % 2 == 0 else (CONSTRAINED, FREE)
                for variant in order:
                    prompts = [next(pool) for _ in range(streams)]
                    chosen = constraint if variant == CONSTRAINED else None
                    tok_s = await one_round(engine, prompts, args.max_tokens, chosen)
                    runs.setdefault((streams, variant), []).append(tok_s)
                    print(f"  {streams} streams, round {i + 1}: {variant} {tok_s:.1f} tok/s")
    finally:
        await engine.shutdown(0)
    return runs


def run(args) -> dict:
    runs = asyncio.run(measure(args))
    rows = report.streams_rows(runs)
    ratios = [
        report.median_ratio(
            f"constrained/free at {streams} streams",
            runs[(streams, CONSTRAINED)],
            runs[(streams, FREE)],
            metric="tok_s",
        )
        for streams in args.concurrency
    ]
    widest = ratios[-1]
    checks = [
        report.check_entry(
            widest["name"], widest["value"], "at least 0.90", widest["value"] >= 0.90 - 0.05
        )
    ]
    return report.make_report("constrained", args, rows, ratios, checks)
