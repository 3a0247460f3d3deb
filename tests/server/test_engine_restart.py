"""An engine process that dies (kill -9) or wedges (SIGSTOP) is restarted with its models;
past engine.max_engine_restarts failures in a row the server gives up (`serve` exits 3)."""

import asyncio
import os
import re
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import start_server
from wire_helpers import error_info, read_rest, retry_seconds, rpc_error

from mlx_serving.engine.config import EngineConfig
from mlx_serving.server.app import ServingApp
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")  # the fresh_server fixture's loop

MODEL_ID = "tiny"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Spawning a process, importing MLX and loading the tiny model again, on a busy CI host.
RESTART_SECONDS = 30


def quick_restarts(**options) -> EngineConfig:
    return EngineConfig(engine_restart_backoff_seconds=0.1, wedge_timeout_seconds=1, **options)


def greedy(model_id: str = MODEL_ID, max_tokens: int = 12) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=model_id, text="Once upon a time", max_tokens=max_tokens, temperature=0,
        ignore_eos=True,
    )  # fmt: skip


def endless(model_id: str = MODEL_ID) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=model_id, text="Tell me a story", max_tokens=100_000, ignore_eos=True
    )


async def token_ids(channel, request: generate_pb.GenerateRequest) -> list[int]:
    stub = generate_grpc.GenerateServiceStub(channel)
    return [t async for response in stub.Generate(request) for t in response.token_ids]


async def health_status(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def wait_for_health(channel, status: int, seconds: float = RESTART_SECONDS) -> float:
    """Seconds until health says `status`."""
    started = time.monotonic()
    while await health_status(channel) != status:
        assert time.monotonic() - started < seconds, f"health never became {status}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def subscribe(channel, app: ServingApp, kinds: list) -> grpc.aio.UnaryStreamCall:
    call = events_grpc.EventsServiceStub(channel).Subscribe(events_pb.SubscribeRequest(types=kinds))
    started = time.monotonic()
    while not app.engine.events._subscriptions:  # registered on the server's first read
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.01)
    return call


async def events_until(call, last: tuple, seconds: float = RESTART_SECONDS) -> list[tuple]:
    """(kind, detail) of each event, up to and including the first that is `last`."""
    seen: list[tuple] = []
    while not seen or seen[-1] != last:
        response = await asyncio.wait_for(call.read(), seconds)
        assert response is not grpc.aio.EOF, seen
        kind = response.event.WhichOneof("payload")
        payload = getattr(response.event, kind)
        detail = payload.status if kind == "runtime_status" else getattr(payload, "model", "")
        seen.append((kind, detail))
    return seen


async def fail_mid_stream(app: ServingApp, channel, how: signal.Signals) -> grpc.aio.AioRpcError:
    """Send the engine process `how` while a stream runs: the error that stream ends with."""
    stream = generate_grpc.GenerateServiceStub(channel).Generate(endless())
    await stream.read()
    pid = app.engine.process_id
    assert pid is not None
    os.kill(pid, how)
    return await asyncio.wait_for(rpc_error(stream), RESTART_SECONDS)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["kill -9", "SIGSTOP"])
@SESSION_LOOP
async def test_a_failed_engine_is_restarted_with_its_models(fresh_server, how):
    app = await fresh_server(quick_restarts())
    async with grpc.aio.insecure_channel(app.address) as channel:
        before = await token_ids(channel, greedy())
        kinds = [
            events_pb.EVENT_TYPE_RUNTIME_STATUS,
            events_pb.EVENT_TYPE_MODEL_INVALIDATED,
            events_pb.EVENT_TYPE_MODEL_LOADED,
        ]
        events = await subscribe(channel, app, kinds)
        old_pid = app.engine.process_id
        assert old_pid is not None
        error = await fail_mid_stream(app, channel, how)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "ENGINE_UNAVAILABLE"
        # Until the models are back: refused, worth retrying.
        refused = await rpc_error(generate_grpc.GenerateServiceStub(channel).Generate(greedy()))
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert retry_seconds(refused) > 0
        await wait_for_health(channel, NOT_SERVING, 5)
        await wait_for_health(channel, SERVING)
        assert app.engine.alive and not app.engine.gave_up
        assert app.engine.process_id != old_pid
        assert gone(old_pid)  # a stopped one too: it was SIGKILLed
        listed = await model_grpc.ModelServiceStub(channel).ListModels(model_pb.ListModelsRequest())
        assert [(m.model_id, m.state) for m in listed.models] == [
            (MODEL_ID, model_pb.MODEL_STATE_READY)
        ]
        assert await token_ids(channel, greedy()) == before
        seen = await events_until(events, ("runtime_status", events_pb.RUNTIME_STATE_ERROR))
        assert seen[-2] == ("model_invalidated", MODEL_ID), seen
        seen = await events_until(events, ("runtime_status", events_pb.RUNTIME_STATE_READY))
        assert seen == [
            ("model_loaded", MODEL_ID),
            ("runtime_status", events_pb.RUNTIME_STATE_READY),
        ]
        events.cancel()


