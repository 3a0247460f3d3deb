"""Subscribe, on servers of their own so that no other test's events interleave."""

import asyncio

import grpc
import pytest
import pytest_asyncio
from wire_helpers import generate_all, rpc_error, violated_fields, wait_for_subscribers

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


async def next_events(call, n: int) -> list[events_pb.Event]:
    return [(await asyncio.wait_for(call.read(), 5)).event for _ in range(n)]


async def load_other_and_generate(channel, model_path, max_tokens: int = 3) -> str:
    """Loads OTHER and generates on it; returns the Generate call's request id."""
    source = model_pb.ModelSource(local_path=str(model_path))
    await model_grpc.ModelServiceStub(channel).LoadModel(
        model_pb.LoadModelRequest(model_id=OTHER, source=source)
    )
    request = generate_pb.GenerateRequest(
        model_id=OTHER, text="hi", max_tokens=max_tokens, temperature=0
    )
    responses, _, _ = await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    return responses[0].request_id


async def test_a_subscriber_sees_a_load_and_a_generation(app, channel, model_path):
    call = await subscribe(channel, app)
    request_id = await load_other_and_generate(channel, model_path, max_tokens=3)
    loaded, started, completed = await next_events(call, 3)
    assert loaded.WhichOneof("payload") == "model_loaded" and loaded.model_id == OTHER
    assert loaded.model_loaded.model_path == str(model_path)
    assert loaded.model_loaded.load_seconds > 0 and not loaded.request_id
    assert started.WhichOneof("payload") == "generation_started"
    assert (started.model_id, started.request_id) == (OTHER, request_id)
    assert started.generation_started.max_tokens == 3
    assert started.generation_started.prompt_tokens > 0
    assert completed.WhichOneof("payload") == "generation_completed"
    assert (completed.model_id, completed.request_id) == (OTHER, request_id)
    assert completed.generation_completed.tokens_generated == 3
    assert completed.generation_completed.finish_reason == "max_tokens"
    assert completed.generation_completed.duration_seconds > 0
    assert loaded.time.ToNanoseconds() <= started.time.ToNanoseconds()
    assert started.time.ToNanoseconds() <= completed.time.ToNanoseconds()
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
    assert [completed.model_id, completed_tiny.model_id] == [OTHER, MODEL_ID]
    # Nothing about OTHER reached the subscriber to MODEL_ID.
    tiny_events = await next_events(about_tiny, 2)
    assert [e.WhichOneof("payload") for e in tiny_events] == [
        "generation_started",
        "generation_completed",
    ]
    assert {e.model_id for e in tiny_events} == {MODEL_ID}
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
    call = await subscribe(channel, app)
    await app.stop(1)
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def test_a_dead_engine_is_reported_as_an_error_event(app, channel):
    call = await subscribe(channel, app, types=[events_pb.EVENT_TYPE_ERROR])

    def broken_step():
        raise RuntimeError("injected fault")

    app.engine._slots[MODEL_ID].generator.next = broken_step
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=5)
    error = await rpc_error(generate_grpc.GenerateServiceStub(channel).Generate(request))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    (event,) = await next_events(call, 1)
    assert event.WhichOneof("payload") == "error"
    assert event.error.code == "engine_dead" and event.error.message
    call.cancel()


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
