"""Where a steady decode step's time goes: with and without the decode attention kernel, and
with and without the compiled decode layers (fusion.CompiledDecodeBlock; here at every batch
size measured, whatever the engine's COMPILED_BATCH, so the figures can set that bound).

mlx-lm's BatchGenerator decodes a full batch (every sequence prefilled, none finishing) on the
fused model, alternating the variants within every round. Per step it splits the time into
building the model's graph in Python (`build`), `mx.async_eval` launching it (`dispatch`),
`mx.eval` waiting for the previous step's tokens (`wait`) and mlx-lm's own bookkeeping
(`other`). On a GPU, `wait` near zero means the step is bound by the host. The kernel runs
where the native extension has it and it is the faster path (CUDA and the CPU; check "kernel
runs here"); elsewhere both variants run MLX's attention and should measure the same.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

from . import report
from .model_maker import add_model_arguments, chosen_model_path
from .options import int_list

PHASES = ("build", "dispatch", "wait")
PROMPT_TOKENS = 118
# Steps decoded after the batch is full and before timing starts.
SETTLE_STEPS = 20

COLUMNS = [
    report.Column("batch", "batch"),
    report.Column("kernel", "kernel"),
    report.Column("compiled", "compiled"),
    report.Column("step ms", "step_ms", ".2f"),
    report.Column("build", "build_ms", ".2f"),
    report.Column("dispatch", "dispatch_ms", ".2f"),
    report.Column("wait", "wait_ms", ".2f"),
    report.Column("other", "other_ms", ".2f"),
    report.Column("tok/s (median)", "tok_s", ".0f"),
    report.Column("per round", "tok_s_rounds", ".0f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="llama-3.2-1b")
    parser.add_argument("--batch", type=int_list, default=[16, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)


class TimedMLX:
    """mlx.core as mlx-lm's generate module sees it, with async_eval and eval timed."""

    def __init__(self, mx, spent: dict[str, float]):
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


@contextlib.contextmanager
def timed_phases(model, spent: dict[str, float]):
    """While inside: the model's forward pass and mlx-lm's evals add their time to `spent`."""
    import mlx.core as mx

    generate = sys.modules["mlx_lm.generate"]
    model_class = type(model)
    forward = model_class.__call__

    def timed_forward(self, *args, **kwargs):
        started = time.perf_counter()
        out = forward(self, *args, **kwargs)
        spent["build"] += time.perf_counter() - started
        return out

    model_class.__call__ = timed_forward
    generate.mx = TimedMLX(mx, spent)
    try:
        yield
    finally:
        model_class.__call__ = forward
        generate.mx = mx


@contextlib.contextmanager
def compiled_up_to(fusion, batch: int):
    """While inside: the compiled decode layers run at batches of up to `batch` rows."""
    bound, fusion.COMPILED_BATCH = fusion.COMPILED_BATCH, batch
    try:
        yield
    finally:
        fusion.COMPILED_BATCH = bound


# (decode attention kernel, compiled decode layers)
VARIANTS = ((True, True), (True, False), (False, False))


def set_variant(model, kernel: bool, compiled: bool) -> None:
    for module in model.modules():
        if hasattr(type(module), "decode_kernel"):
            module.decode_kernel = kernel
        if hasattr(type(module), "compiled_decode"):
            module.compiled_decode = compiled


def steady_generator(model, batch: int):
    """A batch of `batch` sequences, all prefilled and decoding, none about to finish."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=None, completion_batch_size=batch)
    vocab = min(model.args.vocab_size - 3, 2000)
    prompts = [
        [(i * 7 + j) % vocab + 3 for j in range(PROMPT_TOKENS + i % 9)] for i in range(batch)
    ]
    uids = set(generator.insert(prompts, max_tokens=[10**6] * batch))
    decoding: set[int] = set()
    while decoding != uids:
        decoding.update(response.uid for response in generator.next()[1])
    for _ in range(SETTLE_STEPS):
        generator.next()
    return generator


def time_steps(model, batch: int, steps: int, spent: dict[str, float]) -> dict:
    generator = steady_generator(model, batch)
    try:
        for phase in PHASES:
            spent[phase] = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            generator.next()
        wall = time.perf_counter() - started
    finally:
        generator.close()
    ms = {f"{phase}_ms": 1000 * spent[phase] / steps for phase in PHASES}
    step_ms = 1000 * wall / steps
    return {
        "step_ms": step_ms,
        **ms,
        "other_ms": step_ms - sum(ms.values()),
        "tok_s": batch * steps / wall,
    }


def run(args) -> dict:
    import mlx.core as mx
    from mlx_lm import load

    from mlx_serving.engine import decode_attention, fusion
    from mlx_serving.engine.fusion import fuse_projections

    model, _ = load(str(chosen_model_path(args)))
    fuse_projections(model, compile_decode=True)
    print(f"MLX {mx.__version__} on {mx.default_device()}", flush=True)
    spent = dict.fromkeys(PHASES, 0.0)
    runs: dict[tuple[int, bool, bool], list[dict]] = {}
    with timed_phases(model, spent), compiled_up_to(fusion, max(args.batch)):
        for round_ in range(args.rounds):
            order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
            for batch in args.batch:
                for kernel, compiled in order:
                    set_variant(model, kernel, compiled)
                    one = time_steps(model, batch, args.steps, spent)
                    runs.setdefault((batch, kernel, compiled), []).append(one)
                    print(
                        f"  round {round_ + 1} batch {batch} kernel {'on' if kernel else 'off'}"
                        f" compiled {'on' if compiled else 'off'}: "
                        f"step {one['step_ms']:.2f} ms, {one['tok_s']:,.0f} tok/s",
                        flush=True,
                    )
    rows = [summarize(*variant, values) for variant, values in sorted(runs.items())]
    ratios = []
    for batch in args.batch:
        for name, a, b in (
            ("kernel on/off", (True, False), (False, False)),
            ("compiled on/off", (True, True), (True, False)),
        ):
            ratios.append(ratio(runs[(batch, *a)], runs[(batch, *b)], name, batch))
    checks = [
        report.check_entry("kernel runs here", decode_attention.kernel_here()),
        report.check_entry("compiled decode up to batch", max(args.batch)),
    ]
    return report.make_report("decode-step", args, rows, ratios, checks)


def ratio(on: list[dict], off: list[dict], name: str, batch: int) -> dict:
    per_round = [a["tok_s"] / b["tok_s"] for a, b in zip(on, off, strict=True)]
    value = statistics.median(r["tok_s"] for r in on) / statistics.median(r["tok_s"] for r in off)
    return report.ratio_entry(name, value, per_round, batch=batch, metric="tok_s")


def summarize(batch: int, kernel: bool, compiled: bool, values: list[dict]) -> dict:
    """Medians over rounds of each phase, and tok/s round by round."""
    row = {"batch": batch, "kernel": kernel, "compiled": compiled}
    for key in ("step_ms", *(f"{phase}_ms" for phase in PHASES), "other_ms", "tok_s"):
        row[key] = statistics.median(value[key] for value in values)
    row["tok_s_rounds"] = [value["tok_s"] for value in values]
    return row
