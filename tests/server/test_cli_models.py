"""`mlx-serving serve --model ORG/NAME` through the Hugging Face cache, offline, and the log lines
of LoadModel and UnloadModel: the real process, no network."""

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_process import STARTUP_SECONDS, child_env, start_server, stop_server

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub(hf_home: Path) -> dict[str, str]:
    """The environment of a child that finds its Hugging Face cache under `hf_home` and never
    reaches the network (HF_HUB_CACHE too, in case the caller's environment sets it)."""
    return {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "1",
    }


def cache_model(hf_home: Path, repo_id: str, model_path: Path) -> None:
    """`repo_id` at `main` in the hub cache's layout, with the files of the model at
    `model_path`: what a `huggingface-cli download` would have left."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in model_path.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def cached_server(model_path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A server started with `--model acme/tiny-hf` (no hf: prefix), found only in the cache."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    cache_model(hf_home, "acme/tiny-hf", model_path)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    # LoadModel reads local models from the test's directories only.
    roots = {"MLX_SERVING_SECURITY_MODEL_ROOTS": str(tmp_path_factory.getbasetemp())}
    process, address = start_server(
        ["--model", "acme/tiny-hf"], log, **offline_hub(hf_home), **roots
    )
    yield address, log
    stop_server(process, log)


@pytest.fixture
def models(cached_server) -> Iterator[model_grpc.ModelServiceStub]:
    with grpc.insecure_channel(cached_server[0]) as channel:
        yield model_grpc.ModelServiceStub(channel)


def logged(cached_server) -> str:
    """The server's log so far: a handler logs before it answers."""
    return cached_server[1].read_text()


def test_a_repo_id_without_hf_prefix_is_served_from_the_cache(cached_server, models):
    (model,) = models.ListModels(model_pb.ListModelsRequest()).models
    assert model.model_id == "tiny-hf"
    assert model.source.hugging_face.repo_id == "acme/tiny-hf"
    with grpc.insecure_channel(cached_server[0]) as channel:
        request = generate_pb.GenerateRequest(model_id="tiny-hf", text="Hi", max_tokens=3)
        responses = list(generate_grpc.GenerateServiceStub(channel).Generate(request))
    assert sum(len(r.token_ids) for r in responses) == 3
    assert re.search(
        r"loaded model tiny-hf from hf:acme/tiny-hf in \d+\.\d s", logged(cached_server)
    )


def test_load_and_unload_are_logged(cached_server, models, model_path):
    source = model_pb.ModelSource(local_path=str(model_path))
    models.LoadModel(model_pb.LoadModelRequest(model_id="second", source=source))
    assert re.search(
        rf"INFO .*loaded model second from {re.escape(str(model_path))} in \d+\.\d s",
        logged(cached_server),
    )
    models.UnloadModel(model_pb.UnloadModelRequest(model_id="second"))
    assert re.search(r"INFO .*unloaded model second in \d+\.\d s", logged(cached_server))


def test_load_and_unload_failures_are_logged_with_their_cause(cached_server, models, tmp_path):
    source = model_pb.ModelSource(local_path=str(tmp_path))
    with pytest.raises(grpc.RpcError):
        models.LoadModel(model_pb.LoadModelRequest(model_id="empty", source=source))
    assert re.search(
        rf"WARNING .*LoadModel empty from {re.escape(str(tmp_path))} failed after \d+\.\d s: "
        r".* is not a model directory \(no config\.json\)",
        logged(cached_server),
    )
    with pytest.raises(grpc.RpcError):
        models.UnloadModel(model_pb.UnloadModelRequest(model_id="absent"))
    assert "UnloadModel absent failed: model 'absent' is not loaded" in logged(cached_server)


def test_an_uncached_repo_says_why_it_could_not_be_downloaded(cached_server, models):
    repo = model_pb.HuggingFaceRepo(repo_id="acme/absent", revision="v2")
    source = model_pb.ModelSource(hugging_face=repo)
    with pytest.raises(grpc.RpcError) as failed:
        models.LoadModel(model_pb.LoadModelRequest(source=source))
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert_says_why(failed.value.details(), "acme/absent@v2")
    assert "LoadModel absent from hf:acme/absent@v2 failed" in logged(cached_server)


def test_serving_an_uncached_repo_offline_exits_1_saying_why(tmp_path):
    command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--port", "0"]
    done = subprocess.run(
        [*command, "--model", "acme/absent"],
        capture_output=True,
        text=True,
        env=child_env(**offline_hub(tmp_path)),
        timeout=STARTUP_SECONDS,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "startup failed" in done.stderr
    assert_says_why(done.stderr, "acme/absent")


def assert_says_why(message: str, name: str) -> None:
    """The cause in huggingface_hub's words (offline mode), not just its exception's class."""
    prefix = f"{name!r} is not in the Hugging Face cache and could not be downloaded: "
    assert prefix in message, message
    cause = message.split(prefix, 1)[1]
    assert "HF_HUB_OFFLINE" in cause and len(cause.split()) > 5, message
