"""A real aio server on 127.0.0.1:0, in-process, with the test model loaded.

All server tests run on one session-wide event loop, so the shared server and its channel
are started once. Tests that change the server's life cycle take `fresh_server` instead.
"""

from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2_grpc

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.server.app import ServingApp
from mlx_serving.v1 import (
    events_service_pb2_grpc,
    generate_service_pb2_grpc,
    model_service_pb2_grpc,
    tokenize_service_pb2_grpc,
)

MODEL_ID = "tiny"


async def start_app(model_path, config: EngineConfig = EngineConfig(), **options) -> ServingApp:
    """`options`: ServingApp's own (max_response_bytes, ...)."""
    app = ServingApp(Engine(config), "127.0.0.1", 0, **options)
    await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
    return app


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server(model_path) -> AsyncIterator[ServingApp]:
    app = await start_app(model_path)
    yield app
    await app.stop(1)


@pytest.fixture(scope="session")
def server_address(server: ServingApp) -> str:
    return server.address


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(server_address) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server_address) as channel:
        yield channel


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_server(model_path) -> AsyncIterator[Callable]:
    """A factory of servers of their own (an EngineConfig may be given), stopped afterwards."""
    apps: list[ServingApp] = []

    async def make(config: EngineConfig = EngineConfig()) -> ServingApp:
        apps.append(await start_app(model_path, config))
        return apps[-1]

    yield make
    for app in apps:
        await app.stop(0)


@pytest.fixture
def models(channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture
def generate(channel) -> generate_service_pb2_grpc.GenerateServiceStub:
    return generate_service_pb2_grpc.GenerateServiceStub(channel)


@pytest.fixture
def tokenize(channel) -> tokenize_service_pb2_grpc.TokenizeServiceStub:
    return tokenize_service_pb2_grpc.TokenizeServiceStub(channel)


@pytest.fixture
def events(channel) -> events_service_pb2_grpc.EventsServiceStub:
    return events_service_pb2_grpc.EventsServiceStub(channel)


@pytest.fixture
def health(channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)
