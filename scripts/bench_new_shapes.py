"""What a new prefill shape costs: each (prompts, length) group prefilled twice, timed to the
first token and to three tokens.

Usage:
  python scripts/bench_new_shapes.py [--model-preset small | --model PATH]
  MLX_CUDA_USE_CUDNN_SDPA=0 python scripts/bench_new_shapes.py ...   # MLX's attention on CUDA

On MLX's CUDA backend the first prefill of a shape builds what that shape needs (cuDNN's
attention graph, by default); the engine turns cuDNN prefill attention off unless told
otherwise (`engine.cudnn_prefill_attention`). Groups are raw mlx-lm `BatchGenerator` inserts
of random token ids, with the fused model the engine serves.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "scripts")]

from make_bench_model import add_model_arguments, chosen_model_path  # noqa: E402

# (prompts, length): a known length in a new group size, new lengths in a known group size.
GROUPS = [(3, 118), (3, 97), (3, 140), (5, 97), (5, 118), (2, 200), (2, 201), (7, 33), (7, 35)]


def prefill(model, prompts: int, length: int, rng: random.Random) -> tuple[float, float]:
    """Milliseconds to the first token and to the last of three, for one group."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_serving.engine.batch_cache import make_cache

    generator = BatchGenerator(model, stop_tokens=None, prefill_batch_size=8)
    vocab = model.args.vocab_size
    ids = [[rng.randrange(vocab) for _ in range(length)] for _ in range(prompts)]
    started = time.perf_counter()
    uids = set(
        generator.insert(ids, max_tokens=[3] * prompts, caches=[make_cache(model) for _ in ids])
    )
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, default_preset="small")
    args = parser.parse_args(argv)

    from mlx_lm import load

    from mlx_serving.engine.fusion import fuse_projections

    path = chosen_model_path(args)
    model = load(str(path))[0]
    fuse_projections(model)
    rng = random.Random(0)
    prefill(model, 8, 64, rng)  # the model's first run, whatever the shape
    for prompts, length in GROUPS:
        timings = [prefill(model, prompts, length, rng) for _ in range(2)]
        print(
            f"{prompts} prompts of {length} tokens: first token "
            + ", then ".join(f"{first:.1f} ms (all {total:.1f})" for first, total in timings),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
