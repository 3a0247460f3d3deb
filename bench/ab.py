"""A/B of two ways to run mlx-lm's BatchGenerator, alternating in one process.

--compare fusion (the default): the model as loaded ("plain") against the same weights with
projections fused ("fused"); their logits over the same prompts are compared first (checks:
the largest difference, and how often the argmax agrees). --compare batch-cache: the fused
model with mlx-lm's own KV caches ("stock") against the engine's host-padded ones ("host").
Both variants are driven by the same closed loop as `serving` (greedy, EOS ignored, a new
prompt for every request) and alternate within every round, in an order that flips each
round, so drift of the host falls on both. Ratios: second/first tok/s, of the medians and
round by round.
"""

from __future__ import annotations

import argparse
import statistics

from mlx_serving.engine.config import EngineConfig

from . import report
from .backends import stock_generator
from .client import generator_closed_loop, make_prompts, tokens_per_second
from .model_maker import add_model_arguments, chosen_model_path
from .options import int_list, length_range

VARIANTS = {"fusion": ("plain", "fused"), "batch-cache": ("stock", "host")}

COLUMNS = [
    report.Column("streams", "concurrency"),
    report.Column("variant", "variant"),
    report.Column("tok/s (median)", "tok_s", ".1f"),
    report.Column("per round", "tok_s_rounds", ".1f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="fusion")
    parser.add_argument("--concurrency", type=int_list, default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=length_range, default=(118, 118))
    parser.add_argument("--requests-per-level", type=int, help="default: 3 x concurrency")
    parser.add_argument("--rounds", type=int, default=4)


def make_variants(path, compare: str) -> dict:
    """name → (model, cache factory, or None for mlx-lm's own caches)."""
    from mlx_lm import load

    from mlx_serving.engine.batch_cache import make_cache
    from mlx_serving.engine.fusion import fuse_projections

    fused = load(str(path))[0]
    print(f"model {path}: {fuse_projections(fused)} modules fused", flush=True)
    first, second = VARIANTS[compare]
    if compare == "fusion":
        return {first: (load(str(path))[0], None), second: (fused, None)}
    return {first: (fused, None), second: (fused, make_cache)}


def tok_s(variant, config: EngineConfig, prompts, concurrency: int, max_tokens: int) -> float:
    model, make_cache = variant
    generator = stock_generator(model, config)
    if make_cache is not None:
        insert = generator.insert
        generator.insert = lambda prompts, **kw: insert(
            prompts, caches=[make_cache(model) for _ in prompts], **kw
        )
    try:
        done, wall = generator_closed_loop(generator, prompts, concurrency, max_tokens)
    finally:
        generator.close()
    return tokens_per_second(done, wall)


def compare_logits(plain, fused, tokenizer, prompt_tokens) -> list[dict]:
    """Both models' logits over the same prompts: how far apart, and whether the argmax agrees."""
    import mlx.core as mx

    ids = mx.array([p.ids for p in make_prompts(tokenizer, 8, prompt_tokens[0], seed=2)])
    a, b = (model(ids).astype(mx.float32) for model in (plain, fused))
    return [
        report.check_entry("logits max |fused - plain|", mx.abs(b - a).max().item()),
        report.check_entry("logits max |plain|", mx.abs(a).max().item()),
        report.check_entry(
            f"argmax agreement over {ids.size} positions",
            (a.argmax(-1) == b.argmax(-1)).mean().item(),
        ),
    ]


def run(args) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = chosen_model_path(args)
    tokenizer = load_tokenizer(path)
    config = EngineConfig()
    variants = make_variants(path, args.compare)
    first, second = VARIANTS[args.compare]
    checks = []
    if args.compare == "fusion":
        checks = compare_logits(
            variants[first][0], variants[second][0], tokenizer, args.prompt_tokens
        )
    counts = {c: args.requests_per_level or 3 * c for c in args.concurrency}
    total = (args.rounds + 1) * sum(counts.values())
    pool = iter(make_prompts(tokenizer, total, args.prompt_tokens))
    rows, ratios = [], []
    for c in args.concurrency:
        warmup = [next(pool) for _ in range(counts[c])]
        for variant in variants.values():  # every shape of this level, compiled once
            tok_s(variant, config, warmup, c, args.max_tokens)
        runs = {name: [] for name in variants}
        for i in range(args.rounds):
            prompts = [next(pool) for _ in range(counts[c])]
            for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
                runs[name].append(tok_s(variants[name], config, prompts, c, args.max_tokens))
                print(f"  c={c} round {i + 1}: {name} {runs[name][-1]:.0f} tok/s", flush=True)
        for name, values in runs.items():
            rows.append(
                {
                    "concurrency": c,
                    "variant": name,
                    "tok_s": statistics.median(values),
                    "tok_s_rounds": values,
                }
            )
        a, b = runs[first], runs[second]
        ratios.append(
            report.ratio_entry(
                f"{second}/{first}",
                statistics.median(b) / statistics.median(a),
                [y / x for x, y in zip(a, b, strict=True)],
                concurrency=c,
            )
        )
    return report.make_report("ab", args, rows, ratios, checks)
