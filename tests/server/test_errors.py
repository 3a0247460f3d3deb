"""Every error status the server sends, through the real server over a real socket: its code,
its ErrorInfo (reason, domain, metadata), the details docs/ERRORS.md says it carries, and a
size clients accept. Bugs are INTERNAL with a request id, never Python text."""

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import grpc
import pytest
from conftest import start_app
from engine_probes import break_loop, poison_seed, probe
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from wire_helpers import (
    detail,
    details,
    error_info,
    field_violations,
    read_rest,
    reason,
    retry_seconds,
    rpc_error,
    wait_until,
)

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelState
from mlx_serving.server.app import ServingApp
from mlx_serving.server.status import DOMAIN, Reason
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
VOCAB = 2048
DOC = Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md"
# Clients cap the trailers they accept at 8 to 16 KB.
TRAILER_BYTES = 8192
INTERNAL_MESSAGE = re.compile(r"internal error \(request id ([0-9a-f]{32})\)")

Code = grpc.StatusCode


def long_request(model_id: str = MODEL_ID, **fields) -> generate_pb.GenerateRequest:
    defaults = {"text": "Once", "max_tokens": 100_000, "temperature": 0, "ignore_eos": True}
    return generate_pb.GenerateRequest(model_id=model_id, **{**defaults, **fields})


def short_request(model_id: str = MODEL_ID, **fields) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(model_id=model_id, text="hi", max_tokens=2, **fields)


def local(path) -> model_pb.ModelSource:
    return model_pb.ModelSource(local_path=str(path))


def assert_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, why: Reason, **metadata):
    """The code, reason and metadata (a subset); ErrorInfo first; every detail one we document;
    small trailers; a request id."""
    assert error.code() is code, error
    info = error_info(error)
    assert info.reason == why and info.domain == DOMAIN, info
    for key, value in metadata.items():
        assert info.metadata[key] == value, info
    assert re.fullmatch(r"[0-9a-f]{32}", info.metadata["request_id"]), info
    trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata())
    assert trailers + len(error.details()) < TRAILER_BYTES / 2
    return info


def resource(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    info = detail(error, error_details_pb2.ResourceInfo)
    assert info is not None, f"no ResourceInfo in {error}"
    return info.resource_type, info.resource_name


def kinds(error: grpc.aio.AioRpcError) -> list[str]:
    return [type(d).__name__ for d in details(error)]


# ---- models -----------------------------------------------------------------------------


async def test_an_unknown_model_is_model_not_found_with_its_resource(models, generate, tokenize):
    calls = [
        models.GetModel(model_pb.GetModelRequest(model_id="absent")),
        models.UnloadModel(model_pb.UnloadModelRequest(model_id="absent")),
        generate.Generate(short_request("absent")),
        tokenize.Tokenize(tokenize_pb.TokenizeRequest(model_id="absent", text="hi")),
        tokenize.Detokenize(tokenize_pb.DetokenizeRequest(model_id="absent", token_ids=[1])),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert_error(error, Code.NOT_FOUND, Reason.MODEL_NOT_FOUND, model_id="absent")
        assert kinds(error) == ["ErrorInfo", "ResourceInfo"]
        assert resource(error) == ("model", "absent")
        assert "absent" in error.details()


async def test_loading_an_id_twice_is_model_already_loaded(models, tmp_path):
    # From another source: the same one again is the model there, not an error.
    request = model_pb.LoadModelRequest(model_id=MODEL_ID, source=local(tmp_path))
    error = await rpc_error(models.LoadModel(request))
    assert_error(error, Code.ALREADY_EXISTS, Reason.MODEL_ALREADY_LOADED, model_id=MODEL_ID)
    assert resource(error) == ("model", MODEL_ID)
    assert error.details() == f"model {MODEL_ID!r} is already loaded"


async def test_a_loading_model_is_not_ready_with_a_precondition_failure(
    models, generate, tokenize, server, model_path, monkeypatch
):
    # Deterministic: the load cannot finish until the gate opens (the facade's tokenizer is the
    # last thing a load waits for).
    gate = asyncio.Event()
    add_model = server.engine._prompts.add_model

    async def gated_add_model(model_id, path):
        await gate.wait()
        await add_model(model_id, path)

    monkeypatch.setattr(server.engine._prompts, "add_model", gated_add_model)
    request = model_pb.LoadModelRequest(model_id="slow", source=local(model_path))
    loading = asyncio.ensure_future(models.LoadModel(request))
    try:
        await wait_until(
            lambda: any(
                info.model_id == "slow" and info.state is ModelState.LOADING
                for info in server.engine.list_models()
            )
        )
        calls = [
            generate.Generate(short_request("slow")),
            tokenize.Tokenize(tokenize_pb.TokenizeRequest(model_id="slow", text="hi")),
            models.UnloadModel(model_pb.UnloadModelRequest(model_id="slow")),
        ]
        for call in calls:
            error = await rpc_error(call)
            assert_error(
                error,
                Code.FAILED_PRECONDITION,
                Reason.MODEL_NOT_READY,
                model_id="slow",
                state="loading",
            )
            assert kinds(error) == ["ErrorInfo", "ResourceInfo", "PreconditionFailure"]
            assert resource(error) == ("model", "slow")
            (violation,) = detail(error, error_details_pb2.PreconditionFailure).violations
            assert (violation.type, violation.subject) == ("MODEL_STATE", "slow")
            assert "loading" in violation.description
            assert error.details() == "model 'slow' is loading, not ready"
    finally:
        gate.set()
        await loading
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="slow"))


