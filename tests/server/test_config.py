"""The configuration: strict keys and types, the contract's ranges, layers, files and the CLI."""

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest
import yaml
from buf.validate import validate_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_process import STARTUP_SECONDS, child_env, start_server, stop_server

from mlx_serving.engine.config import EngineConfig
from mlx_serving.server import cli
from mlx_serving.server.config import (
    FORMATS,
    ConfigError,
    default_config,
    engine_config,
    env_names,
    load_config,
    render,
    to_dict,
)
from mlx_serving.v1 import config_pb2 as config_pb
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc

SERVICE_NAME_RULE = "must be 1 to 100 characters, each a letter, digit, hyphen or underscore"


def between(low, high) -> str:
    return f"must be greater than or equal to {low} and less than or equal to {high}"


def problems(env: dict[str, str] | None = None, path: Path | None = None, **given) -> list[str]:
    """What `load_config` finds wrong with `given` (as flags), `env` and the file at `path`."""
    try:
        load_config(path, env or {}, given)
    except ConfigError as exc:
        assert str(exc) == "\n".join(exc.problems)
        return exc.problems
    return []


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the seed's telemetry rules, at each boundary ----------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("service_name", "a", None),
        ("service_name", "", SERVICE_NAME_RULE),
        ("service_name", "a" * 100, None),
        ("service_name", "a" * 101, SERVICE_NAME_RULE),
        ("service_name", "my-service_2", None),
        ("service_name", "-", None),
        ("service_name", "_", None),
        ("service_name", "Z9", None),
        ("service_name", "my service", SERVICE_NAME_RULE),
        ("service_name", "my.service", SERVICE_NAME_RULE),
        ("service_name", "my/service", SERVICE_NAME_RULE),
        ("service_name", "café", SERVICE_NAME_RULE),
        ("service_name", "name\n", SERVICE_NAME_RULE),
        ("prometheus_port", 1023, between(1024, 65535)),
        ("prometheus_port", 1024, None),
        ("prometheus_port", 65535, None),
        ("prometheus_port", 65536, between(1024, 65535)),
        ("prometheus_port", -1, between(1024, 65535)),
        ("export_interval_ms", 999, between(1000, 600000)),
        ("export_interval_ms", 1000, None),
        ("export_interval_ms", 600000, None),
        ("export_interval_ms", 600001, between(1000, 600000)),
    ],
)
def test_telemetry_boundaries(key, value, error):
    expected = [f"telemetry.{key}: {error}"] if error else []
    assert problems(telemetry={"enabled": True, key: value}) == expected


@pytest.mark.parametrize("enabled", [True, False])
def test_telemetry_enabled_given(enabled):
    assert problems(telemetry={"enabled": enabled, "prometheus_port": 9100}) == []
    assert load_config(overrides={"telemetry": {"enabled": enabled}}).telemetry.enabled is enabled


@pytest.mark.parametrize("section", [{}, {"prometheus_port": 9100}, {"service_name": "svc"}])
def test_telemetry_enabled_is_required_when_the_section_is_given(section):
    assert problems(telemetry=section) == ["telemetry.enabled: value is required"]


def test_telemetry_is_off_without_the_section():
    assert problems() == []
    assert load_config().telemetry.enabled is False


@pytest.mark.parametrize("value", ["true", 1, None, [True]])
def test_telemetry_enabled_must_be_a_boolean(value):
    (problem,) = problems(telemetry={"enabled": value})  # not also "value is required"
    assert problem.startswith("telemetry.enabled: expected a boolean (true or false), got ")


def test_telemetry_boundaries_from_the_environment():
    env = {"MLX_SERVING_TELEMETRY_ENABLED": "true"}
    assert problems({**env, "MLX_SERVING_TELEMETRY_PROMETHEUS_PORT": "1024"}) == []
    assert problems({**env, "MLX_SERVING_TELEMETRY_PROMETHEUS_PORT": "1023"}) == [
        f"telemetry.prometheus_port: {between(1024, 65535)}"
    ]
    assert problems({**env, "MLX_SERVING_TELEMETRY_SERVICE_NAME": "a" * 101}) == [
        f"telemetry.service_name: {SERVICE_NAME_RULE}"
    ]


