"""Engine errors and contract violations, as gRPC statuses with google.rpc details.

The one place that decides which status code an error gets, and what it carries. Every status
the server sets carries a `google.rpc.ErrorInfo` first: a stable `reason` (the `Reason` below),
the `DOMAIN`, and metadata (`request_id`, `model_id`, ... where known); then what fits the
error: `ResourceInfo` for a model, `PreconditionFailure` for a model not ready, `BadRequest` for
INVALID_ARGUMENT, `RetryInfo` where waiting helps. docs/ERRORS.md is the table for clients.

Messages of the engine's own errors are written for callers and go out as they are; anything
else is a bug and gets a generic INTERNAL status that names the request id, never `str(exc)`.
Everything travels in trailers, which clients cap (8 to 16 KB): lists are bounded and texts
clipped.
"""

from collections.abc import Iterable, Mapping
from enum import StrEnum

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mlx_serving.engine.admission import MAX_VIOLATIONS
from mlx_serving.engine.errors import (
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    LoadCapReached,
    LoadingDisabled,
    ModelAlreadyExists,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelSourceNotFound,
    RemoteCodeRefused,
    RequestAborted,
    SequenceFailed,
    ShuttingDown,
    SourceNotAllowed,
    TokenizeOverloaded,
)

# ErrorInfo.domain of every error this server sends.
DOMAIN = "mlx-serving"


class Reason(StrEnum):
    """ErrorInfo.reason: stable, for clients to branch on (the status message is for people)."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_ALREADY_LOADED = "MODEL_ALREADY_LOADED"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    MODEL_SOURCE_NOT_FOUND = "MODEL_SOURCE_NOT_FOUND"
    LOADING_DISABLED = "LOADING_DISABLED"
    MODEL_SOURCE_NOT_ALLOWED = "MODEL_SOURCE_NOT_ALLOWED"
    REMOTE_CODE_NOT_ALLOWED = "REMOTE_CODE_NOT_ALLOWED"
    MODEL_CAP_REACHED = "MODEL_CAP_REACHED"
    CONTRACT_VIOLATION = "CONTRACT_VIOLATION"
    INVALID_REQUEST = "INVALID_REQUEST"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    ENGINE_OVERLOADED = "ENGINE_OVERLOADED"
    TOKENIZE_OVERLOADED = "TOKENIZE_OVERLOADED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    REQUEST_ABORTED = "REQUEST_ABORTED"
    SEQUENCE_FAILED = "SEQUENCE_FAILED"
    INTERNAL = "INTERNAL"
    SERVICE_NOT_FOUND = "SERVICE_NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"


# Looked up along the exception's MRO, so a subclass inherits its base's code and reason
# unless it has its own.
# A missing model directory or uncached repository is NOT_FOUND; any other load failure
# (bad config, unsupported architecture, weights whose header lies) is FAILED_PRECONDITION.
# What the load policy refuses (LoadRefused) is PERMISSION_DENIED, the same for a path that
# exists outside the model roots and one that does not; its caps are RESOURCE_EXHAUSTED.
# RequestAborted is UNAVAILABLE, as the contract says for generations ended by an unload;
# both it and a draining engine are worth retrying elsewhere.
ENGINE_ERRORS: dict[type[EngineError], tuple[int, Reason]] = {
    ModelNotFound: (code_pb2.NOT_FOUND, Reason.MODEL_NOT_FOUND),
    ModelAlreadyExists: (code_pb2.ALREADY_EXISTS, Reason.MODEL_ALREADY_LOADED),
    ModelNotReady: (code_pb2.FAILED_PRECONDITION, Reason.MODEL_NOT_READY),
    ModelLoadFailed: (code_pb2.FAILED_PRECONDITION, Reason.MODEL_LOAD_FAILED),
    ModelSourceNotFound: (code_pb2.NOT_FOUND, Reason.MODEL_SOURCE_NOT_FOUND),
    LoadingDisabled: (code_pb2.PERMISSION_DENIED, Reason.LOADING_DISABLED),
    SourceNotAllowed: (code_pb2.PERMISSION_DENIED, Reason.MODEL_SOURCE_NOT_ALLOWED),
    RemoteCodeRefused: (code_pb2.PERMISSION_DENIED, Reason.REMOTE_CODE_NOT_ALLOWED),
    LoadCapReached: (code_pb2.RESOURCE_EXHAUSTED, Reason.MODEL_CAP_REACHED),
    InvalidRequest: (code_pb2.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
    EngineOverloaded: (code_pb2.RESOURCE_EXHAUSTED, Reason.ENGINE_OVERLOADED),
    TokenizeOverloaded: (code_pb2.RESOURCE_EXHAUSTED, Reason.TOKENIZE_OVERLOADED),
    EngineUnavailable: (code_pb2.UNAVAILABLE, Reason.ENGINE_UNAVAILABLE),
    ShuttingDown: (code_pb2.UNAVAILABLE, Reason.SHUTTING_DOWN),
    RequestAborted: (code_pb2.UNAVAILABLE, Reason.REQUEST_ABORTED),
    SequenceFailed: (code_pb2.INTERNAL, Reason.SEQUENCE_FAILED),
}

# ResourceInfo.description of an error about a model.
MODEL_PROBLEMS = {
    Reason.MODEL_NOT_FOUND: "not loaded",
    Reason.MODEL_ALREADY_LOADED: "already loaded",
    Reason.MODEL_NOT_READY: "not ready",
    Reason.MODEL_LOAD_FAILED: "failed to load",
    Reason.MODEL_SOURCE_NOT_FOUND: "no model at its source",
    Reason.LOADING_DISABLED: "not loaded or unloaded on request here",
    Reason.MODEL_SOURCE_NOT_ALLOWED: "its source is not allowed here",
    Reason.REMOTE_CODE_NOT_ALLOWED: "it would run its own code",
    Reason.MODEL_CAP_REACHED: "over the server's load caps",
}
MODEL_RESOURCE = "model"
# PreconditionFailure.Violation.type of a model that is not ready (its subject: the model id).
MODEL_STATE_PRECONDITION = "MODEL_STATE"

# Violations the status message names (the BadRequest detail lists up to MAX_VIOLATIONS).
SUMMARY_VIOLATIONS = 3
# A field path, description or metadata value longer than this is clipped.
MAX_DETAIL_CHARS = 160

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


def make_status(code: int, message: str, *details) -> grpc.Status:
    """A grpc.Status whose trailers carry the google.rpc.Status with `details` packed in."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def error_info(reason: Reason | str, **metadata: str) -> error_details_pb2.ErrorInfo:
    """ErrorInfo in our domain; metadata keys are the contract's field names, empty values left
    out, long ones clipped."""
    kept = {key: clip(value) for key, value in metadata.items() if value}
    return error_details_pb2.ErrorInfo(reason=str(reason), domain=DOMAIN, metadata=kept)


