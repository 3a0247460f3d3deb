"""Subscribe, on servers of their own so that no other test's events interleave."""

import asyncio
import contextlib
import time

import grpc
import pytest
import pytest_asyncio
from engine_probes import break_loop, probe, wedge_steps
from grpc_health.v1 import health_pb2, health_pb2_grpc
from wire_helpers import generate_all, rpc_error, violated_fields, wait_for_subscribers

from mlx_serving.engine.config import EngineConfig
from mlx_serving.server.services import EventsService
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by fresh_server
OTHER = "other"


@pytest_asyncio.fixture(loop_scope="session")
async def app(fresh_server):
    return await fresh_server()


@pytest_asyncio.fixture(loop_scope="session")
async def channel(app):
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield channel


async def subscribe(channel, app, count: int = 1, **filters):
    """A Subscribe call, once the server has registered it (the `count`-th subscriber)."""
    call = events_grpc.EventsServiceStub(channel).Subscribe(events_pb.SubscribeRequest(**filters))
    await wait_for_subscribers(app.engine, count)
    return call


async def next_events(call, n: int, skip=("runtime_status",)) -> list[events_pb.Event]:
    """The next n events, leaving out the kinds in `skip` (runtime status interleaves)."""
    found = []
    while len(found) < n:
        event = (await asyncio.wait_for(call.read(), 5)).event
        if event.WhichOneof("payload") not in skip:
            found.append(event)
    return found


def model_of(event: events_pb.Event) -> str:
    return getattr(event, event.WhichOneof("payload")).model


async def load_other_and_generate(channel, model_path, max_tokens: int = 3, **fields) -> str:
    """Loads OTHER and generates on it; returns the Generate call's request id."""
    source = model_pb.ModelSource(local_path=str(model_path))
    await model_grpc.ModelServiceStub(channel).LoadModel(
        model_pb.LoadModelRequest(model_id=OTHER, source=source)
    )
    request = generate_pb.GenerateRequest(
        model_id=OTHER, text="hi", max_tokens=max_tokens, temperature=0, **fields
    )
    responses, _, _ = await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    return responses[0].request_id


async def test_a_subscriber_sees_a_load_and_a_generation(app, channel, model_path):
    call = await subscribe(channel, app)
    request_id = await load_other_and_generate(
        channel, model_path, max_tokens=3, metadata={"user": "ada"}
    )
    loaded, started, completed = await next_events(call, 3)
    assert loaded.WhichOneof("payload") == "model_loaded" and not loaded.request_id
    assert loaded.model_loaded.model == OTHER
    assert loaded.model_loaded.model_path == str(model_path)
    assert loaded.model_loaded.parameters > 1_000_000
    assert loaded.model_loaded.metadata["dtype"] == "float32"
    assert started.WhichOneof("payload") == "generation_started"
    assert (started.generation_started.model, started.request_id) == (OTHER, request_id)
    assert started.generation_started.text == "hi"
    assert started.generation_started.max_tokens == 3
    assert dict(started.generation_started.metadata) == {"user": "ada"}
    assert completed.WhichOneof("payload") == "generation_completed"
    done = completed.generation_completed
    assert (done.model, completed.request_id) == (OTHER, request_id)
    assert done.tokens_generated == 3
    assert done.finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
    assert done.duration.ToNanoseconds() > 0 and done.throughput > 0
    assert dict(done.metadata) == {"user": "ada"}
    assert loaded.time.ToNanoseconds() <= started.time.ToNanoseconds()
    assert started.time.ToNanoseconds() <= completed.time.ToNanoseconds()
    call.cancel()


