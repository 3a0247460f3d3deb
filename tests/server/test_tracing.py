"""OpenTelemetry: the span tree of one Generate call, read from an in-memory exporter."""

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from wire_helpers import generate_all, rpc_error

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.server.app import ServingApp
from mlx_serving.server.telemetry import TelemetrySettings, make_telemetry
from mlx_serving.server.tracing import TracingInterceptor
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
GENERATE = "/mlx_serving.v1.GenerateService/Generate"
PHASES = ["mlx_serving.queue", "mlx_serving.prefill", "mlx_serving.decode"]


@pytest_asyncio.fixture(loop_scope="session")
async def traced(model_path):
    """A server whose spans go to an in-memory exporter (no Prometheus port needed)."""
    exporter = InMemorySpanExporter()
    settings = TelemetrySettings(enabled=True, prometheus_port=0)
    telemetry = make_telemetry(settings, span_exporters=[exporter])
    app = ServingApp(Engine(), "127.0.0.1", 0, telemetry=telemetry)
    await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield exporter, channel
    await app.stop(0)


async def test_one_generate_is_a_server_span_with_queue_prefill_and_decode_children(traced):
    exporter, channel = traced
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Hello", max_tokens=4, temperature=0, ignore_eos=True
    )
    responses, _, _ = await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    usage = responses[-1].usage

    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.parent is None]
    assert server.name == GENERATE and server.kind is SpanKind.SERVER
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "mlx_serving.v1.GenerateService"
    assert server.attributes["rpc.method"] == "Generate"
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert server.attributes["mlx_serving.request_id"] == responses[0].request_id
    assert server.status.status_code is StatusCode.UNSET and not server.events
    children = sorted((s for s in spans if s.parent is not None), key=lambda s: s.start_time)
    assert [s.name for s in children] == PHASES
    for child in children:
        assert child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
        assert child.kind is SpanKind.INTERNAL
        assert child.attributes["gen_ai.request.model"] == MODEL_ID
        assert child.attributes["gen_ai.response.id"] == responses[0].request_id
    # Back to back, inside the RPC's span.
    queue, prefill, decode = children
    assert server.start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.start_time <= prefill.end_time == decode.start_time
    assert decode.start_time <= decode.end_time <= server.end_time
    assert decode.end_time - queue.start_time == pytest.approx(
        usage.total_time.ToNanoseconds(), abs=1000
    )
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert prefill.attributes["gen_ai.usage.cache_read.input_tokens"] == usage.cached_prompt_tokens
    assert decode.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 4
    assert decode.attributes["gen_ai.response.finish_reasons"] == ("max_tokens",)


async def test_the_callers_own_request_id_is_on_the_rpc_span(traced):
    exporter, channel = traced
    exporter.clear()
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Hello", max_tokens=2, client_request_id="batch-9/item-3"
    )
    await generate_all(generate_grpc.GenerateServiceStub(channel), request)
    (server,) = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert server.attributes["mlx_serving.client_request_id"] == "batch-9/item-3"


async def test_a_span_carries_the_status_the_client_saw(traced):
    exporter, channel = traced
    exporter.clear()
    models = model_grpc.ModelServiceStub(channel)
    error = await rpc_error(models.GetModel(model_pb.GetModelRequest(model_id="missing")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    invalid = await rpc_error(
        generate_grpc.GenerateServiceStub(channel).Generate(
            generate_pb.GenerateRequest(model_id=MODEL_ID)
        )
    )
    assert invalid.code() is grpc.StatusCode.INVALID_ARGUMENT

    get_model, generate = exporter.get_finished_spans()
    assert get_model.name == "/mlx_serving.v1.ModelService/GetModel"
    assert get_model.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # A client's mistake is not the server's error (OpenTelemetry's gRPC conventions).
    assert get_model.status.status_code is StatusCode.UNSET
    assert generate.name == GENERATE
    assert generate.attributes["rpc.grpc.status_code"] == invalid.code().value[0]
    # An abort is how a status is sent, not an exception to record.
    assert not get_model.events and not generate.events


async def test_a_callers_trace_context_is_the_rpc_spans_parent(traced):
    exporter, channel = traced
    exporter.clear()
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    models = model_grpc.ModelServiceStub(channel)
    await models.ListModels(
        model_pb.ListModelsRequest(), metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")]
    )
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent_id and span.parent.is_remote


async def test_spans_are_only_made_when_they_go_somewhere():
    quiet = make_telemetry(TelemetrySettings(enabled=True))
    assert quiet.tracer_provider is None
    assert not any(isinstance(i, TracingInterceptor) for i in quiet.interceptors)
    exported = make_telemetry(
        TelemetrySettings(enabled=True, otlp_endpoint="http://127.0.0.1:4317")
    )
    try:
        assert exported.tracer_provider is not None
        assert isinstance(exported.interceptors[0], TracingInterceptor)
    finally:
        exported.shutdown()
    off = make_telemetry(TelemetrySettings(otlp_endpoint="http://127.0.0.1:4317"))
    assert off.tracer_provider is None and off.interceptors == ()
