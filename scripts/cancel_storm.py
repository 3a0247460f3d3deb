"""Cancel storm: many requests cancelled at random points, then proof that nothing is left.

Requests are cancelled while queued (far more in flight than the batch holds), while
prefilling a long prompt (~2,000 tokens), and while decoding. Afterwards the server's metrics
must show no active sequence and no queued one, the prefix cache within its budget, and a
single stream must decode as fast as before (within noise).

The server runs on 127.0.0.1 with telemetry on (its metrics on a free loopback port).

    python scripts/cancel_storm.py --requests 1000
"""

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter

import grpc
from soak import MODEL_ID, metric, mib, report_checks, running_server, scrape, telemetry_args

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

KINDS = ("queued", "prefill", "decode")
# Prompt + completion must fit the tiny model's context (2048).
LONG_PROMPT_TOKENS = 2000
VOCAB = 2048
EXPECTED = {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"}


def request_for(kind: str, rng: random.Random) -> generate_pb.GenerateRequest:
    """Distinct long prompts (random ids), so the prefix cache cannot make prefill instant."""
    if kind == "prefill":
        ids = [rng.randrange(VOCAB) for _ in range(LONG_PROMPT_TOKENS)]
        return generate_pb.GenerateRequest(
            model_id=MODEL_ID, tokens=generate_pb.TokenIds(ids=ids), max_tokens=16, temperature=0
        )
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID,
        text=f"request {rng.random()} tells a story",
        max_tokens=256,
        ignore_eos=True,
        temperature=0.7,
    )


async def cancelled_request(stub, kind: str, rng: random.Random) -> str:
    """Send one request and cancel it at a random point of its phase; its final status."""
    call = stub.Generate(request_for(kind, rng), timeout=120)
    try:
        if kind == "decode":
            for _ in range(rng.randint(1, 20)):
                await call.read()
        else:
            seconds = rng.uniform(0, 0.05) if kind == "queued" else rng.uniform(0, 0.3)
            await asyncio.sleep(seconds)
    except grpc.RpcError:
        pass
    call.cancel()
    return (await call.code()).name


async def storm(stub, args) -> Counter:
    """`requests` requests, `concurrency` at a time (more than the batch and its queue hold)."""
    rng = random.Random(args.seed)
    plan = [rng.choice(KINDS) for _ in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)
    outcomes: Counter = Counter()

    async def one(kind: str, seed: int) -> None:
        async with gate:
            outcomes[(kind, await cancelled_request(stub, kind, random.Random(seed)))] += 1

    await asyncio.gather(*(one(kind, rng.random()) for kind in plan))
    return outcomes


async def single_stream_tokens_per_second(stub, runs: int, tokens: int) -> float:
    """The median, over `runs`, of tokens after the first over the time after the first."""
    rates = []
    for run in range(runs):
        request = generate_pb.GenerateRequest(
            model_id=MODEL_ID, text=f"measure {run}", max_tokens=tokens, ignore_eos=True
        )
        first, count = None, 0
        async for reply in stub.Generate(request, timeout=120):
            if first is None:
                first = time.perf_counter()
            else:
                count += len(reply.token_ids)
        rates.append(count / (time.perf_counter() - first))
    return statistics.median(rates)


async def settled_metrics(url: str, seconds: float) -> str:
    """The metrics once nothing is active or queued (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        exposition = await asyncio.to_thread(scrape, url)
        idle = metric(exposition, "active_sequences") == 0 == metric(exposition, "queue_depth")
        if idle or time.monotonic() > deadline:
            return exposition
        await asyncio.sleep(0.2)


async def cancel_storm(args) -> bool:
    server_args = [
        *telemetry_args(),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-queued-requests",
        str(args.max_queued),
        "--prefix-cache-bytes",
        str(args.prefix_cache_bytes),
    ]
    async with running_server(args.model, server_args) as (server, channel):
        stub = generate_grpc.GenerateServiceStub(channel)
        before = await single_stream_tokens_per_second(stub, args.runs, args.measure_tokens)
        started = time.monotonic()
        outcomes = await storm(stub, args)
        storm_seconds = time.monotonic() - started
        exposition = await settled_metrics(server.metrics_url, 10)
        after = await single_stream_tokens_per_second(stub, args.runs, args.measure_tokens)
    return report(args, server, outcomes, storm_seconds, exposition, before, after)


def report(args, server, outcomes, storm_seconds, exposition, before, after) -> bool:
    print(f"cancel storm: {args.requests} requests in {storm_seconds:.1f} s, ", end="")
    print(f"{args.concurrency} at a time")
    print(f"  server: max batch {args.max_batch_size}, max queued {args.max_queued}")
    for (kind, code), count in sorted(outcomes.items()):
        print(f"  {kind:8} {code:20} {count}")
    unexpected = {code for _, code in outcomes if code not in EXPECTED}
    active = metric(exposition, "active_sequences")
    queued = metric(exposition, "queue_depth")
    cache = metric(exposition, "prefix_cache_bytes")
    ratio = after / before if before else 0.0
    checks = {
        f"statuses only {sorted(EXPECTED)} (unexpected: {sorted(unexpected)})": not unexpected,
        f"active sequences afterwards: {active:g}": active == 0,
        f"queued afterwards: {queued:g}": queued == 0,
        f"prefix cache {mib(cache)} within {mib(args.prefix_cache_bytes)}": cache
        <= args.prefix_cache_bytes,
        f"single stream {before:.0f} -> {after:.0f} tok/s (ratio {ratio:.2f}, min "
        f"{args.min_ratio})": ratio >= args.min_ratio,
        f"server exit code {server.exit_code}": server.exit_code == 0,
    }
    return report_checks("cancel storm", checks)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests to cancel")
    parser.add_argument("--concurrency", type=int, default=40, help="requests in flight")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's batch")
    parser.add_argument("--max-queued", type=int, default=32, help="the server's queue")
    parser.add_argument(
        "--prefix-cache-bytes", type=int, default=64 << 20, help="the server's prefix cache"
    )
    parser.add_argument("--runs", type=int, default=3, help="single-stream measurements")
    parser.add_argument("--measure-tokens", type=int, default=128, help="tokens per measurement")
    parser.add_argument("--min-ratio", type=float, default=0.7, help="after/before tok/s floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return 0 if asyncio.run(cancel_storm(parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
