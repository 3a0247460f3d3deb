"""One interceptor for every unary-request RPC, unary and server-streaming alike.

It gives the call a request id, enforces the contract's protovalidate rules before the handler
runs, and turns whatever the handler raises into a status: the handlers stay convert → engine
→ convert, with no error handling of their own.
"""

import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import grpc
import protovalidate

from mlx_serving.engine.errors import EngineError

from .status import internal_error, invalid_argument, response_too_large, status_for

log = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    """The id the interceptor gave the RPC being handled (in logs, events and INTERNAL errors)."""
    return REQUEST_ID.get()


# What a request that cannot be parsed is handed to the handler as (see `tolerant`).
MALFORMED = object()


class ContractInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, max_response_bytes: int):
        self.max_response_bytes = max_response_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        # Reflection is the only request-streaming RPC; its messages carry no rules.
        if handler is None or handler.request_streaming:
            return handler
        behavior = handler.unary_stream or handler.unary_unary
        if not inspect.iscoroutinefunction(behavior):
            # A generator handler would escape the error mapping: stream with context.write.
            raise TypeError(
                f"{handler_call_details.method}: handlers must be `async def` coroutines"
            )
        make_handler = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make_handler(
            guard(behavior, handler_call_details.method, self.max_response_bytes),
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def tolerant(deserialize: Callable | None) -> Callable | None:
    """A deserializer that hands bytes it cannot parse to the handler as MALFORMED: grpc would
    answer UNKNOWN with the parser's exception text, and log a traceback."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:
            return MALFORMED

    return parse


def guard(behavior: Callable, method: str, max_response_bytes: int) -> Callable:
    """`behavior` with a request id, validation first, and every exception turned into a status."""

    async def guarded(request, context: grpc.aio.ServicerContext):
        request_id = uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        try:
            status = contract_status(request, method)
            if status is None:
                response = await behavior(request, context)
                if response is None or response.ByteSize() <= max_response_bytes:
                    return response
                status = response_too_large(response.ByteSize(), max_response_bytes)
        except EngineError as exc:
            status = status_for(exc) or log_internal(method, request_id)
        except Exception:
            if context.cancelled():
                raise  # the client left (cancel, deadline): nothing to report to anyone
            status = log_internal(method, request_id)
        end_with(context, status)

    return guarded


def contract_status(request, method: str) -> grpc.Status | None:
    """INVALID_ARGUMENT for a request that cannot be parsed or breaks the contract's rules."""
    if request is MALFORMED:
        problem = ("", "the message could not be parsed")
        return invalid_argument([problem], f"{method} request")
    if violations := protovalidate.collect_violations(request):
        return invalid_argument(map(describe, violations), request.DESCRIPTOR.name)
    return None


def end_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """The call's status, set rather than raised: `abort` raises an AbortError that grpc keeps
    in a reference cycle with the handler's frames, and with them the request, until the
    garbage collector's next full pass (a 4 MiB prompt per rejected call)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def log_internal(method: str, request_id: str) -> grpc.Status:
    """Called inside an `except`: logs the traceback once, tells the client only the request id."""
    log.error("internal error in %s (request id %s)", method, request_id, exc_info=True)
    return internal_error(request_id)


def describe(violation: protovalidate.Violation) -> tuple[str, str]:
    """(field path, rule message) of a protovalidate violation."""
    rule = violation.proto
    elements = rule.field.elements if rule.field is not None else ()  # a message-level rule
    return field_path(elements), rule.message or rule.rule_id


def field_path(elements) -> str:
    """Like protovalidate's own rendering: `chat.messages[1].role`, `logit_bias[5]`, `m["k"]`."""
    parts = []
    for element in elements:
        part, subscript = element.field_name, element.subscript
        if subscript is not None:
            if subscript.field == "string_key":
                key = json.dumps(subscript.value)
            elif subscript.field == "bool_key":
                key = "true" if subscript.value else "false"
            else:
                key = str(subscript.value)
            part += f"[{key}]"
        parts.append(part)
    return ".".join(parts)
