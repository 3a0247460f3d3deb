"""Speculative decoding through the real server, over a socket: pairing with LoadModel, the
pairing on GetModel and ListModels, greedy output unchanged alone and in a mixed batch of 8,
usage, events and the Prometheus counter, and unloading either side of a pair."""

import asyncio
import os
import signal
import time

import grpc
import pytest
import pytest_asyncio
from model_variants import model_variant
from wire_helpers import generate_all, read_rest, reason, rpc_error, wait_for_subscribers

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource, ModelState
from mlx_serving.server.app import ServingApp
from mlx_serving.server.config import load_config, preload_models
from mlx_serving.server.telemetry import TelemetrySettings, make_telemetry
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded: the reference, without a draft
# Prefill as mlx-lm schedules it (see tests/engine/test_speculative.py).
QUIET_PREFILL = {"prefill_pacing": 0} if hasattr(EngineConfig, "prefill_pacing") else {}
PROMPTS = [
    (5, 6, 7, 8, 9, 10),
    (300, 301, 302),
    (42,),
    (7, 7, 7, 7),
    (1000, 20, 30, 40, 50),
    (11, 12),
    (1500, 1501, 1502, 1503),
    (99, 98, 97),
]


@pytest_asyncio.fixture(loop_scope="session")
async def app(model_path):
    telemetry = make_telemetry(TelemetrySettings(enabled=True, prometheus_port=0))
    app = ServingApp(Engine(EngineConfig(**QUIET_PREFILL)), "127.0.0.1", 0, telemetry=telemetry)
    await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
    yield app
    await app.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def stubs(app):
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield (
            model_grpc.ModelServiceStub(channel),
            generate_grpc.GenerateServiceStub(channel),
            events_grpc.EventsServiceStub(channel),
        )


def local(path) -> model_pb.ModelSource:
    return model_pb.ModelSource(local_path=str(path))


def request(model_id: str, prompt: tuple[int, ...], **fields) -> generate_pb.GenerateRequest:
    fields.setdefault("max_tokens", 24)
    fields.setdefault("temperature", 0)
    return generate_pb.GenerateRequest(
        model_id=model_id, tokens=generate_pb.TokenIds(ids=prompt), ignore_eos=True, **fields
    )


async def pair(models, model_path, draft_tokens: int = 3) -> None:
    """ "draft" (the test model again, so every proposal is accepted) drafts for "spec"."""
    await models.LoadModel(model_pb.LoadModelRequest(model_id="draft", source=local(model_path)))
    loaded = await models.LoadModel(
        model_pb.LoadModelRequest(
            model_id="spec",
            source=local(model_path),
            draft_model_id="draft",
            draft_tokens=draft_tokens,
        )
    )
    assert loaded.model.draft_model_id == "draft" and loaded.model.draft_tokens == draft_tokens


async def unload(models, *model_ids: str) -> None:
    for model_id in model_ids:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id=model_id))


