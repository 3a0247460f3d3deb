"""`mlx-serving serve`: argument parsing, and the real process from start to SIGTERM."""

import argparse
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import STARTUP_SECONDS, child_env, start_server, stop_server

from mlx_serving.engine.models import ModelSource
from mlx_serving.server.cli import make_parser, parse_model_spec
from mlx_serving.server.default_model import DEFAULT_MODEL_NAME
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc


@pytest.fixture
def in_a_directory_of_models(tmp_path, monkeypatch):
    """The working directory holds models/llama and a=b/model: paths that exist."""
    for name in ("models/llama", "a=b/model"):
        (tmp_path / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("models/llama", ("", ModelSource(local_path="models/llama"))),
        ("chat=models/llama", ("chat", ModelSource(local_path="models/llama"))),
        ("./a=b/model", ("", ModelSource(local_path="./a=b/model"))),
        ("hf:acme/tiny", ("", ModelSource(repo_id="acme/tiny"))),
        ("hf:acme/tiny@v1.0", ("", ModelSource(repo_id="acme/tiny", revision="v1.0"))),
        ("t:1=hf:acme/tiny@main", ("t:1", ModelSource(repo_id="acme/tiny", revision="main"))),
        # No such path: ORG/NAME is a repository, as mlx-lm reads it.
        ("acme/tiny", ("", ModelSource(repo_id="acme/tiny"))),
        ("c=acme/tiny@refs/pr/1", ("c", ModelSource(repo_id="acme/tiny", revision="refs/pr/1"))),
        ("hf:models/llama", ("", ModelSource(repo_id="models/llama"))),
    ],
)
def test_model_specs(spec, expected, in_a_directory_of_models):
    assert parse_model_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("", "source.local_path"),
        ("hf:not a repo", "source.hugging_face.repo_id"),
        (("x" * 129) + "=models/llama", "model_id"),
    ],
)
def test_bad_model_specs_name_the_contract_field(spec, field, in_a_directory_of_models):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(field)):
        parse_model_spec(spec)


@pytest.mark.parametrize("spec", ["/models/absent", "absent", "chat=./acme/tiny", "a/b/c"])
def test_neither_a_path_nor_a_repo_id_says_both_were_tried(spec, in_a_directory_of_models):
    with pytest.raises(argparse.ArgumentTypeError, match="no existing path, nor a Hugging Face"):
        parse_model_spec(spec)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_serving.server.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=child_env(**env), timeout=STARTUP_SECONDS
    )


def test_version_prints_the_installed_version():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mlx-serving {importlib.metadata.version('mlx-serving')}\n"


def test_defaults_and_bad_arguments(capsys):
    args = make_parser().parse_args(["serve"])
    assert (args.host, args.port, args.models, args.log_level) == ("127.0.0.1", 50051, [], "info")
    assert args.shutdown_grace == 10.0
    for bad in (["serve", "--port", "70000"], ["serve", "--model", "hf:bad repo"], []):
        with pytest.raises(SystemExit) as exited:
            make_parser().parse_args(bad)
        assert exited.value.code == 2
    assert "hf:bad repo" in capsys.readouterr().err