# ---- the other sections' ranges ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "inside", "outside", "rule"),
    [
        ("server.port", [0, 65535], [-1, 65536], between(0, 65535)),
        ("server.shutdown_grace_seconds", [0, 3600], [-0.5, 3600.5], between(0, 3600)),
        ("server.drain_delay_seconds", [0, 600], [-0.5, 600.5], between(0, 600)),
        ("engine.max_batch_size", [0, 1024], [-1, 1025], between(0, 1024)),
        ("engine.max_queued_requests", [0, 100000], [-1, 100001], between(0, 100000)),
        ("engine.prefill_batch_size", [1, 1024], [0, 1025], between(1, 1024)),
        ("engine.prefill_step_size", [16, 65536], [15, 65537], between(16, 65536)),
        ("engine.coalesce_seconds", [0, 1], [-0.001, 1.001, float("nan")], between(0, 1)),
        ("engine.prefix_cache_bytes", [0, 2**40], [-1, 2**40 + 1], between(0, 2**40)),
        ("engine.prefix_cache_entries", [0, 65536], [-1, 65537], between(0, 65536)),
        ("engine.retry_after_seconds", [0, 3600], [-1, 3601], between(0, 3600)),
        ("engine.wedge_timeout_seconds", [1, 86400], [0.5, 86401], between(1, 86400)),
        ("engine.prefill_gather_seconds", [0, 1], [-0.001, 1.001], between(0, 1)),
        # Beyond the field's 32 or 64 bits: still reported by the range rule.
        ("engine.max_batch_size", [], [2**31, -(2**70)], between(0, 1024)),
        ("engine.prefix_cache_bytes", [], [2**64, 2**100], between(0, 2**40)),
    ],
)
def test_ranges(key, inside, outside, rule):
    section, _, name = key.partition(".")
    for value in inside:
        assert problems(**{section: {name: value}}) == [], value
    for value in outside:
        assert problems(**{section: {name: value}}) == [f"{key}: {rule}"], value


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"host": ""}, "server.host: value is empty, which is not a valid hostname, or ip address"),
        ({"host": "not a host"}, "server.host: must be a valid hostname, or ip address"),
        (
            {"log_level": "verbose"},
            "server.log_level: must be in list [debug, info, warning, error]",
        ),
    ],
)
def test_server_strings(settings, problem):
    assert problems(server=settings) == [problem]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "localhost", "node-1.example.com"])
def test_hosts(host):
    assert (
        problems(server={"host": host}, telemetry={"enabled": True, "prometheus_host": host}) == []
    )


def test_otlp_endpoint_is_empty_or_a_uri():
    for endpoint in ("", "http://localhost:4317", "https://collector.example.com:4317"):
        assert problems(telemetry={"enabled": True, "otlp_endpoint": endpoint}) == []
    assert problems(telemetry={"enabled": True, "otlp_endpoint": "not a uri"}) == [
        "telemetry.otlp_endpoint: must be a valid URI"
    ]


def test_models_follow_the_load_model_rules():
    models = [
        {"model_id": "ok", "source": {"local_path": "/models/a"}},
        {"model_id": "-bad", "source": {"hugging_face": {"repo_id": "not a repo"}}},
        {"model_id": "no-source"},
        {"source": {"local_path": "/a", "hugging_face": {"repo_id": "acme/tiny"}}},
    ]
    assert problems(models=models) == [
        "models[3].source: set only one of local_path, hugging_face",
        "models[1].model_id: does not match regex pattern `^([A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$`",
        "models[1].source.hugging_face.repo_id: does not match regex pattern "
        "`^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$`",
        "models[2].source: value is required",
    ]


def test_every_number_has_both_bounds():
    """Integers too wide for their field are clamped: only a bounded rule then reports them."""
    for section in ("server", "engine", "telemetry"):
        descriptor = getattr(config_pb, f"{section.title()}Settings").DESCRIPTOR
        for field in descriptor.fields:
            rules = field.GetOptions().Extensions[validate_pb2.field]
            kind = rules.WhichOneof("type")
            if kind in ("int32", "int64", "uint32", "uint64", "double", "float"):
                bounds = getattr(rules, kind)
                assert bounds.HasField("gte") or bounds.HasField("gt"), field.full_name
                assert bounds.HasField("lte") or bounds.HasField("lt"), field.full_name
            else:
                assert field.cpp_type not in (field.CPPTYPE_INT32, field.CPPTYPE_INT64)


