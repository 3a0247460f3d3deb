"""`mlx-serving serve` runs the gRPC server until SIGTERM or SIGINT; `mlx-serving config print`
shows the configuration it would run with, and `mlx-serving config check FILE` checks a file.

The configuration (docs/CONFIG.md) is the defaults, then the file of --config (or of
$MLX_SERVING_CONFIG), then MLX_SERVING_* variables, then flags. The host defaults to 127.0.0.1;
listening anywhere else without TLS or tokens (server.tls, security.tokens_*) logs a warning.
SIGHUP reads the TLS files and the token file again.

`mlx-serving download ORG/NAME[@REV]` puts a model's files in the Hugging Face cache (the code
LoadModel downloads with, engine/hub.py) and prints its directory; `mlx-serving models` lists
the cache's MLX models (docs/MODELS.md).

`--model ORG/NAME[@REV]` is a Hugging Face repository, as mlx-lm reads it, when no such local
path exists; `hf:ORG/NAME[@REV]` always is one. Either resolves through the Hugging Face cache
first, so a downloaded model is served offline.

The first SIGTERM or SIGINT (Ctrl-C) drains: health turns NOT_SERVING, new requests are still
taken for `server.drain_delay_seconds` (default 0: load balancers that watch health stop
sending meanwhile), then refused, and generations in flight get the shutdown grace to finish.
A second one during the drain ends the process at once, its engine and streams with it.

An engine process that dies or wedges is restarted with its models, up to
`engine.max_engine_restarts` times in a row (after `engine.engine_restart_backoff_seconds`,
doubling each time; a restarted engine that serves for a minute starts a new row).

Exit status: 0 after a graceful shutdown, 1 if startup failed, 2 for bad arguments or a bad
configuration, 3 when the engine failed and is not restarted again (more failures in a row than
`engine.max_engine_restarts`, or any with 0): restarting the server is then its supervisor's
turn. 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) when a second signal forced
the exit, as shells report a process killed by that signal.
"""

import argparse
import asyncio
import importlib.metadata
import ipaddress
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import protovalidate

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import EngineError
from mlx_serving.engine.models import ModelSource
from mlx_serving.v1 import config_pb2 as config_pb
from mlx_serving.v1 import model_service_pb2 as model_pb

from . import convert
from .app import ServingApp
from .auth import TokenError, TokenStore, token_store
from .config import (
    CONFIG_ENV,
    FORMATS,
    ConfigError,
    default_config,
    engine_config,
    load_config,
    load_policy,
    parse_override,
    preload_models,
    render,
    to_dict,
)
from .interceptor import describe
from .telemetry import make_telemetry
from .tls import ServerCertificates, TlsError

log = logging.getLogger("mlx_serving.server")

DISTRIBUTION = "mlx-serving"
HF_PREFIX = "hf:"
# What may stand before "=" in ID=SOURCE; LoadModelRequest's own rule then checks it fully.
MODEL_ID_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
# ORG/NAME[@REVISION], as mlx-lm users type a model; the name parts follow HuggingFaceRepo's rule.
REPO_ID_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@\S+)?$")

# (flag, config key it overrides, help)
OVERRIDES = (
    ("--host", "server.host", "interface to listen on"),
    ("--port", "server.port", "0 picks a free port"),
    ("--log-level", "server.log_level", "debug, info, warning or error"),
    ("--shutdown-grace", "server.shutdown_grace_seconds", "seconds of grace after SIGTERM"),
    ("--drain-delay", "server.drain_delay_seconds", "seconds NOT_SERVING before refusing"),
    ("--max-batch-size", "engine.max_batch_size", "most sequences decoded together per model"),
    ("--max-queued-requests", "engine.max_queued_requests", "requests that may wait for a slot"),
    ("--prefill-batch-size", "engine.prefill_batch_size", "most prompts prefilled together"),
    ("--prefill-step-size", "engine.prefill_step_size", "prompt tokens per prefill step"),
    ("--prefix-cache-bytes", "engine.prefix_cache_bytes", "KV-cache bytes kept for prefix reuse"),
    ("--prometheus-port", "telemetry.prometheus_port", "port of the Prometheus endpoint"),
    ("--otlp-endpoint", "telemetry.otlp_endpoint", "OTLP/gRPC endpoint for traces; empty: none"),
)
TELEMETRY_SWITCH = ("--telemetry", "telemetry.enabled", "turn metrics and traces on or off")


