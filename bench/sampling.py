"""The sampling step alone: the fused sampler's native op, its pure-MLX fallback, and the
per-row path (mlx-lm's samplers and logits processors, one row at a time).

For each rows x vocabulary (--shapes, default 32x128256 and 32x32000) of random logits, every
row asks for top-p 0.9, top-k 0, a presence (0.5) and a frequency (0.3) penalty over a
64-token history and temperature 0.8, each row with its own seed. One step of:

- native: `mlx_serving._native.fused_sample` (left out, with a note, where the extension has no
  kernel for the device);
- fallback: `engine.fused_sample.fallback`, the same semantics in batched MLX ops;
- per-row: what mlx-lm's batch generator does when the rows' samplers differ: each row's logits
  slice through its own `make_logits_processors` (sampling.py), the batch's log-softmax, then
  each row's own `make_sampler` sampler (made once, as a request makes it), concatenated.

Each is timed as building its inputs from Python values, the call, and `mx.eval` of the tokens.
Variants alternate within every round in an order that rotates each round; a round times
--steps steps of each; figures are medians over rounds of the per-step mean. Ratios: native
over fallback and over per-row (the time of native, as a fraction of the other's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from . import report

VARIANTS = ("native", "fallback", "per-row")
HISTORY = 64
TEMPERATURE, TOP_P, PRESENCE, FREQUENCY = 0.8, 0.9, 0.5, 0.3

COLUMNS = [
    report.Column("rows", "rows"),
    report.Column("vocab", "vocab"),
    report.Column("variant", "variant"),
    report.Column("ms/step (median)", "ms", ".3f"),
    report.Column("per round", "ms_rounds", ".3f"),
]


def shape_list(text: str) -> list[tuple[int, int]]:
    """32x128256,32x32000 → [(32, 128256), (32, 32000)]."""
    shapes = []
    for item in text.split(","):
        rows, _, vocab = item.partition("x")
        try:
            shapes.append((int(rows), int(vocab)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: ROWSxVOCAB, e.g. 32x128256") from None
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", type=shape_list, default=[(32, 128256), (32, 32000)], metavar="RxV,..."
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps of each variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument(
        "--device", choices=("default", "cpu", "gpu"), default="default", help="MLX's device"
    )
    parser.add_argument("--seed", type=int, default=0)


class Workload:
    """One shape's logits (on the device, evaluated) and its rows' Python-side settings."""

    def __init__(self, rows: int, vocab: int, seed: int):
        import mlx.core as mx
        import numpy as np

        rng = np.random.default_rng(seed)
        self.rows, self.vocab = rows, vocab
        self.logits = mx.array(rng.normal(0.0, 3.0, (rows, vocab)).astype(np.float32))
        mx.eval(self.logits)
        self.history = [[int(t) for t in rng.integers(0, vocab, HISTORY)] for _ in range(rows)]
        self.seeds = [int(s) for s in rng.integers(0, 2**63, rows)]
        self.step = 0


def fused_step(workload: Workload, sample: Callable) -> None:
    """Inputs from Python values, one fused call, the tokens evaluated."""
    import mlx.core as mx

    from mlx_serving.engine import fused_sample as fs

    rows = workload.rows
    step = workload.step
    workload.step += 1
    per_row = lambda value: mx.array([value] * rows, mx.float32)  # noqa: E731
    bias_ids, bias_values = fs.pack_bias([{} for _ in range(rows)])
    tokens = sample(
        workload.logits,
        per_row(TEMPERATURE),
        mx.array([0] * rows, mx.int32),
        per_row(TOP_P),
        per_row(0.0),
        fs.pack_history(workload.history, HISTORY),
        per_row(1.0),
        per_row(PRESENCE),
        per_row(FREQUENCY),
        bias_ids,
        bias_values,
        fs.pack_keys([(fs.row_key(seed), step) for seed in workload.seeds]),
    )
    mx.eval(tokens)


class PerRow:
    """Each row its own sampler and logits processors, made once (as each request makes them)."""

    def __init__(self, workload: Workload):
        from mlx_serving.engine.requests import SamplingParams
        from mlx_serving.engine.sampling import make_logits_processors, make_sampler

        self.workload = workload
        self.samplers = []
        self.processors = []
        for seed in workload.seeds:
            params = SamplingParams(
                temperature=TEMPERATURE,
                top_p=TOP_P,
                presence_penalty=PRESENCE,
                frequency_penalty=FREQUENCY,
                penalty_context=HISTORY,
                seed=seed,
            )
            self.samplers.append(make_sampler(params))
            self.processors.append(make_logits_processors(params))

    def step(self) -> None:
        import mlx.core as mx

        logits = self.workload.logits
        processed = []
        for e, processors in enumerate(self.processors):
            row = logits[e : e + 1]
            context = mx.array(self.workload.history[e])
            for processor in processors:
                row = processor(context, row)
            processed.append(row)
        logits = mx.concatenate(processed, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.concatenate(
            [sampler(logprobs[e : e + 1]) for e, sampler in enumerate(self.samplers)]
        )
        mx.eval(tokens)


def measure_shape(rows: int, vocab: int, args, variants: tuple[str, ...]) -> dict[str, list]:
    from mlx_serving.engine import fused_sample as fs
    from mlx_serving.engine import native

    workload = Workload(rows, vocab, args.seed)
    steps: dict[str, Callable[[], None]] = {
        "fallback": lambda: fused_step(workload, fs.fallback),
        "per-row": PerRow(workload).step,
    }
    module = native.extension_for_device()
    if module is not None:
        steps["native"] = lambda: fused_step(workload, module.fused_sample)
    chosen = [v for v in variants if v in steps]
    for variant in chosen:
        for _ in range(args.warmup):
            steps[variant]()
    rounds: dict[str, list] = {v: [] for v in chosen}
    for i in range(args.rounds):
        order = chosen[i % len(chosen) :] + chosen[: i % len(chosen)]
        for variant in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[variant]()
            ms = (time.perf_counter() - started) * 1e3 / args.steps
            rounds[variant].append(ms)
        print(
            f"  {rows}x{vocab}, round {i + 1}: "
            + ", ".join(f"{v} {rounds[v][-1]:.3f} ms" for v in chosen)
        )
    return rounds


def run(args) -> dict:
    import mlx.core as mx

    from mlx_serving.engine import native

    if args.device != "default":
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    variants = VARIANTS
    if native.extension_for_device() is None:
        print(
            f"  no native variant: mlx_serving._native has no kernel for the "
            f"{native.device_backend()} backend here"
        )
        variants = tuple(v for v in VARIANTS if v != "native")
    rows, ratios = [], []
    for count, vocab in args.shapes:
        measured = measure_shape(count, vocab, args, variants)
        for variant, values in measured.items():
            rows.append(
                {
                    "rows": count,
                    "vocab": vocab,
                    "variant": variant,
                    "ms": statistics.median(values),
                    "ms_rounds": values,
                }
            )
        if "native" in measured:
            for other in ("fallback", "per-row"):
                ratios.append(
                    report.ratio_entry(
                        f"native/{other} at {count}x{vocab}",
                        statistics.median(measured["native"]) / statistics.median(measured[other]),
                        [n / o for n, o in zip(measured["native"], measured[other], strict=True)],
                        metric="ms",
                    )
                )
    checks = [
        report.check_entry(
            f"{r['name']} (time)",
            r["value"],
            "at most 0.33 (3x faster)" if "fallback" in r["name"] else None,
            r["value"] <= 1 / 3 if "fallback" in r["name"] else None,
        )
        for r in ratios
    ]
    return report.make_report("sampling", args, rows, ratios, checks)