# ---- strict parsing: unknown keys and wrong types -------------------------------------------


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (
            {"servr": {}},
            "servr: unknown key (allowed: server, engine, telemetry, models, security)",
        ),
        (
            {"telemetry": {"enabled": True, "prometheus_prot": 9100}},
            "telemetry.prometheus_prot: unknown key (allowed: enabled, service_name, "
            "prometheus_port, export_interval_ms, otlp_endpoint, prometheus_host)",
        ),
        (
            {"engine": {"max_batch": 4}},
            "engine.max_batch: unknown key (allowed: max_batch_size, max_queued_requests, "
            "prefill_batch_size, prefill_step_size, coalesce_seconds, prefix_cache_bytes, "
            "prefix_cache_entries, retry_after_seconds, wedge_timeout_seconds, "
            "prefill_gather_seconds, fuse_projections, decode_attention_kernel, "
            "cudnn_prefill_attention, default_context_length, tokenizer_threads, "
            "chat_template_workers, chat_template_timeout_seconds, max_concurrent_tokenize, "
            "max_tokenize_bytes, max_constraint_bytes, max_prompt_tokens, max_generation_tokens, "
            "max_request_tokens, max_stop_strings, max_engine_restarts, "
            "engine_restart_backoff_seconds, fused_sampler, native_kernels, jemalloc, "
            "max_kv_bytes, kv_memory_fraction, capacity_context_tokens, prefill_buckets, "
            "prefill_pacing)",
        ),
        (
            {
                "models": [
                    {"source": {"local_path": "/a"}},
                    {"source": {"local_path": "/b", "a": 1}},
                ]
            },
            "models[1].source.a: unknown key (allowed: local_path, hugging_face)",
        ),
        (
            {"models": [{"source": {"hugging_face": {"repo_id": "a/b", "branch": "x"}}}]},
            "models[0].source.hugging_face.branch: unknown key (allowed: repo_id, revision)",
        ),
    ],
)
def test_unknown_keys_name_their_path_and_the_allowed_keys(given, problem):
    assert problems(**given) == [problem]


def test_rules_still_apply_around_an_unknown_key():
    assert problems(telemetry={"enabeld": True}) == [
        "telemetry.enabeld: unknown key (allowed: enabled, service_name, prometheus_port, "
        "export_interval_ms, otlp_endpoint, prometheus_host)",
        "telemetry.enabled: value is required",
    ]


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"server": {"port": "50051"}}, "server.port: expected an integer, got str '50051'"),
        ({"server": {"port": 1.5}}, "server.port: expected an integer, got float 1.5"),
        ({"server": {"port": True}}, "server.port: expected an integer, got bool True"),
        ({"server": {"host": 127}}, "server.host: expected a string, got int 127"),
        (
            {"engine": {"coalesce_seconds": "0.1"}},
            "engine.coalesce_seconds: expected a number, got str '0.1'",
        ),
        ({"engine": 8}, "engine: expected a table, got int 8"),
        ({"engine": None}, "engine: expected a table, got null"),
        ({"models": {"source": {}}}, "models: expected a list, got dict {'source': {}}"),
        (
            {"models": ["tiny=/models/tiny"]},
            "models[0]: expected a table, got str 'tiny=/models/tiny'",
        ),
    ],
)
def test_type_errors_name_the_key_and_the_expected_type(given, problem):
    assert problems(**given) == [problem]


