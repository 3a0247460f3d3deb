"""Client-side helpers for the server tests: run calls, read statuses and their details."""

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from mlx_serving.engine.engine import Engine
from mlx_serving.v1 import generate_service_pb2 as generate_pb

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# The google.rpc details the server sends (docs/ERRORS.md), by their full name: any other
# fails `details`.
DETAIL_TYPES: dict[str, type[Message]] = {
    message.DESCRIPTOR.full_name: message
    for message in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    )
}
M = TypeVar("M", bound=Message)


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
    bad_request = detail(error, error_details_pb2.BadRequest)
    assert bad_request is not None, f"no BadRequest in {error}"
    return [(v.field, v.description) for v in bad_request.field_violations]


def details(error: grpc.aio.AioRpcError) -> list[Message]:
    """Every detail of the error's google.rpc.Status, unpacked, in order."""
    unpacked = []
    for packed in rich_status(error).details:
        name = packed.TypeName()
        message_type = DETAIL_TYPES.get(name)
        assert message_type is not None, f"unexpected detail {name} in {error}"
        message = message_type()
        assert packed.Unpack(message)
        unpacked.append(message)
    return unpacked


def detail(error: grpc.aio.AioRpcError, message_type: type[M]) -> M | None:
    """The error's one detail of `message_type`, or None (fails if there are several)."""
    found = [d for d in details(error) if isinstance(d, message_type)]
    assert len(found) <= 1, f"{len(found)} {message_type.__name__} details in {error}"
    return found[0] if found else None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo every error of ours carries, first of its details, in our domain."""
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None, f"no ErrorInfo in {error}"
    assert isinstance(details(error)[0], error_details_pb2.ErrorInfo), error
    assert info.domain == "mlx-serving", info
    return info


def reason(error: grpc.aio.AioRpcError) -> str:
    return error_info(error).reason


def retry_seconds(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of the error, in seconds (fails without one)."""
    retry = detail(error, error_details_pb2.RetryInfo)
    assert retry is not None, f"no RetryInfo in {error}"
    return retry.retry_delay.ToNanoseconds() / 1e9


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