async def test_a_missing_source_is_model_source_not_found(models, tmp_path):
    request = model_pb.LoadModelRequest(model_id="ghost", source=local(tmp_path / "missing"))
    error = await rpc_error(models.LoadModel(request))
    assert_error(error, Code.NOT_FOUND, Reason.MODEL_SOURCE_NOT_FOUND, model_id="ghost")
    assert resource(error) == ("model", "ghost")
    assert "missing" in error.details()


async def test_a_source_that_is_no_model_is_model_load_failed(models, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    request = model_pb.LoadModelRequest(model_id="empty", source=local(tmp_path))
    error = await rpc_error(models.LoadModel(request))
    assert_error(error, Code.FAILED_PRECONDITION, Reason.MODEL_LOAD_FAILED, model_id="empty")
    assert kinds(error) == ["ErrorInfo", "ResourceInfo"]
    assert resource(error) == ("model", "empty")
    # Without an id the model is named as its source's default id.
    error = await rpc_error(models.LoadModel(model_pb.LoadModelRequest(source=local(tmp_path))))
    assert reason(error) == Reason.MODEL_LOAD_FAILED and resource(error)[1]


# ---- the request ------------------------------------------------------------------------


async def test_a_contract_violation_keeps_its_bad_request(generate, models):
    error = await rpc_error(generate.Generate(short_request(temperature=2.5)))
    assert_error(error, Code.INVALID_ARGUMENT, Reason.CONTRACT_VIOLATION, model_id=MODEL_ID)
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    assert field_violations(error) == [
        ("temperature", "must be greater than or equal to 0 and less than or equal to 2")
    ]
    error = await rpc_error(models.GetModel(model_pb.GetModelRequest()))
    info = assert_error(error, Code.INVALID_ARGUMENT, Reason.CONTRACT_VIOLATION)
    assert "model_id" not in info.metadata  # empty: left out


async def test_many_violations_stay_bounded_and_small(generate):
    bad = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="hi", logit_bias={i: 1000.0 for i in range(1024)}
    )
    error = await rpc_error(generate.Generate(bad))
    assert_error(error, Code.INVALID_ARGUMENT, Reason.CONTRACT_VIOLATION)
    violations = field_violations(error)
    assert len(violations) == 11 and violations[-1] == ("", "and 1014 more violations")