def test_numbers_take_integers_and_integers_take_no_fractions():
    assert load_config(overrides={"engine": {"coalesce_seconds": 1}}).engine.coalesce_seconds == 1.0
    assert problems(engine={"max_batch_size": 4.0}) == [
        "engine.max_batch_size: expected an integer, got float 4.0"
    ]


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path, "c.yaml", "server: {port: 70000, hots: x}\nengine: {max_batch_size: a}\n"
    )
    env = {"MLX_SERVING_TELEMETRY_PROMETHEUS_PORT": "80", "MLX_SERVING_SERVER_PROT": "1"}
    assert problems(env, path, models=[{}]) == [
        "server.hots: unknown key (allowed: host, port, shutdown_grace_seconds, log_level, "
        "max_response_bytes, tls, max_request_bytes, max_streams_per_client, "
        "max_subscriptions_per_client, drain_delay_seconds)",
        "engine.max_batch_size: expected an integer, got str 'a'",
        "MLX_SERVING_SERVER_PROT: unknown variable (allowed: MLX_SERVING_SERVER_HOST, "
        "MLX_SERVING_SERVER_PORT, MLX_SERVING_SERVER_SHUTDOWN_GRACE_SECONDS, "
        "MLX_SERVING_SERVER_LOG_LEVEL, MLX_SERVING_SERVER_MAX_RESPONSE_BYTES, "
        "MLX_SERVING_SERVER_MAX_REQUEST_BYTES, MLX_SERVING_SERVER_MAX_STREAMS_PER_CLIENT, "
        "MLX_SERVING_SERVER_MAX_SUBSCRIPTIONS_PER_CLIENT, MLX_SERVING_SERVER_DRAIN_DELAY_SECONDS)",
        f"server.port: {between(0, 65535)}",
        "telemetry.enabled: value is required",
        f"telemetry.prometheus_port: {between(1024, 65535)}",
        "models[0].source: value is required",
    ]


# ---- environment variables -----------------------------------------------------------------


def test_environment_variables_set_keys_by_type():
    env = {
        "MLX_SERVING_SERVER_HOST": "0.0.0.0",
        "MLX_SERVING_SERVER_SHUTDOWN_GRACE_SECONDS": "2.5",
        "MLX_SERVING_ENGINE_MAX_BATCH_SIZE": "64",
        "MLX_SERVING_ENGINE_PREFIX_CACHE_BYTES": "1099511627776",
        "MLX_SERVING_TELEMETRY_ENABLED": "yes",
        "MLX_SERVING_TELEMETRY_PROMETHEUS_PORT": "9100",
        "MLX_SERVING_TELEMETRY_OTLP_ENDPOINT": "http://localhost:4317",
    }
    config = load_config(None, env)
    assert (config.server.host, config.server.shutdown_grace_seconds) == ("0.0.0.0", 2.5)
    assert (config.engine.max_batch_size, config.engine.prefix_cache_bytes) == (64, 2**40)
    assert config.telemetry.enabled and config.telemetry.prometheus_port == 9100
    assert config.telemetry.otlp_endpoint == "http://localhost:4317"


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("1", True), ("ON", True), ("no", False)]
)
def test_environment_booleans(text, value):
    assert load_config(None, {"MLX_SERVING_TELEMETRY_ENABLED": text}).telemetry.enabled is value


def test_every_key_has_an_environment_variable():
    names = env_names()
    assert "MLX_SERVING_TELEMETRY_PROMETHEUS_PORT" in names
    assert "MLX_SERVING_ENGINE_MAX_BATCH_SIZE" in names
    expected = sum(
        len([f for f in getattr(default_config(), s).DESCRIPTOR.fields if not f.message_type])
        for s in ("server", "engine", "telemetry", "security")
    )
    assert len(names) == expected


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        (
            "MLX_SERVING_ENGINE_MAX_BATCH_SIZE",
            "lots",
            "engine.max_batch_size: MLX_SERVING_ENGINE_MAX_BATCH_SIZE='lots': expected an integer",
        ),
        (
            "MLX_SERVING_TELEMETRY_ENABLED",
            "maybe",
            "telemetry.enabled: MLX_SERVING_TELEMETRY_ENABLED='maybe': "
            "expected a boolean (true or 1 or yes or on or false or 0 or no or off)",
        ),
        (
            "MLX_SERVING_TELEMETRY_PORT",
            "9100",
            "MLX_SERVING_TELEMETRY_PORT: unknown variable (allowed: MLX_SERVING_TELEMETRY_ENABLED, "
            "MLX_SERVING_TELEMETRY_SERVICE_NAME, MLX_SERVING_TELEMETRY_PROMETHEUS_PORT, "
            "MLX_SERVING_TELEMETRY_EXPORT_INTERVAL_MS, MLX_SERVING_TELEMETRY_OTLP_ENDPOINT, "
            "MLX_SERVING_TELEMETRY_PROMETHEUS_HOST)",
        ),
        (
            "MLX_SERVING_TELEMTRY_ENABLED",
            "true",
            "MLX_SERVING_TELEMTRY_ENABLED: unknown variable (allowed: MLX_SERVING_CONFIG, "
            "MLX_SERVING_CACHE, MLX_SERVING_ENGINE_*, MLX_SERVING_SECURITY_*, "
            "MLX_SERVING_SERVER_*, MLX_SERVING_TELEMETRY_*)",
        ),
    ],
)
def test_bad_environment_variables(name, text, problem):
    assert problems({name: text}) == [problem]


