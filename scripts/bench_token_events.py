"""What per-token events cost: the same batch with no subscriber, then with one to token events.

    python scripts/bench_token_events.py [--streams 8] [--max-tokens 64] [--rounds 3]

Prints aggregate tokens/s of both and their ratio, measured side by side in one run.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from mlx_serving.engine.default_model import default_model_path  # noqa: E402
from mlx_serving.engine.engine import Engine  # noqa: E402
from mlx_serving.engine.events import TokenGenerated  # noqa: E402
from mlx_serving.engine.models import ModelSource  # noqa: E402
from mlx_serving.engine.requests import GenerationRequest, SamplingParams  # noqa: E402

MODEL_ID = "bench"


async def one_round(engine: Engine, streams: int, max_tokens: int) -> float:
    """Aggregate generated tokens per second of `streams` concurrent greedy requests."""

    async def run(i: int) -> int:
        request = GenerationRequest(
            MODEL_ID,
            text=f"stream {i} says",
            max_tokens=max_tokens,
            ignore_eos=True,
            sampling=SamplingParams(temperature=0),
        )
        return sum([len(chunk.token_ids) async for chunk in engine.generate(request)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(run(i) for i in range(streams))))
    return tokens / (time.perf_counter() - started)


async def drain(events) -> int:
    return sum([1 async for _ in events])


async def main(args: argparse.Namespace) -> None:
    engine = Engine()
    await engine.start()
    await engine.load_model(
        ModelSource(local_path=str(args.model or default_model_path())), MODEL_ID
    )
    await engine.warm_up()
    plain, watched = [], []
    for _ in range(args.rounds):
        plain.append(await one_round(engine, args.streams, args.max_tokens))
        events = engine.subscribe(frozenset({TokenGenerated}))
        reader = asyncio.create_task(drain(events))
        watched.append(await one_round(engine, args.streams, args.max_tokens))
        events.close()
        events.subscription.queue.put_nowait(None)
        received = await reader
    await engine.shutdown(0)
    a, b = statistics.median(plain), statistics.median(watched)
    print(f"{args.streams} streams x {args.max_tokens} tokens, median of {args.rounds} rounds")
    print(f"no token subscriber:  {a:8.1f} tok/s")
    print(f"one token subscriber: {b:8.1f} tok/s  ({received} events in the last round)")
    print(f"ratio: {b / a:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: the embedded test model)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