def parse_model_spec(spec: str) -> tuple[str, ModelSource]:
    """`[ID=]PATH`, `[ID=]ORG/NAME[@REV]` or `[ID=]hf:ORG/NAME[@REV]` → (model id or "", source).

    An existing path is a local model; else ORG/NAME is a Hugging Face repository, so that what
    mlx-lm users type works as is. Checked with the same contract rules as a LoadModel request.
    """
    model_id, _, rest = spec.partition("=")
    if not rest or not MODEL_ID_PREFIX.match(model_id):
        model_id, rest = "", spec  # a path that happens to contain "="
    if rest.startswith(HF_PREFIX):
        source = hugging_face_source(rest.removeprefix(HF_PREFIX))
    elif rest and not path_exists(rest) and REPO_ID_SHAPE.match(rest):
        source = hugging_face_source(rest)
    elif rest and not path_exists(rest):
        raise argparse.ArgumentTypeError(
            f"bad --model {spec!r}: {rest!r} is no existing path, nor a Hugging Face repository "
            "id (ORG/NAME[@REV])"
        )
    else:
        source = model_pb.ModelSource(local_path=rest)
    request = model_pb.LoadModelRequest(model_id=model_id, source=source)
    if violations := protovalidate.collect_violations(request):
        problems = "; ".join(f"{field}: {text}" for field, text in map(describe, violations))
        raise argparse.ArgumentTypeError(f"bad --model {spec!r}: {problems}")
    return model_id, convert.model_source(source)


def hugging_face_source(repo: str) -> model_pb.ModelSource:
    """`ORG/NAME[@REV]` as a ModelSource (the revision may itself hold "/": refs/pr/1)."""
    repo_id, _, revision = repo.partition("@")
    return model_pb.ModelSource(
        hugging_face=model_pb.HuggingFaceRepo(repo_id=repo_id, revision=revision)
    )


def path_exists(text: str) -> bool:
    """Whether `text` names something on disk; a name the system refuses is no path."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # too long, a NUL byte
        return False


def model_entry(model_id: str, source: ModelSource) -> dict:
    """A parsed --model as an entry of the config's `models` list."""
    return {"model_id": model_id, "source": to_dict(convert.model_source_pb(source))}


def flag_value(key: str) -> Callable[[str], Any]:
    """An argparse type: the flag's text as config key `key`, checked by the key's own rules."""

    def parse(text: str) -> Any:
        try:
            return parse_override(key, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def record(namespace: argparse.Namespace, key: str, value: Any) -> None:
    """Notes a flag that was given: only those override the file and the environment."""
    namespace.overrides = {**namespace.overrides, key: value}


class Override(argparse.Action):
    """Stores the value like "store", and records it as an override of config key `key`."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        record(namespace, self.key, values)


class SwitchOverride(argparse.BooleanOptionalAction):
    """--NAME / --no-NAME, recorded as an override of config key `key`."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        record(namespace, self.key, getattr(namespace, self.dest))


def default_of(key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(default_config(), section), name)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config, one flag per overridable key, and --model; shared by `serve` and `config print`."""
    parser.set_defaults(overrides={})
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"a YAML or TOML config file (default: ${CONFIG_ENV}, if set)",
    )
    for flag, key, text in OVERRIDES:
        default = default_of(key)
        parser.add_argument(
            flag,
            action=Override,
            key=key,
            type=flag_value(key),
            default=default,
            metavar=key.rpartition(".")[2].upper(),
            help=f"{text} [{key}, default {json.dumps(default)}]",
        )
    flag, key, text = TELEMETRY_SWITCH
    parser.add_argument(flag, action=SwitchOverride, key=key, help=f"{text} [{key}]")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=parse_model_spec,
        default=[],
        metavar="[ID=]PATH|[ID=][hf:]ORG/NAME[@REV]",
        help="a model to load at startup (repeatable; replaces the configured models): a local "
        "directory, or else a Hugging Face repository (cache first, then a download); none "
        "anywhere loads the built-in tiny test model",
    )


def installed_version() -> str:
    """The version pip installed, so that a bug report can name it."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-serving", description="Serve MLX models over gRPC.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server until SIGTERM or SIGINT (Ctrl-C), which drain: "
        "generations in flight get the shutdown grace to finish. A second signal during the "
        "drain exits at once with status 128 + its number (130 for SIGINT, 143 for SIGTERM).",
    )
    add_config_flags(serve)
    serve.set_defaults(run=run_serve)
    config = commands.add_parser("config", help="print or check the configuration")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser("print", help="print the effective configuration")
    add_config_flags(show)
    show.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    show.set_defaults(run=run_print)
    check = actions.add_parser("check", help="check a config file (alone): ok, or every error")
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(run=run_check)
    add_model_commands(commands)
    return parser