def test_other_variables_are_not_config_keys():
    env = {"MLX_SERVING_CACHE": "/tmp/x", "MLX_SERVING_CONFIG": "/no/such.yaml", "PATH": "/bin"}
    assert load_config(None, env) == default_config()


# ---- layers and precedence -----------------------------------------------------------------


def test_defaults():
    config = load_config()
    assert config == default_config()
    assert engine_config(config) == EngineConfig()
    assert (config.server.host, config.server.port, config.server.log_level) == (
        "127.0.0.1",
        50051,
        "info",
    )
    assert list(config.models) == []


def test_every_engine_knob_is_a_config_key():
    engine_keys = {field.name for field in config_pb.EngineSettings.DESCRIPTOR.fields}
    knobs = {field.name for field in dataclasses.fields(EngineConfig)}
    assert engine_keys == knobs - {"shutdown_grace_seconds"}  # under server


def test_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, "c.toml", "[server]\nport = 1000\n[engine]\nmax_batch_size = 2\n")
    env = {"MLX_SERVING_SERVER_PORT": "2000", "MLX_SERVING_ENGINE_PREFILL_BATCH_SIZE": "3"}
    flags = {"server": {"port": 3000}, "engine": {"prefill_step_size": 64}}
    assert load_config(path).server.port == 1000
    assert load_config(path, env).server.port == 2000
    config = load_config(path, env, flags)
    assert config.server.port == 3000
    # Sections merge key by key; what no layer sets keeps its default.
    assert (config.engine.max_batch_size, config.engine.prefill_batch_size) == (2, 3)
    assert (config.engine.prefill_step_size, config.engine.max_queued_requests) == (64, 256)
    assert config.server.host == "127.0.0.1"


def test_flags_override_only_when_given(tmp_path, monkeypatch):
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLX_SERVING_CONFIG", raising=False)
    path = write(tmp_path, "c.yaml", "server: {port: 6000, log_level: debug}\n")

    def effective(*flags: str) -> config_pb.Config:
        return cli.effective_config(cli.make_parser().parse_args(["config", "print", *flags]))

    assert effective("--config", str(path)).server.port == 6000
    assert effective("--config", str(path), "--port", "50051").server.port == 50051  # the default
    assert effective("--config", str(path)).server.log_level == "debug"
    monkeypatch.setenv("MLX_SERVING_CONFIG", str(path))
    assert effective().server.port == 6000
    config = effective("--max-batch-size", "7", "--telemetry", "--prometheus-port", "9100")
    assert (config.engine.max_batch_size, config.telemetry.prometheus_port) == (7, 9100)
    assert config.telemetry.enabled


