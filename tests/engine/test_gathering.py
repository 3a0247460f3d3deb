"""New requests joining a running batch gather for one shared prefill."""

import asyncio

from engine_probes import inserted, probe, record_inserts, wait_until_idle

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.requests import GenerationRequest, SamplingParams

MODEL_ID = "tiny"
GATHER = 0.3


def request(text: str, max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(
        MODEL_ID, text=text, max_tokens=max_tokens, sampling=SamplingParams(temperature=0)
    )


async def final_chunk(engine, req):
    return [chunk async for chunk in engine.generate(req)][-1]


async def test_arrivals_share_a_prefill_and_a_lone_one_waits_no_longer_than_the_window(
    model_path,
):
    engine = Engine(EngineConfig(prefill_batch_size=2, prefill_gather_seconds=GATHER))
    await engine.start()
    try:
        await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
        running = engine.generate(request("Tell me a story", max_tokens=100_000))
        await anext(running)
        await probe(engine, record_inserts, MODEL_ID)

        # Two arrivals a little apart: the first waits for the second, then both go together.
        first = asyncio.create_task(final_chunk(engine, request("Hello")))
        await asyncio.sleep(0.05)
        second = await final_chunk(engine, request("Good morning"))
        assert (await first).usage.completion_tokens == second.usage.completion_tokens == 3
        assert await probe(engine, inserted) == [2]
        # A full prefill batch goes at once, without waiting out the window.
        assert second.usage.queue_time < GATHER

        # A lone arrival waits out the window, then goes alone.
        lone = await final_chunk(engine, request("Once upon a time"))
        assert await probe(engine, inserted) == [2, 1]
        assert lone.usage.queue_time >= GATHER

        # One that leaves while it waits never reaches the batch.
        leaving = asyncio.create_task(final_chunk(engine, request("Goodbye")))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.sleep(GATHER)
        assert await probe(engine, inserted) == [2, 1]

        await running.aclose()
        await wait_until_idle(engine)
    finally:
        await engine.shutdown(0)


async def test_an_idle_model_starts_at_once(model_path):
    engine = Engine(EngineConfig(prefill_gather_seconds=1.0))
    await engine.start()
    try:
        await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
        chunk = await final_chunk(engine, request("Hello"))
        assert chunk.usage.queue_time < 0.5
    finally:
        await engine.shutdown(0)
