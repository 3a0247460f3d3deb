"""New requests joining a running batch gather for one shared prefill."""

import asyncio
import types

from engine_probes import frozen_objects, inserted, probe, record_inserts, wait_until_idle

from mlx_serving.engine import worker as worker_module
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.protocol import Admit
from mlx_serving.engine.requests import GenerationRequest, SamplingParams
from mlx_serving.engine.worker import Worker

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


async def test_the_engine_process_freezes_what_it_imported_out_of_collections():
    """The modules the process imported at its start (the server's among them, when it serves)
    are never walked by a full collection: a stall of every stream otherwise."""
    engine = Engine(EngineConfig())
    await engine.start()
    try:
        assert await probe(engine, frozen_objects) > 10_000
    finally:
        await engine.shutdown(0)


class Clock:
    """Virtual time for the engine loop: sleeping and waiting on the pipe advance it."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Arrivals:
    """The engine's command pipe, with each command arriving at its own virtual time."""

    def __init__(self, clock: Clock, times: list[float]):
        self.clock = clock
        self.pending = [(at, Admit(admission=None, rid=i)) for i, at in enumerate(times)]

    def poll(self, timeout: float = 0.0) -> bool:
        if self.pending and self.pending[0][0] <= self.clock.now + timeout:
            self.clock.now = max(self.clock.now, self.pending[0][0])
            return True
        self.clock.now += timeout
        return False

    def recv(self):
        return self.pending.pop(0)[1]


class Admitted:
    """As much of a Scheduler as the loop's command taking looks at."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.arrivals: list[float] = []

    @property
    def idle(self) -> bool:
        return not self.arrivals

    def waiting(self) -> int:
        return len(self.arrivals)

    def admit(self, admission, rid, internal=False, fork_of=None) -> None:
        self.arrivals.append(round(self.clock.now, 6))


def first_step_arrivals(monkeypatch, times: list[float], **config) -> list[float]:
    """The arrivals an idle engine takes before its first step (virtual time, no process)."""
    clock = Clock()
    fake_time = types.SimpleNamespace(
        perf_counter=clock.time, monotonic=clock.time, sleep=clock.sleep
    )
    monkeypatch.setattr(worker_module, "time", fake_time)
    worker = Worker(EngineConfig(**config), Arrivals(clock, times), None, types.SimpleNamespace())
    worker.scheduler.close()
    worker.scheduler = Admitted(clock)
    try:
        worker._take_commands()
    finally:
        worker._loader.shutdown()
    return worker.scheduler.arrivals


def test_an_idle_engine_gathers_a_burst_as_a_running_batch_does(monkeypatch):
    # Requests over the wire reach an idle engine a fraction of a millisecond to a few
    # milliseconds apart: once a second one has come within coalesce_seconds, the burst
    # gathers for prefill_gather_seconds after the first, as arrivals at a running batch do.
    config = dict(coalesce_seconds=0.002, prefill_gather_seconds=0.005)
    times = [0.0, 0.0015, 0.003, 0.0045, 0.006]
    assert first_step_arrivals(monkeypatch, times, **config) == times[:4]
    times = [0.0, 0.0003, 0.0035, 0.0049]
    assert first_step_arrivals(monkeypatch, times, **config) == times
    # Up to a prefill batch's worth: no waiting for more once that many wait.
    many = [round(i * 0.0001, 6) for i in range(12)]
    assert first_step_arrivals(monkeypatch, many, prefill_batch_size=8, **config) == many[:8]
    # A lone request waits coalesce_seconds for company, no longer.
    assert first_step_arrivals(monkeypatch, [0.0, 0.0025], **config) == [0.0]
