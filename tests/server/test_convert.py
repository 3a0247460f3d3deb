"""The pure pieces of the wire layer: conversions and the error → status table."""

import grpc
import protovalidate
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from mlx_serving.engine import errors, events
from mlx_serving.engine.models import ModelInfo, ModelSource, ModelState, Quantization
from mlx_serving.engine.requests import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    Usage,
)
from mlx_serving.server import convert
from mlx_serving.server.app import host_port
from mlx_serving.server.interceptor import describe
from mlx_serving.server.status import internal_error, status_for
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import model_service_pb2 as model_pb


def test_unset_optional_fields_leave_the_engine_defaults():
    request = generate_pb.GenerateRequest(model_id="m", text="hi")
    assert convert.generation_request(request, "r1") == GenerationRequest(
        model_id="m", text="hi", request_id="r1"
    )


def test_every_generate_field_reaches_the_engine():
    request = generate_pb.GenerateRequest(
        model_id="m",
        chat=generate_pb.ChatPrompt(
            messages=[generate_pb.ChatMessage(role="user", content="hé 👋")],
            add_generation_prompt=False,
        ),
        max_tokens=7,
        temperature=0.5,
        top_p=0.25,
        top_k=3,
        seed=2**63 + 1,
        min_p=0.125,
        repetition_penalty=1.5,
        presence_penalty=-0.5,
        frequency_penalty=0.75,
        penalty_context=32,
        logit_bias={9: -1.5, 2: 100.0},
        stop=["\n\n", "END"],
        stop_token_ids=[5, 6],
        ignore_eos=True,
        include_stop=True,
    )
    assert convert.generation_request(request, "r2") == GenerationRequest(
        model_id="m",
        messages=(ChatMessage("user", "hé 👋"),),
        add_generation_prompt=False,
        max_tokens=7,
        sampling=SamplingParams(
            temperature=0.5,
            top_p=0.25,
            top_k=3,
            min_p=0.125,
            seed=2**63 + 1,
            repetition_penalty=1.5,
            presence_penalty=-0.5,
            frequency_penalty=0.75,
            penalty_context=32,
            logit_bias=((2, 100.0), (9, -1.5)),
        ),
        stop=("\n\n", "END"),
        stop_token_ids=(5, 6),
        ignore_eos=True,
        include_stop=True,
        request_id="r2",
    )
    tokens = generate_pb.GenerateRequest(model_id="m", tokens=generate_pb.TokenIds(ids=[3, 1]))
    converted = convert.generation_request(tokens, "r3")
    assert converted.token_ids == (3, 1) and converted.text is None and converted.messages is None


def test_chunks_become_responses():
    middle = convert.generate_response(GenerationChunk("a", (1,)), "r")
    assert middle == generate_pb.GenerateResponse(request_id="r", text="a", token_ids=[1])
    usage = Usage(
        3, 2, 1, queue_time=0.1, time_to_first_token=0.25, tokens_per_second=50.0, total_time=1.5
    )
    last = convert.generate_response(
        GenerationChunk("", (), FinishReason.STOP_SEQUENCE, usage, "END"), "r"
    )
    assert last.finish_reason == generate_pb.FINISH_REASON_STOP_SEQUENCE
    assert last.matched_stop == "END"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 2)
    assert last.usage.cached_prompt_tokens == 1 and last.usage.tokens_per_second == 50.0
    assert last.usage.time_to_first_token.ToMilliseconds() == 250
    assert last.usage.total_time.ToMilliseconds() == 1500


def test_every_finish_reason_and_state_has_a_wire_value():
    assert set(convert.FINISH_REASONS) == set(FinishReason)
    assert set(convert.MODEL_STATES) == set(ModelState)
    named = {generate_pb.FinishReason.Name(v) for v in convert.FINISH_REASONS.values()}
    assert named == {f"FINISH_REASON_{r.name}" for r in FinishReason}


def test_model_info_and_sources():
    info = ModelInfo(
        model_id="q",
        source=ModelSource(repo_id="acme/q", revision="v2"),
        state=ModelState.LOADING,
        quantization=Quantization(bits=4, group_size=64, mode="affine"),
        loaded_time=None,
    )
    model = convert.model_pb_from_info(info)
    assert model.source.hugging_face == model_pb.HuggingFaceRepo(repo_id="acme/q", revision="v2")
    assert model.state == model_pb.MODEL_STATE_LOADING
    assert model.quantization == model_pb.Quantization(bits=4, group_size=64, mode="affine")
    assert not model.HasField("loaded_time")
    assert convert.model_source(model.source) == info.source
    main = model_pb.ModelSource(hugging_face=model_pb.HuggingFaceRepo(repo_id="acme/q"))
    assert convert.model_source(main) == ModelSource(repo_id="acme/q", revision=None)
    assert convert.model_source(model_pb.ModelSource(local_path="/m")) == ModelSource("/m")