def add_model_commands(commands: Any) -> None:
    """`download` and `models`: the Hugging Face cache that --model and LoadModel read."""
    download = commands.add_parser(
        "download",
        help="download a model from Hugging Face into its cache",
        description="Download the files an MLX model needs (weights, config, tokenizer, chat "
        "template) into the Hugging Face cache ($HF_HOME/hub), resuming a download that was cut "
        "off, and print the local directory. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply.",
    )
    download.add_argument("repo", type=repository_spec, metavar="[hf:]ORG/NAME[@REVISION]")
    download.set_defaults(run=run_download)
    models = commands.add_parser(
        "models",
        help="list the MLX models in the Hugging Face cache",
        description="One line per cached model revision that MLX can load: repository, "
        "revision, size on disk, quantization (or the weights' dtype).",
    )
    models.set_defaults(run=run_models)


def repository_spec(text: str) -> tuple[str, str | None]:
    """`[hf:]ORG/NAME[@REV]` → (repository id, revision or None), by LoadModel's own rules."""
    repo = text.removeprefix(HF_PREFIX)
    if not REPO_ID_SHAPE.match(repo):
        raise argparse.ArgumentTypeError(f"{text!r} is not ORG/NAME[@REVISION]")
    source = hugging_face_source(repo)
    request = model_pb.LoadModelRequest(source=source)
    if violations := protovalidate.collect_violations(request):
        problems = "; ".join(f"{field}: {why}" for field, why in map(describe, violations))
        raise argparse.ArgumentTypeError(f"bad repository {text!r}: {problems}")
    return source.hugging_face.repo_id, source.hugging_face.revision or None


