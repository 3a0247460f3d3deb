"""deploy/: the container image, the Kubernetes manifests and the Envoy configuration.

Each check of deploy/validate.sh runs here (kubeconform against the Kubernetes schemas, the Envoy
bootstrap validator of deploy/validate, hadolint), with a bad input each to show that the tool
does reject; they skip, saying why, only where there is no `go` to build the tools with (.ci/run
builds them beforehand). Then the files against the server: `mlx-serving config check` on the
config files, and the port, the health service, the drain grace and the environment that the
Dockerfile, the manifests and envoy.yaml name are the server's.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mlx_serving.server.app import DEFAULT_PORT, SERVICE_NAMES
from mlx_serving.server.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TOOLS = REPO / "build" / "tools"
VALIDATE = DEPLOY / "validate.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
IMAGE_CONFIG = DEPLOY / "config.yaml"
KUBERNETES = DEPLOY / "kubernetes"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
HEALTHCHECK = DEPLOY / "healthcheck.py"

# The names a grpc.health.v1 Check may ask about: the whole server ("") and each service.
HEALTH_NAMES = ("", *SERVICE_NAMES)
# The idempotent reads that Envoy may retry; no other method, Generate (a generation) least.
RETRYABLE = {
    "/mlx_serving.v1.ModelService/ListModels",
    "/mlx_serving.v1.ModelService/GetModel",
    "/mlx_serving.v1.TokenizeService/Tokenize",
    "/mlx_serving.v1.TokenizeService/Detokenize",
    "/mlx_serving.v1.TokenizeService/RenderChatTemplate",
}
NOT_RETRYABLE = {
    "/mlx_serving.v1.GenerateService/Generate",
    "/mlx_serving.v1.EventsService/Subscribe",
    "/mlx_serving.v1.ModelService/LoadModel",
    "/mlx_serving.v1.ModelService/UnloadModel",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
# `mlx-serving`, from the Python running the tests.
MLX_SERVING = [
    sys.executable,
    "-c",
    "import sys; from mlx_serving.server.cli import main; sys.exit(main())",
]
# Slowest first build of every tool (no Go caches, 2 cores) plus downloads.
BUILD_TIMEOUT_SECONDS = 900


def run_validate(step: str, needs_go: bool = True) -> subprocess.CompletedProcess[str]:
    """`deploy/validate.sh STEP`, which builds what it needs first; skips without `go`."""
    if needs_go and shutil.which("go") is None:
        pytest.skip(f"no `go` to build the tools of `deploy/validate.sh {step}` with")
    env = {**os.environ, "LD_PRELOAD": "", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(VALIDATE), step],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"deploy/validate.sh {step}:\n{result.stdout}{result.stderr}"
    return result


def tool(name: str, step: str, needs_go: bool = True) -> Path:
    """build/tools/NAME, built by `deploy/validate.sh STEP` when missing."""
    if not (TOOLS / name).exists():
        run_validate(step, needs_go)
    return TOOLS / name


# ---- the files -----------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml by (kind, name)."""
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def deployment() -> dict[str, Any]:
    return manifests()[("Deployment", "mlx-serving")]


def container() -> dict[str, Any]:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    return only


def configmap_config() -> dict[str, Any]:
    """The server's config file held by the ConfigMap."""
    configmap = manifests()[("ConfigMap", "mlx-serving-config")]
    (text,) = configmap["data"].values()
    return yaml.safe_load(text)


def envoy() -> dict[str, Any]:
    return yaml.safe_load(ENVOY.read_text())


def envoy_cluster() -> dict[str, Any]:
    (cluster,) = envoy()["static_resources"]["clusters"]
    return cluster


