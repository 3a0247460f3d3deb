"""The RPC fuzz of tests/server/test_fuzz.py, for a long run: many cases, counted.

Starts a server in this process (127.0.0.1, a free port, the tiny built-in model, offline so no
Hugging Face id is ever downloaded), sends `--cases` requests drawn by the strategies of
tests/server/fuzz_strategies.py (every RPC, every field, random cancellations), and prints the
count of each status per RPC. Exits 1 on a violation (INTERNAL, UNKNOWN, DATA_LOSS, an
unexpected UNAVAILABLE, CANCELLED or DEADLINE_EXCEEDED, a hang) or if, afterwards, a greedy
Generate is not served or health is not SERVING.

    python scripts/fuzz_rpcs.py --cases 10000 --seconds 3000
"""

import argparse
import asyncio
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before the engine process is spawned: it inherits it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))

import grpc  # noqa: E402
from fuzz_strategies import (  # noqa: E402
    MODEL_ID,
    cases,
    greedy_generate_works,
    make_hostile_files,
    run_case,
    use_hostile_paths,
    violation,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from mlx_serving.engine.config import EngineConfig  # noqa: E402
from mlx_serving.engine.engine import Engine  # noqa: E402
from mlx_serving.engine.models import ModelSource  # noqa: E402
from mlx_serving.server.app import ServingApp  # noqa: E402


def draw_cases(count: int, random_seed: int) -> list:
    """`count` cases from the shared strategies, drawn up front (no shrinking, no database)."""
    drawn = []

    @seed(random_seed)
    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


async def start_server(model: Path) -> ServingApp:
    app = ServingApp(Engine(EngineConfig()), "127.0.0.1", 0)
    await app.start([(MODEL_ID, ModelSource(local_path=str(model)))])
    return app


async def fuzz(args) -> int:
    from mlx_serving.server.default_model import default_model_path

    with tempfile.TemporaryDirectory(prefix="mlx-serving-fuzz-") as scratch:
        use_hostile_paths(make_hostile_files(scratch))
        app = await start_server(Path(args.model) if args.model else default_model_path())
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                counts, violations, sent = await send_all(channel, app, args)
                served = await greedy_generate_works(channel)
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
        finally:
            await app.stop(1)
    serving = health.status == health_pb2.HealthCheckResponse.SERVING
    return report(counts, violations, sent, served, serving, args)


async def send_all(channel, app: ServingApp, args):
    """Send batches of cases until all are sent or the time is up; stop at a dead engine."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    violations: list[str] = []
    deadline = time.monotonic() + args.seconds
    sent, batch_number = 0, 0
    while sent < args.cases and time.monotonic() < deadline and app.engine.alive:
        size = min(args.batch, args.cases - sent)
        batch = draw_cases(size, args.seed + batch_number)
        batch_number += 1
        for case in batch:
            if time.monotonic() >= deadline or not app.engine.alive:
                break
            outcome = await run_case(channel, case)
            counts[case.rpc.name][outcome.code.name] += 1
            sent += 1
            if (problem := violation(case, outcome)) is not None:
                violations.append(f"{problem}\n    {case!r}")
            if sent % args.progress == 0:
                print(f"... {sent} cases, {len(violations)} violations", flush=True)
    if not app.engine.alive:
        violations.append("the engine died")
    return counts, violations, sent


def report(counts, violations, sent, served, serving, args) -> int:
    print(f"fuzz: {sent} cases (asked {args.cases}, limit {args.seconds:g} s), seed {args.seed}")
    total: collections.Counter = collections.Counter()
    for rpc in sorted(counts):
        total.update(counts[rpc])
        described = ", ".join(f"{code} {n}" for code, n in counts[rpc].most_common())
        print(f"  {rpc}: {sum(counts[rpc].values())} ({described})")
    print("  all: " + ", ".join(f"{code} {n}" for code, n in total.most_common()))
    print(f"violations: {len(violations)}")
    for problem in violations[:20]:
        print(f"  {problem[:3000]}")
    print(f"afterwards: greedy Generate served: {served}, health SERVING: {serving}")
    passed = not violations and served and serving and sent >= min(args.cases, 1)
    print(f"fuzz: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="requests to send")
    parser.add_argument("--seconds", type=float, default=3000.0, help="stop sending after this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch")
    parser.add_argument("--batch", type=int, default=500, help="cases drawn at a time")
    parser.add_argument("--progress", type=int, default=1000, help="print every this many")
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # The server's warnings (every refused LoadModel) would drown the summary; errors stay.
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(fuzz(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