def test_serve_generates_and_exits_0_on_sigterm(model_path, tmp_path):
    log = tmp_path / "server.log"
    args = ["--model", f"tiny={model_path}", "--log-level", "info", "--max-batch-size", "4"]
    process, address = start_server(args, log)
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            request = generate_pb.GenerateRequest(
                model_id="tiny", text="Hello", max_tokens=4, temperature=0
            )
            responses = list(generate_grpc.GenerateServiceStub(channel).Generate(request))
            assert sum(len(r.token_ids) for r in responses) == 4
            assert responses[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
    finally:
        stop_server(process, log)
    assert "shutting down" in log.read_text()
    # One line: where, what, on which device, how it batches.
    assert process.startup_line == (
        f"mlx-serving listening on {address}: serving tiny on cpu: max batch size 4, "
        "prefill batch size 8, max queued requests 256"
    )


def test_ctrl_c_to_the_process_group_lets_a_stream_finish(model_path, tmp_path):
    """A terminal's Ctrl-C reaches the engine process too; the stream must still complete."""
    log = tmp_path / "server.log"
    process, address = start_server(["--model", f"tiny={model_path}"], log)
    try:
        with grpc.insecure_channel(address) as channel:
            request = generate_pb.GenerateRequest(
                model_id="tiny", text="Hello", max_tokens=64, temperature=0, ignore_eos=True
            )
            stream = generate_grpc.GenerateServiceStub(channel).Generate(request)
            responses = [next(stream)]
            os.killpg(process.pid, signal.SIGINT)
            responses += list(stream)
        assert sum(len(r.token_ids) for r in responses) == 64
        assert responses[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM twice", "Ctrl-C twice"],
)
def test_a_second_signal_during_the_drain_exits_at_once(model_path, tmp_path, signum, to_group):
    """SIGTERM to the server alone; Ctrl-C as a terminal sends it, to the whole group. The exit
    status is 128 + the signal's number, as for a process that signal killed."""
    log = tmp_path / "server.log"
    args = ["--model", f"tiny={model_path}", "--shutdown-grace", "600"]
    process, address = start_server(args, log)

    def send() -> None:
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)

    try:
        with grpc.insecure_channel(address) as channel:
            request = generate_pb.GenerateRequest(
                model_id="tiny", text="Hello", max_tokens=2000, temperature=0, ignore_eos=True
            )
            stream = generate_grpc.GenerateServiceStub(channel).Generate(request)
            next(stream)
            send()
            wait_for_line(log, "draining 1 generation(s), up to 600 s; Ctrl-C again to force")
            send()
            forced_at = time.monotonic()
            assert process.wait(timeout=10) == 128 + signum, log.read_text()
            assert time.monotonic() - forced_at < 5
            with pytest.raises(grpc.RpcError) as broken:  # the stream broke off
                list(stream)
            assert broken.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "during the shutdown: exiting now, cutting off 1 generation(s)" in log.read_text()
        wait_until_gone(process.pid)  # the engine process and the template worker too
    finally:
        if process.poll() is None:
            process.kill()


def wait_for_line(log, text: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log.read_text()}"
        time.sleep(0.02)


def wait_until_gone(process_group: int, seconds: float = 10) -> None:
    """Every process of the group has exited."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(process_group, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "processes of the server's group are left"
        time.sleep(0.05)


def test_serve_without_models_loads_the_built_in_model(tmp_path):
    log = tmp_path / "server.log"
    process, address = start_server([], log, MLX_SERVING_CACHE=str(tmp_path / "cache"))
    try:
        with grpc.insecure_channel(address) as channel:
            listed = model_grpc.ModelServiceStub(channel).ListModels(model_pb.ListModelsRequest())
            assert [m.model_id for m in listed.models] == [DEFAULT_MODEL_NAME]
    finally:
        stop_server(process, log)


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli("serve", "--port", "0", "--model", str(tmp_path / "empty"))
    assert done.returncode == 1
    assert done.stdout == ""
    assert "startup failed" in done.stderr and "is not a model directory" in done.stderr


def test_a_model_neither_on_disk_nor_a_repo_id_exits_2(tmp_path):
    done = run_cli("serve", "--port", "0", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert "missing" in done.stderr
    assert "is no existing path, nor a Hugging Face repository id" in done.stderr


def test_serve_with_telemetry_exposes_metrics_on_its_own_port(model_path, tmp_path):
    with socket.socket() as probe:  # a free port for Prometheus
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    log = tmp_path / "server.log"
    args = ["--model", f"tiny={model_path}", "--telemetry", "--prometheus-port", str(metrics_port)]
    process, address = start_server(args, log)
    try:
        assert process.stdout.readline().strip() == (
            f"mlx-serving metrics on http://127.0.0.1:{metrics_port}/metrics"
        )
        with grpc.insecure_channel(address) as channel:
            request = generate_pb.GenerateRequest(model_id="tiny", text="Hi", max_tokens=3)
            list(generate_grpc.GenerateServiceStub(channel).Generate(request))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        exposition = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'mlx_serving_generated_tokens_total{model="tiny"} 3.0' in exposition
    finally:
        stop_server(process, log)


def test_listening_beyond_loopback_without_tls_or_tokens_warns(model_path, tmp_path):
    log = tmp_path / "server.log"
    process, _ = start_server(["--host", "0.0.0.0", "--model", f"tiny={model_path}"], log)
    stop_server(process, log)
    assert "WARNING" in log.read_text()
    assert "listening on 0.0.0.0 without TLS or tokens" in log.read_text()