async def test_what_the_model_refuses_is_invalid_request(generate):
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, tokens=generate_pb.TokenIds(ids=[1, VOCAB]), max_tokens=2
    )
    error = await rpc_error(generate.Generate(request))
    assert_error(error, Code.INVALID_ARGUMENT, Reason.INVALID_REQUEST, model_id=MODEL_ID)
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    assert [field for field, _ in field_violations(error)] == ["tokens.ids[1]"]


async def test_a_message_that_cannot_be_parsed_is_malformed_message(channel):
    for method, call in (
        ("/mlx_serving.v1.GenerateService/Generate", channel.unary_stream),
        ("/mlx_serving.v1.ModelService/GetModel", channel.unary_unary),
        ("/grpc.health.v1.Health/Check", channel.unary_unary),
    ):
        raw = call(method, request_serializer=bytes, response_deserializer=bytes)
        error = await rpc_error(raw(b"\xff\xff\xff\xff"))
        assert_error(error, Code.INVALID_ARGUMENT, Reason.MALFORMED_MESSAGE)
        assert field_violations(error) == [("", "the message could not be parsed")]
        assert "could not be parsed" in error.details()
        assert "DecodeError" not in error.details() and "Unexpected" not in error.details()


async def test_a_response_over_the_limit_is_response_too_large(model_path):
    app = await start_app(model_path, max_response_bytes=65536)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tokenize_grpc.TokenizeServiceStub(channel)
            request = tokenize_pb.TokenizeRequest(
                model_id=MODEL_ID, text="hello world " * 5000, return_pieces=True
            )
            error = await rpc_error(stub.Tokenize(request))
            info = assert_error(error, Code.INVALID_ARGUMENT, Reason.RESPONSE_TOO_LARGE)
            assert info.metadata["max_response_bytes"] == "65536"
            assert int(info.metadata["response_bytes"]) > 65536
            assert kinds(error) == ["ErrorInfo", "BadRequest"]
            assert "over this server's limit of 65536" in error.details()
    finally:
        await app.stop(0)


# ---- load -------------------------------------------------------------------------------


async def test_overloads_are_resource_exhausted_with_retry_info(fresh_server):
    config = EngineConfig(
        max_batch_size=1, max_queued_requests=0, max_concurrent_tokenize=0, retry_after_seconds=2
    )
    app = await fresh_server(config)
    async with grpc.aio.insecure_channel(app.address) as channel:
        generate = generate_grpc.GenerateServiceStub(channel)
        running = generate.Generate(long_request())
        await running.read()
        error = await rpc_error(generate.Generate(short_request()))
        assert_error(error, Code.RESOURCE_EXHAUSTED, Reason.ENGINE_OVERLOADED, model_id=MODEL_ID)
        assert kinds(error) == ["ErrorInfo", "RetryInfo"] and retry_seconds(error) == 2
        running.cancel()
        tokenize = tokenize_grpc.TokenizeServiceStub(channel)
        for call in (
            tokenize.Tokenize(tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="hi")),
            tokenize.Detokenize(tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=[1])),
        ):
            error = await rpc_error(call)
            assert_error(error, Code.RESOURCE_EXHAUSTED, Reason.TOKENIZE_OVERLOADED)
            assert kinds(error) == ["ErrorInfo", "RetryInfo"] and retry_seconds(error) == 2
            assert error.details() == "too many requests in flight; retry later"


# ---- the engine going away --------------------------------------------------------------


