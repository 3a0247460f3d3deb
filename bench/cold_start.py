"""A freshly started server's first minute of mixed-length traffic, against the same once warm.

For each variant (`engine.prefill_buckets` on and off), `mlx-serving serve` starts with an
empty MLX kernel cache of its own (MLX_PTX_CACHE_DIR; nothing compiled carries over from an
earlier process). As soon as health says SERVING, `--streams` closed-loop clients send greedy
requests of `--max-tokens` tokens whose prompts are random token ids of random lengths in
`--prompt-tokens` for `--seconds`, then for `--warm-seconds` more: the first window is what the
first users of a new replica meet, the second the same traffic once its shapes have been seen.
Startup: from the process's start to SERVING (loading and, bucketed, the warm-up).
Check: bucketed, the first window's TTFT p95 is at most twice the warm window's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time

from . import report
from .client import Prompt, RequestResult
from .model_maker import add_model_arguments, chosen_model_path
from .options import length_range
from .servers import MlxServingBackend

VARIANTS = ("on", "off")
# The server's startup lines kept in the report: its capacity and its warm-up.
TOLD = ("KV cache per token", "prefill shapes")

COLUMNS = [
    report.Column("buckets", "buckets"),
    report.Column("window", "window"),
    report.Column("startup s", "startup_s", ".1f"),
    report.Column("requests", "requests"),
    report.Column("failed", "failed"),
    report.Column("tok/s", "tok_s", ".0f"),
    report.Column("TTFT p50 ms", "ttft_p50_ms", ".0f"),
    report.Column("p95 ms", "ttft_p95_ms", ".0f"),
    report.Column("max ms", "ttft_max_ms", ".0f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=length_range, default=(16, 1024))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warm-seconds", type=float, default=30.0)
    parser.add_argument("--buckets", default="on,off", help="variants, in order: on, off")
    parser.add_argument("--startup-timeout", type=float, default=600.0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_loop(backend, lengths, vocab: int, args, seconds: float, rng) -> tuple:
    """Closed-loop clients until `seconds` have passed; (results, wall seconds)."""
    deadline = time.perf_counter() + seconds
    results: list[RequestResult] = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))]
            results.append(await backend.generate(Prompt(ids, ""), args.max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.streams)))
    return results, time.perf_counter() - started


def window_row(buckets: str, window: str, startup: float, results, wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.first is not None]
    ttfts = [(r.first - r.start) * 1000 for r in ok]
    return {
        "buckets": buckets,
        "window": window,
        "startup_s": startup,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tok_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50_ms": percentile(ttfts, 0.5),
        "ttft_p95_ms": percentile(ttfts, 0.95),
        "ttft_max_ms": max(ttfts, default=None),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


async def measure_variant(args, buckets: str, vocab: int) -> list[dict]:
    model = chosen_model_path(args)
    backend = MlxServingBackend(model, args.startup_timeout, {"prefill_buckets": buckets}, [])
    with tempfile.TemporaryDirectory(prefix="mlx-ptx-") as kernels:
        backend.server.env["MLX_PTX_CACHE_DIR"] = kernels
        backend.server.env["CUDA_CACHE_DISABLE"] = "1"  # nor the driver's own cache of them
        started = time.perf_counter()
        async with backend:
            startup = time.perf_counter() - started
            told = [line for line in backend.server.tail if any(w in line for w in TOLD)]
            rng = random.Random(0)
            first = await timed_loop(backend, args.prompt_tokens, vocab, args, args.seconds, rng)
            warm = await timed_loop(
                backend, args.prompt_tokens, vocab, args, args.warm_seconds, rng
            )
    return [
        {**window_row(buckets, "first", startup, *first), "startup_log": told},
        window_row(buckets, "warm", startup, *warm),
    ]


def served_vocab_size(path) -> int:
    """The ids the server accepts: its tokenizer's, within the model's embedding rows."""
    import json

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.loading import vocab_size

    config = json.loads((path / "config.json").read_text())
    return vocab_size(load_tokenizer(path), config)


def run(args) -> dict:
    vocab = served_vocab_size(chosen_model_path(args))
    rows = []
    for buckets in [b for b in args.buckets.split(",") if b]:
        if buckets not in VARIANTS:
            raise SystemExit(f"--buckets: {buckets!r} is not on or off")
        rows += asyncio.run(measure_variant(args, buckets, vocab))
    ratios, checks = [], []
    for buckets in VARIANTS:
        first, warm = (
            next((r for r in rows if r["buckets"] == buckets and r["window"] == w), None)
            for w in ("first", "warm")
        )
        if first is None or warm is None or not warm["ttft_p95_ms"]:
            continue
        value = first["ttft_p95_ms"] / warm["ttft_p95_ms"]
        ratios.append(report.ratio_entry("first/warm TTFT p95", value, buckets=buckets))
        if buckets == "on":
            checks.append(
                report.check_entry("bucketed first/warm TTFT p95", value, "<= 2", value <= 2)
            )
    return report.make_report("cold-start", args, rows, ratios, checks)
