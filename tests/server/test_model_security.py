"""What a client's LoadModel may load (issue 17), through a real server on a loopback port.

The server's policy allows local models under one root and repositories of one organisation;
a test that needs another policy swaps it on the running engine for its own duration. The
test model itself lies outside the root: the operator's models load whatever the policy says.
"""

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import protovalidate
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_variants import model_variant, with_weights_bytes, with_weights_header
from wire_helpers import error_info, rpc_error, violated_fields

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import InvalidRequest
from mlx_serving.engine.models import LoadPolicy, ModelSource
from mlx_serving.engine.sources import check_source_allowed
from mlx_serving.server.app import ServingApp
from mlx_serving.server.cli import make_app
from mlx_serving.server.config import default_model_roots, load_config, load_policy
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # the operator's model, from outside the root
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def inside(root, model_path) -> Path:
    """The test model, copied into the root."""
    return Path(shutil.copytree(model_path, root / "tiny-inside"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app(model_path, root) -> AsyncIterator[ServingApp]:
    policy = LoadPolicy(
        model_roots=(str(root),), hugging_face_organizations=("acme",), max_loaded_models=16
    )
    app = ServingApp(Engine(EngineConfig(), policy=policy), "127.0.0.1", 0)
    try:
        await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
        yield app
    finally:
        await app.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(app) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield channel


@pytest.fixture
def models(channel) -> model_grpc.ModelServiceStub:
    return model_grpc.ModelServiceStub(channel)


@contextlib.contextmanager
def policy(app: ServingApp, **changes):
    """The engine's policy with `changes`, for the block."""
    saved = app.engine.policy
    app.engine.policy = replace(saved, **changes)
    try:
        yield
    finally:
        app.engine.policy = saved


def local(path) -> model_pb.ModelSource:
    return model_pb.ModelSource(local_path=str(path))


def repo(repo_id: str, revision: str = "") -> model_pb.ModelSource:
    return model_pb.ModelSource(
        hugging_face=model_pb.HuggingFaceRepo(repo_id=repo_id, revision=revision)
    )


async def load_error(models, source, model_id="probe") -> grpc.aio.AioRpcError:
    request = model_pb.LoadModelRequest(model_id=model_id, source=source)
    return await rpc_error(models.LoadModel(request, timeout=30))


def assert_refused(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> None:
    assert error.code() is code, error
    assert error_info(error).reason == reason, error


async def listed(models) -> list[str]:
    return [m.model_id for m in (await models.ListModels(model_pb.ListModelsRequest())).models]


async def assert_still_serving(channel, models) -> None:
    """The operator's model generates, health says SERVING, and nothing else was left listed."""
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="Hi", max_tokens=3)
    stub = generate_grpc.GenerateServiceStub(channel)
    responses = [r async for r in stub.Generate(request)]
    assert responses[-1].finish_reason
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert await listed(models) == [MODEL_ID]


# ---- local paths ------------------------------------------------------------------------


async def test_paths_outside_the_roots_are_refused_alike_whether_they_exist_or_not(
    channel, models, root, model_path
):
    escape = root / "escape"
    escape.symlink_to(model_path, target_is_directory=True)
    paths = [
        str(model_path),  # a model, outside
        f"{root}/../{model_path.parent.name}/{model_path.name}",  # the same, through ".."
        f"{root}/../../../../../../../../etc",
        "/etc",
        "/etc/passwd",
        "/proc/self",
        "/proc/self/root/etc",
        str(escape),  # a link in the root to a model outside it
        "/no/such/directory",
        f"{root}/../no-such-directory",
        "~root",
    ]
    templates = set()
    for path in paths:
        error = await load_error(models, local(path))
        assert_refused(error, Code.PERMISSION_DENIED, "MODEL_SOURCE_NOT_ALLOWED")
        templates.add(error.details().replace(repr(path), "<path>"))
    assert templates == {"<path> is not in a directory this server loads models from"}
    await assert_still_serving(channel, models)


async def test_a_model_directory_with_a_link_to_a_file_outside_is_refused(
    channel, models, root, model_path
):
    linked = Path(shutil.copytree(model_path, root / "linked-file"))
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(model_path / "tokenizer.json")
    error = await load_error(models, local(linked))
    assert_refused(error, Code.PERMISSION_DENIED, "MODEL_SOURCE_NOT_ALLOWED")
    await assert_still_serving(channel, models)


async def test_inside_the_roots_a_missing_path_is_not_found(models, root):
    error = await load_error(models, local(root / "absent"))
    assert_refused(error, Code.NOT_FOUND, "MODEL_SOURCE_NOT_FOUND")


async def test_a_model_inside_the_roots_loads_through_a_link_there_too(models, root, inside):
    link = root / "link-to-inside"
    link.symlink_to(inside, target_is_directory=True)
    for model_id, path in (("direct", inside), ("linked", link)):
        request = model_pb.LoadModelRequest(model_id=model_id, source=local(path))
        loaded = (await models.LoadModel(request)).model
        assert loaded.state == model_pb.MODEL_STATE_READY and loaded.source == local(path)
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id=model_id))


