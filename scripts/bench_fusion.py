"""A/B: mlx-lm's BatchGenerator on a model as loaded and on the same weights, projections fused.

Usage:
  python scripts/bench_fusion.py [--model-preset small | --model PATH] [--concurrency 16,32]
                                 [--requests-per-level N] [--rounds 4] [--json OUT]

Both models are loaded side by side in this process and driven by the closed loop of
scripts/bench.py (greedy, EOS ignored, a new prompt for every request); the two alternate within
every round, in an order that flips each round, so machine drift falls on both. Printed: tok/s
per round, the median of each, and the ratio fused/plain, median and per round.
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


def tok_s(model, config, prompts, concurrency, max_tokens) -> float:
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        stop_tokens=None,
        completion_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
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
    parser.add_argument("--concurrency", type=int_list, default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=118)
    parser.add_argument("--requests-per-level", type=int, help="default: 3 x concurrency")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from mlx_lm import load
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.config import EngineConfig
    from mlx_serving.engine.fusion import fuse_projections

    path = chosen_model_path(args)
    config = EngineConfig()
    models = {"plain": load(str(path))[0], "fused": load(str(path))[0]}
    print(f"model {path}: {fuse_projections(models['fused'])} modules fused", flush=True)
    check_outputs(models, load_tokenizer(path), args.prompt_tokens)
    counts = {c: args.requests_per_level or 3 * c for c in args.concurrency}
    total = (args.rounds + 1) * sum(counts.values())
    pool = iter(make_prompts(load_tokenizer(path), total, args.prompt_tokens))
    runs: dict[int, dict[str, list[float]]] = {}
    for c in args.concurrency:
        warmup = [next(pool) for _ in range(counts[c])]
        for model in models.values():  # every shape of this level, compiled once
            tok_s(model, config, warmup, c, args.max_tokens)
        runs[c] = {name: [] for name in models}
        for i in range(args.rounds):
            order = list(models) if i % 2 == 0 else list(models)[::-1]
            prompts = [next(pool) for _ in range(counts[c])]
            for name in order:
                runs[c][name].append(tok_s(models[name], config, prompts, c, args.max_tokens))
                print(f"  c={c} round {i + 1}: {name} {runs[c][name][-1]:.0f} tok/s", flush=True)
        plain, fused = runs[c]["plain"], runs[c]["fused"]
        paired = [f / p for p, f in zip(plain, fused, strict=True)]
        print(
            f"c={c}: plain {statistics.median(plain):.0f} tok/s, fused "
            f"{statistics.median(fused):.0f} tok/s; fused/plain "
            f"{statistics.median(fused) / statistics.median(plain):.2f} "
            f"(per round {', '.join(f'{r:.2f}' for r in paired)})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "tok_s": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
