"""grpc.health.v1.Health/List, which grpcio-health-checking's aio servicer lacks (the server's
own subclass adds it); Check, Watch and the life cycle's statuses are test_app.py's."""

import inspect

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as upstream

from mlx_serving.server.app import SERVICE_NAMES, HealthServicer

SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")  # the server fixture's loop

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(response: health_pb2.HealthListResponse) -> dict[str, int]:
    return {service: entry.status for service, entry in response.statuses.items()}


@SESSION_LOOP
async def test_list_gives_the_server_and_every_service_as_check_does(health):
    response = await health.List(health_pb2.HealthListRequest(), timeout=5)
    assert statuses(response) == dict.fromkeys(("", *SERVICE_NAMES), SERVING)
    for service, status in statuses(response).items():
        request = health_pb2.HealthCheckRequest(service=service)
        assert (await health.Check(request, timeout=5)).status == status


@SESSION_LOOP
async def test_list_follows_set_and_graceful_shutdown():
    servicer = HealthServicer()
    await servicer.set("a.Service", NOT_SERVING)
    await servicer.set("b.Service", SERVING)
    listed = statuses(await servicer.List(health_pb2.HealthListRequest(), None))
    assert listed == {"": SERVING, "a.Service": NOT_SERVING, "b.Service": SERVING}
    await servicer.enter_graceful_shutdown()
    listed = statuses(await servicer.List(health_pb2.HealthListRequest(), None))
    assert listed == dict.fromkeys(("", "a.Service", "b.Service"), NOT_SERVING)


def test_list_is_a_coroutine_and_check_and_watch_are_upstreams():
    # The interceptor refuses handlers that are not `async def`.
    assert inspect.iscoroutinefunction(HealthServicer.List)
    assert HealthServicer.Check is upstream.HealthServicer.Check
    assert HealthServicer.Watch is upstream.HealthServicer.Watch