async def test_greedy_output_is_unchanged_alone_and_in_a_mixed_batch_of_8(app, stubs, model_path):
    models, generate, events = stubs
    await pair(models, model_path)
    try:
        got = await models.GetModel(model_pb.GetModelRequest(model_id="spec"))
        assert got.model.draft_model_id == "draft" and got.model.draft_tokens == 3
        listed = {
            m.model_id: m for m in (await models.ListModels(model_pb.ListModelsRequest())).models
        }
        assert listed["spec"].draft_model_id == "draft" and not listed[MODEL_ID].draft_model_id

        completed = events.Subscribe(
            events_pb.SubscribeRequest(
                types=[events_pb.EVENT_TYPE_GENERATION_COMPLETED], model_ids=["spec"]
            )
        )
        await wait_for_subscribers(app.engine, 1)
        # Alone.
        _, _, want = await generate_all(generate, request(MODEL_ID, PROMPTS[0]))
        responses, _, tokens = await generate_all(generate, request("spec", PROMPTS[0]))
        assert tokens == want
        usage = responses[-1].usage
        assert usage.draft_tokens_proposed > 0
        assert usage.draft_tokens_accepted == usage.draft_tokens_proposed
        while (found := (await asyncio.wait_for(completed.read(), 5)).event).WhichOneof(
            "payload"
        ) != "generation_completed":
            pass
        event = found.generation_completed
        assert event.draft_tokens_proposed == usage.draft_tokens_proposed
        assert event.draft_acceptance_rate == 1.0

        # A batch of 8: several k, k 0, sampled and penalized requests beside them.
        extras = [
            dict(draft_tokens=4),
            dict(draft_tokens=0),
            dict(draft_tokens=2),
            dict(),
            dict(temperature=0.7, seed=3),
            dict(draft_tokens=1, max_tokens=9),
            dict(presence_penalty=0.5),
            dict(draft_tokens=4, logprobs=True, top_logprobs=2),
        ]
        wanted = await asyncio.gather(
            *(
                generate_all(generate, request(MODEL_ID, p, **x))
                for p, x in zip(PROMPTS, extras, strict=True)
            )
        )
        results = await asyncio.gather(
            *(
                generate_all(generate, request("spec", p, **x))
                for p, x in zip(PROMPTS, extras, strict=True)
            )
        )
        for i, ((_, want_text, want_ids), (_, text, ids)) in enumerate(
            zip(wanted, results, strict=True)
        ):
            if i != 4:  # sampled: the same in distribution (tests/engine/test_speculative.py)
                assert ids == want_ids, i
                assert text == want_text
        usages = [r[0][-1].usage for r in results]
        proposed = [u.draft_tokens_proposed for u in usages]
        assert [p > 0 for p in proposed] == [True, False, True, True, True, True, False, True]
        logprobs = [entry for r in results[7][0] for entry in r.logprobs]
        assert len(logprobs) == len(results[7][2]) == 24

        metric = app.telemetry.metrics.registry.get_sample_value
        counted = {
            outcome: metric("mlx_serving_draft_tokens_total", {"model": "spec", "outcome": outcome})
            for outcome in ("proposed", "accepted")
        }
        assert counted["proposed"] == sum(proposed) + usage.draft_tokens_proposed
        accepted = sum(u.draft_tokens_accepted for u in usages) + usage.draft_tokens_accepted
        assert counted["accepted"] == accepted
        completed.cancel()
    finally:
        await unload(models, "spec", "draft")


