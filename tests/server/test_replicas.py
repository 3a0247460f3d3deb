"""Two replicas of the real `mlx-serving serve` behind gRPC's own client-side load balancing:
`round_robin` over both addresses, with client-side health checks. Streams alternate between
the replicas; SIGTERM to one turns its health NOT_SERVING, the channel stops picking it while it
still takes requests (`--drain-delay`), and a steady flow of streams runs through its drain and
exit without one failure.

What each replica served is read from its own Prometheus endpoint: the generations its engine
ended, and the router gauges (vllm:num_requests_*) for what it still runs.
"""

import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from server_process import LISTENING, STARTUP_SECONDS, child_env

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

MODEL_ID = "tiny"
# The service name "" is the server's overall health (app.py sets it with every service's).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
}
METRICS_LINE = re.compile(r"^mlx-serving metrics on (http://\S+/metrics)$")
# How long the draining replica still takes requests after its health turns NOT_SERVING.
DRAIN_DELAY_SECONDS = 3.0
SPREAD_STREAMS = 10
AFTER_EXIT_STREAMS = 10
# Clients of the steady flow, each sending one stream after another.
FLOW_CLIENTS = 2
# Streams in a row on the staying replica that show the channel no longer picks the draining one.
SETTLED_STREAMS = 4


class Replica:
    """One `mlx-serving serve` child process, with metrics on a port of its own."""

    def __init__(self, model_path: Path, log: Path, args: list[str]):
        self.log = log
        command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--port", "0"]
        command += ["--model", f"{MODEL_ID}={model_path}", *args]
        command += ["--telemetry", "--prometheus-port", str(free_port())]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=child_env(),
            # Its own process group: the test's signals reach this replica alone.
            start_new_session=True,
        )
        self.address = self.metrics_url = ""

    def wait_started(self) -> None:
        """The address line, then the metrics line (printed with it: read from the buffer)."""
        ready, _, _ = select.select([self.process.stdout], [], [], STARTUP_SECONDS)
        lines = [self.process.stdout.readline().strip() if ready else "" for _ in range(2)]
        listening, metrics = LISTENING.match(lines[0]), METRICS_LINE.match(lines[1])
        if not (listening and metrics):
            self.process.kill()
            pytest.fail(f"no addresses printed (got {lines!r}); log:\n{self.log.read_text()}")
        self.address, self.metrics_url = listening.group(1), metrics.group(1)

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def scrape(self) -> dict[str, float]:
        """The model's samples of interest: name → value, summed over other labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if MODEL_ID in (sample.labels.get("model"), sample.labels.get("model_name")):
                    samples[sample.name] = samples.get(sample.name, 0) + sample.value
        return samples

    def served(self) -> int:
        """Generations its engine ended (they end there before their stream does)."""
        return int(self.scrape().get("mlx_serving_requests_finished_total", 0))

    def idle(self) -> bool:
        samples = self.scrape()
        return samples["vllm:num_requests_running"] + samples["vllm:num_requests_waiting"] == 0

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            request = health_pb2.HealthCheckRequest()
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def free_port() -> int:
    """A port free now on loopback (for the metrics endpoint, which takes no 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def generate(stub) -> None:
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Hello", max_tokens=4, temperature=0, ignore_eos=True
    )
    replies = list(stub.Generate(request, timeout=30))
    assert replies[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS


class SteadyFlow:
    """FLOW_CLIENTS threads sending streams one after another until stopped; every outcome is
    kept."""

    def __init__(self, stub):
        self.stub = stub
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(FLOW_CLIENTS)
        ]

    def __enter__(self) -> "SteadyFlow":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                generate(self.stub)
            except (grpc.RpcError, AssertionError) as error:
                with self._lock:
                    self.failures.append(repr(error))
            else:
                with self._lock:
                    self.ok += 1


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Settled:
    """Whether the channel has stopped picking `draining`: it is idle, and `staying` has served
    SETTLED_STREAMS since `draining` last served one (round_robin would alternate otherwise)."""

    def __init__(self, draining: Replica, staying: Replica):
        self.draining, self.staying = draining, staying
        self.last = (-1, 0)

    def __call__(self) -> bool:
        served = self.draining.served()
        if served != self.last[0]:
            self.last = (served, self.staying.served())
            return False
        return self.draining.idle() and self.staying.served() - self.last[1] >= SETTLED_STREAMS


def both_used(stub, replicas: list[Replica]) -> bool:
    """One more stream; whether each replica has served one."""
    generate(stub)
    return min(replica.served() for replica in replicas) > 0


def test_round_robin_spreads_streams_and_a_drain_fails_none(model_path, tmp_path):
    args = ["--shutdown-grace", "10", "--drain-delay", str(DRAIN_DELAY_SECONDS)]
    # Both start at once; each prints its addresses once it serves.
    replicas = [Replica(model_path, tmp_path / f"server{i}.log", args) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_started()
        draining, staying = replicas
        target = f"ipv4:127.0.0.1:{draining.port},127.0.0.1:{staying.port}"
        options = [("grpc.service_config", json.dumps(SERVICE_CONFIG))]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = generate_grpc.GenerateServiceStub(channel)
            # Until both subchannels are READY (connected, health SERVING), one may take all.
            wait_for(lambda: both_used(stub, replicas), 30, "the channel never used both")
            before = [replica.served() for replica in replicas]
            for _ in range(SPREAD_STREAMS):
                generate(stub)
            spread = [r.served() - b for r, b in zip(replicas, before, strict=True)]
            assert spread == [SPREAD_STREAMS // 2] * 2  # round_robin alternates

            before = draining.served()
            with SteadyFlow(stub) as flow:
                wait_for(lambda: flow.ok >= 20, 30, "the steady flow did not start")
                assert draining.served() > before  # the flow goes to both
                draining.process.send_signal(signal.SIGTERM)
                not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
                wait_for(lambda: draining.health() == not_serving, 5, "still SERVING")
                # The channel learns it from its health watch a moment later; a pick made before
                # that still goes there. Still in its drain delay: the streams it had end, the
                # flow moves to the other, and no new one comes.
                settled = Settled(draining, staying)
                wait_for(settled, DRAIN_DELAY_SECONDS / 2, "the channel kept picking it")
                ended = draining.served()
                time.sleep(DRAIN_DELAY_SECONDS / 4)
                assert draining.idle() and draining.served() == ended, "picked when NOT_SERVING"
                assert draining.process.wait(timeout=30) == 0, draining.log.read_text()
                exited = flow.ok
                wait_for(lambda: flow.ok >= exited + 10, 30, "the flow stalled after the exit")
            assert flow.failures == []

            before = [staying.served()]
            for _ in range(AFTER_EXIT_STREAMS):
                generate(stub)
            assert [staying.served() - before[0]] == [AFTER_EXIT_STREAMS]
        log = draining.log.read_text()
        assert "health is NOT_SERVING; new requests are refused in 3 s" in log
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait(timeout=30)