# ---- a model's own code -----------------------------------------------------------------


async def test_a_model_that_asks_to_run_its_own_code_is_refused(
    app, channel, models, root, model_path
):
    marker = root / "code-ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    variants = {
        "auto-map": model_variant(
            model_path, root / "auto-map", config={"auto_map": {"AutoModel": "modeling.Model"}}
        ),
        "model-file": model_variant(model_path, root / "model-file", config={"model_file": "x.py"}),
        "tokenizer-code": Path(shutil.copytree(model_path, root / "tokenizer-code")),
    }
    (variants["model-file"] / "x.py").write_text(code)
    tokenizer_config = variants["tokenizer-code"] / "tokenizer_config.json"
    tokenizer_config.write_text(
        tokenizer_config.read_text().replace(
            "{", '{"auto_map": {"AutoTokenizer": ["t.T", null]},', 1
        )
    )
    for path in variants.values():
        error = await load_error(models, local(path))
        assert_refused(error, Code.PERMISSION_DENIED, "REMOTE_CODE_NOT_ALLOWED")
    await assert_still_serving(channel, models)
    # Trusted, a model with an auto_map loads, built by mlx-lm without its code; one that needs
    # its code to build (model_file) still fails, and its code never ran.
    with policy(app, trust_remote_code=True):
        request = model_pb.LoadModelRequest(model_id="mapped", source=local(variants["auto-map"]))
        assert (await models.LoadModel(request)).model.state == model_pb.MODEL_STATE_READY
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="mapped"))
        error = await load_error(models, local(variants["model-file"]))
        assert_refused(error, Code.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
        assert "x.py" not in error.details()
    assert not marker.exists()
    await assert_still_serving(channel, models)


# ---- hostile files ----------------------------------------------------------------------


def shift_past_the_end(header: dict) -> None:
    start, stop = header["lm_head.weight"]["data_offsets"]
    header["lm_head.weight"]["data_offsets"] = [start + (1 << 40), stop + (1 << 40)]


def overlap(header: dict) -> None:
    first = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = list(first)


def wrong_shape(header: dict) -> None:
    header["model.norm.weight"]["shape"] = [4096]


def unknown_dtype(header: dict) -> None:
    header["model.norm.weight"]["dtype"] = "F128"


def huge_length(data: bytes) -> bytes:
    return (len(data) * 4).to_bytes(8, "little") + data[8:]


def garbage_header(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    return data[:8] + b"\xff" * length + data[8 + length :]


HOSTILE_HEADERS = {"past-end": shift_past_the_end, "overlap": overlap, "shape": wrong_shape}
HOSTILE_HEADERS["dtype"] = unknown_dtype
HOSTILE_BYTES = {
    "truncated": lambda data: data[: len(data) // 2],
    "length": huge_length,
    "garbage": garbage_header,
    "stub": lambda data: data[:5],
}


@pytest.mark.parametrize("name", [*HOSTILE_HEADERS, *HOSTILE_BYTES])
async def test_weights_whose_header_lies_fail_the_load_and_the_server_serves_on(
    channel, models, root, model_path, name
):
    target = root / f"hostile-{name}"
    if name in HOSTILE_HEADERS:
        hostile = with_weights_header(model_path, target, HOSTILE_HEADERS[name])
    else:
        hostile = with_weights_bytes(model_path, target, HOSTILE_BYTES[name])
    error = await load_error(models, local(hostile))
    assert_refused(error, Code.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "model.safetensors" in error.details() and "not a sound safetensors" in error.details()
    await assert_still_serving(channel, models)


async def test_an_unknown_architecture_fails_without_echoing_the_config(
    channel, models, root, model_path
):
    secret = "arch-named-from-a-secret-file-4242"
    unknown = model_variant(model_path, root / "unknown-arch", config={"model_type": secret})
    error = await load_error(models, local(unknown))
    assert_refused(error, Code.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "unsupported architecture" in error.details()
    assert secret not in error.details()
    await assert_still_serving(channel, models)


async def test_a_config_that_is_not_a_json_object_fails_without_echoing_it(
    channel, models, root, model_path
):
    broken = Path(shutil.copytree(model_path, root / "not-json"))
    (broken / "config.json").write_text('["secret-list-value-77"]')
    error = await load_error(models, local(broken))
    assert_refused(error, Code.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "secret-list-value-77" not in error.details()
    await assert_still_serving(channel, models)


# ---- Hugging Face -----------------------------------------------------------------------


async def test_repositories_outside_the_listed_organisations_are_refused_offline(app, models):
    for repo_id in ("evil/tiny", "tiny", "acmeX/tiny"):
        error = await load_error(models, repo(repo_id))
        assert_refused(error, Code.PERMISSION_DENIED, "MODEL_SOURCE_NOT_ALLOWED")
    with policy(app, allow_hugging_face=False):
        error = await load_error(models, repo("acme/tiny"))
        assert_refused(error, Code.PERMISSION_DENIED, "MODEL_SOURCE_NOT_ALLOWED")
        assert "Hugging Face" in error.details()


@pytest.mark.parametrize(
    "revision", ["../../etc", "..", "a/../b", "/abs", "a//b", ".hidden", "main/", "a b"]
)
async def test_a_revision_that_walks_is_refused_by_the_contract(models, revision):
    error = await load_error(models, repo("acme/tiny", revision))
    assert violated_fields(error) == ["source.hugging_face.revision"]


@pytest.mark.parametrize("revision", ["", "main", "v1.0", "refs/pr/3", "a" * 40, "feature_x-1"])
async def test_branches_tags_and_commits_keep_the_contract(revision):
    request = model_pb.HuggingFaceRepo(repo_id="acme/tiny", revision=revision)
    assert not protovalidate.collect_violations(request)


async def test_the_engine_checks_the_revision_itself():
    with pytest.raises(InvalidRequest, match="revision"):
        check_source_allowed(ModelSource(repo_id="acme/x", revision="../x"), LoadPolicy())


# ---- caps -------------------------------------------------------------------------------


async def test_a_load_past_max_loaded_models_is_resource_exhausted(app, channel, models, inside):
    with policy(app, max_loaded_models=1):
        error = await load_error(models, local(inside))
        assert_refused(error, Code.RESOURCE_EXHAUSTED, "MODEL_CAP_REACHED")
        assert "max_loaded_models" in error.details()
    await assert_still_serving(channel, models)


async def test_a_load_past_max_loaded_bytes_is_refused_before_its_weights_are_read(
    app, channel, models, inside
):
    (held,) = (await models.ListModels(model_pb.ListModelsRequest())).models
    size = held.weight_bytes  # the copy inside the root is the same model
    with policy(app, max_loaded_bytes=held.weight_bytes + size - 1):
        error = await load_error(models, local(inside))
        assert_refused(error, Code.RESOURCE_EXHAUSTED, "MODEL_CAP_REACHED")
        assert "max_loaded_bytes" in error.details()
    await assert_still_serving(channel, models)
    with policy(app, max_loaded_bytes=held.weight_bytes + size):
        request = model_pb.LoadModelRequest(model_id="fits", source=local(inside))
        assert (await models.LoadModel(request)).model.weight_bytes == size
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="fits"))


# ---- the same load twice ----------------------------------------------------------------


async def test_loading_the_same_model_again_returns_it(models, inside, model_path):
    request = model_pb.LoadModelRequest(model_id="again", source=local(inside))
    first = (await models.LoadModel(request)).model
    try:
        assert (await models.LoadModel(request)).model == first
        for other in (local(model_path), repo("acme/other")):
            error = await load_error(models, other, model_id="again")
            assert_refused(error, Code.ALREADY_EXISTS, "MODEL_ALREADY_LOADED")
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="again"))
    # The operator's model from its own source, though outside the roots: the model there.
    same = model_pb.LoadModelRequest(model_id=MODEL_ID, source=local(model_path))
    assert (await models.LoadModel(same)).model.model_id == MODEL_ID


async def test_two_identical_loads_at_once_share_one_load(channel, models, inside):
    subscription = events_pb.SubscribeRequest(
        types=[events_pb.EVENT_TYPE_MODEL_LOADED, events_pb.EVENT_TYPE_MODEL_UNLOADED],
        model_ids=["pair"],
    )
    events = events_grpc.EventsServiceStub(channel).Subscribe(subscription)
    await asyncio.sleep(0.1)  # subscribed before the loads
    request = model_pb.LoadModelRequest(model_id="pair", source=local(inside))
    first, second = await asyncio.gather(models.LoadModel(request), models.LoadModel(request))
    assert first.model == second.model and first.model.state == model_pb.MODEL_STATE_READY
    await models.UnloadModel(model_pb.UnloadModelRequest(model_id="pair"))
    kinds = []
    while (response := await events.read()) is not grpc.aio.EOF:
        kinds.append(response.event.WhichOneof("payload"))
        if kinds[-1] == "model_unloaded":
            break
    events.cancel()
    assert kinds == ["model_loaded", "model_unloaded"]


# ---- loading off ------------------------------------------------------------------------


async def test_with_loading_off_load_and_unload_are_refused(app, channel, models, inside):
    with policy(app, allow_loading=False):
        error = await load_error(models, local(inside))
        assert_refused(error, Code.PERMISSION_DENIED, "LOADING_DISABLED")
        unload = models.UnloadModel(model_pb.UnloadModelRequest(model_id=MODEL_ID))
        assert_refused(await rpc_error(unload), Code.PERMISSION_DENIED, "LOADING_DISABLED")
        await assert_still_serving(channel, models)


# ---- the configuration ------------------------------------------------------------------


async def test_the_configured_policy_is_the_servers(tmp_path):
    security = {
        "allow_loading": False,
        "model_roots": [str(tmp_path)],
        "allow_hugging_face": False,
        "hugging_face_organizations": ["acme"],
        "trust_remote_code": True,
        "max_loaded_models": 2,
        "max_loaded_bytes": 1 << 30,
    }
    config = load_config(overrides={"security": security})
    expected = LoadPolicy(
        allow_loading=False,
        model_roots=(str(tmp_path),),
        allow_hugging_face=False,
        hugging_face_organizations=("acme",),
        trust_remote_code=True,
        max_loaded_models=2,
        max_loaded_bytes=1 << 30,
    )
    assert load_policy(config) == expected
    assert make_app(config).engine.policy == expected


async def test_by_default_only_the_caches_and_no_code():
    default = load_policy(load_config())
    assert default.allow_loading and default.allow_hugging_face
    assert default.model_roots == tuple(str(root) for root in default_model_roots())
    assert not default.trust_remote_code and not default.hugging_face_organizations
    assert default.max_loaded_models == 16 and default.max_loaded_bytes == 0
