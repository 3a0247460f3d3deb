"""One interceptor for every unary-request RPC, unary and server-streaming alike.

It gives the call a request id, enforces the contract's protovalidate rules before the handler
runs, and turns whatever the handler raises into a status (status.py says which, with which
details): the handlers stay convert → engine → convert, with no error handling of their own.

It never raises itself: grpc would answer UNKNOWN with the exception's text. What it cannot
guard (a handler that is no coroutine, a failing lookup) ends INTERNAL, its cause logged.
"""

import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar

import grpc
import protovalidate

from mlx_serving.engine.errors import EngineError

from .status import (
    Reason,
    aborted,
    internal_error,
    invalid_argument,
    malformed_message,
    response_too_large,
    status_for,
)

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
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        try:
            handler = await continuation(handler_call_details)
            # Reflection is the only request-streaming RPC; its messages carry no rules.
            if handler is None or handler.request_streaming:
                return handler
            return self._guarded(handler, method)
        except Exception:
            # Runs once per call, like the handler would: this call gets its own request id.
            request_id = uuid.uuid4().hex
            return ended_with(log_internal(method, request_id), request_id)

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_stream or handler.unary_unary
        if not inspect.iscoroutinefunction(behavior):
            behavior = not_a_coroutine(behavior, method)
        make_handler = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make_handler(
            guard(behavior, method, self.max_response_bytes),
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def not_a_coroutine(behavior: Callable, method: str) -> Callable:
    """What runs instead of a handler that is no `async def` coroutine: a generator would
    escape the error mapping (streams are written with context.write), and a plain function
    would block the event loop. Every call ends INTERNAL, the cause logged."""
    kind = "a generator" if inspect.isgeneratorfunction(behavior) else "not a coroutine"
    if inspect.isasyncgenfunction(behavior):
        kind = "an async generator"

    async def refuse(request, context):
        raise TypeError(
            f"{method}: the handler is {kind}; handlers must be `async def` coroutines "
            "that stream with context.write"
        )

    return refuse


def ended_with(status: grpc.Status, request_id: str) -> grpc.RpcMethodHandler:
    """A handler that only ends the call with `status`. Unary, whatever the method's shape: on
    the wire a call that ends with an error before any response looks the same to every kind
    of client."""

    async def end(request, context: grpc.aio.ServicerContext) -> None:
        REQUEST_ID.set(request_id)
        end_with(context, status)

    return grpc.unary_unary_rpc_method_handler(end)


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
        model_id = requested_model(request)
        try:
            metadata = {"request_id": request_id, "model_id": model_id}
            status = contract_status(request, method, metadata)
            if status is None:
                response = await behavior(request, GuardedContext(context))
                if response is None or response.ByteSize() <= max_response_bytes:
                    return response
                status = response_too_large(
                    response.ByteSize(), max_response_bytes, {"request_id": request_id}
                )
        except EngineError as exc:
            status = status_for(exc, request_id, model_id) or log_internal(method, request_id)
        except HandlerAborted as exc:
            status = aborted(exc.code, exc.details, method, request, request_id)
        except Exception:
            if context.cancelled():
                raise  # the client left (cancel, deadline): nothing to report to anyone
            status = log_internal(method, request_id)
        end_with(context, status)

    return guarded


def requested_model(request) -> str:
    """The request's model_id field, if it has one (for errors that name no model)."""
    model_id = getattr(request, "model_id", "")
    return model_id if isinstance(model_id, str) else ""


class HandlerAborted(Exception):
    """A handler called `context.abort`: the guard ends the call with that status, plus
    details (grpc's own abort would send it at once, bare, and raise AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = details


class GuardedContext:
    """The handler's context, but for `abort`, which raises HandlerAborted. Our handlers never
    abort; grpc's health servicer does, for a service it does not know."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self.write = context.write  # streams call it per message: no __getattr__ on the way

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise HandlerAborted(code, details)


def contract_status(
    request, method: str, metadata: Mapping[str, str] | None = None
) -> grpc.Status | None:
    """INVALID_ARGUMENT for a request that cannot be parsed or breaks the contract's rules;
    `metadata` goes into its ErrorInfo."""
    if request is MALFORMED:
        return malformed_message(method, metadata)
    if violations := protovalidate.collect_violations(request):
        what = request.DESCRIPTOR.name
        return invalid_argument(
            map(describe, violations), what, 0, Reason.CONTRACT_VIOLATION, metadata
        )
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
