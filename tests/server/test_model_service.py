import json

import grpc
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from model_variants import with_generation_config
from wire_helpers import rpc_error, violated_fields

from mlx_serving.server.default_model import DEFAULT_MODEL_NAME, IM_END, PAD_TOKEN
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import model_service_pb2 as model_pb

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture


def local(path) -> model_pb.ModelSource:
    return model_pb.ModelSource(local_path=str(path))


async def test_list_models_describes_the_preloaded_model(models, model_path):
    (model,) = (await models.ListModels(model_pb.ListModelsRequest())).models
    assert model.model_id == MODEL_ID
    assert model.source == local(model_path)
    assert model.state == model_pb.MODEL_STATE_READY
    assert model.architecture == "llama" and model.dtype == "float32"
    assert model.context_length == 2048 and model.vocab_size == 2048
    assert model.parameter_count > 1_000_000 and model.has_chat_template
    assert not model.HasField("quantization")
    assert model.loaded_time.seconds > 0
    assert model.weight_bytes == model.weight_bytes_loaded >= 4 * model.parameter_count


async def test_get_model_is_the_listed_model(models):
    listed = (await models.ListModels(model_pb.ListModelsRequest())).models[0]
    got = await models.GetModel(model_pb.GetModelRequest(model_id=MODEL_ID))
    assert got.model == listed


async def test_get_an_unknown_model_is_not_found(models):
    error = await rpc_error(models.GetModel(model_pb.GetModelRequest(model_id="absent")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "absent" in error.details()


async def test_load_get_list_unload_then_get_is_not_found(models, model_path):
    loaded = await models.LoadModel(
        model_pb.LoadModelRequest(model_id="second", source=local(model_path))
    )
    assert loaded.model.model_id == "second"
    assert loaded.model.state == model_pb.MODEL_STATE_READY
    assert loaded.model.source == local(model_path)
    got = await models.GetModel(model_pb.GetModelRequest(model_id="second"))
    assert got.model == loaded.model
    listed = (await models.ListModels(model_pb.ListModelsRequest())).models
    assert [m.model_id for m in listed] == [MODEL_ID, "second"]
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id="second"))
    error = await rpc_error(models.GetModel(model_pb.GetModelRequest(model_id="second")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    again = await rpc_error(models.UnloadModel(model_pb.UnloadModelRequest(model_id="second")))
    assert again.code() is grpc.StatusCode.NOT_FOUND


async def test_an_empty_model_id_is_derived_from_the_directory(models, model_path):
    loaded = await models.LoadModel(model_pb.LoadModelRequest(source=local(model_path)))
    assert loaded.model.model_id == model_path.name == DEFAULT_MODEL_NAME
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id=DEFAULT_MODEL_NAME))


async def test_loading_a_loaded_model_id_from_another_source_is_already_exists(
    models, model_path, tmp_path
):
    request = model_pb.LoadModelRequest(model_id=MODEL_ID, source=local(tmp_path))
    error = await rpc_error(models.LoadModel(request))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert MODEL_ID in error.details()
    # From its own source it is the model there (tests/server/test_model_security.py).
    same = model_pb.LoadModelRequest(model_id=MODEL_ID, source=local(model_path))
    assert (await models.LoadModel(same)).model.model_id == MODEL_ID


async def test_loading_a_missing_directory_is_not_found_and_keeps_nothing(models, tmp_path):
    request = model_pb.LoadModelRequest(model_id="ghost", source=local(tmp_path / "missing"))
    error = await rpc_error(models.LoadModel(request))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "missing" in error.details()
    listed = (await models.ListModels(model_pb.ListModelsRequest())).models
    assert [m.model_id for m in listed] == [MODEL_ID]


async def test_loading_a_broken_model_directory_fails_precondition(models, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    request = model_pb.LoadModelRequest(model_id="broken", source=local(tmp_path))
    error = await rpc_error(models.LoadModel(request))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot load" in error.details()
    listed = (await models.ListModels(model_pb.ListModelsRequest())).models
    assert [m.model_id for m in listed] == [MODEL_ID]


async def test_a_hugging_face_repo_missing_from_an_offline_cache_is_not_found(
    models, monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = model_pb.HuggingFaceRepo(repo_id="acme/absent", revision="main")
    request = model_pb.LoadModelRequest(source=model_pb.ModelSource(hugging_face=repo))
    error = await rpc_error(models.LoadModel(request))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "acme/absent" in error.details()


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (model_pb.LoadModelRequest(), ["source"]),
        (model_pb.LoadModelRequest(source=model_pb.ModelSource()), ["source.kind"]),
        (model_pb.LoadModelRequest(source=local("")), ["source.local_path"]),
        (model_pb.LoadModelRequest(model_id="-bad", source=local("/x")), ["model_id"]),
        (
            model_pb.LoadModelRequest(
                model_id="a/b",
                source=model_pb.ModelSource(
                    hugging_face=model_pb.HuggingFaceRepo(repo_id="not a repo")
                ),
            ),
            ["model_id", "source.hugging_face.repo_id"],
        ),
    ],
)
async def test_load_model_violations_are_named(models, request_, fields):
    assert violated_fields(await rpc_error(models.LoadModel(request_))) == fields


