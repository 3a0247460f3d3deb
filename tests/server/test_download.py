"""`mlx-serving download` and `mlx-serving models`, and LoadModel by repository id, against a
stand-in hub on 127.0.0.1 (tests/hub_server.py): huggingface_hub's real download code, no
network. Every command runs as a child process, so that HF_* variables count as they do for a
user."""

import hashlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hub_server import FakeHub, Faults, model_files
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
from server_process import child_env, start_server, stop_server

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

REPO = "acme/tiny"
WEIGHTS = "model.safetensors"
# In the repository, and not what an MLX model needs.
EXTRAS = {
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "modeling_tiny.py": b"raise SystemExit('not ours to run')\n",
    "original/consolidated.safetensors": b"\0" * 64,
    "onnx/model.onnx": b"\1" * 64,
}
COMMAND_SECONDS = 60


@pytest.fixture(scope="module")
def hub(model_path) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add(REPO, {**model_files(model_path), **EXTRAS}, refs=("main", "v1"))
        hub.add("acme/notes", {"README.md": b"notes\n", "config.json": b"{}"})
        yield hub


@pytest.fixture(autouse=True)
def no_faults(hub) -> None:
    hub.faults = Faults()


def hub_env(hf_home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A child's environment: its cache under `hf_home`, the hub at `endpoint`, none of this
    machine's HF_* settings."""
    env = {k: v for k, v in child_env().items() if not k.startswith("HF_")}
    return {
        **env,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_serving.server.cli", *args]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)


def repo_dir(hf_home: Path, repo_id: str = REPO) -> Path:
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def dead_endpoint() -> str:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def downloaded(hub, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`mlx-serving download acme/tiny` once, into a cache of its own."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    return hf_home, run(hub_env(hf_home, hub.endpoint), "download", REPO)


def test_download_prints_the_path_and_fetches_only_the_model_files(downloaded, model_path):
    hf_home, done = downloaded
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert done.stdout == f"{path}\n"
    assert path.parent == repo_dir(hf_home) / "snapshots"
    wanted = model_files(model_path)
    assert {file.name for file in path.rglob("*")} == set(wanted)
    assert all((path / name).read_bytes() == data for name, data in wanted.items())
    # huggingface_hub's progress bars, on stderr.
    assert "100%" in done.stderr and WEIGHTS in done.stderr


def test_a_download_cut_off_goes_on_from_where_it_stopped(hub, model_path, tmp_path):
    """The first run is killed with most of the weights sent; the second asks for the rest."""
    weights = (model_path / WEIGHTS).read_bytes()
    partial = repo_dir(tmp_path) / "blobs" / f"{sha256(weights)}.incomplete"
    env = hub_env(tmp_path, hub.endpoint)
    hub.faults.hold_after[WEIGHTS] = len(weights) - 4096
    pipe = subprocess.PIPE
    first = subprocess.Popen(cli("download", REPO), env=env, stdout=pipe, stderr=pipe)
    try:  # huggingface_hub writes in chunks of 10 MB: the first is on disk
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0)
    finally:
        first.kill()
        first.communicate()
    hub.faults.released.set()
    kept = partial.stat().st_size
    assert not partial.with_suffix("").exists()  # no blob: part of a file is no file
    seen = len(hub.requests)

    done = run(env, "download", REPO)

    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / WEIGHTS).read_bytes() == weights
    (get,) = hub.gets(WEIGHTS, since=seen)
    assert get.range == f"bytes={kept}-"
    assert get.bytes_sent == len(weights) - kept
    assert not partial.exists()


def test_a_dropped_connection_resumes_in_the_same_run(hub, model_path, tmp_path):
    """Dropped after the first chunk huggingface_hub writes and a little more: the run goes on
    from the chunk's end."""
    weights = (model_path / WEIGHTS).read_bytes()
    hub.faults.drop_after[WEIGHTS] = DOWNLOAD_CHUNK_SIZE + 1000
    seen = len(hub.requests)

    done = run(hub_env(tmp_path, hub.endpoint), "download", REPO)

    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / WEIGHTS).read_bytes() == weights
    first, second = hub.gets(WEIGHTS, since=seen)
    assert first.range is None
    assert second.range == f"bytes={DOWNLOAD_CHUNK_SIZE}-"
    assert second.bytes_sent == len(weights) - DOWNLOAD_CHUNK_SIZE


def test_bytes_that_fail_their_checksum_are_refused_and_not_kept(hub, model_path, tmp_path):
    weights = (model_path / WEIGHTS).read_bytes()
    hub.faults.corrupt.add(WEIGHTS)

    done = run(hub_env(tmp_path, hub.endpoint), "download", REPO)

    assert done.returncode == 1
    assert done.stdout == ""
    assert f"the bytes received for {WEIGHTS} do not match the checksum (sha256)" in done.stderr
    blobs = repo_dir(tmp_path) / "blobs"
    assert not (blobs / sha256(weights)).exists()
    assert not list(blobs.glob("*.incomplete"))
    assert not list(repo_dir(tmp_path).glob(f"snapshots/*/{WEIGHTS}"))