async def test_a_drain_refuses_new_work_with_retry_info_and_aborts_the_rest(fresh_server):
    app = await fresh_server(EngineConfig(retry_after_seconds=3))
    async with grpc.aio.insecure_channel(app.address) as channel:
        generate = generate_grpc.GenerateServiceStub(channel)
        tokenize = tokenize_grpc.TokenizeServiceStub(channel)
        stream = generate.Generate(long_request())
        first = await stream.read()
        stopping = asyncio.create_task(app.stop(1.0))
        await wait_until(lambda: app.engine._draining)
        for call in (
            generate.Generate(short_request()),
            tokenize.Tokenize(tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="hi")),
        ):
            error = await rpc_error(call)
            assert_error(error, Code.UNAVAILABLE, Reason.SHUTTING_DOWN, model_id=MODEL_ID)
            assert kinds(error) == ["ErrorInfo", "RetryInfo"] and retry_seconds(error) == 3
            assert error.details() == "the server is shutting down"
        # The grace runs out: the stream gets its last message, then REQUEST_ABORTED, worth
        # retrying elsewhere.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_rest(stream)
        info = assert_error(
            ended.value, Code.UNAVAILABLE, Reason.REQUEST_ABORTED, model_id=MODEL_ID
        )
        assert info.metadata["request_id"] == first.request_id
        assert kinds(ended.value) == ["ErrorInfo", "RetryInfo"] and retry_seconds(ended.value) == 3
        await stopping


async def test_an_unloaded_model_aborts_its_streams_after_a_cancelled_message(
    models, generate, model_path
):
    request = model_pb.LoadModelRequest(model_id="victim", source=local(model_path))
    await models.LoadModel(request)
    stream = generate.Generate(long_request("victim"))
    first = await stream.read()
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id="victim"))
    responses = [first]
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            responses.append(await stream.read())
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_CANCELLED
    info = assert_error(ended.value, Code.UNAVAILABLE, Reason.REQUEST_ABORTED, model_id="victim")
    assert info.metadata["request_id"] == first.request_id
    # No RetryInfo: the model is gone until someone loads it again.
    assert kinds(ended.value) == ["ErrorInfo"]
    assert "unloaded" in ended.value.details()


async def test_a_dead_engine_is_engine_unavailable(fresh_server):
    app = await fresh_server(EngineConfig(max_engine_restarts=0))  # dead stays dead
    async with grpc.aio.insecure_channel(app.address) as channel:
        generate = generate_grpc.GenerateServiceStub(channel)
        stream = generate.Generate(long_request())
        await stream.read()
        await probe(app.engine, break_loop)
        error = await rpc_error(stream)
        assert_error(error, Code.UNAVAILABLE, Reason.ENGINE_UNAVAILABLE, model_id=MODEL_ID)
        assert "injected" not in error.details()
        await wait_until(lambda: not app.engine.alive)
        error = await rpc_error(generate.Generate(short_request()))
        assert_error(error, Code.UNAVAILABLE, Reason.ENGINE_UNAVAILABLE)
        assert kinds(error) == ["ErrorInfo"]


# ---- bugs -------------------------------------------------------------------------------


async def test_a_failed_sequence_is_internal_naming_its_request(generate, server):
    await probe(server.engine, poison_seed, 666)
    error = await rpc_error(generate.Generate(short_request(seed=666)))
    info = assert_error(error, Code.INTERNAL, Reason.SEQUENCE_FAILED, model_id=MODEL_ID)
    assert f"(request id {info.metadata['request_id']})" in error.details()
    assert "poison" not in error.details() and "ValueError" not in error.details()


def internal_records(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if request_id in r.getMessage()]


async def test_an_unexpected_exception_is_internal_and_logged_once(
    models, server, monkeypatch, caplog
):
    def broken_list_models():
        raise KeyError("secret internals")

    monkeypatch.setattr(server.engine, "list_models", broken_list_models)
    with caplog.at_level(logging.ERROR, logger="mlx_serving.server"):
        error = await rpc_error(models.ListModels(model_pb.ListModelsRequest()))
    info = assert_error(error, Code.INTERNAL, Reason.INTERNAL)
    request_id = INTERNAL_MESSAGE.fullmatch(error.details()).group(1)
    assert info.metadata["request_id"] == request_id and kinds(error) == ["ErrorInfo"]
    (record,) = internal_records(caplog, request_id)
    assert isinstance(record.exc_info[1], KeyError)


