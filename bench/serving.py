"""Side by side: mlx-serving over gRPC, stock mlx-lm, our engine in-process, mlx_lm.server.

Every backend gets the same prompts (the same token ids, distinct first tokens so no prefix
cache helps), the same max_tokens, greedy decoding and EOS ignored, as closed-loop clients:
each of N clients sends its next request when its previous one ends. The headline is
mlx_serving against `stock` (mlx-lm's BatchGenerator on the model exactly as `mlx_lm.load`
returns it: what a user would otherwise run) and against mlx_lm.server; `engine` (our engine in
this process, no wire) is a diagnostic that splits the gap between the engine and the wire.

Servers are started and warmed up once, then each level runs on one backend at a time, never
two at once, in an order that rotates each round, so drift of the host falls on all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_serving.engine.config import EngineConfig

from . import engine_stats, report
from .backends import ENGINE, STOCK, EngineBackend, StockBackend
from .client import Prompt, describe_lengths, make_prompts
from .levels import LevelResult, Round, measure, summarize
from .model_maker import add_model_arguments, chosen_model_path
from .options import choice_list, engine_setting, int_list, length_range
from .servers import MLX_LM_SERVER, MLX_SERVING, MlxLmServerBackend, MlxServingBackend

BACKENDS = (STOCK, ENGINE, MLX_SERVING, MLX_LM_SERVER)
# A level's requests: 2 x concurrency, and never so few that one slow request decides it.
MIN_REQUESTS_PER_LEVEL = 8
# Warm-up: prompts as long as the measured ones, a few tokens each. MLX's CUDA backend stalls
# the first time it prefills a group of a new size, and a backend that gathers arrivals forms
# groups of every size, so every group size is prefilled once before anything is measured.
WARMUP_TOKENS = 4

# The ratios aimed for: (ratio, metric, the level it applies at or None for all, sign, bound).
TARGETS = [
    ("mlx_serving/stock", "tok_s", None, ">=", 0.97),
    ("mlx_serving/mlx_lm_server", "tok_s", 32, ">=", 3.0),
    ("mlx_serving/mlx_lm_server", "ttft_p50_ms", 16, "<=", 0.3),
]

COLUMNS = [
    report.Column("streams", "concurrency"),
    report.Column("backend", "backend"),
    report.Column("tok/s", "tok_s", ".1f"),
    report.Column("min", "tok_s_min", ".1f"),
    report.Column("max", "tok_s_max", ".1f"),
    report.Column("TTFT p50 ms", "ttft_p50_ms", ".1f"),
    report.Column("TTFT p95 ms", "ttft_p95_ms", ".1f"),
    report.Column("ITL p50 ms", "itl_p50_ms", ".2f"),
    report.Column("engine TTFT p50", "engine_ttft_p50_ms", ".1f"),
    report.Column("engine ITL p50", "engine_itl_p50_ms", ".2f"),
    report.Column("fail", "failures"),
    report.Column("short", "short"),
    report.Column("cpu s server", "server_cpu_s", ".2f"),
    report.Column("cpu s here", "client_cpu_s", ".2f"),
    report.Column("prompt tokens", "prompt"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--prompt-tokens",
        type=length_range,
        default=(118, 118),
        help="118, or MIN-MAX to give every prompt its own length (new shapes, as a server meets)",
    )
    parser.add_argument(
        "--requests-per-level",
        type=int,
        help=f"default: 2 x concurrency, at least {MIN_REQUESTS_PER_LEVEL}",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat each level, interleaved")
    parser.add_argument(
        "--skip",
        type=choice_list(BACKENDS),
        action="extend",
        default=[],
        help=",".join(BACKENDS),
    )
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="as --engine fuse_projections=false",
    )
    parser.add_argument(
        "--engine",
        type=engine_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an `engine` key of docs/CONFIG.md, for engine and mlx_serving (stock takes only "
        "the batch sizes)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--engine-stats",
        type=Path,
        metavar="DIR",
        help="record every engine step inside the engine processes (bench/engine_stats.py) into "
        "DIR, and report per backend and level: steps decode-only or prefilling, prefill passes "
        "and joins per request, CPU per token",
    )
    parser.add_argument(
        "--engine-profile",
        action="store_true",
        help="with --engine-stats: also cProfile each engine process's loop (DIR/<pid>.prof)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `mlx-serving serve`, as --server-arg=--flag=value",
    )


@dataclass
class Plan:
    levels: list[int]
    rounds: int
    max_tokens: int
    # (prompts, concurrency) stages, run in order before anything is measured
    warmup: list[tuple[list[Prompt], int]]
    # level → one list of prompts per round
    prompts: dict[int, list[list[Prompt]]]


def make_plan(tokenizer, args, prefill_batch_size: int) -> Plan:
    """Every request of the run gets its own prompt, the same for every backend."""
    levels, rounds = args.concurrency, args.rounds
    counts = {c: args.requests_per_level or max(2 * c, MIN_REQUESTS_PER_LEVEL) for c in levels}
    firsts: set[int] = set()
    total = rounds * sum(counts.values())
    pool = iter(make_prompts(tokenizer, total, args.prompt_tokens, firsts=firsts))
    prompts = {c: [[next(pool) for _ in range(counts[c])] for _ in range(rounds)] for c in levels}
    # Prefill groups of every size, then every decode batch size up to the largest level.
    stages = [*range(1, prefill_batch_size + 1), max(levels)]
    pool = iter(make_prompts(tokenizer, sum(stages), args.prompt_tokens, seed=1, firsts=firsts))
    warmup = [([next(pool) for _ in range(n)], n) for n in stages]
    return Plan(levels, rounds, args.max_tokens, warmup, prompts)


async def warm_up(backend, plan: Plan) -> None:
    """Every prefill group size and decode batch size, before anything is measured."""
    for prompts, concurrency in plan.warmup:
        results, _ = await backend.run_level(prompts, concurrency, WARMUP_TOKENS)
        if failed := [r.error for r in results if r.error]:
            raise RuntimeError(f"{backend.name} warm-up failed: {failed[0]}")


async def run_levels(backends: list, plan: Plan, windows: list | None = None) -> list[LevelResult]:
    """Level by level, round by round, one backend at a time in a rotating order; each round's
    (backend, level, round, start, end) in `windows` (time.perf_counter)."""
    rows = []
    for c in plan.levels:
        rounds: dict[str, list[Round]] = {b.name: [] for b in backends}
        for i, prompts in enumerate(plan.prompts[c]):
            shift = i % len(backends)
            for backend in backends[shift:] + backends[:shift]:
                started = time.perf_counter()
                one = await measure(backend, prompts, c, plan.max_tokens)
                if windows is not None:
                    windows.append((backend.name, c, i, started, time.perf_counter()))
                rounds[backend.name].append(one)
                print(f"  c={c} round {i + 1}: {backend.name} {one.tok_s:.1f} tok/s", flush=True)
        for name in BACKENDS:
            if name in rounds:
                rows.append(summarize(name, c, rounds[name], plan.max_tokens))
    return rows


def engine_settings(args) -> dict:
    settings = dict(args.engine)
    if not args.fuse:
        settings["fuse_projections"] = False
    return settings


def make_backends(args, model: Path, settings: dict) -> list:
    config = EngineConfig(**settings)
    candidates = {
        MLX_LM_SERVER: lambda: MlxLmServerBackend(model, args.startup_timeout),
        MLX_SERVING: lambda: MlxServingBackend(
            model, args.startup_timeout, settings, args.server_arg
        ),
        STOCK: lambda: StockBackend(model, config),
        ENGINE: lambda: EngineBackend(model, config),
    }
    return [make() for name, make in candidates.items() if name not in args.skip]


def level_ratios(c: int, rows: dict[str, dict]) -> list[dict]:
    """The headline ratios at one level, median over rounds and round by round."""
    ours, stock, engine, peer = (rows.get(n) for n in (MLX_SERVING, STOCK, ENGINE, MLX_LM_SERVER))
    pairs = [
        ("mlx_serving/stock", "tok_s", ours, stock),
        ("mlx_serving/mlx_lm_server", "tok_s", ours, peer),
        ("engine/stock", "tok_s", engine, stock),
        ("mlx_serving/stock", "ttft_p50_ms", ours, stock),
        ("mlx_serving/mlx_lm_server", "ttft_p50_ms", ours, peer),
    ]
    ratios = []
    for name, metric, a, b in pairs:
        if a is None or b is None:
            continue
        rounds = paired(a, b) if metric == "tok_s" else []
        ratios.append(
            report.ratio_entry(
                name, divide(a[metric], b[metric]), rounds, concurrency=c, metric=metric
            )
        )
    return ratios


def divide(a: float, b: float) -> float | None:
    return a / b if b else None


def paired(a: dict, b: dict) -> list[float]:
    """a/b tok/s within each round: drift between rounds, large on a shared host, cancels."""
    return [x / y for x, y in zip(a["tok_s_rounds"], b["tok_s_rounds"], strict=True) if y]


def level_checks(c: int, ratios: list[dict], rows: dict[str, dict]) -> list[dict]:
    """The aimed-for ratios that apply at this level; none is met while a request failed."""
    found = {(r["name"], r["metric"]): r["value"] for r in ratios if r["value"] is not None}
    failures = rows[MLX_SERVING]["failures"] if MLX_SERVING in rows else 0
    checks = []
    for name, metric, level, sign, bound in TARGETS:
        value = found.get((name, metric))
        if value is None or level not in (None, c):
            continue
        met = (value >= bound if sign == ">=" else value <= bound) and failures == 0
        target = f"{sign} {bound}, no failed request (had {failures})"
        checks.append(report.check_entry(f"c={c} {name} {metric}", value, target, met))
    return checks


def record_engine_steps(directory: Path, profile: bool) -> None:
    """Engine processes started from now on (in this process or under a server) record their
    steps into `directory` (their environment is inherited)."""
    from mlx_serving.engine.worker import BENCH_HOOK_ENV

    directory.mkdir(parents=True, exist_ok=True)
    for old in [*directory.glob("*.jsonl"), *directory.glob("*.prof")]:
        old.unlink()
    os.environ[engine_stats.STATS_ENV] = str(directory.resolve())
    os.environ.setdefault(BENCH_HOOK_ENV, engine_stats.HOOK)
    if profile:
        os.environ[engine_stats.PROFILE_ENV] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def engine_step_rows(directory: Path, windows: list) -> list[dict]:
    """One row per backend and level: the engine's step figures, the mean over rounds."""
    records = [r for recs in engine_stats.read_records(directory).values() for r in recs]
    by_level: dict[tuple[str, int], list[dict]] = {}
    for name, c, _, start, end in windows:
        if figures := engine_stats.summarize(records, start, end):
            by_level.setdefault((name, c), []).append(figures)
    rows = []
    for (name, c), rounds in by_level.items():
        row = {"backend": name, "concurrency": c, "rounds": len(rounds)}
        for key in rounds[0]:
            row[key] = sum(r[key] for r in rounds) / len(rounds)
        rows.append(row)
    return rows


