"""Client-side helpers for the server tests: run calls, read statuses and their details."""

import asyncio
from collections.abc import Callable

import grpc
from google.rpc import error_details_pb2, status_pb2

from mlx_serving.engine.engine import Engine
from mlx_serving.v1 import generate_service_pb2 as generate_pb

STATUS_DETAILS_KEY = "grpc-status-details-bin"


async def rpc_error(call) -> grpc.aio.AioRpcError:
    """The error a unary or server-streaming call ends with (fails if it succeeds)."""
    try:
        if hasattr(call, "read"):  # a stream, maybe partly read already
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


async def read_rest(call) -> list:
    """The remaining responses of a stream already read with `read()`."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    details = dict(error.trailing_metadata() or ())
    assert STATUS_DETAILS_KEY in details, f"no google.rpc.Status in {error}"
    status = status_pb2.Status.FromString(details[STATUS_DETAILS_KEY])
    assert status.code == error.code().value[0] and status.message == error.details()
    return status


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of the BadRequest detail of an INVALID_ARGUMENT error."""
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    (detail,) = rich_status(error).details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    return [(v.field, v.description) for v in bad_request.field_violations]


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    return [field for field, _ in field_violations(error)]


async def generate_all(stub, request: generate_pb.GenerateRequest, **kwargs):
    """Every response of one Generate call, and the joined text and token ids."""
    responses = [r async for r in stub.Generate(request, **kwargs)]
    text = "".join(r.text for r in responses)
    return responses, text, [t for r in responses for t in r.token_ids]


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def wait_for_subscribers(engine: Engine, count: int) -> None:
    """Subscribe registers on the server's first read: wait for it before making events."""
    await wait_until(lambda: len(engine.events._subscriptions) == count)