def envoy_virtual_host() -> dict[str, Any]:
    (listener,) = envoy()["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = [f for f in chain["filters"] if f["name"].endswith("http_connection_manager")]
    (virtual_host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    return virtual_host


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuations joined, comments out."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV, NAME=VALUE pairs."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    env = {}
    for name, arguments in instructions[last_from:]:
        if name == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


def mlx_serving_env(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("MLX_SERVING_")}


# ---- the tools' checks ---------------------------------------------------------------------


def test_kubeconform_accepts_the_manifests() -> None:
    out = run_validate("kubernetes").stdout
    summaries = re.findall(r"Summary: (\d+) resources? found .* Invalid: (\d+), Errors: (\d+)", out)
    assert len(summaries) >= 2, out  # one per Kubernetes version
    for found, invalid, errors in summaries:
        assert (int(found), invalid, errors) == (len(manifests()), "0", "0"), out


def test_kubeconform_rejects_unknown_fields_and_wrong_types(tmp_path: Path) -> None:
    kubeconform = tool("kubeconform", "kubernetes")
    bad = (KUBERNETES / "deployment.yaml").read_text()
    bad = bad.replace("enableServiceLinks: false", "enableServiceLinks: false\n      nosuch: 1")
    bad = bad.replace("failureThreshold: 6", 'failureThreshold: "6"')
    (tmp_path / "bad.yaml").write_text(bad)
    location = (
        f"{TOOLS}/kubernetes-json-schema/{{{{ .NormalizedKubernetesVersion }}}}-local"
        "{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    )
    result = subprocess.run(
        [str(kubeconform), "-strict", "-kubernetes-version", "1.30.0"]
        + ["-schema-location", location, str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "additional properties 'nosuch' not allowed" in result.stdout
    assert "livenessProbe/failureThreshold': got string" in result.stdout


def test_the_envoy_config_is_a_valid_bootstrap() -> None:
    assert "ok deploy/envoy/envoy.yaml" in run_validate("envoy").stdout


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("connect_timeout: 2s", "connect_timeout: 2s\n      nosuch: 1", 'unknown field "nosuch"'),
        # A rule of a message inside a typed_config (HttpConnectionManager.stat_prefix).
        ("stat_prefix: mlx_serving", 'stat_prefix: ""', "StatPrefix: value length must be"),
        (
            "lb_policy: LEAST_REQUEST",
            "lb_policy: LEAST_REQUEST\n      dns_refresh_rate: 5s",
            "dns_refresh_rate: deprecated field",
        ),
        ("grpc_stats.v3.FilterConfig", "grpc_stats.v3.NoSuch", "unable to resolve"),
    ],
)
def test_the_envoy_validator_rejects(tmp_path: Path, old: str, new: str, problem: str) -> None:
    validator = tool("validate-envoy", "envoy")
    text = ENVOY.read_text()
    assert old in text
    (tmp_path / "envoy.yaml").write_text(text.replace(old, new, 1))
    result = subprocess.run(
        [str(validator), str(tmp_path / "envoy.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert problem in result.stderr


def test_hadolint_accepts_the_dockerfile() -> None:
    assert "deploy/Dockerfile ok" in run_validate("dockerfile", needs_go=False).stdout


def test_hadolint_flags_a_bad_dockerfile() -> None:
    hadolint = tool("hadolint", "dockerfile", needs_go=False)
    bad = "FROM python\nRUN apt-get install curl\n"
    result = subprocess.run([str(hadolint), "-"], input=bad, capture_output=True, text=True)
    assert result.returncode == 1
    assert "DL3006" in result.stdout  # an untagged base image
    assert "DL3015" in result.stdout  # apt-get install without --no-install-recommends


# ---- the server's own configuration check ---------------------------------------------------


def config_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MLX_SERVING, "config", "check", str(path)],
        capture_output=True,
        text=True,
    )


def test_the_image_config_passes_config_check() -> None:
    result = config_check(IMAGE_CONFIG)
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_the_configmap_config_passes_config_check(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(configmap_config()))
    result = config_check(path)
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_config_check_would_catch_a_bad_configmap(tmp_path: Path) -> None:
    config = configmap_config()
    config["server"]["port"] = "50051"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = config_check(path)
    assert result.returncode == 2
    assert "server.port: expected an integer" in result.stderr


def test_the_environments_are_accepted_by_the_server(tmp_path: Path) -> None:
    """Every MLX_SERVING_* name the image and the Deployment set is one the server knows (it
    refuses others), with the config file each one names."""
    image_env = mlx_serving_env(dockerfile_env())
    load_config(IMAGE_CONFIG, image_env)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(configmap_config()))
    pod_env = {**image_env, **{e["name"]: e["value"] for e in container()["env"]}}
    load_config(path, mlx_serving_env(pod_env))


# ---- the files agree with the server and with one another -----------------------------------


def test_the_dockerfile_serves_the_default_port_with_a_health_check() -> None:
    instructions = dockerfile_instructions()
    arguments = {name: args for name, args in instructions}
    assert arguments["EXPOSE"].split() == [str(DEFAULT_PORT)]
    health_check = arguments["HEALTHCHECK"]
    assert "/opt/mlx-serving/healthcheck.py" in health_check
    assert f'"127.0.0.1:{DEFAULT_PORT}"' in health_check
    assert ["COPY deploy/healthcheck.py /opt/mlx-serving/healthcheck.py"] == [
        f"{name} {args}"
        for name, args in instructions
        if "healthcheck.py" in args and name == "COPY"
    ]
    assert arguments["ENTRYPOINT"] == '["mlx-serving"]' and arguments["CMD"] == '["serve"]'
    # Non-root, from a pinned base.
    user = arguments["USER"].split(":")[0]
    assert user not in ("0", "root")
    assert re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", arguments["ARG"])
    # The config file the image names is the one it copies, and listens beyond loopback.
    env = dockerfile_env()
    assert f"COPY deploy/config.yaml {env['MLX_SERVING_CONFIG']}" in [
        f"{name} {args}" for name, args in instructions
    ]
    config = load_config(IMAGE_CONFIG)
    assert (config.server.host, config.server.port) == ("0.0.0.0", DEFAULT_PORT)


def test_the_dockerfile_user_is_the_deployments() -> None:
    user, group = dict(dockerfile_instructions())["USER"].split(":")
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user), int(group))
    assert pod["runAsNonRoot"] is True


def test_the_probes_ask_the_servers_health_service_on_its_port() -> None:
    port = configmap_config()["server"]["port"]
    assert port == DEFAULT_PORT
    spec = container()
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = spec[probe]["grpc"]
        assert grpc_probe["port"] == port, probe
        assert grpc_probe.get("service", "") in HEALTH_NAMES, probe
    # Liveness outlasts an engine restart inside the server (seconds of NOT_SERVING).
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def test_the_grace_period_covers_the_drain() -> None:
    """SIGKILL comes terminationGracePeriodSeconds after the pod's end begins: after the preStop
    pause, the server's drain delay (if any) and its shutdown grace, with a margin, but not
    much later."""
    pod = deployment()["spec"]["template"]["spec"]
    server = configmap_config()["server"]
    drain = server.get("drain_delay_seconds", 0) + server["shutdown_grace_seconds"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    margin = pod["terminationGracePeriodSeconds"] - pause - drain
    assert 5 <= margin <= 30, margin


def test_the_pod_is_locked_down() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # else MLX_SERVING_SERVICE_HOST & co.: exit 2
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]


def test_resources_bound_the_pod_and_the_engine_fits() -> None:
    resources = container()["resources"]
    assert set(resources) == {"requests", "limits"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    limit = resources["limits"]["memory"]
    assert limit.endswith("Gi")
    engine = configmap_config()["engine"]
    # The KV cache is sized from the node's free memory unless bounded (capacity.py).
    assert engine["max_kv_bytes"] + engine["prefix_cache_bytes"] <= int(limit[:-2]) * 2**30 // 2
    env = {e["name"]: e["value"] for e in container()["env"]}
    assert env["OPENBLAS_NUM_THREADS"] == resources["limits"]["cpu"]


def test_the_configmap_is_the_mounted_config_file() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    configmap = manifests()[("ConfigMap", "mlx-serving-config")]
    (key,) = configmap["data"]
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    env = {e["name"]: e["value"] for e in container()["env"]}
    assert env["MLX_SERVING_CONFIG"] == f"{mount['mountPath']}/{key}"


def test_the_services_route_grpc_to_the_pods() -> None:
    template = deployment()["spec"]["template"]
    labels = template["metadata"]["labels"]
    container_ports = {p["name"] for p in container()["ports"]}
    services = [obj for (kind, _), obj in manifests().items() if kind == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"mlx-serving", "mlx-serving-headless"}
    for service in services:
        spec = service["spec"]
        assert spec["selector"].items() <= labels.items()
        (grpc_port,) = [p for p in spec["ports"] if p["name"] == "grpc"]
        assert grpc_port["port"] == DEFAULT_PORT
        assert grpc_port["targetPort"] in container_ports
        assert grpc_port["appProtocol"] == "grpc"
        for port in spec["ports"]:
            assert port["targetPort"] in container_ports
    headless = manifests()[("Service", "mlx-serving-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_envoy_balances_streams_over_healthy_replicas() -> None:
    cluster = envoy_cluster()
    assert cluster["type"] in ("STRICT_DNS", "STATIC")
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    for endpoint in endpoints["lb_endpoints"]:
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address["port_value"] == DEFAULT_PORT
        assert address["address"] == "mlx-serving-headless"  # deploy/kubernetes/service.yaml
    (options,) = cluster["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"]
    (health_check,) = cluster["health_checks"]
    assert health_check["grpc_health_check"]["service_name"] in HEALTH_NAMES


def envoy_route(method: str) -> dict[str, Any]:
    """The route Envoy takes for `method`: the first whose match fits (path, prefix or a
    regular expression matching the whole path)."""
    for route in envoy_virtual_host()["routes"]:
        match = route["match"]
        if (
            match.get("path") == method
            or ("prefix" in match and method.startswith(match["prefix"]))
            or ("safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], method))
        ):
            return route["route"]
    raise AssertionError(f"no route for {method}")


def test_envoy_retries_only_idempotent_reads() -> None:
    assert "retry_policy" not in envoy_virtual_host()
    for method in RETRYABLE:
        assert "retry_policy" in envoy_route(method), method
    for method in NOT_RETRYABLE:
        assert "retry_policy" not in envoy_route(method), method


def test_envoy_never_cuts_a_stream_short() -> None:
    for method in (
        "/mlx_serving.v1.GenerateService/Generate",
        "/mlx_serving.v1.EventsService/Subscribe",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ):
        route = envoy_route(method)
        assert route["timeout"] == "0s", method
        assert route["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}, method
    assert envoy_route("/mlx_serving.v1.EventsService/Subscribe")["idle_timeout"] == "0s"


# ---- the image's health check script ---------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with grpc.health.v1 only, on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30
    )


def test_the_healthcheck_passes_only_while_serving(health_server) -> None:
    address, servicer = health_server
    serving = health_pb2.HealthCheckResponse.SERVING
    servicer.set("", serving)
    result = run_healthcheck(address)
    assert (result.returncode, result.stdout) == (0, f"{address} (server): SERVING\n")
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_healthcheck(address).stdout == f"{address} (server): NOT_SERVING\n"
    assert run_healthcheck(address).returncode == 1
    servicer.set(SERVICE_NAMES[0], serving)
    assert run_healthcheck(address, SERVICE_NAMES[0]).returncode == 0


def test_the_healthcheck_fails_without_a_server() -> None:
    result = run_healthcheck("127.0.0.1:1")  # nothing listens on port 1
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout


# ---- the ConfigMap's configuration, served ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_configmap_config_serves_and_drains(tmp_path: Path) -> None:
    """`mlx-serving serve` with the ConfigMap's file and the Deployment's environment (loopback
    and free ports instead of the pod's, by flags): the image's health check sees SERVING, then
    NOT_SERVING once SIGTERM starts the drain, and the server exits 0 within the pod's grace."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(configmap_config()))
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLX_SERVING_")}
    env.update({e["name"]: e["value"] for e in container()["env"]})
    env.update(MLX_SERVING_CONFIG=str(config), MLX_SERVING_TELEMETRY_PROMETHEUS_HOST="127.0.0.1")
    port = free_port()
    address = f"127.0.0.1:{port}"
    flags = ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port())]
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*MLX_SERVING, "serve", *flags], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while (check := run_healthcheck(address)).returncode:
            assert server.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{check.stdout}{log.read_text()}"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert run_healthcheck(address).returncode == 1
        grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert server.wait(timeout=grace) == 0, log.read_text()
        assert "shutting down" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