# Messages of a real service, for the handlers below.
REQUEST, RESPONSE = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
SERIALIZERS = {
    "request_deserializer": REQUEST.FromString,
    "response_serializer": RESPONSE.SerializeToString,
}


class Handlers(grpc.GenericRpcHandler):
    """Handlers the interceptor cannot guard, under /test.Broken/: what each method name says."""

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith("/test.Broken/"):
            return None
        name = method.rsplit("/", 1)[1]
        if name == "LookupFails":
            raise RuntimeError("the handler lookup broke")
        if name == "Function":
            return grpc.unary_unary_rpc_method_handler(lambda r, c: RESPONSE(), **SERIALIZERS)
        if name == "Generator":
            return grpc.unary_stream_rpc_method_handler(sync_stream, **SERIALIZERS)
        if name == "AsyncGenerator":
            return grpc.unary_stream_rpc_method_handler(async_stream, **SERIALIZERS)
        return None


def sync_stream(request, context):
    yield RESPONSE()


async def async_stream(request, context):
    yield RESPONSE()


async def test_what_cannot_be_guarded_ends_internal_with_its_cause_logged(model_path, caplog):
    app = ServingApp(Engine(), "127.0.0.1", 0)
    app.server.add_generic_rpc_handlers((Handlers(),))
    try:
        await app.start()
        async with grpc.aio.insecure_channel(app.address) as channel:
            for name, kind, cause in (
                ("Function", channel.unary_unary, "not a coroutine"),
                ("Generator", channel.unary_stream, "a generator"),
                ("AsyncGenerator", channel.unary_stream, "an async generator"),
                ("LookupFails", channel.unary_unary, "the handler lookup broke"),
                ("LookupFails", channel.unary_stream, "the handler lookup broke"),
                ("LookupFails", channel.stream_stream, "the handler lookup broke"),
            ):
                call = kind(
                    f"/test.Broken/{name}",
                    request_serializer=REQUEST.SerializeToString,
                    response_deserializer=RESPONSE.FromString,
                )
                with caplog.at_level(logging.ERROR, logger="mlx_serving.server"):
                    caplog.clear()
                    if kind == channel.stream_stream:  # bound anew at each lookup
                        stream = call()
                        with contextlib.suppress(grpc.aio.AioRpcError):  # ended already
                            await stream.write(REQUEST())
                        error = await rpc_error(stream)
                    else:
                        error = await rpc_error(call(REQUEST()))
                info = assert_error(error, Code.INTERNAL, Reason.INTERNAL)
                request_id = INTERNAL_MESSAGE.fullmatch(error.details()).group(1)
                assert info.metadata["request_id"] == request_id
                (record,) = internal_records(caplog, request_id)
                assert cause in str(record.exc_info[1]), (name, record.exc_info)
                assert f"/test.Broken/{name}" in record.getMessage()
    finally:
        await app.stop(0)


# ---- grpc's health service --------------------------------------------------------------


async def test_an_unknown_health_service_is_service_not_found_and_no_bug(channel, health, caplog):
    with caplog.at_level(logging.ERROR, logger="mlx_serving.server"):
        error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="nope.Svc")))
    assert_error(error, Code.NOT_FOUND, Reason.SERVICE_NOT_FOUND)
    assert resource(error) == ("service", "nope.Svc")
    assert "nope.Svc" in error.details()
    assert not [r for r in caplog.records if r.name.startswith("mlx_serving")]
    # Health itself still answers.
    stub = health_pb2_grpc.HealthStub(channel)
    assert (await stub.Check(health_pb2.HealthCheckRequest())).status


# ---- docs/ERRORS.md ---------------------------------------------------------------------


async def test_the_doc_has_a_row_for_every_reason_and_no_other():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    documented = {re.match(r"\| `\w+` \| `(\w+)`", row).group(1) for row in rows}
    assert documented == {r.value for r in Reason}
    assert f"`{DOMAIN}`" in DOC.read_text()