async def test_a_generation_the_server_stopped_completes_as_cancelled(app, channel, model_path):
    """The engine's "aborted" (it ended the sequence: here, an unload) is the contract's
    FINISH_REASON_CANCELLED, as in the Generate stream's last message."""
    call = await subscribe(
        channel, app, types=[events_pb.EVENT_TYPE_GENERATION_COMPLETED], model_ids=[OTHER]
    )
    models = model_grpc.ModelServiceStub(channel)
    source = model_pb.ModelSource(local_path=str(model_path))
    await models.LoadModel(model_pb.LoadModelRequest(model_id=OTHER, source=source))
    request = generate_pb.GenerateRequest(
        model_id=OTHER, text="hi", max_tokens=100_000, ignore_eos=True
    )
    stream = generate_grpc.GenerateServiceStub(channel).Generate(request)
    await stream.read()
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id=OTHER))
    assert (await rpc_error(stream)).code() is grpc.StatusCode.UNAVAILABLE
    (completed,) = await next_events(call, 1, skip=())
    done = completed.generation_completed
    assert done.model == OTHER and done.tokens_generated >= 1
    assert done.finish_reason == generate_pb.FINISH_REASON_CANCELLED
    call.cancel()


async def test_runtime_status_follows_the_engine(app, channel):
    call = await subscribe(channel, app, types=[events_pb.EVENT_TYPE_RUNTIME_STATUS])
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=3)
    await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    busy, ready = await next_events(call, 2, skip=())
    assert busy.runtime_status.status == events_pb.RUNTIME_STATE_BUSY
    assert busy.runtime_status.active_tasks == 1 and busy.runtime_status.models_loaded == 1
    assert ready.runtime_status.status == events_pb.RUNTIME_STATE_READY
    await app.stop(1)
    (shutdown,) = await next_events(call, 1, skip=())
    assert shutdown.runtime_status.status == events_pb.RUNTIME_STATE_SHUTDOWN


async def test_token_events_are_opt_in_and_spell_the_stream(app, channel):
    tokens = await subscribe(
        channel, app, 1, types=[events_pb.EVENT_TYPE_TOKEN_GENERATED], model_ids=[MODEL_ID]
    )
    everything = await subscribe(channel, app, 2)
    assert app.engine.events.token_subscribers == 1
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=6)
    _, text, ids = await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    events = await next_events(tokens, 7, skip=())
    assert [e.token_generated.token_id for e in events[:6]] == ids
    assert "".join(e.token_generated.token for e in events) == text
    assert all(e.token_generated.logprob <= 0 for e in events[:6])
    assert events[6].token_generated.end_of_sequence and events[6].token_generated.token == ""
    started, completed = await next_events(everything, 2)
    assert [started.WhichOneof("payload"), completed.WhichOneof("payload")] == [
        "generation_started",
        "generation_completed",
    ]
    tokens.cancel()
    await wait_for_subscribers(app.engine, 1)
    assert app.engine.events.token_subscribers == 0
    everything.cancel()


async def test_a_slow_subscriber_loses_events_and_is_told_how_many(app):
    app.engine.events.buffer_size = 4
    # A receive window of a few hundred bytes, so a client that stops reading blocks the server.
    options = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(app.address, options=options) as slow:
        call = await subscribe(slow, app, types=[events_pb.EVENT_TYPE_TOKEN_GENERATED])
        app.engine.events.buffer_size = 1024
        async with grpc.aio.insecure_channel(app.address) as channel:
            request = generate_pb.GenerateRequest(
                model_id=MODEL_ID, text="hi", max_tokens=40, ignore_eos=True
            )
            await generate_all(generate_grpc.GenerateServiceStub(channel), request)
        received = []
        with contextlib.suppress(TimeoutError):
            while True:
                received.append(await asyncio.wait_for(call.read(), 1))
        # 40 token events and the end marker: each one either reached us or was counted.
        assert received[-1].dropped_events > 0
        assert len(received) + received[-1].dropped_events == 41
        call.cancel()


async def test_an_invalid_event_is_logged_counted_and_not_sent(app, channel, caplog):
    from mlx_serving.engine import events

    call = await subscribe(channel, app, types=[events_pb.EVENT_TYPE_MODEL_INVALIDATED])
    encoder = app.servicers[EventsService]
    # The contract requires a reason: this payload is a bug.
    app.engine.events.publish(events.Event(events.ModelInvalidated(model=MODEL_ID, reason="")))
    app.engine.events.publish(events.Event(events.ModelInvalidated(model=MODEL_ID, reason="x")))
    (event,) = await next_events(call, 1, skip=())
    assert event.model_invalidated.reason == "x"
    assert encoder.invalid_events == 1
    assert "dropped an invalid model_invalidated event: model_invalidated.reason" in caplog.text
    call.cancel()


