"""Telemetry for one server: Prometheus metrics on a port of their own, OpenTelemetry traces.

`make_telemetry(settings)` reads only attributes, so the config file's `TelemetrySettings`
message and the dataclass below serve alike. Off (`enabled=False`) costs nothing: no
interceptor, a no-op engine observer. On, the server gets, outermost first:

- the tracing interceptor (only when spans go somewhere: an OTLP endpoint, or a test's exporter);
- the outcome interceptor, which sees how each RPC really ended, after ContractInterceptor
  mapped errors inside the handler, and tells the metrics and the RPC's span, once per call;

and the engine gets a `MetricsObserver`.
"""

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import start_http_server

from mlx_serving.engine.observer import EngineObserver

from .metrics import Metrics, MetricsObserver
from .tracing import TracingInterceptor, make_tracer_provider, set_rpc_status

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "mlx-serving"
DEFAULT_PROMETHEUS_PORT = 9464
DEFAULT_PROMETHEUS_HOST = "127.0.0.1"
DEFAULT_EXPORT_INTERVAL_MS = 5000

# (full method name, final status code, seconds the handler ran)
RpcOutcome = Callable[[str, grpc.StatusCode, float], None]


@dataclass(frozen=True)
class TelemetrySettings:
    """The fields of the config's TelemetrySettings message, for tests and for no config."""

    enabled: bool = False
    service_name: str = DEFAULT_SERVICE_NAME
    # 0 picks a free port (tests); read the bound one from `Telemetry.prometheus_port`.
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT
    # How often finished spans are sent to the OTLP endpoint (Prometheus pulls metrics).
    export_interval_ms: int = DEFAULT_EXPORT_INTERVAL_MS
    # OTLP/gRPC collector, e.g. "http://127.0.0.1:4317"; empty exports no spans.
    otlp_endpoint: str = ""
    prometheus_host: str = DEFAULT_PROMETHEUS_HOST


class Telemetry:
    """What the server installs: `interceptors` (in order), `observer` for the Engine."""

    def __init__(
        self,
        settings,
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.tracer_provider = tracer_provider
        self.observer = MetricsObserver(metrics) if metrics else EngineObserver()
        outcomes: list[RpcOutcome] = [metrics.record_rpc] if metrics else []
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tracer_provider is not None:
            interceptors.append(TracingInterceptor(tracer_provider))
            outcomes.append(set_rpc_status)
        if outcomes:
            interceptors.append(RpcOutcomeInterceptor(*outcomes))
        self.interceptors = tuple(interceptors)
        # The bound Prometheus port once started (the real one when asked for port 0).
        self.prometheus_port: int | None = None
        self._http: WSGIServer | None = None

    @property
    def prometheus_host(self) -> str:
        return self.settings.prometheus_host or DEFAULT_PROMETHEUS_HOST

    def start(self) -> None:
        """Serve /metrics on prometheus_host:prometheus_port, when metrics are on."""
        if self.metrics is None or self._http is not None:
            return
        host, port = self.prometheus_host, self.settings.prometheus_port
        try:
            self._http, _ = start_http_server(port, host, registry=self.metrics.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self.prometheus_port = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.prometheus_port)

    def engine_stopped(self) -> None:
        """The engine died without ending its sequences: zero what it would have."""
        if isinstance(self.observer, MetricsObserver):
            self.observer.engine_stopped()

    def shutdown(self) -> None:
        """Stop serving metrics and flush spans. Blocks (up to ~0.5 s): run it in a thread."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            self.tracer_provider = None


def make_telemetry(settings=None, span_exporters: Sequence[SpanExporter] = ()) -> Telemetry:
    """Telemetry as `settings` say (off when None); `span_exporters` also get every span."""
    if settings is None:
        settings = TelemetrySettings()
    if not settings.enabled:
        return Telemetry(settings)
    provider = make_tracer_provider(
        settings.service_name or DEFAULT_SERVICE_NAME,
        settings.otlp_endpoint,
        settings.export_interval_ms or DEFAULT_EXPORT_INTERVAL_MS,
        span_exporters,
    )
    return Telemetry(settings, Metrics(), provider)


class RpcOutcomeInterceptor(grpc.aio.ServerInterceptor):
    """Reports each RPC once, as it ends, with the status code its client gets."""

    def __init__(self, *outcomes: RpcOutcome):
        self._outcomes = outcomes

    async def intercept_service(
        self,
        continuation: Callable,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED, no label is made
            return None
        method = handler_call_details.method
        return rewrap_handler(handler, lambda behavior: self._observed(behavior, method))

    def _observed(self, behavior: Callable, method: str) -> Callable:
        report = self._report
        if inspect.isasyncgenfunction(behavior):  # streams by yielding (reflection)

            async def streamed(request, context):
                started, error = time.perf_counter(), None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    report(method, context, error, started)

            return streamed

        async def handled(request, context):
            started, error = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                report(method, context, error, started)

        return handled

    def _report(self, method: str, context, error: BaseException | None, started: float) -> None:
        code, seconds = final_code(context, error), time.perf_counter() - started
        for outcome in self._outcomes:
            try:
                outcome(method, code, seconds)
            except Exception:  # telemetry must never fail the RPC
                log.exception("recording the outcome of %s failed", method)


# A client's deadline runs from when it sent the call, ours from when the call arrived (and
# grpc-timeout is rounded up), so the client gives up a little before our clock says so: a
# client that leaves this close to its deadline left because of it.
DEADLINE_SLACK_S = 0.25


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client sees, from how the handler ended."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # The client left: it cancelled, or its deadline passed.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if (code := context.code()) is not None:  # an abort, or set_code
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def rewrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior replaced by `wrap(behavior)`."""
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return factory(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
