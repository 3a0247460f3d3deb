"""OpenTelemetry: a server span per RPC, and the engine phases of a generation under it.

The RPC spans come from opentelemetry-instrumentation-grpc's aio interceptor, with one fix: it
iterates every streaming handler as an async generator, and ours are coroutines writing with
`context.write` (opentelemetry-python-contrib#3066). The engine times each generation and
reports it in the final `Usage`; `record_generation` turns that into three child spans with
explicit timestamps, so the engine never touches OpenTelemetry. No global state: each
server has its own TracerProvider, and the tracer reaches the Generate handler by a ContextVar.
"""

import asyncio
import inspect
import time
from collections.abc import Sequence
from contextvars import ContextVar

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.util.types import AttributeValue

from mlx_serving.engine.requests import FinishReason, Usage

from .interceptor import current_request_id

TRACER_NAME = "mlx_serving.server"
QUEUE_SPAN = "mlx_serving.queue"
PREFILL_SPAN = "mlx_serving.prefill"
DECODE_SPAN = "mlx_serving.decode"
# The id ContractInterceptor gives each RPC (in responses, events and INTERNAL errors' logs).
REQUEST_ID_ATTRIBUTE = "mlx_serving.request_id"
# The caller's own id for a generation (GenerateRequest.client_request_id).
CLIENT_REQUEST_ID_ATTRIBUTE = "mlx_serving.client_request_id"

# Server-side failures mark a span as an error; a client's mistake does not (OTel gRPC semconv).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# The tracer of the server handling the current RPC (None when tracing is off); set per RPC,
# so servers with providers of their own can share a process.
_GENERATION_TRACER: ContextVar[trace.Tracer | None] = ContextVar(
    "mlx_serving_generation_tracer", default=None
)


def make_tracer_provider(
    service_name: str,
    otlp_endpoint: str = "",
    export_interval_ms: int = 5000,
    exporters: Sequence[SpanExporter] = (),
) -> TracerProvider | None:
    """A provider sending spans to OTLP when an endpoint is set and to `exporters`; else None."""
    if not otlp_endpoint and not exporters:
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if otlp_endpoint:
        # Imported here: the OTLP exporter pulls in its own protobuf modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=otlp_endpoint)
        provider.add_span_processor(
            BatchSpanProcessor(otlp, schedule_delay_millis=export_interval_ms)
        )
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


class TracingInterceptor(OpenTelemetryAioServerInterceptor):
    """A SERVER span around each RPC; goes first, so the span encloses validation and handling.

    Coroutine handlers (unary, and streams written with `context.write`) get a wrapper of our
    own, built on the instrumentation's span (`_start_span`, remote context): it awaits the
    streams that the instrumentation would iterate, and keeps aborts (statuses sent on purpose)
    and client cancels out of the span's exception events. The status lands on the span through
    `set_rpc_status`. Generator handlers (reflection) keep the instrumentation's own wrapper.
    """

    def __init__(self, provider: TracerProvider):
        tracer = provider.get_tracer(TRACER_NAME)
        super().__init__(_TracerRecordingNoExceptions(tracer))
        self._generation_tracer = tracer

    def _intercept_aio_server_unary(self, behavior, handler_call_details):
        return self._traced(behavior, handler_call_details)

    def _intercept_aio_server_stream(self, behavior, handler_call_details):
        if inspect.iscoroutinefunction(behavior):
            return self._traced(behavior, handler_call_details)
        return super()._intercept_aio_server_stream(behavior, handler_call_details)

    def _traced(self, behavior, handler_call_details):
        tracer = self._generation_tracer

        async def traced(request, context):
            _GENERATION_TRACER.set(tracer)  # each RPC runs in a task (and a context) of its own
            with (
                self._set_remote_context(context),
                self._start_span(handler_call_details, context) as span,
            ):
                try:
                    return await behavior(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a bug that escaped ContractInterceptor
                    span.record_exception(exc)
                    raise

        return traced


class _TracerRecordingNoExceptions:
    """The instrumentation's spans record no exception by themselves: `_traced` chooses."""

    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer

    def start_as_current_span(self, *args, **kwargs):
        return self._tracer.start_as_current_span(*args, record_exception=False, **kwargs)


def set_rpc_status(method: str, code: grpc.StatusCode, seconds: float) -> None:
    """The status the client saw, and the request id of the logs, on the RPC's span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if request_id := current_request_id():
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
    if code in SERVER_ERRORS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))


def set_client_request_id(client_request_id: str) -> None:
    span = trace.get_current_span()
    if client_request_id and span.is_recording():
        span.set_attribute(CLIENT_REQUEST_ID_ATTRIBUTE, client_request_id)


def record_generation(
    model_id: str, finish_reason: FinishReason | None, usage: Usage, request_id: str = ""
) -> None:
    """Queue, prefill and decode spans under the current RPC span, from the final usage.

    Call it as the last chunk arrives: admission is then `total_time` ago.
    """
    tracer = _GENERATION_TRACER.get()
    parent = trace.get_current_span()
    if tracer is None or not parent.is_recording():
        return
    end = time.time_ns()
    admitted = end - seconds_ns(usage.total_time)
    started = min(admitted + seconds_ns(usage.queue_time), end)
    first_token = min(max(admitted + seconds_ns(usage.time_to_first_token), started), end)
    model: dict[str, AttributeValue] = {"gen_ai.request.model": model_id}
    if request_id:
        model["gen_ai.response.id"] = request_id
    prefill: dict[str, AttributeValue] = {
        **model,
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cached_prompt_tokens,
    }
    decode: dict[str, AttributeValue] = {
        **model,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "gen_ai.response.finish_reasons": (finish_reason.value if finish_reason else "",),
    }
    context = trace.set_span_in_context(parent)
    for name, start, stop, attributes in (
        (QUEUE_SPAN, admitted, started, model),
        (PREFILL_SPAN, started, first_token, prefill),
        (DECODE_SPAN, first_token, end, decode),
    ):
        span = tracer.start_span(name, context, attributes=attributes, start_time=start)
        span.end(end_time=stop)


def seconds_ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)
