"""`mlx-serving serve`: argument parsing, and the real process from start to SIGTERM."""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import STARTUP_SECONDS, child_env, start_server, stop_server

from mlx_serving.engine.default_model import DEFAULT_MODEL_NAME
from mlx_serving.engine.models import ModelSource
from mlx_serving.server.cli import make_parser, parse_model_spec
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("/models/llama", ("", ModelSource(local_path="/models/llama"))),
        ("chat=/models/llama", ("chat", ModelSource(local_path="/models/llama"))),
        ("./a=b/model", ("", ModelSource(local_path="./a=b/model"))),
        ("hf:acme/tiny", ("", ModelSource(repo_id="acme/tiny"))),
        ("hf:acme/tiny@v1.0", ("", ModelSource(repo_id="acme/tiny", revision="v1.0"))),
        ("t:1=hf:acme/tiny@main", ("t:1", ModelSource(repo_id="acme/tiny", revision="main"))),
    ],
)
def test_model_specs(spec, expected):
    assert parse_model_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("", "source.local_path"),
        ("hf:not a repo", "source.hugging_face.repo_id"),
        (("x" * 129) + "=/models/llama", "model_id"),
    ],
)
def test_bad_model_specs_name_the_contract_field(spec, field):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(field)):
        parse_model_spec(spec)


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
    process, address = start_server(["--model", f"tiny={model_path}", "--log-level", "info"], log)
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
    command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--port", "0"]
    done = subprocess.run(
        [*command, "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=STARTUP_SECONDS,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "startup failed" in done.stderr and "missing" in done.stderr


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
