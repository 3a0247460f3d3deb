"""Where a steady decode step's time goes, with and without the decode attention kernel.

Usage:
  python scripts/bench_decode_step.py [--model-preset llama-3.2-1b | --model PATH]
                                      [--batch 16,32] [--steps 100] [--rounds 3]

mlx-lm's BatchGenerator decodes a full batch (every sequence prefilled, none finishing) on the
fused model, alternating kernel on / off within every round. Per step it splits the time into
building the model's graph in Python (`build`), `mx.async_eval` launching it (`dispatch`),
`mx.eval` waiting for the previous step's tokens (`wait`) and mlx-lm's own bookkeeping
(`other`). On a GPU, `wait` near zero means the step is bound by the host. The kernel needs
CUDA; elsewhere both variants run MLX's attention and should measure the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "scripts")]

from bench import int_list  # noqa: E402
from make_bench_model import add_model_arguments, chosen_model_path  # noqa: E402

PHASES = ("build", "dispatch", "wait")


class TimedMLX:
    """mlx.core as mlx-lm's generate module sees it, with async_eval and eval timed."""

    def __init__(self, mx, spent):
        self._mx, self._spent = mx, spent

    def __getattr__(self, name):
        return getattr(self._mx, name)

    def async_eval(self, *args):
        started = time.perf_counter()
        self._mx.async_eval(*args)
        self._spent["dispatch"] += time.perf_counter() - started

    def eval(self, *args):
        started = time.perf_counter()
        self._mx.eval(*args)
        self._spent["wait"] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, default_preset="llama-3.2-1b")
    parser.add_argument("--batch", type=int_list, default=[16, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from mlx_serving.engine import decode_attention
    from mlx_serving.engine.fusion import fuse_projections

    model, _ = load(str(chosen_model_path(args)))
    fuse_projections(model)
    spent = dict.fromkeys(PHASES, 0.0)
    forward = type(model).__call__

    def timed_forward(self, *a, **k):
        started = time.perf_counter()
        out = forward(self, *a, **k)
        spent["build"] += time.perf_counter() - started
        return out

    type(model).__call__ = timed_forward
    sys.modules["mlx_lm.generate"].mx = TimedMLX(mx, spent)
    print(
        f"MLX {mx.__version__} on {mx.default_device()}; kernel available: "
        f"{decode_attention.on_cuda()}"
    )

    def steady_generator(batch: int) -> BatchGenerator:
        generator = BatchGenerator(model, stop_tokens=None, completion_batch_size=batch)
        prompts = [[(i * 7 + j) % 2000 + 3 for j in range(118 + i % 9)] for i in range(batch)]
        generator.insert(prompts, max_tokens=[10**6] * batch)
        while len(generator._generation_batch) < batch:
            generator.next()
        for _ in range(20):
            generator.next()
        return generator

    results = {}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for batch in args.batch:
            for kernel in order:
                for module in model.modules():
                    if hasattr(type(module), "decode_kernel"):
                        module.decode_kernel = kernel
                generator = steady_generator(batch)
                for phase in PHASES:
                    spent[phase] = 0.0
                started = time.perf_counter()
                for _ in range(args.steps):
                    generator.next()
                wall = time.perf_counter() - started
                generator.close()
                ms = {phase: 1000 * spent[phase] / args.steps for phase in PHASES}
                step = 1000 * wall / args.steps
                results.setdefault((batch, kernel), []).append(batch * args.steps / wall)
                print(
                    f"round {round_} batch {batch} kernel {'on ' if kernel else 'off'}: "
                    f"step {step:.2f} ms = build {ms['build']:.2f} + dispatch "
                    f"{ms['dispatch']:.2f} + wait {ms['wait']:.2f} + other "
                    f"{step - sum(ms.values()):.2f}; {batch * args.steps / wall:,.0f} tok/s",
                    flush=True,
                )
    for batch in args.batch:
        on, off = results[(batch, True)], results[(batch, False)]
        median_on, median_off = statistics.median(on), statistics.median(off)
        print(
            f"batch {batch}: kernel on {median_on:,.0f} tok/s, off {median_off:,.0f}, "
            f"on/off {median_on / median_off:.2f}"
            f" (per round {', '.join(f'{a / b:.2f}' for a, b in zip(on, off, strict=True))})"
        )


if __name__ == "__main__":
    main()