async def test_a_pairing_that_cannot_work_is_failed_precondition(stubs, model_path, tmp_path):
    models, _, _ = stubs
    error = await rpc_error(
        models.LoadModel(
            model_pb.LoadModelRequest(
                model_id="spec", source=local(model_path), draft_model_id="nothing"
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing" in error.details() and "load it first" in error.details()

    other = model_variant(model_path, tmp_path / "other-vocabulary", rows=1500)
    await models.LoadModel(model_pb.LoadModelRequest(model_id="draft", source=local(other)))
    try:
        error = await rpc_error(
            models.LoadModel(
                model_pb.LoadModelRequest(
                    model_id="spec", source=local(model_path), draft_model_id="draft"
                )
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason(error) == "MODEL_LOAD_FAILED"
        assert "vocabulary sizes differ" in error.details()
        # The model is not kept.
        listed = [
            m.model_id for m in (await models.ListModels(model_pb.ListModelsRequest())).models
        ]
        assert "spec" not in listed
    finally:
        await unload(models, "draft")


async def test_the_contract_bounds_draft_tokens(stubs):
    models, generate, _ = stubs
    error = await rpc_error(generate.Generate(request(MODEL_ID, (5,), draft_tokens=17)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(
        models.LoadModel(
            model_pb.LoadModelRequest(
                model_id="x", source=local("/nowhere"), draft_model_id="tiny", draft_tokens=0
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unloading_the_draft_lets_requests_finish_without_speculation(stubs, model_path):
    """The pair is dissolved: a request in flight finishes (same tokens, usage counting only
    the drafts made before), and the model is listed without a draft."""
    models, generate, _ = stubs
    await pair(models, model_path, draft_tokens=2)
    try:
        _, _, want = await generate_all(generate, request(MODEL_ID, PROMPTS[1], max_tokens=400))
        call = generate.Generate(request("spec", PROMPTS[1], max_tokens=400))
        first = await call.read()
        await unload(models, "draft")
        rest = await read_rest(call)
        tokens = [t for r in (first, *rest) for t in r.token_ids]
        assert tokens == want
        assert rest[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
        assert rest[-1].usage.draft_tokens_proposed < 400
        got = await models.GetModel(model_pb.GetModelRequest(model_id="spec"))
        assert got.model.draft_model_id == "" and got.model.draft_tokens == 0
    finally:
        await unload(models, "spec")


async def test_unloading_the_model_ends_its_requests_as_ever(stubs, model_path):
    """UNAVAILABLE after a last message, as for any unload; the draft stays loaded."""
    models, generate, _ = stubs
    await pair(models, model_path)
    try:
        call = generate.Generate(request("spec", PROMPTS[2], max_tokens=2000))
        await call.read()
        await unload(models, "spec")
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        got = await models.GetModel(model_pb.GetModelRequest(model_id="draft"))
        assert got.model.state == model_pb.MODEL_STATE_READY
    finally:
        await unload(models, "draft")


async def test_a_draft_loaded_with_the_model(stubs, model_path, tmp_path):
    """draft_source: the draft is loaded first, as "<model_id>-draft", then paired; when the
    pairing fails, neither model is kept."""
    models, generate, _ = stubs
    loaded = await models.LoadModel(
        model_pb.LoadModelRequest(
            model_id="spec", source=local(model_path), draft_source=local(model_path)
        )
    )
    try:
        assert loaded.model.draft_model_id == "spec-draft" and loaded.model.draft_tokens == 4
        listed = {
            m.model_id for m in (await models.ListModels(model_pb.ListModelsRequest())).models
        }
        assert {"spec", "spec-draft"} <= listed
        _, _, want = await generate_all(generate, request(MODEL_ID, PROMPTS[3]))
        responses, _, tokens = await generate_all(generate, request("spec", PROMPTS[3]))
        assert tokens == want and responses[-1].usage.draft_tokens_accepted > 0
    finally:
        await unload(models, "spec", "spec-draft")

    other = model_variant(model_path, tmp_path / "other-vocabulary", rows=1500)
    error = await rpc_error(
        models.LoadModel(
            model_pb.LoadModelRequest(
                model_id="spec", source=local(model_path), draft_source=local(other)
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = {m.model_id for m in (await models.ListModels(model_pb.ListModelsRequest())).models}
    assert not {"spec", "spec-draft"} & listed


async def test_an_engine_restart_pairs_the_models_again(fresh_server, model_path):
    app = await fresh_server(EngineConfig(engine_restart_backoff_seconds=0.1, **QUIET_PREFILL))
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        generate = generate_grpc.GenerateServiceStub(channel)
        await pair(models, model_path)
        died = app.engine.process_id
        assert died is not None
        os.kill(died, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (
            app.engine.alive
            and app.engine.process_id != died
            and all(i.state is ModelState.READY for i in app.engine.list_models())
        ):
            assert time.monotonic() < deadline, "the engine did not come back"
            await asyncio.sleep(0.1)
        got = await models.GetModel(model_pb.GetModelRequest(model_id="spec"))
        assert got.model.draft_model_id == "draft" and got.model.draft_tokens == 3
        responses, _, _ = await generate_all(generate, request("spec", PROMPTS[0]))
        usage = responses[-1].usage
        assert usage.draft_tokens_accepted == usage.draft_tokens_proposed > 0


async def test_the_config_file_pairs_its_models(model_path, tmp_path):
    """A `models` entry's draft_model_id names an entry before it; the server starts with the
    pair made."""
    config_file = tmp_path / "mlx-serving.yaml"
    config_file.write_text(
        "models:\n"
        f"  - {{model_id: small, source: {{local_path: '{model_path}'}}}}\n"
        f"  - {{model_id: big, source: {{local_path: '{model_path}'}}, draft_model_id: small,"
        " draft_tokens: 2}\n"
    )
    models = preload_models(load_config(config_file, {}))
    assert [m[0] for m in models] == ["small", "big"] and models[1][2:] == ("small", 2)
    app = ServingApp(Engine(EngineConfig(**QUIET_PREFILL)), "127.0.0.1", 0)
    try:
        await app.start(models)
        info = app.engine.get_model("big")
        assert (info.draft_model_id, info.draft_tokens) == ("small", 2)
    finally:
        await app.stop(0)