def test_model_flags_replace_the_file_models(tmp_path):
    path = write(tmp_path, "c.yaml", "models:\n  - {model_id: a, source: {local_path: /a}}\n")
    args = cli.make_parser().parse_args(["config", "print", "--model", "b=hf:acme/tiny@v1"])
    config = load_config(path, {}, cli.overrides(args))
    assert [to_dict(spec) for spec in config.models] == [
        {"model_id": "b", "source": {"hugging_face": {"repo_id": "acme/tiny", "revision": "v1"}}}
    ]
    assert [spec.model_id for spec in load_config(path).models] == ["a"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-batch-size", "-1"],
            f"argument --max-batch-size: engine.max_batch_size: {between(0, 1024)}",
        ),
        (["--prometheus-port", "80"], f"telemetry.prometheus_port: {between(1024, 65535)}"),
        (["--port", "x"], "argument --port: server.port: expected an integer, got 'x'"),
        (["--otlp-endpoint", "no uri"], "telemetry.otlp_endpoint: must be a valid URI"),
    ],
)
def test_flags_are_checked_by_the_contract_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.make_parser().parse_args(["serve", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# ---- files ---------------------------------------------------------------------------------

YAML = """\
server:
  port: 6000
engine:
  max_batch_size: 4
telemetry:
  enabled: true
  service_name: svc_1
models:
  - model_id: a
    source: {local_path: /models/a}
  - source:
      hugging_face: {repo_id: acme/tiny, revision: v1}
"""

TOML = """\
[server]
port = 6000

[engine]
max_batch_size = 4

[telemetry]
enabled = true
service_name = "svc_1"

[[models]]
model_id = "a"
source = { local_path = "/models/a" }

[[models]]
[models.source.hugging_face]
repo_id = "acme/tiny"
revision = "v1"
"""


def test_yaml_and_toml_files_say_the_same(tmp_path):
    from_yaml = load_config(write(tmp_path, "c.yaml", YAML))
    assert load_config(write(tmp_path, "c.yml", YAML)) == from_yaml
    assert load_config(write(tmp_path, "c.toml", TOML)) == from_yaml
    assert (from_yaml.server.port, from_yaml.engine.max_batch_size) == (6000, 4)
    assert from_yaml.telemetry.service_name == "svc_1"
    assert [m.model_id for m in from_yaml.models] == ["a", ""]
    assert from_yaml.models[1].source.hugging_face.repo_id == "acme/tiny"


def test_file_problems_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    (problem,) = problems(path=missing)
    assert problem.startswith(f"{missing}: ") and "No such file" in problem
    json_file = write(tmp_path, "c.json", "{}")
    assert problems(path=json_file) == [
        f"{json_file}: not a config file (allowed: .toml, .yaml, .yml)"
    ]
    bad_toml = write(tmp_path, "c.toml", "[server\n")
    (problem,) = problems(path=bad_toml)
    assert problem.startswith(f"{bad_toml}: ")
    twice = write(tmp_path, "twice.yaml", "server:\n  port: 1\n  port: 2\n")
    (problem,) = problems(path=twice)
    assert problem.startswith(f"{twice}: ") and "found duplicate key 'port'" in problem
    assert problems(path=write(tmp_path, "list.yaml", "- 1\n")) == [
        "expected a table, got list [1]"
    ]


def test_an_empty_yaml_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "empty.yaml", "# nothing yet\n")) == default_config()


@pytest.mark.parametrize("form", FORMATS)
def test_printed_configs_read_back(tmp_path, form):
    config = load_config(
        write(tmp_path, "c.yaml", YAML), {}, {"engine": {"coalesce_seconds": 1e-05}}
    )
    text = render(config, form)
    if form == "json":
        assert load_config(None, {}, json.loads(text)) == config
    else:
        assert load_config(write(tmp_path, f"printed.{form}", text)) == config


# ---- the CLI, in a process of its own ------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_serving.server.cli", *args]
    clean = {
        k: v for k, v in child_env().items() if k not in env_names() and k != "MLX_SERVING_CONFIG"
    }
    return subprocess.run(command, capture_output=True, text=True, env={**clean, **env}, timeout=60)


def test_config_check(tmp_path):
    good = write(tmp_path, "good.yaml", YAML)
    done = run_cli("config", "check", str(good), MLX_SERVING_ENGINE_MAX_BATCH_SIZE="0")
    assert (done.returncode, done.stdout) == (
        0,
        "ok\n",
    )  # the file alone: the environment is not read
    bad = write(
        tmp_path,
        "bad.toml",
        "[telemetry]\nprometheus_port = 1023\nexport_interval_ms = 600001\n[engin]\n",
    )
    done = run_cli("config", "check", str(bad))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        "engin: unknown key (allowed: server, engine, telemetry, models, security)",
        "telemetry.enabled: value is required",
        f"telemetry.prometheus_port: {between(1024, 65535)}",
        f"telemetry.export_interval_ms: {between(1000, 600000)}",
    ]


