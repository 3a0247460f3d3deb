"""The server around the services: health, reflection, shutdown, errors that are bugs."""

import asyncio
import logging
import socket

import grpc
import pytest
import pytest_asyncio
from engine_probes import break_loop, probe, wait_until_idle
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from wire_helpers import (
    detail,
    generate_all,
    read_rest,
    rpc_error,
    wait_until,
)

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import ModelLoadFailed
from mlx_serving.engine.models import ModelSource
from mlx_serving.server.app import SERVICE_NAMES, ServingApp
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
OUR_SERVICES = [
    "mlx_serving.v1.EventsService",
    "mlx_serving.v1.GenerateService",
    "mlx_serving.v1.ModelService",
    "mlx_serving.v1.TokenizeService",
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def long_request(max_tokens: int = 100_000) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Once", max_tokens=max_tokens, temperature=0, ignore_eos=True
    )


async def check(health, service: str = "") -> int:
    return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status


@pytest_asyncio.fixture(loop_scope="session")
async def own(fresh_server):
    """A server of its own, with a channel and stubs on it."""
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield (
            app,
            health_pb2_grpc.HealthStub(channel),
            generate_grpc.GenerateServiceStub(channel),
        )


# ---- health ------------------------------------------------------------------------------


async def test_every_service_and_the_server_are_serving(health):
    assert sorted(SERVICE_NAMES) == OUR_SERVICES
    for service in ("", *OUR_SERVICES):
        assert await check(health, service) == SERVING
    error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="nope.Service")))
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_shutdown_says_not_serving_and_lets_a_stream_finish_within_the_grace(own):
    app, health, generate = own
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == SERVING
    stream = generate.Generate(long_request(max_tokens=40))
    first = await stream.read()
    stopping = asyncio.create_task(app.stop(grace=10))
    assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
    for service in ("", *OUR_SERVICES):
        assert await check(health, service) == NOT_SERVING
    refused = await rpc_error(generate.Generate(long_request(max_tokens=2)))
    assert refused.code() is grpc.StatusCode.UNAVAILABLE
    rest = await read_rest(stream)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
    assert rest[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
    await asyncio.wait_for(stopping, 5)
    assert not app.engine.alive


async def test_streams_still_running_when_the_grace_ends_are_unavailable(own):
    app, _, generate = own
    stream = generate.Generate(long_request())
    await stream.read()
    await app.stop(grace=0.2)
    error = await rpc_error(stream)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details()


async def test_a_dead_engine_thread_ends_streams_and_turns_health_not_serving(own):
    app, health, generate = own
    stream = generate.Generate(long_request())
    await stream.read()

    await probe(app.engine, break_loop)
    error = await rpc_error(stream)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "injected" not in error.details()
    await wait_until(lambda: not app.engine.alive)
    for service in ("", *OUR_SERVICES):
        await wait_until_status(health, service, NOT_SERVING)
    again = await rpc_error(generate.Generate(long_request(max_tokens=2)))
    assert again.code() is grpc.StatusCode.UNAVAILABLE


async def wait_until_status(health, service: str, status: int) -> None:
    for _ in range(100):
        if await check(health, service) == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{service!r} never became {status}")


async def test_health_is_not_serving_when_a_preloaded_model_fails(tmp_path):
    app = ServingApp(Engine(), "127.0.0.1", 0)
    with pytest.raises(ModelLoadFailed):
        await app.start([("broken", ModelSource(local_path=str(tmp_path)))])
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            assert await check(health_pb2_grpc.HealthStub(channel)) == NOT_SERVING
    finally:
        await app.stop(0)


async def test_a_port_in_use_fails_to_bind():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = ServingApp(Engine(), "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(RuntimeError):
            await app.start()
        await app.stop(0)


# ---- errors ------------------------------------------------------------------------------


async def test_a_bug_is_internal_with_a_request_id_and_logged_once(
    models, server, monkeypatch, caplog
):
    def broken_list_models():
        raise KeyError("secret internals")

    monkeypatch.setattr(server.engine, "list_models", broken_list_models)
    with caplog.at_level(logging.ERROR, logger="mlx_serving.server"):
        error = await rpc_error(models.ListModels(model_pb.ListModelsRequest()))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "KeyError" not in error.details()
    (record,) = [r for r in caplog.records if r.name.startswith("mlx_serving.server")]
    request_id = record.args[1]
    assert error.details() == f"internal error (request id {request_id})"
    assert record.exc_info and isinstance(record.exc_info[1], KeyError)
    assert "/ListModels" in record.getMessage()


async def test_a_full_queue_is_resource_exhausted_with_retry_info(fresh_server):
    app = await fresh_server(EngineConfig(max_batch_size=1, max_queued_requests=0))
    async with grpc.aio.insecure_channel(app.address) as channel:
        generate = generate_grpc.GenerateServiceStub(channel)
        running = generate.Generate(long_request())
        await running.read()
        error = await rpc_error(generate.Generate(long_request(max_tokens=2)))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = detail(error, error_details_pb2.RetryInfo)
        assert retry is not None and retry.retry_delay.ToNanoseconds() == 1_000_000_000
        running.cancel()
        await wait_until_idle(app.engine)
        await generate_all(generate, long_request(max_tokens=2))


# ---- reflection --------------------------------------------------------------------------

ALL_SERVICES = sorted(
    [
        *OUR_SERVICES,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
)


async def test_reflection_lists_the_services_and_describes_them(server_address):
    def describe() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(server_address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            generate = pool.FindServiceByName("mlx_serving.v1.GenerateService")
            method = generate.FindMethodByName("Generate")
            assert method.server_streaming and not method.client_streaming
            assert (
                pool.FindMessageTypeByName("mlx_serving.v1.GenerateRequest")
                .fields_by_name["temperature"]
                .has_presence
            )
            methods = [
                m.full_name for m in pool.FindServiceByName("mlx_serving.v1.ModelService").methods
            ]
            return list(database.get_services()), methods

    services, methods = await asyncio.to_thread(describe)
    assert services == ALL_SERVICES
    assert methods == [
        f"mlx_serving.v1.ModelService.{name}"
        for name in ("LoadModel", "UnloadModel", "ListModels", "GetModel")
    ]


async def test_reflection_v1_answers_like_v1alpha(channel):
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="mlx_serving.v1.Event"),
    ]
    listed, v1_file, events_file = [r async for r in v1(iter(requests))]
    assert [s.name for s in listed.list_services_response.service] == ALL_SERVICES
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in v1_file.file_descriptor_response.file_descriptor_proto
    ]
    (reflection_file,) = files
    assert reflection_file.package == "grpc.reflection.v1"
    assert reflection_file.service[0].method[0].input_type == (
        ".grpc.reflection.v1.ServerReflectionRequest"
    )
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in events_file.file_descriptor_response.file_descriptor_proto
    ]
    assert "mlx_serving/v1/events_service.proto" in names
    assert "buf/validate/validate.proto" in names
