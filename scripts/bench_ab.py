"""A/B of two ways to run mlx-lm's BatchGenerator, alternating in one process.

Usage:
  python scripts/bench_ab.py [--compare fusion | batch-cache]
                             [--model-preset small | --model PATH] [--concurrency 16,32]
                             [--requests-per-level N] [--rounds 4] [--json OUT]

--compare fusion (the default): the model as loaded ("plain") against the same weights with
projections fused ("fused"), whose logits are compared first. --compare batch-cache: the fused
model with mlx-lm's own KV caches ("stock") against the engine's host-padded ones ("host",
engine/batch_cache.py). Both variants are driven by the closed loop of scripts/bench.py (greedy,
EOS ignored, a new prompt for every request) and alternate within every round, in an order that
flips each round, so machine drift falls on both. Printed: tok/s per round, the median of each,
and the ratio of the second to the first, median and per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "scripts")]

from bench import int_list, make_prompts, raw_closed_loop  # noqa: E402
from make_bench_model import add_model_arguments, chosen_model_path  # noqa: E402


def tok_s(variant, config, prompts, concurrency, max_tokens) -> float:
    """`variant`: (model, cache factory or None for mlx-lm's own caches)."""
    from mlx_lm.generate import BatchGenerator

    model, make_cache = variant
    generator = BatchGenerator(
        model,
        stop_tokens=None,
        completion_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
    )
    if make_cache is not None:
        insert = generator.insert
        generator.insert = lambda prompts, **kw: insert(
            prompts, caches=[make_cache(model) for _ in prompts], **kw
        )
    try:
        done, wall = raw_closed_loop(generator, prompts, concurrency, max_tokens)
    finally:
        generator.close()
    return sum(r.tokens for r in done) / wall


def check_outputs(models, tokenizer, prompt_tokens) -> None:
    """Both models' logits over the same prompts: how far apart, and whether the argmax agrees."""
    import mlx.core as mx

    prompts = mx.array([p.ids for p in make_prompts(tokenizer, 8, prompt_tokens, seed=2)])
    plain, fused = (models[name](prompts).astype(mx.float32) for name in ("plain", "fused"))
    same = (plain.argmax(-1) == fused.argmax(-1)).mean().item()
    print(
        f"logits over {prompts.size} positions: max |fused - plain| "
        f"{mx.abs(fused - plain).max().item():.3g} (largest |plain| "
        f"{mx.abs(plain).max().item():.3g}); argmax agrees at {same:.1%}",
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--compare", choices=["fusion", "batch-cache"], default="fusion")
    parser.add_argument("--concurrency", type=int_list, default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=118)
    parser.add_argument("--requests-per-level", type=int, help="default: 3 x concurrency")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from mlx_lm import load
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.batch_cache import make_cache
    from mlx_serving.engine.config import EngineConfig
    from mlx_serving.engine.fusion import fuse_projections

    path = chosen_model_path(args)
    config = EngineConfig()
    fused = load(str(path))[0]
    print(f"model {path}: {fuse_projections(fused)} modules fused", flush=True)
    if args.compare == "fusion":
        variants = {"plain": (load(str(path))[0], None), "fused": (fused, None)}
        check_outputs(
            {name: model for name, (model, _) in variants.items()},
            load_tokenizer(path),
            args.prompt_tokens,
        )
    else:
        variants = {"stock": (fused, None), "host": (fused, make_cache)}
    first, second = variants
    counts = {c: args.requests_per_level or 3 * c for c in args.concurrency}
    total = (args.rounds + 1) * sum(counts.values())
    pool = iter(make_prompts(load_tokenizer(path), total, args.prompt_tokens))
    runs: dict[int, dict[str, list[float]]] = {}
    for c in args.concurrency:
        warmup = [next(pool) for _ in range(counts[c])]
        for variant in variants.values():  # every shape of this level, compiled once
            tok_s(variant, config, warmup, c, args.max_tokens)
        runs[c] = {name: [] for name in variants}
        for i in range(args.rounds):
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]
            prompts = [next(pool) for _ in range(counts[c])]
            for name in order:
                runs[c][name].append(tok_s(variants[name], config, prompts, c, args.max_tokens))
                print(f"  c={c} round {i + 1}: {name} {runs[c][name][-1]:.0f} tok/s", flush=True)
        a, b = runs[c][first], runs[c][second]
        paired = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"c={c}: {first} {statistics.median(a):.0f} tok/s, {second} "
            f"{statistics.median(b):.0f} tok/s; {second}/{first} "
            f"{statistics.median(b) / statistics.median(a):.2f} "
            f"(per round {', '.join(f'{r:.2f}' for r in paired)})",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(path), "compare": args.compare, "tok_s": runs}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