def test_config_print(tmp_path):
    path = write(tmp_path, "c.yaml", YAML)
    env = {"MLX_SERVING_ENGINE_MAX_BATCH_SIZE": "8", "MLX_SERVING_SERVER_PORT": "7000"}
    done = run_cli("config", "print", "--config", str(path), "--port", "8000", **env)
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["server"] == {
        "host": "127.0.0.1",
        "port": 8000,
        "shutdown_grace_seconds": 10.0,
        "log_level": "info",
        "max_response_bytes": 4194304,
        "max_request_bytes": 8388608,
        "max_streams_per_client": 64,
        "max_subscriptions_per_client": 4,
        "drain_delay_seconds": 0.0,
    }
    assert printed["engine"]["max_batch_size"] == 8
    assert printed["telemetry"]["service_name"] == "svc_1"
    assert len(printed["models"]) == 2
    for form, parse in (("toml", tomllib.loads), ("json", json.loads)):
        done = run_cli("config", "print", "--config", str(path), "--format", form, **env)
        assert parse(done.stdout) == {**printed, "server": {**printed["server"], "port": 7000}}


def test_config_print_without_anything_prints_the_defaults():
    done = run_cli("config", "print", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert load_config(None, {}, json.loads(done.stdout)) == default_config()


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path):
    done = run_cli("serve", "--port", "0", MLX_SERVING_TELEMETRY_PROMETHEUS_PORT="9100")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "telemetry.enabled: value is required\n"


async def test_the_engine_gets_the_configured_knobs():
    given = {
        "server": {"shutdown_grace_seconds": 3},
        "engine": {"max_batch_size": 5, "prefill_step_size": 64, "wedge_timeout_seconds": 9},
    }
    app = cli.make_app(load_config(None, {}, given))
    assert app.engine.config == EngineConfig(
        max_batch_size=5, prefill_step_size=64, wedge_timeout_seconds=9, shutdown_grace_seconds=3
    )


def test_serve_runs_the_configured_engine_and_models(model_path, tmp_path):
    path = write(
        tmp_path,
        "serve.yaml",
        yaml.safe_dump(
            {
                "server": {"shutdown_grace_seconds": 1},
                "engine": {"max_batch_size": 1, "max_queued_requests": 0, "retry_after_seconds": 7},
                "models": [{"model_id": "from-file", "source": {"local_path": str(model_path)}}],
            }
        ),
    )
    log = tmp_path / "server.log"
    process, address = start_server(["--config", str(path)], log)
    try:
        with grpc.insecure_channel(address) as channel:
            listed = model_grpc.ModelServiceStub(channel).ListModels(model_pb.ListModelsRequest())
            assert [m.model_id for m in listed.models] == ["from-file"]
            assert_one_generation_at_a_time(generate_grpc.GenerateServiceStub(channel), retry=7)
    finally:
        stop_server(process, log)


def assert_one_generation_at_a_time(stub, retry: float) -> None:
    """max_batch_size 1 and no queue: a second request is refused while the first runs."""
    request = generate_pb.GenerateRequest(
        model_id="from-file", text="Hello", max_tokens=1500, ignore_eos=True, temperature=0
    )
    first = stub.Generate(request, timeout=STARTUP_SECONDS)
    try:
        next(first)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Generate(request, timeout=STARTUP_SECONDS))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rpc_status.from_call(refused.value).details
        info = error_details_pb2.RetryInfo()
        assert any(d.Unpack(info) for d in details)
        assert info.retry_delay.ToTimedelta().total_seconds() == retry
    finally:
        first.cancel()


# ---- docs/CONFIG.md ------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_the_documented_examples_are_valid_and_alike(tmp_path):
    blocks = re.findall(r"```(yaml|toml)\n(.*?)```", DOC.read_text(), re.DOTALL)
    configs = [load_config(write(tmp_path, f"doc.{form}", text)) for form, text in blocks]
    assert len(configs) == 2 and configs[0] == configs[1]


def test_every_key_is_documented():
    doc = DOC.read_text()
    for name, (section, field) in env_names().items():
        assert f"| `{section}.{field.name}` |" in doc, name