async def measure_all(args, windows: list | None = None) -> list[LevelResult]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    if args.engine_stats:
        record_engine_steps(args.engine_stats, args.engine_profile)
    model = chosen_model_path(args)
    settings = engine_settings(args)
    plan = make_plan(load_tokenizer(model), args, EngineConfig(**settings).prefill_batch_size)
    backends = make_backends(args, model, settings)
    print(f"model {model}; backends {[b.name for b in backends]}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        for backend in backends:
            await stack.enter_async_context(backend)
            await warm_up(backend, plan)
        rows = await run_levels(backends, plan, windows)
        if args.engine_stats:  # before the engines stop: each writes its records every so often
            await asyncio.sleep(2 * engine_stats.FLUSH_SECONDS)
    return rows


def run(args) -> dict:
    windows: list = []
    rows = [asdict(r) for r in asyncio.run(measure_all(args, windows))]
    ratios, checks = [], []
    for c in args.concurrency:
        at_level = {row["backend"]: row for row in rows if row["concurrency"] == c}
        level = level_ratios(c, at_level)
        ratios += level
        checks += level_checks(c, level, at_level)
    result = report.make_report("serving", args, rows, ratios, checks)
    if args.engine_stats:
        result["engine_steps"] = engine_step_rows(args.engine_stats, windows)
    return result


def render(result: dict) -> str:
    """Every backend's figures, then the headline: tok/s side by side and the ratios."""
    rows = [{**row, "prompt": describe_lengths(row["prompt_tokens"])} for row in result["rows"]]
    parts = [report.format_table(rows, COLUMNS), headline(result)]
    if any(len(r["per_round"]) > 1 for r in result["ratios"]):
        parts.append(report.format_ratios([r for r in result["ratios"] if r["per_round"]]))
    if result["checks"]:
        parts.append(report.format_checks(result["checks"]))
    if result.get("engine_steps"):
        parts.append(format_engine_steps(result["engine_steps"]))
    if errors := [
        f"{r['backend']} c={r['concurrency']}: {r['errors']}" for r in rows if r["errors"]
    ]:
        parts.append("errors:\n" + "\n".join(errors))
    return "\n\n".join(parts)


def headline(result: dict) -> str:
    """Per level: tok/s of each backend, serving/stock, serving/mlx_lm.server, engine/stock."""
    table = []
    for c in result["arguments"]["concurrency"]:
        line = {"concurrency": c}
        for row in result["rows"]:
            if row["concurrency"] == c:
                line[row["backend"]] = row["tok_s"]
                line[f"ttft {row['backend']}"] = row["ttft_p50_ms"]
        for ratio in result["ratios"]:
            if ratio["concurrency"] == c and ratio["metric"] == "tok_s":
                line[ratio["name"]] = ratio["value"]
        table.append(line)
    columns = [
        report.Column("streams", "concurrency"),
        report.Column("stock tok/s", STOCK, ".1f"),
        report.Column("engine tok/s", ENGINE, ".1f"),
        report.Column("mlx-serving tok/s", MLX_SERVING, ".1f"),
        report.Column("mlx_lm.server tok/s", MLX_LM_SERVER, ".1f"),
        report.Column("serving/stock", "mlx_serving/stock", ".3f"),
        report.Column("serving/mlx_lm.server", "mlx_serving/mlx_lm_server", ".3f"),
        report.Column("engine/stock (diag.)", "engine/stock", ".3f"),
        report.Column("TTFT p50 ms: stock", f"ttft {STOCK}", ".1f"),
        report.Column("serving", f"ttft {MLX_SERVING}", ".1f"),
        report.Column("mlx_lm.server", f"ttft {MLX_LM_SERVER}", ".1f"),
    ]
    return report.format_table(table, columns)


def format_engine_steps(rows: list[dict]) -> str:
    """The engine's steps, per backend and level: one line per figure, a column per row."""
    names = [f"{r['backend']} c={r['concurrency']}" for r in rows]
    width = max(len(n) for n in names) + 2
    keys = [k for k in rows[0] if k not in ("backend", "concurrency")]
    lines = ["engine steps (inside the engine process, mean over rounds)"]
    lines.append(" " * 28 + "".join(n.rjust(width) for n in names))
    for key in keys:
        lines.append(key.ljust(28) + "".join(f"{r[key]:{width}.3f}" for r in rows))
    return "\n".join(lines)