async def test_filters_by_type_and_by_model(app, channel, model_path):
    completions = await subscribe(
        channel, app, 1, types=[events_pb.EVENT_TYPE_GENERATION_COMPLETED]
    )
    about_tiny = await subscribe(channel, app, 2, model_ids=[MODEL_ID])
    about_other = await subscribe(
        channel,
        app,
        3,
        types=[events_pb.EVENT_TYPE_MODEL_UNLOADED, events_pb.EVENT_TYPE_GENERATION_STARTED],
        model_ids=[OTHER],
    )
    request_id = await load_other_and_generate(channel, model_path)
    await model_grpc.ModelServiceStub(channel).UnloadModel(
        model_pb.UnloadModelRequest(model_id=OTHER)
    )
    tiny_request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="hi", max_tokens=2, temperature=0
    )
    await generate_all(generate_grpc.GenerateServiceStub(channel), tiny_request)

    (completed, completed_tiny) = await next_events(completions, 2)
    assert [e.WhichOneof("payload") for e in (completed, completed_tiny)] == [
        "generation_completed"
    ] * 2
    assert [model_of(completed), model_of(completed_tiny)] == [OTHER, MODEL_ID]
    # Nothing about OTHER reached the subscriber to MODEL_ID.
    tiny_events = await next_events(about_tiny, 2)
    assert [e.WhichOneof("payload") for e in tiny_events] == [
        "generation_started",
        "generation_completed",
    ]
    assert {model_of(e) for e in tiny_events} == {MODEL_ID}
    started, unloaded = await next_events(about_other, 2)
    assert started.WhichOneof("payload") == "generation_started"
    assert started.request_id == request_id
    assert unloaded.WhichOneof("payload") == "model_unloaded"
    assert unloaded.model_unloaded.reason
    for call in (completions, about_tiny, about_other):
        call.cancel()


async def test_a_cancelled_subscription_is_dropped(app, channel):
    call = await subscribe(channel, app)
    call.cancel()
    await wait_for_subscribers(app.engine, 0)


async def test_streams_end_cleanly_when_the_server_stops(app, channel):
    call = await subscribe(channel, app, types=[events_pb.EVENT_TYPE_MODEL_LOADED])
    await app.stop(1)
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def test_a_dead_engine_invalidates_its_models_and_says_so(app, channel, health):
    call = await subscribe(channel, app)

    await probe(app.engine, break_loop)
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=5)
    error = await rpc_error(generate_grpc.GenerateServiceStub(channel).Generate(request))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    invalidated, failure, status = await next_events(call, 3, skip=("generation_started",))
    assert invalidated.model_invalidated.model == MODEL_ID
    assert "RuntimeError" in invalidated.model_invalidated.reason
    assert failure.error.code == "engine_dead" and failure.error.error
    assert status.runtime_status.status == events_pb.RUNTIME_STATE_ERROR
    call.cancel()


async def test_a_wedged_engine_is_declared_dead_within_a_second(fresh_server, model_path):
    app = await fresh_server(EngineConfig(wedge_timeout_seconds=0.3))
    async with grpc.aio.insecure_channel(app.address) as channel:
        call = await subscribe(channel, app, types=[events_pb.EVENT_TYPE_MODEL_INVALIDATED])
        await probe(app.engine, wedge_steps, MODEL_ID, 2.0)
        request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=5)
        started = time.monotonic()
        error = await rpc_error(generate_grpc.GenerateServiceStub(channel).Generate(request))
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.5
        (invalidated,) = await next_events(call, 1, skip=())
        assert "wedged" in invalidated.model_invalidated.reason
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_UNSPECIFIED]), ["types[0]"]),
        (events_pb.SubscribeRequest(types=[1, 99]), ["types[1]"]),
        (events_pb.SubscribeRequest(types=[1, 1]), ["types"]),
        (events_pb.SubscribeRequest(model_ids=["ok", ""]), ["model_ids[1]"]),
        (events_pb.SubscribeRequest(model_ids=["m"] * 101), ["model_ids"]),
    ],
)
async def test_bad_filters_are_invalid_argument(events, request_, fields):
    assert violated_fields(await rpc_error(events.Subscribe(request_))) == fields