@SESSION_LOOP
async def test_models_come_back_under_their_ids_in_their_order(fresh_server, model_path):
    app = await fresh_server(quick_restarts())
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(model_path))
        for model_id in ("b-second", "a-third"):
            await models.LoadModel(model_pb.LoadModelRequest(model_id=model_id, source=source))
        before = await token_ids(channel, greedy("a-third"))
        await fail_mid_stream(app, channel, signal.SIGKILL)
        await wait_for_health(channel, NOT_SERVING, 5)
        await wait_for_health(channel, SERVING)
        listed = await models.ListModels(model_pb.ListModelsRequest())
        assert [m.model_id for m in listed.models] == [MODEL_ID, "b-second", "a-third"]
        assert {m.state for m in listed.models} == {model_pb.MODEL_STATE_READY}
        assert await token_ids(channel, greedy("a-third")) == before


@SESSION_LOOP
async def test_with_no_restarts_a_dead_engine_stays_dead(fresh_server):
    app = await fresh_server(quick_restarts(max_engine_restarts=0))
    async with grpc.aio.insecure_channel(app.address) as channel:
        pid = app.engine.process_id
        error = await fail_mid_stream(app, channel, signal.SIGKILL)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(app.engine.wait_stopped(), 5)
        assert app.engine.gave_up and not app.engine.alive
        await wait_for_health(channel, NOT_SERVING, 5)
        await asyncio.sleep(1)
        assert await health_status(channel) == NOT_SERVING
        assert app.engine.process_id == pid  # none was started
        refused = await rpc_error(generate_grpc.GenerateServiceStub(channel).Generate(greedy()))
        assert refused.code() is grpc.StatusCode.UNAVAILABLE


@SESSION_LOOP
async def test_failures_in_a_row_past_the_limit_give_up(fresh_server):
    app = await fresh_server(quick_restarts(max_engine_restarts=2))
    async with grpc.aio.insecure_channel(app.address) as channel:
        for _ in range(2):
            await fail_mid_stream(app, channel, signal.SIGKILL)
            await wait_for_health(channel, NOT_SERVING, 5)
            await wait_for_health(channel, SERVING)
            assert not app.engine.gave_up
        await fail_mid_stream(app, channel, signal.SIGKILL)
        await asyncio.wait_for(app.engine.wait_stopped(), 5)
        assert app.engine.gave_up
        await wait_for_health(channel, NOT_SERVING, 5)


@SESSION_LOOP
async def test_a_shutdown_during_a_restart_stops_it(fresh_server):
    app = await fresh_server(EngineConfig(engine_restart_backoff_seconds=30))
    async with grpc.aio.insecure_channel(app.address) as channel:
        pid = app.engine.process_id
        await fail_mid_stream(app, channel, signal.SIGKILL)
        await wait_for_health(channel, NOT_SERVING, 5)
    started = time.monotonic()
    await app.stop(0)
    assert time.monotonic() - started < 5
    assert app.engine.process_id == pid and not app.engine.alive


@SESSION_LOOP
async def test_unloading_one_model_mid_stream_leaves_the_others_streams_alone(
    fresh_server, model_path
):
    """The tiny model twice: the unloaded one's stream ends CANCELLED then UNAVAILABLE, the
    other's runs to its end."""
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(model_path))
        await models.LoadModel(model_pb.LoadModelRequest(model_id="gone", source=source))
        generate = generate_grpc.GenerateServiceStub(channel)
        doomed = generate.Generate(endless("gone"))
        bystander = generate.Generate(greedy(MODEL_ID, max_tokens=300))
        first = [await doomed.read()]
        kept = [await bystander.read()]
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="gone"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                first.append(await doomed.read())
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_info(ended.value).reason == "REQUEST_ABORTED"
        assert first[-1].finish_reason == generate_pb.FINISH_REASON_CANCELLED
        kept += await read_rest(bystander)
        assert kept[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
        assert sum(len(r.token_ids) for r in kept) == 300


def test_serve_exits_3_once_the_engine_failed_past_its_restarts(model_path, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("engine:\n  max_engine_restarts: 1\n  engine_restart_backoff_seconds: 0.1\n")
    log = tmp_path / "server.log"
    args = ["--config", str(config), "--model", f"tiny={model_path}", "--log-level", "info"]
    process, address = start_server(args, log)
    try:
        first = engine_pid(log)
        os.kill(first, signal.SIGKILL)
        second = engine_pid(log, after=first)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + RESTART_SECONDS
            while stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status != SERVING:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        os.kill(second, signal.SIGKILL)
        assert process.wait(timeout=RESTART_SECONDS) == 3, log.read_text()
        assert "not restarted again" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


ENGINE_STARTED = re.compile(r"engine process started \(pid (\d+)\)")


def engine_pid(log, after: int | None = None, seconds: float = RESTART_SECONDS) -> int:
    """The pid of the engine process the server's log names last (one other than `after`)."""
    deadline = time.monotonic() + seconds
    while True:
        pids = [int(pid) for pid in ENGINE_STARTED.findall(log.read_text())]
        if pids and pids[-1] != after:
            return pids[-1]
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
