"""Slow readers: streams read one message a second, and an events subscriber never reads.

Proves that a client that reads slowly costs the server bounded memory: the server coalesces
the tokens a slow Generate stream has not taken yet into fewer, larger messages, and a
subscriber that falls behind loses events, counted in `dropped_events` (README, "Subscribe"),
instead of the server buffering them all.

The readers' channel keeps gRPC's per-stream window small (`grpc.http2.lookahead_bytes`), as
a slow link would, so that the server feels the back-pressure within seconds.

    python scripts/slow_readers.py --seconds 60 --streams 16
"""

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import grpc
from soak import MODEL_ID, mib, report_checks, rss_bytes, running_server

from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

# Prompt + completion within the tiny model's context (2048).
MAX_TOKENS = 2000


@dataclass
class Reading:
    messages: int = 0
    tokens: int = 0
    requests: int = 0
    errors: int = 0


async def slow_stream(stub, until: float, every: float, reading: Reading) -> None:
    """Requests one after another, each read one message per `every` seconds, until `until`."""
    while time.monotonic() < until:
        request = generate_pb.GenerateRequest(
            model_id=MODEL_ID, text="Once upon a time", max_tokens=MAX_TOKENS, ignore_eos=True
        )
        call = stub.Generate(request)
        reading.requests += 1
        try:
            while time.monotonic() < until:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                reading.messages += 1
                reading.tokens += len(reply.token_ids)
                await asyncio.sleep(every)
        except grpc.RpcError:
            reading.errors += 1
        call.cancel()


def slow_channel_options(lookahead_bytes: int) -> list[tuple[str, int]]:
    """A small per-stream window, fixed (no BDP probing to grow it)."""
    return [("grpc.http2.lookahead_bytes", lookahead_bytes), ("grpc.http2.bdp_probe", 0)]


async def drain_dropped(call, seconds: float) -> tuple[int, int]:
    """Read what the subscriber left (until a second passes with nothing); the most events
    any message says were dropped."""
    dropped, read = 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            reply = await asyncio.wait_for(call.read(), 1.0)
        except TimeoutError:
            break
        if reply is grpc.aio.EOF:
            break
        read += 1
        dropped = max(dropped, reply.dropped_events)
    call.cancel()
    return dropped, read


async def slow_readers(args) -> bool:
    async with running_server(args.model) as (server, _):
        options = slow_channel_options(args.lookahead_bytes)
        async with grpc.aio.insecure_channel(server.address, options=options) as slow:
            subscribe = events_grpc.EventsServiceStub(slow).Subscribe
            types = [events_pb.EVENT_TYPE_TOKEN_GENERATED, events_pb.EVENT_TYPE_GENERATION_STARTED]
            subscriber = subscribe(events_pb.SubscribeRequest(types=types))
            await asyncio.sleep(0.5)  # subscribed before the first token
            rss_start = rss_bytes(server.pid)
            until = time.monotonic() + args.seconds
            readings = [Reading() for _ in range(args.streams)]
            stub = generate_grpc.GenerateServiceStub(slow)
            await asyncio.gather(*(slow_stream(stub, until, args.read_every, r) for r in readings))
            rss_end = rss_bytes(server.pid)
            dropped, drained = await drain_dropped(subscriber, 10)
    return report(args, server, readings, (rss_start, rss_end), dropped, drained)


def report(args, server, readings: list[Reading], rss: tuple[int, int], dropped, drained) -> bool:
    messages = sum(r.messages for r in readings)
    tokens = sum(r.tokens for r in readings)
    errors = sum(r.errors for r in readings)
    growth = rss[1] - rss[0]
    print(f"slow readers: {args.streams} streams reading 1 message / {args.read_every:g} s")
    print(f"  for {args.seconds:g} s; one subscriber that never read")
    print(f"  requests {sum(r.requests for r in readings)}, messages {messages}, tokens {tokens}")
    print(f"  tokens per message {tokens / max(messages, 1):.1f}")
    print(f"  server RSS start {mib(rss[0])}, end {mib(rss[1])} (growth {mib(growth)})")
    print(f"  subscriber: dropped_events {dropped} (read {drained} messages afterwards)")
    checks = {
        "no stream failed": errors == 0,
        "messages coalesce tokens (fewer messages than tokens)": 0 < messages < tokens,
        f"server RSS growth under {args.max_growth_mib} MiB": growth < args.max_growth_mib << 20,
        "the subscriber's dropped_events grew": dropped > 0,
        f"server exit code {server.exit_code}": server.exit_code == 0,
    }
    return report_checks("slow readers", checks)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to read")
    parser.add_argument("--streams", type=int, default=16, help="slow Generate streams")
    parser.add_argument("--read-every", type=float, default=1.0, help="seconds between reads")
    parser.add_argument(
        "--lookahead-bytes", type=int, default=1024, help="the readers' per-stream window"
    )
    parser.add_argument("--max-growth-mib", type=int, default=64, help="allowed RSS growth")
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return 0 if asyncio.run(slow_readers(parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
