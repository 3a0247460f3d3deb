"""What the fused sampler and the native extension are worth to sampled decoding, end to end.

Three engines (each its own process) on the same model serve the same closed loop of sampled
requests (temperature, top-p and a presence penalty, EOS ignored): "per-row", mlx-lm's sampler
and logits processors row by row (engine.fused_sampler off); "fused", one fused call per step
in pure MLX (engine.native_kernels off); "native", the same call through the compiled extension
(and its decode attention where built). Variants alternate within every round, in an order
that rotates each round. Ratios: native over fused and over per-row tok/s, of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from . import report
from .backends import MODEL_ID, engine_generate
from .client import make_prompts
from .model_maker import add_model_arguments, chosen_model_path
from .options import int_list

PROMPT_TOKENS = 32
VARIANTS = ("per-row", "fused", "native")

COLUMNS = [
    report.Column("streams", "streams"),
    report.Column("variant", "variant"),
    report.Column("tok/s (median)", "tok_s", ".1f"),
    report.Column("per round", "tok_s_rounds", ".1f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="tiny")
    parser.add_argument("--concurrency", type=int_list, default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)


def engine_config(variant: str):
    from mlx_serving.engine.config import EngineConfig

    if variant == "per-row":
        return EngineConfig(fused_sampler=False)
    return EngineConfig(native_kernels=variant == "native")


async def one_round(engine, prompts, max_tokens: int, seed: int) -> float:
    """Aggregate tokens per second of concurrent sampled requests, one per prompt."""
    from mlx_serving.engine.requests import SamplingParams

    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            engine_generate(
                engine,
                p.ids,
                max_tokens,
                sampling=SamplingParams(
                    temperature=0.8, top_p=0.9, presence_penalty=0.5, seed=seed + i
                ),
            )
            for i, p in enumerate(prompts)
        )
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

    if os.environ.get("MLX_SERVING_NATIVE"):
        raise SystemExit("unset MLX_SERVING_NATIVE: each engine here chooses for itself")
    path = chosen_model_path(args)
    count = sum(args.concurrency) * len(VARIANTS) * (args.rounds + 1)
    pool = iter(make_prompts(load_tokenizer(path), count, PROMPT_TOKENS))
    engines = {variant: Engine(engine_config(variant)) for variant in VARIANTS}
    runs: dict[tuple[int, str], list[float]] = {}
    try:
        for engine in engines.values():
            await engine.start()
            await engine.load_model(ModelSource(local_path=str(path)), MODEL_ID)
        for streams in args.concurrency:
            for engine in engines.values():  # warm-up: first shapes compiled
                await one_round(engine, [next(pool) for _ in range(streams)], 8, 0)
            for i in range(args.rounds):
                order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
                for variant in order:
                    prompts = [next(pool) for _ in range(streams)]
                    tok_s = await one_round(engines[variant], prompts, args.max_tokens, 1000 * i)
                    runs.setdefault((streams, variant), []).append(tok_s)
                    print(f"  {streams} streams, round {i + 1}: {variant} {tok_s:.1f} tok/s")
    finally:
        for engine in engines.values():
            await engine.shutdown(0)
    return runs


def run(args) -> dict:
    runs = asyncio.run(measure(args))
    rows = report.streams_rows(runs)
    ratios = [
        report.median_ratio(
            f"native/{other} at {streams} streams",
            runs[(streams, "native")],
            runs[(streams, other)],
            metric="tok_s",
        )
        for streams in args.concurrency
        for other in ("fused", "per-row")
    ]
    widest = [r for r in ratios if r["name"] == f"native/fused at {args.concurrency[-1]} streams"]
    checks = [
        report.check_entry(
            widest[0]["name"], widest[0]["value"], "above 1.00", widest[0]["value"] > 1.0 - 0.05
        )
    ]
    return report.make_report("sampled", args, rows, ratios, checks)