def error_status(code: int, message: str, reason: Reason | str, *details, **metadata: str):
    """A status with ErrorInfo(reason, metadata) first, then `details`."""
    return make_status(code, message, error_info(reason, **metadata), *details)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def invalid_argument(
    violations: Iterable[tuple[str, str]],
    what: str,
    more: int = 0,
    reason: Reason = Reason.CONTRACT_VIOLATION,
    metadata: Mapping[str, str] | None = None,
) -> grpc.Status:
    """INVALID_ARGUMENT with a BadRequest.FieldViolation per (field path, description).

    At most MAX_VIOLATIONS are listed, each clipped, and the message names the first few: the
    status travels in trailers, which clients cap (8 to 16 KB); past that they see
    RESOURCE_EXHAUSTED, which they would retry.
    """
    violations = [(clip(field), clip(text)) for field, text in violations]
    more += max(0, len(violations) - MAX_VIOLATIONS)
    violations = violations[:MAX_VIOLATIONS]
    if more:
        violations.append(("", f"and {more} more violations"))
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    named = [f"{field}: {text}" if field else text for field, text in violations]
    if len(named) > SUMMARY_VIOLATIONS:
        named[SUMMARY_VIOLATIONS:] = [f"and {len(named) - SUMMARY_VIOLATIONS} more"]
    summary = "; ".join(named)
    message = f"invalid {what}: {summary}"
    return error_status(code_pb2.INVALID_ARGUMENT, message, reason, bad_request, **(metadata or {}))


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def malformed_message(method: str, metadata: Mapping[str, str] | None = None) -> grpc.Status:
    """INVALID_ARGUMENT for request bytes that are not the method's message."""
    problem = ("", "the message could not be parsed")
    return invalid_argument([problem], f"{method} request", 0, Reason.MALFORMED_MESSAGE, metadata)