def run_download(args: argparse.Namespace) -> int:
    """Progress on stderr, the directory alone on stdout (`$(mlx-serving download X)`)."""
    from mlx_serving.engine import hub

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    repo_id, revision = args.repo
    try:
        path = hub.download(repo_id, revision, progress=True)
    except hub.DownloadFailed as exc:
        print(f"mlx-serving download: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlx-serving download: interrupted; run it again to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    print(path)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from huggingface_hub import constants

    from mlx_serving.engine import hub

    models = hub.cached_models()
    for line in hub.model_lines(models):
        print(line)
    if not models:
        cache = constants.HF_HUB_CACHE
        print(f"no MLX models in the Hugging Face cache ({cache})", file=sys.stderr)
    return 0


def effective_config(args: argparse.Namespace) -> config_pb.Config:
    """Defaults ← the config file ← MLX_SERVING_* variables ← the flags given."""
    path = args.config or os.environ.get(CONFIG_ENV) or None
    return load_config(Path(path) if path else None, os.environ, overrides(args))


def overrides(args: argparse.Namespace) -> dict:
    """The flags given, shaped like a config file; --model entries replace `models`."""
    nested: dict[str, Any] = {}
    for key, value in args.overrides.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    if args.models:
        nested["models"] = [model_entry(model_id, source) for model_id, source in args.models]
    return nested


def run_serve(args: argparse.Namespace) -> int:
    config = effective_config(args)
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if DISTRIBUTED_RANK_ENV in os.environ:  # under mlx.launch: docs/DISTRIBUTED.md
        from mlx_serving.engine import distributed

        if (distributed.launched_rank() or 0) > 0:
            distributed.follow()  # ends the process once rank 0 stops
        # Its followers cannot join a restarted engine: a failure ends the whole group.
        config.engine.max_engine_restarts = 0
    return asyncio.run(serve(config))


def run_print(args: argparse.Namespace) -> int:
    print(render(effective_config(args), args.format), end="")
    return 0


def run_check(args: argparse.Namespace) -> int:
    load_config(args.file)
    print("ok")
    return 0


def default_models() -> list[tuple[str, ModelSource]]:
    """The tiny random-weight model, built into the cache on first use (a few seconds)."""
    from mlx_serving.server.default_model import DEFAULT_MODEL_NAME, default_model_path

    return [(DEFAULT_MODEL_NAME, ModelSource(local_path=str(default_model_path())))]


def make_app(config: config_pb.Config) -> ServingApp:
    """The engine and the server that `config` describes (call it inside the event loop)."""
    certificates, tokens = wire_security(config)
    telemetry = make_telemetry(config.telemetry)
    engine = Engine(engine_config(config), policy=load_policy(config))
    server = config.server
    return ServingApp(
        engine,
        server.host,
        server.port,
        telemetry=telemetry,
        max_response_bytes=server.max_response_bytes,
        certificates=certificates,
        tokens=tokens,
        protect_health=config.security.protect_health,
        max_request_bytes=server.max_request_bytes,
        max_streams_per_client=server.max_streams_per_client,
        max_subscriptions_per_client=server.max_subscriptions_per_client,
    )


def wire_security(
    config: config_pb.Config,
) -> tuple[ServerCertificates | None, TokenStore | None]:
    """The TLS files and the tokens, read before anything starts: one that cannot be used is a
    ConfigError (exit 2), not a server that fails every handshake or refuses every call."""
    tls, security = config.server.tls, config.security
    try:
        certificates = None
        if config.server.HasField("tls"):
            client_ca = Path(tls.client_ca_file) if tls.client_ca_file else None
            certificates = ServerCertificates(Path(tls.cert_file), Path(tls.key_file), client_ca)
        tokens = token_store(security.tokens_file or None, security.tokens_env or None)
    except (TlsError, TokenError) as exc:
        raise ConfigError([(exc.key, exc.problem)]) from None
    return certificates, tokens


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost": only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(config: config_pb.Config) -> None:
    """Said loudly at startup: anyone who reaches the port may generate, load and unload."""
    security = config.security
    if is_loopback(config.server.host) or config.server.HasField("tls"):
        return
    if security.tokens_file or security.tokens_env:
        return
    log.warning(
        "listening on %s without TLS or tokens: anyone who can reach the port may call every "
        "RPC, LoadModel included; set server.tls and security.tokens_file (docs/CONFIG.md)",
        config.server.host,
    )


# The engine's reader thread and the event loop share the GIL. At Python's default 5 ms switch
# interval a batch step's results would wait up to that long for the loop to let go of it.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005
# How long a forced exit waits for each killed child process to be gone (SIGKILL: a moment).
FORCED_EXIT_JOIN_SECONDS = 1.0
# mlx.launch gives every rank its number here; rank 0 serves, the others follow it.
DISTRIBUTED_RANK_ENV = "MLX_RANK"
# The exit status once the engine has failed more times in a row than it may be restarted.
ENGINE_GAVE_UP_EXIT = 3


async def serve(config: config_pb.Config) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    app = make_app(config)
    warn_if_exposed(config)
    engine = app.engine
    models = preload_models(config) or default_models()
    signals = StopSignals(engine)
    signals.install()
    install_reload_signal(app)
    try:
        if not await first_of(app.start(models), signals.requested.wait()):
            await app.stop(0)
            return 0
    except (EngineError, RuntimeError) as exc:  # a model that fails to load, a port in use
        log.error("startup failed: %s", exc)
        await app.stop(0)
        return 1
    print(f"mlx-serving listening on {app.address}: {serving_summary(app, config)}", flush=True)
    if app.metrics_address:
        print(f"mlx-serving metrics on http://{app.metrics_address}/metrics", flush=True)
    requested = await first_of(signals.requested.wait(), engine.wait_stopped())
    signals.stopping = True
    grace = config.server.shutdown_grace_seconds
    if requested:
        log.info("shutting down: %s", drain_plan(engine.active_requests(), grace))
    else:
        log.error("the engine failed and is not restarted again; shutting down")
    await app.stop(grace, config.server.drain_delay_seconds if requested else 0.0)
    return 0 if requested else ENGINE_GAVE_UP_EXIT


def serving_summary(app: ServingApp, config: config_pb.Config) -> str:
    """What is served, where it runs and how it batches: the rest of the startup line, after
    the address (`mlx-serving listening on HOST:PORT: ...`)."""
    infos = app.engine.list_models()
    model_ids = ", ".join(info.model_id for info in infos)
    settings = config.engine
    batch_size = str(settings.max_batch_size)
    if not settings.max_batch_size:  # each model's own, derived from memory at its load
        derived = ", ".join(f"{info.model_id} {info.max_batch_size}" for info in infos)
        batch_size = f"from memory ({derived})" if derived else "from memory"
    return (
        f"serving {model_ids} on {mlx_device()}: max batch size {batch_size}, "
        f"prefill batch size {settings.prefill_batch_size}, "
        f"max queued requests {settings.max_queued_requests}"
    )


def mlx_device() -> str:
    """MLX's default device: "cpu", "gpu (Metal)" or "gpu (CUDA)". Asked here, in the server
    process: the engine process, on the same machine and library, picks the same one, and its
    facade does not report it."""
    import mlx.core as mx

    kind = mx.default_device().type.name
    if kind != "gpu":
        return kind
    if mx.metal.is_available():
        return "gpu (Metal)"
    return "gpu (CUDA)" if mx.cuda.is_available() else "gpu"


def drain_plan(streams: int, grace: float) -> str:
    """What the shutdown waits for, and how not to wait: said once, when the drain begins."""
    if not streams:
        return "no generation in flight"
    return f"draining {streams} generation(s), up to {grace:g} s; Ctrl-C again to force"


class StopSignals:
    """SIGTERM and SIGINT. The first asks for a graceful stop; one more, once a stop was asked
    for or has begun, means the sender will not wait for it: the process exits at once."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requested = asyncio.Event()
        # The shutdown has begun, asked for or not (the engine may have died).
        self.stopping = False

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.received, signum)

    def received(self, signum: int) -> None:
        if self.requested.is_set() or self.stopping:
            force_exit(signum, self.engine.active_requests())
        self.requested.set()


def install_reload_signal(app: ServingApp) -> None:
    """SIGHUP reads the TLS files and the token file again. With neither, it keeps its default
    action: it ends the process."""
    if app.certificates is None and (app.tokens is None or app.tokens.path is None):
        return
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_files, app)


def reload_files(app: ServingApp) -> None:
    log.info("SIGHUP: reading the TLS files and tokens again")
    app.reload()


def force_exit(signum: int, streams: int) -> NoReturn:
    """Exit now with 128 + `signum`, as a shell reports a process that signal killed.

    The engine and chat-template processes are killed first, not left behind; streams in flight
    break off (their clients see UNAVAILABLE), spans not yet exported are lost.
    """
    name = signal.Signals(signum).name
    log.warning("%s during the shutdown: exiting now, cutting off %d generation(s)", name, streams)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(FORCED_EXIT_JOIN_SECONDS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


async def first_of(main, other) -> bool:
    """Run both; True if `main` finished first (its exception propagates), else cancel it."""
    tasks = [asyncio.ensure_future(main), asyncio.ensure_future(other)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if tasks[0] in done:
        tasks[0].result()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
