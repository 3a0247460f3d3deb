"""Engine errors and contract violations, as gRPC statuses with google.rpc details.

The one place that decides which status code an error gets. Messages of the engine's own
errors are written for callers and go out as they are; anything else is a bug and gets a
generic INTERNAL status that names the request id, never `str(exc)`.
"""

from collections.abc import Iterable

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
    ModelAlreadyExists,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelSourceNotFound,
    RequestAborted,
    SequenceFailed,
)

# Looked up along the exception's MRO, so a subclass inherits its base's code.
# A missing model directory or uncached repository is NOT_FOUND; any other load failure
# (bad config, unsupported architecture) is FAILED_PRECONDITION.
# RequestAborted is UNAVAILABLE, as the contract says for generations ended by an unload;
# both it and a draining engine are worth retrying elsewhere.
CODES: dict[type[EngineError], int] = {
    ModelNotFound: code_pb2.NOT_FOUND,
    ModelAlreadyExists: code_pb2.ALREADY_EXISTS,
    ModelNotReady: code_pb2.FAILED_PRECONDITION,
    ModelLoadFailed: code_pb2.FAILED_PRECONDITION,
    ModelSourceNotFound: code_pb2.NOT_FOUND,
    EngineUnavailable: code_pb2.UNAVAILABLE,
    RequestAborted: code_pb2.UNAVAILABLE,
    SequenceFailed: code_pb2.INTERNAL,
}

# Violations the status message names (the BadRequest detail lists up to MAX_VIOLATIONS).
SUMMARY_VIOLATIONS = 3
# A field path or description longer than this is clipped.
MAX_DETAIL_CHARS = 160


def make_status(code: int, message: str, *details) -> grpc.Status:
    """A grpc.Status whose trailers carry the google.rpc.Status with `details` packed in."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def invalid_argument(
    violations: Iterable[tuple[str, str]], what: str, more: int = 0
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
    return make_status(code_pb2.INVALID_ARGUMENT, f"invalid {what}: {summary}", bad_request)


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def response_too_large(size: int, limit: int) -> grpc.Status:
    """INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (which clients retry): the same request would
    get the same answer."""
    problem = f"the response would be {size} bytes, over this server's limit of {limit}"
    return invalid_argument([("", problem + "; ask for less")], "request")


def status_for(exc: EngineError) -> grpc.Status | None:
    """The status of an error the engine raised on purpose; None if it has no mapping (a bug)."""
    if isinstance(exc, InvalidRequest):
        violations = ((v.field, v.description) for v in exc.violations)
        return invalid_argument(violations, "request", exc.more)
    if isinstance(exc, EngineOverloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(exc.retry_after * 1e9))
        retry = error_details_pb2.RetryInfo(retry_delay=delay)
        return make_status(code_pb2.RESOURCE_EXHAUSTED, str(exc), retry)
    code = next((CODES[cls] for cls in type(exc).__mro__ if cls in CODES), None)
    return None if code is None else make_status(code, str(exc))


def internal_error(request_id: str) -> grpc.Status:
    """For bugs: says nothing about the cause, only where to look in the server's log."""
    return make_status(code_pb2.INTERNAL, f"internal error (request id {request_id})")