async def test_get_and_unload_need_a_model_id(models):
    for call in (
        models.GetModel(model_pb.GetModelRequest()),
        models.UnloadModel(model_pb.UnloadModelRequest(model_id="x" * 129)),
    ):
        assert violated_fields(await rpc_error(call)) == ["model_id"]


async def test_a_loading_model_is_listed_and_refuses_work_until_ready(models, generate, model_path):
    loading = models.LoadModel(model_pb.LoadModelRequest(model_id="slow", source=local(model_path)))
    states = set()
    while not loading.done():
        try:
            got = await models.GetModel(model_pb.GetModelRequest(model_id="slow"))
        except grpc.aio.AioRpcError:
            continue  # not registered yet
        states.add(got.model.state)
        if got.model.state == model_pb.MODEL_STATE_LOADING:
            request = generate_pb.GenerateRequest(model_id="slow", text="hi", max_tokens=1)
            error = await rpc_error(generate.Generate(request))
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "loading" in error.details()
            break
    assert (await loading).model.state == model_pb.MODEL_STATE_READY
    assert model_pb.MODEL_STATE_LOADING in states
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id="slow"))


async def test_unloading_ends_its_generations_with_unavailable(models, generate, model_path):
    await models.LoadModel(model_pb.LoadModelRequest(model_id="victim", source=local(model_path)))
    stream = generate.Generate(
        generate_pb.GenerateRequest(model_id="victim", text="hi", max_tokens=100_000)
    )
    await stream.read()
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id="victim"))
    error = await rpc_error(stream)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "unloaded" in error.details()


async def test_a_model_tells_its_eos_and_bos_ids_and_generation_defaults(models, model_path):
    tokenizer = load_tokenizer(model_path)
    model = (await models.GetModel(model_pb.GetModelRequest(model_id=MODEL_ID))).model
    assert list(model.eos_token_ids) == sorted(tokenizer.eos_token_ids)
    assert model.HasField("bos_token_id") and model.bos_token_id == tokenizer.bos_token_id
    # The test model's generation_config.json (default_model.py).
    assert model.generation_defaults == model_pb.GenerationDefaults(
        temperature=0.7, top_p=0.9, top_k=40
    )


async def test_generation_defaults_are_read_from_generation_config_json(
    models, model_path, tmp_path
):
    tokenizer = load_tokenizer(model_path)
    ends = sorted(
        {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)}
    )
    settings = {
        "temperature": 0.6,
        "top_p": 0.95,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "max_new_tokens": 512,
        "top_k": "forty",  # of the wrong type: left out
        "eos_token_id": ends,  # a list is fine; generation stops on each
    }
    variant = with_generation_config(model_path, tmp_path / "tuned", json.dumps(settings))
    loaded = await models.LoadModel(
        model_pb.LoadModelRequest(model_id="tuned", source=local(variant))
    )
    try:
        assert loaded.model.generation_defaults == model_pb.GenerationDefaults(
            temperature=0.6, top_p=0.95, min_p=0.05, repetition_penalty=1.05, max_new_tokens=512
        )
        assert list(loaded.model.eos_token_ids) == ends
        got = await models.GetModel(model_pb.GetModelRequest(model_id="tuned"))
        assert got.model == loaded.model
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="tuned"))


@pytest.mark.parametrize("text", ["{not json", "", '{"temperature": true, "top_k": -1}'])
async def test_a_malformed_generation_config_gives_no_defaults_and_the_model_loads(
    models, model_path, tmp_path, text
):
    variant = with_generation_config(model_path, tmp_path / "odd", text)
    loaded = await models.LoadModel(
        model_pb.LoadModelRequest(model_id="odd", source=local(variant))
    )
    try:
        assert loaded.model.state == model_pb.MODEL_STATE_READY
        assert not loaded.model.HasField("generation_defaults")
        tokenizer = load_tokenizer(variant)
        assert list(loaded.model.eos_token_ids) == sorted(tokenizer.eos_token_ids)
        assert loaded.model.bos_token_id == tokenizer.bos_token_id
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="odd"))
