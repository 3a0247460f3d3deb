"""Backends behind a server subprocess: mlx-serving over gRPC, and mlx_lm.server over HTTP."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from .client import Prompt, RequestResult, closed_loop, describe_error

MLX_SERVING, MLX_LM_SERVER = "mlx_serving", "mlx_lm_server"
MODEL_ID = "bench"
HOST = "127.0.0.1"
LISTENING = re.compile(r"mlx-serving listening on (\S+):(\d+)")
ENGINE_ENV_PREFIX = "MLX_SERVING_ENGINE_"


class ServerProcess:
    """A server subprocess whose merged output is drained (and its tail kept) as it runs."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name, self.argv = name, argv
        self.env = {**os.environ, **(env or {})}
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task | None = None
        self._watch: list[tuple[re.Pattern, asyncio.Future]] = []
        self._reported = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        self._drain = asyncio.create_task(self._read())

    @contextlib.asynccontextmanager
    async def stopped_on_error(self):
        """Start the process; stop it again if what follows fails (no orphan servers)."""
        await self.start()
        try:
            yield
        except BaseException:
            await self.stop()
            raise

    async def wait_for_line(self, pattern: re.Pattern, timeout: float) -> re.Match:
        future = asyncio.get_running_loop().create_future()
        self._watch.append((pattern, future))
        for line in self.tail:
            if match := pattern.search(line):
                return match
        return await asyncio.wait_for(future, timeout)

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            for pattern, future in self._watch:
                if not future.done() and (match := pattern.search(text)):
                    future.set_result(match)
        for _, future in self._watch:
            if not future.done():
                future.set_exception(RuntimeError(f"{self.name} exited: {self.log()}"))

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")

    def report_exit(self) -> None:
        """Say once, with its last output, that the server died mid-run (its requests fail)."""
        if self.proc.returncode is not None and not self._reported:
            self._reported = True
            print(f"{self.name} exited with {self.proc.returncode}: {self.log()}", file=sys.stderr)

    def log(self) -> str:
        return "\n  | " + "\n  | ".join(self.tail)

    async def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._drain:
            await self._drain


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """`mlx-serving serve`: the console script beside this interpreter, else its module."""
    script = shutil.which("mlx-serving", path=str(Path(sys.executable).parent))
    if script:
        return [script, "serve"]
    return [sys.executable, "-m", "mlx_serving.server.cli", "serve"]


ONE_CLIENT_ENVIRONMENT = {"MLX_SERVING_SERVER_MAX_STREAMS_PER_CLIENT": "100000"}


def engine_environment(settings: dict) -> dict[str, str]:
    """Engine settings as the server reads them from its environment (docs/CONFIG.md)."""
    return {f"{ENGINE_ENV_PREFIX}{key.upper()}": env_value(v) for key, v in settings.items()}


def env_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class ServerBackend:
    """A backend behind a server subprocess (`self.server`) that `generate` calls."""

    server: ServerProcess

    async def run_level(self, prompts, concurrency, max_tokens):
        return await closed_loop(self.generate, prompts, concurrency, max_tokens)

    def server_pids(self) -> list[int]:
        return [self.server.proc.pid]

    def report_exit(self) -> None:
        self.server.report_exit()


class MlxServingBackend(ServerBackend):
    """Our server as a subprocess (`mlx-serving serve`), driven by asyncio gRPC clients on one
    channel."""

    name = MLX_SERVING

    def __init__(
        self, model: Path, startup_timeout: float, engine_settings: dict, extra_args: list[str]
    ):
        argv = [*serve_command(), "--host", HOST, "--port", "0"]
        argv += ["--model", f"{MODEL_ID}={model}", *extra_args]
        # The benchmark is one client with all the streams: the server's per-client bound
        # (64 by default, a guard against one greedy client) would refuse the 65th.
        environment = {**engine_environment(engine_settings), **ONE_CLIENT_ENVIRONMENT}
        self.server = ServerProcess(self.name, argv, environment)
        self.startup_timeout = startup_timeout
        self.channel = None

    async def __aenter__(self) -> MlxServingBackend:
        import grpc

        from mlx_serving.v1 import generate_service_pb2 as pb
        from mlx_serving.v1 import generate_service_pb2_grpc as pb_grpc

        self.pb = pb
        async with self.server.stopped_on_error():
            match = await self.server.wait_for_line(LISTENING, self.startup_timeout)
            self.channel = grpc.aio.insecure_channel(f"{match[1]}:{match[2]}")
            self.stub = pb_grpc.GenerateServiceStub(self.channel)
            await self._wait_serving()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.server.stop()

    async def _wait_serving(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self.server.check_alive()
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"mlx-serving never became SERVING: {self.server.log()}")

    async def generate(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        request = self.pb.GenerateRequest(
            model_id=MODEL_ID,
            tokens=self.pb.TokenIds(ids=prompt.ids),
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        result = RequestResult(start=time.perf_counter())
        try:
            async for reply in self.stub.Generate(request):
                result.arrived(len(reply.token_ids), time.perf_counter())
                if reply.HasField("usage"):
                    result.prompt_tokens = reply.usage.prompt_tokens
                    ttft = reply.usage.time_to_first_token
                    result.engine_ttft = ttft.seconds + ttft.nanos / 1e9
                    result.engine_tok_s = reply.usage.tokens_per_second
        except Exception as exc:
            result.error = describe_error(exc)
        return result


class MlxLmServerBackend(ServerBackend):
    """mlx_lm.server with its default batching, streaming completions, MLX's own defaults.

    It takes text prompts only, so each prompt's text (which encodes back to the same ids)
    is sent, and the prompt_tokens it reports prove it. It has no ignore_eos; the random
    models never pick EOS (its logit row is zero), and `short` counts any that stop early.
    """

    name = MLX_LM_SERVER

    def __init__(self, model: Path, startup_timeout: float):
        self.port = free_port()
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model)]
        argv += ["--host", HOST, "--port", str(self.port)]
        self.server = ServerProcess(self.name, argv)
        self.startup_timeout = startup_timeout

    async def __aenter__(self) -> MlxLmServerBackend:
        async with self.server.stopped_on_error():
            await self._wait_healthy()
        return self

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self.server.check_alive()
            try:
                if await http_get_status(HOST, self.port, "/health") == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"mlx_lm.server never answered /health: {self.server.log()}")

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()

    async def generate(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        body = {
            "prompt": prompt.text,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        result = RequestResult(start=time.perf_counter())
        usage = None
        try:
            async for now, event in post_sse(HOST, self.port, "/v1/completions", body):
                for choice in event.get("choices") or ():
                    result.arrived(1 if choice.get("text") else 0, now)
                usage = event.get("usage") or usage
        except Exception as exc:
            result.error = describe_error(exc)
            return result
        if usage is None:
            result.error = "no usage in the stream"
        else:
            # Events carry text, not ids: a held-back partial character makes one event hold two.
            result.tokens = usage["completion_tokens"]
            result.prompt_tokens = usage["prompt_tokens"]
        return result


async def http_get_status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def post_sse(host: str, port: int, path: str, payload: dict):
    """POST a JSON body and yield (arrival time, event) for each server-sent `data:` event."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status = await reader.readline()
        while (await reader.readline()).strip():
            pass
        if status.split()[1:2] != [b"200"]:
            detail = (await reader.read(300)).decode(errors="replace")
            raise ConnectionError(f"HTTP {status.decode().strip()} {detail}")
        while line := await reader.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield time.perf_counter(), json.loads(data)
        raise ConnectionError("the stream ended before [DONE]")
    finally:
        writer.close()