@pytest.mark.parametrize(
    ("repo", "endpoint", "message"),
    [
        ("acme/absent", None, "there is no repository 'acme/absent' on http://127.0.0.1:"),
        ("acme/tiny@v9", None, "'acme/tiny' has no revision 'v9' (no such branch, tag or commit)"),
        (REPO, "dead", "cannot reach http://127.0.0.1:"),
        ("acme/notes", None, "'acme/notes' has no model*.safetensors weights"),
    ],
    ids=["missing-repo", "missing-revision", "network-down", "not-a-model"],
)
def test_a_repo_that_cannot_be_had_says_why(hub, tmp_path, repo, endpoint, message):
    endpoint = dead_endpoint() if endpoint == "dead" else hub.endpoint
    done = run(hub_env(tmp_path, endpoint), "download", repo)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("mlx-serving download: "), done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Error:" not in done.stderr


def test_offline_or_unreachable_the_cached_model_is_found_and_nothing_else(downloaded):
    hf_home, first = downloaded
    env = hub_env(hf_home, dead_endpoint(), HF_HUB_OFFLINE="1")
    done = run(env, "download", REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == first.stdout
    unreachable = run({**env, "HF_HUB_OFFLINE": "0"}, "download", REPO)
    assert (unreachable.returncode, unreachable.stdout) == (0, first.stdout)
    assert "cannot reach http://127.0.0.1:" in unreachable.stderr
    assert "using the cached copy of 'acme/tiny'" in unreachable.stderr
    absent = run(env, "download", "acme/absent")
    assert absent.returncode == 1
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded, and 'acme/absent' is not in" in (
        absent.stderr
    )


def test_models_lists_the_cached_mlx_models(downloaded, model_path):
    hf_home, _ = downloaded
    quantized = repo_dir(hf_home, "acme/tiny-4bit") / "snapshots" / ("0" * 40)
    quantized.mkdir(parents=True)
    config = '{"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}}'
    (quantized / "config.json").write_text(config)
    (quantized / WEIGHTS).write_bytes(b"\0" * 2048)
    (repo_dir(hf_home, "acme/tiny-4bit") / "refs").mkdir()
    (repo_dir(hf_home, "acme/tiny-4bit") / "refs" / "v2").write_text("0" * 40)
    notes = repo_dir(hf_home, "acme/notes") / "snapshots" / ("1" * 40)  # no weights: no model
    notes.mkdir(parents=True)
    (notes / "config.json").write_text('{"model_type": "llama"}')

    done = run(hub_env(hf_home, dead_endpoint()), "models")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert re.fullmatch(r"acme/tiny +main  +1[34]\.\dM  float32", lines[0]), lines
    assert re.fullmatch(r"acme/tiny-4bit  v2  +2\.\dK  +4-bit, group size 64", lines[1]), lines


def test_models_with_an_empty_cache_says_so_on_stderr(tmp_path):
    done = run(hub_env(tmp_path, dead_endpoint()), "models")
    assert (done.returncode, done.stdout) == (0, "")
    assert "no MLX models in the Hugging Face cache" in done.stderr


def test_load_model_by_repo_id_downloads_with_the_same_code_and_generates(hub, tmp_path):
    """The server downloads acme/tiny at startup (--model), then a client's LoadModel of
    acme/tiny@v1, the same commit, finds the weights in the cache and fetches nothing twice."""
    seen = len(hub.requests)
    env = hub_env(tmp_path, hub.endpoint)
    env = {key: value for key, value in env.items() if key.startswith("HF_")}
    log = tmp_path / "server.log"
    process, address = start_server(["--model", f"tiny={REPO}"], log, **env)
    try:
        with grpc.insecure_channel(address) as channel:
            repo = model_pb.HuggingFaceRepo(repo_id=REPO, revision="v1")
            request = model_pb.LoadModelRequest(
                model_id="tiny-v1", source=model_pb.ModelSource(hugging_face=repo)
            )
            model_grpc.ModelServiceStub(channel).LoadModel(request)
            ask = generate_pb.GenerateRequest(model_id="tiny-v1", text="Hi", max_tokens=3)
            responses = generate_grpc.GenerateServiceStub(channel).Generate(ask)
            assert sum(len(r.token_ids) for r in responses) == 3
    finally:
        stop_server(process, log)
    assert len(hub.gets(WEIGHTS, since=seen)) == 1
    assert not any("README" in r.path or r.path.endswith(".py") for r in hub.requests[seen:])
