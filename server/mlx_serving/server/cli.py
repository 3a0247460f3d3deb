"""`mlx-serving serve`: run the gRPC server until SIGTERM or SIGINT.

The host defaults to 127.0.0.1: the server has no authentication, so listening on every
interface (`--host 0.0.0.0`) must be asked for. Exit status: 0 after a graceful shutdown,
1 if startup failed or the engine thread died, 2 for bad arguments.
"""

import argparse
import asyncio
import logging
import re
import signal
import sys

import protovalidate

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import EngineError
from mlx_serving.engine.models import ModelSource
from mlx_serving.v1 import model_service_pb2 as model_pb

from . import convert
from .app import DEFAULT_HOST, DEFAULT_PORT, ServingApp
from .interceptor import describe

log = logging.getLogger("mlx_serving.server")

HF_PREFIX = "hf:"
# What may stand before "=" in ID=SOURCE; LoadModelRequest's own rule then checks it fully.
MODEL_ID_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_model_spec(spec: str) -> tuple[str, ModelSource]:
    """`PATH`, `ID=PATH`, `hf:ORG/NAME[@REV]` or `ID=hf:ORG/NAME[@REV]` → (model id or "", source).

    Checked with the same contract rules as a LoadModel request.
    """
    model_id, _, rest = spec.partition("=")
    if not rest or not MODEL_ID_PREFIX.match(model_id):
        model_id, rest = "", spec  # a path that happens to contain "="
    if rest.startswith(HF_PREFIX):
        repo_id, _, revision = rest.removeprefix(HF_PREFIX).partition("@")
        repo = model_pb.HuggingFaceRepo(repo_id=repo_id, revision=revision)
        source = model_pb.ModelSource(hugging_face=repo)
    else:
        source = model_pb.ModelSource(local_path=rest)
    request = model_pb.LoadModelRequest(model_id=model_id, source=source)
    if violations := protovalidate.collect_violations(request):
        problems = "; ".join(f"{field}: {text}" for field, text in map(describe, violations))
        raise argparse.ArgumentTypeError(f"bad --model {spec!r}: {problems}")
    return model_id, convert.model_source(source)


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0..65535 (0 picks a free port)")
    return port


def grace_seconds(text: str) -> float:
    seconds = float(text)
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"shutdown grace {seconds} is not in 0..3600 seconds")
    return seconds


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-serving", description="Serve MLX models over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on (%(default)s)")
    serve.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help="0 picks a free port (%(default)s)"
    )
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        type=parse_model_spec,
        default=[],
        metavar="[ID=]PATH|[ID=]hf:ORG/NAME[@REV]",
        help="a model to load at startup (repeatable); none loads the built-in tiny test model",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    serve.add_argument(
        "--shutdown-grace",
        type=grace_seconds,
        default=EngineConfig().shutdown_grace_seconds,
        metavar="SECONDS",
        help="how long in-flight generations may run on after SIGTERM (%(default)s)",
    )
    return parser


def default_models() -> list[tuple[str, ModelSource]]:
    """The tiny random-weight model, built into the cache on first use (a few seconds)."""
    from mlx_serving.engine.default_model import DEFAULT_MODEL_NAME, default_model_path

    return [(DEFAULT_MODEL_NAME, ModelSource(local_path=str(default_model_path())))]


async def serve(args: argparse.Namespace) -> int:
    engine = Engine(EngineConfig(shutdown_grace_seconds=args.shutdown_grace))
    app = ServingApp(engine, args.host, args.port)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        if not await first_of(app.start(args.models or default_models()), stop_requested.wait()):
            await app.stop(0)
            return 0
    except (EngineError, RuntimeError) as exc:  # a model that fails to load, a port in use
        log.error("startup failed: %s", exc)
        await app.stop(0)
        return 1
    print(f"mlx-serving listening on {app.address}", flush=True)
    requested = await first_of(stop_requested.wait(), engine.wait_stopped())
    log.info("shutting down" if requested else "the engine stopped; shutting down")
    await app.stop(args.shutdown_grace)
    return 0 if requested else 1


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
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