def response_too_large(
    size: int, limit: int, metadata: Mapping[str, str] | None = None
) -> grpc.Status:
    """INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (which clients retry): the same request would
    get the same answer."""
    problem = f"the response would be {size} bytes, over this server's limit of {limit}"
    return invalid_argument(
        [("", problem + "; ask for less")],
        "request",
        0,
        Reason.RESPONSE_TOO_LARGE,
        {**(metadata or {}), "response_bytes": str(size), "max_response_bytes": str(limit)},
    )


def status_for(exc: EngineError, request_id: str = "", model_id: str = "") -> grpc.Status | None:
    """The status of an error the engine raised on purpose; None if it has no mapping (a bug).

    `model_id`: the request's, for errors that do not name a model of their own.
    """
    mapped = next((ENGINE_ERRORS[c] for c in type(exc).__mro__ if c in ENGINE_ERRORS), None)
    if mapped is None:
        return None
    code, reason = mapped
    own_model = getattr(exc, "model_id", "")
    metadata = {"request_id": request_id, "model_id": own_model or model_id}
    if isinstance(exc, InvalidRequest):
        violations = ((v.field, v.description) for v in exc.violations)
        return invalid_argument(violations, "request", exc.more, reason, metadata)
    details: list = []
    if isinstance(exc, ModelNotReady):
        metadata["state"] = exc.state
        precondition = error_details_pb2.PreconditionFailure.Violation(
            type=MODEL_STATE_PRECONDITION,
            subject=clip(exc.model_id),
            description=clip(f"the model is {exc.state}; wait until it is ready"),
        )
        details.append(error_details_pb2.PreconditionFailure(violations=[precondition]))
    if own_model and reason in MODEL_PROBLEMS:
        resource = error_details_pb2.ResourceInfo(
            resource_type=MODEL_RESOURCE,
            resource_name=clip(own_model),
            description=MODEL_PROBLEMS[reason],
        )
        details.insert(0, resource)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        details.append(retry_info(retry_after))
    return error_status(code, str(exc), reason, *details, **metadata)


def internal_error(
    request_id: str, reason: Reason = Reason.INTERNAL, **metadata: str
) -> grpc.Status:
    """For bugs: says nothing about the cause, only where to look in the server's log."""
    message = f"internal error (request id {request_id})"
    return error_status(code_pb2.INTERNAL, message, reason, request_id=request_id, **metadata)


def unauthenticated(problem: str, request_id: str) -> grpc.Status:
    """No bearer token, or one that is not configured (which it is not said)."""
    return error_status(
        code_pb2.UNAUTHENTICATED, problem, Reason.UNAUTHENTICATED, request_id=request_id
    )


def permission_denied(method: str, scope: str, request_id: str) -> grpc.Status:
    """A valid token whose scope does not cover the method."""
    message = f'a "{scope}" token may not call {method}'
    return error_status(
        code_pb2.PERMISSION_DENIED,
        message,
        Reason.PERMISSION_DENIED,
        request_id=request_id,
        method=method,
        token_scope=scope,
    )


def too_many_streams(
    what: str, setting: str, most: int, retry_after: float, request_id: str
) -> grpc.Status:
    """RESOURCE_EXHAUSTED: the client holds `most` streams of this kind already (`setting`
    names the server's limit); one ending makes room."""
    message = f"this client has {most} {what} open, the most allowed; end one first"
    return error_status(
        code_pb2.RESOURCE_EXHAUSTED,
        message,
        Reason.TOO_MANY_STREAMS,
        retry_info(retry_after),
        request_id=request_id,
        **{setting: str(most)},
    )


def aborted(
    code: grpc.StatusCode, message: str, method: str, request, request_id: str
) -> grpc.Status:
    """The status a handler not ours (grpc's health service) aborted with, given its details:
    an unknown service to Check is SERVICE_NOT_FOUND; any other abort's reason is its code's
    name."""
    if method == HEALTH_CHECK_METHOD and code is grpc.StatusCode.NOT_FOUND:
        service = clip(getattr(request, "service", ""))
        resource = error_details_pb2.ResourceInfo(
            resource_type="service", resource_name=service, description="unknown to health"
        )
        message = message or f"unknown service {service!r}"
        return error_status(
            code.value[0], message, Reason.SERVICE_NOT_FOUND, resource, request_id=request_id
        )
    return error_status(code.value[0], clip(message, 1000), code.name, request_id=request_id)
