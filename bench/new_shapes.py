"""What a new prefill shape costs: each group of prompts prefilled twice, timed.

Each (prompts, length) group is timed to the first token and to the last of three.

On MLX's CUDA backend the first prefill of a shape builds what that shape needs (cuDNN's
attention graph, by default); the engine turns cuDNN prefill attention off unless told
otherwise (`engine.cudnn_prefill_attention`), and `MLX_CUDA_USE_CUDNN_SDPA=0` before the
command does the same here. Groups are BatchGenerator inserts of random token ids on what the
engine serves: the fused model with host-padded caches. Ratio: first time / second time, to
the first token.
"""

from __future__ import annotations

import argparse
import random
import time

from . import report
from .model_maker import add_model_arguments, chosen_model_path

# (prompts, length): a known length in a new group size, new lengths in a known group size.
GROUPS = [(3, 118), (3, 97), (3, 140), (5, 97), (5, 118), (2, 200), (2, 201), (7, 33), (7, 35)]
TOKENS = 3

COLUMNS = [
    report.Column("prompts", "prompts"),
    report.Column("length", "length"),
    report.Column("1st: first token ms", "first_ms", ".1f"),
    report.Column("all ms", "first_all_ms", ".1f"),
    report.Column("2nd: first token ms", "second_ms", ".1f"),
    report.Column("all ms", "second_all_ms", ".1f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")


def prefill(model, prompts: int, length: int, rng: random.Random) -> tuple[float, float]:
    """Milliseconds to the first token and to the last of TOKENS, for one group."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_serving.engine.batch_cache import make_cache

    generator = BatchGenerator(model, stop_tokens=None, prefill_batch_size=8)
    vocab = model.args.vocab_size
    ids = [[rng.randrange(vocab) for _ in range(length)] for _ in range(prompts)]
    started = time.perf_counter()
    caches = [make_cache(model) for _ in ids]
    uids = set(generator.insert(ids, max_tokens=[TOKENS] * prompts, caches=caches))
    first = None
    while uids:
        for response in generator.next()[1]:
            first = first or time.perf_counter() - started
            if response.finish_reason is not None:
                uids.discard(response.uid)
    mx.synchronize()
    total = time.perf_counter() - started
    generator.close()
    return first * 1000, total * 1000


def run(args) -> dict:
    from mlx_lm import load

    from mlx_serving.engine.fusion import fuse_projections

    path = chosen_model_path(args)
    model = load(str(path))[0]
    fuse_projections(model)
    rng = random.Random(0)
    prefill(model, 8, 64, rng)  # the model's first run, whatever the shape
    rows, ratios = [], []
    for prompts, length in GROUPS:
        (first, first_all), (second, second_all) = (
            prefill(model, prompts, length, rng) for _ in range(2)
        )
        print(
            f"  {prompts} x {length} tokens: first token {first:.1f} then {second:.1f} ms",
            flush=True,
        )
        rows.append(
            {
                "prompts": prompts,
                "length": length,
                "first_ms": first,
                "first_all_ms": first_all,
                "second_ms": second,
                "second_all_ms": second_all,
            }
        )
        ratios.append(
            report.ratio_entry(
                "first time/second time",
                first / second,
                prompts=prompts,
                length=length,
                metric="first_token_ms",
            )
        )
    return report.make_report("new-shapes", args, rows, ratios)