MINIMAL_PAYLOADS = [
    (events.ModelLoaded("m", "/models/m"), "model_loaded"),
    (events.ModelUnloaded("m"), "model_unloaded"),
    (events.ModelInvalidated("m", "engine thread died"), "model_invalidated"),
    (events.GenerationStarted("m", text="hi"), "generation_started"),
    (events.TokenGenerated("m", ""), "token_generated"),  # the empty token: end of sequence
    (events.GenerationCompleted("m", 0, 0.0), "generation_completed"),  # zero tokens is fine
    (events.ErrorOccurred("boom"), "error"),
    (events.RuntimeStatus("ready", 0), "runtime_status"),
]
FULL_PAYLOADS = [
    (
        events.ModelLoaded("m", "/m", "4-bit affine, group 64", 7, (("dtype", "bf16"),)),
        "model_loaded",
    ),
    (events.ModelUnloaded("m", "requested", (("by", "admin"),)), "model_unloaded"),
    (
        events.GenerationStarted("m", messages=(ChatMessage("user", "hi"),), max_tokens=9),
        "generation_started",
    ),
    (events.GenerationStarted("m", token_ids=(1, 2), metadata=(("u", "v"),)), "generation_started"),
    (events.TokenGenerated("m", "lo", 5, -0.25, False, (("u", "v"),)), "token_generated"),
    (
        events.GenerationCompleted("m", 9, 0.5, 18.0, "max_tokens", (("u", "v"),)),
        "generation_completed",
    ),
    (events.ErrorOccurred("boom", "engine_dead", "m", (("k", "v"),)), "error"),
    (events.RuntimeStatus("busy", 2, 5, (("k", "v"),)), "runtime_status"),
]


@pytest.mark.parametrize(("payload", "field"), MINIMAL_PAYLOADS + FULL_PAYLOADS)
def test_every_event_payload_converts_to_a_valid_message(payload, field):
    event = events.Event(payload, model_id="m", request_id="r", time=1700000000.25)
    message = convert.event_pb(event)
    assert message.WhichOneof("payload") == field
    assert message.request_id == "r"
    assert message.time.ToMilliseconds() == 1700000000250
    assert protovalidate.collect_violations(message) == []
    converted = getattr(message, field)
    assert dict(converted.metadata) == dict(payload.metadata)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (events.ModelLoaded("", "/m"), "model_loaded.model"),
        (events.ModelLoaded("m", ""), "model_loaded.model_path"),
        (events.ModelInvalidated("m", ""), "model_invalidated.reason"),
        (events.ModelInvalidated("", "why"), "model_invalidated.model"),
        (events.TokenGenerated("m", "x", logprob=0.5), "token_generated.logprob"),
        (
            events.GenerationCompleted("m", 1, 0.1, throughput=-1.0),
            "generation_completed.throughput",
        ),
        (events.ErrorOccurred(""), "error.error"),
    ],
)
def test_a_payload_breaking_the_seed_rules_is_caught(payload, field):
    message = convert.event_pb(events.Event(payload))
    assert [describe(v)[0] for v in protovalidate.collect_violations(message)] == [field]


def test_the_prompt_of_a_started_generation_keeps_its_kind():
    chat = events.GenerationStarted(
        "m", messages=(ChatMessage("user", "hi"),), add_generation_prompt=False
    )
    message = convert.event_pb(events.Event(chat)).generation_started
    assert message.WhichOneof("prompt") == "chat"
    assert not message.chat.add_generation_prompt and message.chat.messages[0].content == "hi"
    tokens = convert.event_pb(events.Event(events.GenerationStarted("m", token_ids=(4, 5))))
    assert list(tokens.generation_started.tokens.ids) == [4, 5]
    assert not tokens.generation_started.HasField("max_tokens")


def test_event_filters():
    everything = convert.event_filter(events_pb.SubscribeRequest())
    assert everything == (None, None)  # every kind but TokenGenerated, which is opt-in
    kinds, model_ids = convert.event_filter(
        events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_ERROR], model_ids=["a", "b"])
    )
    assert kinds == frozenset({events.ErrorOccurred}) and model_ids == frozenset({"a", "b"})
    defined = set(events_pb.EventType.values()) - {events_pb.EVENT_TYPE_UNSPECIFIED}
    assert set(convert.EVENT_TYPES) == defined


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.ModelAlreadyExists("m"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.ModelNotReady("m", "loading"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ModelLoadFailed("no config.json"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.EngineUnavailable("draining"), grpc.StatusCode.UNAVAILABLE),
        (errors.RequestAborted("unloaded"), grpc.StatusCode.UNAVAILABLE),
        (errors.EngineOverloaded(1.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.InvalidRequest(errors.FieldViolation("f", "d")), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_each_engine_error_has_one_status(error, code):
    status = status_for(error)
    assert status.code is code
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert rich.code == code.value[0] and rich.message == status.details


def test_an_unmapped_engine_error_is_left_to_the_bug_path():
    class NewError(errors.EngineError):
        pass

    assert status_for(NewError("x")) is None
    internal = internal_error("abc")
    assert internal.code is grpc.StatusCode.INTERNAL
    assert internal.details == "internal error (request id abc)"
    rich = status_pb2.Status.FromString(dict(internal.trailing_metadata)["grpc-status-details-bin"])
    (detail,) = rich.details
    info = error_details_pb2.ErrorInfo()
    assert rich.code == code_pb2.INTERNAL and detail.Unpack(info)
    assert info.reason == "INTERNAL" and dict(info.metadata) == {"request_id": "abc"}


def test_ipv6_hosts_are_bracketed():
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("[::]", 0) == "[::]:0"
    assert host_port("127.0.0.1", 7) == "127.0.0.1:7"
