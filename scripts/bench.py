"""Side-by-side throughput and latency: raw mlx-lm BatchGenerator, mlx-serving, mlx_lm.server.

Usage:
  python scripts/bench.py [--model-preset small | --model PATH] [--concurrency 1,4,16,32]
                          [--max-tokens 128] [--prompt-tokens 118 | MIN-MAX]
                          [--requests-per-level N]
                          [--rounds 1] [--skip mlx_lm_server] [--engine KEY=VALUE ...]
                          [--json OUT]

Every backend gets the same prompts (the same token ids, distinct first tokens so no prefix
cache helps), the same max_tokens, greedy decoding and EOS ignored, as closed-loop clients:
each of N clients sends its next request when the previous one ends. `--prompt-tokens MIN-MAX`
gives each prompt its own length in that range, as a server's traffic would, so that shapes
the warm-up did not see turn up inside measured rounds (the issue's runs use one length).

Both servers are started (and warmed up) once and the raw BatchGenerator is loaded in this
process; then each level runs on one backend at a time, never two at once (an idle server
only waits on its request queue). Running the backends back to back per level, in a rotating
order and for `--rounds` rounds, puts machine drift (thermal, other load) on all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PATHS = [str(ROOT / "server"), str(ROOT / "stubs" / "src")]
sys.path[:0] = [*SOURCE_PATHS, str(ROOT / "scripts")]

from make_bench_model import add_model_arguments, chosen_model_path  # noqa: E402

RAW, ENGINE, MLX_SERVING, MLX_LM_SERVER = "raw", "engine", "mlx_serving", "mlx_lm_server"
# ENGINE (our engine in this process, no wire) is a diagnostic: it splits the gap to raw
# between the engine and the wire.
BACKENDS = (RAW, ENGINE, MLX_SERVING, MLX_LM_SERVER)
MODEL_ID = "bench"
HOST = "127.0.0.1"
LISTENING = re.compile(r"mlx-serving listening on (\S+):(\d+)")
# A level's requests: 2 x concurrency, and never so few that one slow request decides it.
MIN_REQUESTS_PER_LEVEL = 8
# Warm-up: prompts as long as the measured ones, a few tokens each. MLX's CUDA backend stalls
# ~100 ms the first time it meets a prefill of a new shape (measured on the H100: a group of
# 1-7 prompts of 118 tokens took 90-130 ms the first time, 17-36 ms after), and a backend that
# gathers arrivals forms groups of every size, so every group size is prefilled once before
# anything is measured.
WARMUP_TOKENS = 4

# Targets from the issue: (2)/(1) tok/s everywhere; (2)/(3) tok/s at 32 and TTFT p50 at 16.
RAW_RATIO_MIN = 0.97
SERVER_TOKS_RATIO_MIN, SERVER_TOKS_AT = 3.0, 32
SERVER_TTFT_RATIO_MAX, SERVER_TTFT_AT = 0.3, 16


# ---- measurements ------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    # Decodes from ids and encodes back to exactly them, for the text-only HTTP server.
    text: str


@dataclass
class RequestResult:
    start: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    error: str | None = None
    # As the engine measured them (the final message's usage): from admission to the first
    # token, and the request's decode rate. The client's figures minus these are the wire's.
    engine_ttft: float | None = None
    engine_tok_s: float | None = None

    def arrived(self, n: int, now: float) -> None:
        """n tokens reached the client in one message; its gap is spread over them."""
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        else:
            self.itl.extend([(now - self.last) / n] * n)
        self.last = now
        self.tokens += n


@dataclass
class Round:
    """One run of one level on one backend."""

    results: list[RequestResult]
    wall_s: float
    server_cpu_s: float | None
    client_cpu_s: float | None

    @property
    def tok_s(self) -> float:
        tokens = sum(r.tokens for r in self.results if r.error is None)
        return tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class LevelResult:
    backend: str
    concurrency: int
    rounds: int
    requests: int
    failures: int
    # Requests that ended before max_tokens (EOS not ignored, or cut short).
    short: int
    tokens: int
    wall_s: float
    # Median over rounds, and its spread.
    tok_s: float
    tok_s_min: float
    tok_s_max: float
    # Round by round, in the order run: a ratio of two backends' same round is paired in time.
    tok_s_rounds: list[float]
    # Over every request of every round.
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    prompt_tokens: list[int]
    errors: list[str]
    # Inside the engine (mlx_serving and engine only; None for the others): TTFT from
    # admission, and the decode interval (1 / the request's tokens/s), over every request.
    engine_ttft_p50_ms: float | None
    engine_ttft_p95_ms: float | None
    engine_itl_p50_ms: float | None
    # CPU seconds per round of the server process and of this (client) process; for raw,
    # everything runs in this process and counts as server. None where unreadable.
    server_cpu_s: float | None
    client_cpu_s: float | None


def summarize(backend: str, concurrency: int, rounds: list[Round], max_tokens: int) -> LevelResult:
    results = [r for one in rounds for r in one.results]
    ok = [r for r in results if r.error is None and r.first is not None]
    ttft = [1e3 * (r.first - r.start) for r in ok]
    itl = [1e3 * gap for r in ok for gap in r.itl]
    tok_s = [one.tok_s for one in rounds]
    engine_ttft = [1e3 * r.engine_ttft for r in ok if r.engine_ttft is not None]
    engine_itl = [1e3 / r.engine_tok_s for r in ok if r.engine_tok_s]
    return LevelResult(
        backend=backend,
        concurrency=concurrency,
        rounds=len(rounds),
        requests=len(results),
        failures=len(results) - len(ok),
        short=sum(r.tokens < max_tokens for r in ok),
        tokens=sum(r.tokens for r in ok),
        wall_s=sum(one.wall_s for one in rounds),
        tok_s=float(np.median(tok_s)),
        tok_s_min=min(tok_s),
        tok_s_max=max(tok_s),
        tok_s_rounds=tok_s,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p95_ms=percentile(ttft, 95),
        itl_p50_ms=percentile(itl, 50),
        prompt_tokens=sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
        errors=sorted({r.error for r in results if r.error})[:5],
        engine_ttft_p50_ms=percentile(engine_ttft, 50) if engine_ttft else None,
        engine_ttft_p95_ms=percentile(engine_ttft, 95) if engine_ttft else None,
        engine_itl_p50_ms=percentile(engine_itl, 50) if engine_itl else None,
        server_cpu_s=mean_or_none([one.server_cpu_s for one in rounds]),
        client_cpu_s=mean_or_none([one.client_cpu_s for one in rounds]),
    )


def mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of this process, or of another one by pid (Linux /proc)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def closed_loop(
    call: Callable[[Prompt, int], Awaitable[RequestResult]],
    prompts: list[Prompt],
    concurrency: int,
    max_tokens: int,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients share the prompt list, each sending its next when one ends."""
    pending, results = iter(prompts), []

    async def client() -> None:
        for prompt in pending:
            results.append(await call(prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


# ---- prompts -----------------------------------------------------------------------------


def make_prompts(
    tokenizer,
    count: int,
    n_tokens: int | tuple[int, int],
    seed: int = 0,
    firsts: set[int] | None = None,
) -> list[Prompt]:
    """Distinct prompts of exactly n_tokens ids (or each of its own length in a (min, max)
    range, drawn from `seed`) that survive decode → encode unchanged.

    Distinct first tokens (none of them in, and each added to, `firsts`) keep every prefix
    cache (ours and mlx_lm.server's) out of play.
    """
    from mlx_serving.engine.default_model import CORPUS

    shortest, longest = (n_tokens, n_tokens) if isinstance(n_tokens, int) else n_tokens
    words, rng = CORPUS.split(), random.Random(seed)
    prompts, firsts = [], set() if firsts is None else firsts
    n_tokens = rng.randint(shortest, longest)
    for _ in range(count * 200):
        text = " ".join(rng.choice(words) for _ in range(2 * n_tokens + 20))
        offset = rng.randrange(8)
        ids = tokenizer.encode(text, add_special_tokens=False)[offset : offset + n_tokens]
        text = tokenizer.decode(ids)
        if len(ids) == n_tokens and ids[0] not in firsts and tokenizer.encode(text) == ids:
            prompts.append(Prompt(ids, text))
            firsts.add(ids[0])
            if len(prompts) == count:
                return prompts
            n_tokens = rng.randint(shortest, longest)
    raise SystemExit(f"could only make {len(prompts)} distinct {n_tokens}-token prompts")


# ---- servers as subprocesses -------------------------------------------------------------


class ServerProcess:
    """A server subprocess whose merged output is drained (and its tail kept) as it runs."""

    def __init__(self, name: str, argv: list[str]):
        self.name, self.argv = name, argv
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task | None = None
        self._watch: list[tuple[re.Pattern, asyncio.Future]] = []
        self._reported = False

    async def start(self) -> None:
        paths = [*SOURCE_PATHS, os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
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


class ServerBackend:
    """A backend behind a server subprocess (`self.server`) that `generate` calls."""

    server: ServerProcess

    async def run_level(self, prompts, concurrency, max_tokens):
        return await closed_loop(self.generate, prompts, concurrency, max_tokens)

    def server_pid(self) -> int | None:
        return self.server.proc.pid

    def report_exit(self) -> None:
        self.server.report_exit()


# ---- (2) mlx-serving over gRPC -----------------------------------------------------------


class MlxServingBackend(ServerBackend):
    """The real server as a subprocess, driven by asyncio gRPC clients on one channel."""

    name = MLX_SERVING

    def __init__(self, model: Path, startup_timeout: float, extra_args: list[str]):
        argv = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--host", HOST]
        argv += ["--port", "0", "--model", f"{MODEL_ID}={model}", *extra_args]
        self.server = ServerProcess(self.name, argv)
        self.startup_timeout = startup_timeout
        self.channel = None

    async def __aenter__(self) -> MlxServingBackend:
        import grpc

        from mlx_serving.v1 import generate_service_pb2 as pb
        from mlx_serving.v1 import generate_service_pb2_grpc as pb_grpc

        self.pb = pb
        self.ignore_eos = "ignore_eos" in pb.GenerateRequest.DESCRIPTOR.fields_by_name
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

    def make_request(self, prompt: Prompt, max_tokens: int):
        request = self.pb.GenerateRequest(
            model_id=MODEL_ID,
            tokens=self.pb.TokenIds(ids=prompt.ids),
            max_tokens=max_tokens,
            temperature=0.0,
        )
        if self.ignore_eos:
            request.ignore_eos = True
        return request

    async def generate(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        request = self.make_request(prompt, max_tokens)
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


def describe_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        return f"{code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


# ---- (3) mlx_lm.server over HTTP ---------------------------------------------------------


class MlxLmServerBackend(ServerBackend):
    """mlx_lm.server with its default batching (decode 32, prefill 8), streaming completions.

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


# ---- (1) raw BatchGenerator in this process ----------------------------------------------


class RawBackend:
    """mlx-lm's BatchGenerator with the engine's batch settings and no wire: the ceiling.

    It runs the model as the engine does, fused projections included, so that (2)/(1) is what
    the engine and the wire cost.
    """

    name = RAW

    def __init__(self, model: Path, config):
        self.model_path = model
        self.config = config

    async def __aenter__(self) -> RawBackend:
        from mlx_lm import load

        from mlx_serving.engine.fusion import fuse_projections

        with self.mlx_environment():
            self.model, _ = load(str(self.model_path))
        if self.config.fuse_projections:
            fuse_projections(self.model, decode_kernel=self.config.decode_attention_kernel)
        return self

    def mlx_environment(self):
        """What the engine tells MLX through its process's environment (prefill attention),
        set here while raw runs, and only then: mlx_lm.server gets MLX's own defaults."""
        from mlx_serving.engine.config import mlx_environment
        from mlx_serving.engine.engine import environment

        return environment(mlx_environment(self.config))

    async def __aexit__(self, *exc) -> None:
        del self.model

    def server_pid(self) -> None:
        return None

    def report_exit(self) -> None:
        pass

    async def run_level(self, prompts, concurrency, max_tokens):
        """Runs on this thread (MLX streams are thread-local); nothing else runs meanwhile."""
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            self.model,
            stop_tokens=None,
            completion_batch_size=self.config.max_batch_size,
            prefill_batch_size=self.config.prefill_batch_size,
            prefill_step_size=self.config.prefill_step_size,
        )
        try:
            with self.mlx_environment():
                return raw_closed_loop(generator, prompts, concurrency, max_tokens)
        finally:
            generator.close()


def raw_closed_loop(generator, prompts, concurrency, max_tokens):
    """A finished request's client inserts its next prompt before the following step."""
    pending, active, done = collections.deque(prompts), {}, []

    def insert() -> None:
        prompt = pending.popleft()
        result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt.ids))
        (uid,) = generator.insert([prompt.ids], max_tokens=[max_tokens])
        active[uid] = result

    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        insert()
    while active:
        _, responses = generator.next()
        now = time.perf_counter()
        for response in responses:
            active[response.uid].arrived(1, now)
            if response.finish_reason is not None:
                done.append(active.pop(response.uid))
                if pending:
                    insert()
    return done, time.perf_counter() - start


# ---- (1b) our engine in this process, without the wire ------------------------------------


class EngineBackend:
    """The Engine facade (its thread, its asyncio hand-off) with asyncio callers: no gRPC."""

    name = ENGINE

    def __init__(self, model: Path, config):
        self.model_path = model
        self.config = config

    async def __aenter__(self) -> EngineBackend:
        from mlx_serving.engine.engine import Engine
        from mlx_serving.engine.models import ModelSource

        self.engine = Engine(self.config)
        await self.engine.start()
        await self.engine.load_model(ModelSource(local_path=str(self.model_path)), MODEL_ID)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine.shutdown()

    def server_pid(self) -> None:
        return None

    def report_exit(self) -> None:
        pass

    async def run_level(self, prompts, concurrency, max_tokens):
        return await closed_loop(self.generate, prompts, concurrency, max_tokens)

    async def generate(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        from mlx_serving.engine.requests import GenerationRequest, SamplingParams

        request = GenerationRequest(
            model_id=MODEL_ID,
            token_ids=tuple(prompt.ids),
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt.ids))
        try:
            async for chunk in self.engine.generate(request):
                result.arrived(len(chunk.token_ids), time.perf_counter())
                if chunk.usage is not None:
                    result.engine_ttft = chunk.usage.time_to_first_token
                    result.engine_tok_s = chunk.usage.tokens_per_second
        except Exception as exc:
            result.error = describe_error(exc)
        return result


# ---- driving and reporting ---------------------------------------------------------------


@dataclass
class Plan:
    levels: list[int]
    rounds: int
    max_tokens: int
    prompt_tokens: tuple[int, int]
    # (prompts, concurrency) stages, run in order before anything is measured
    warmup: list[tuple[list[Prompt], int]]
    # level → one list of prompts per round
    prompts: dict[int, list[list[Prompt]]]


def make_plan(tokenizer, args, prefill_batch_size: int) -> Plan:
    """Every request of the run gets its own prompt, the same for every backend."""
    levels, rounds = args.concurrency, args.rounds
    counts = {c: args.requests_per_level or max(2 * c, MIN_REQUESTS_PER_LEVEL) for c in levels}
    firsts: set[int] = set()
    total = rounds * sum(counts.values())
    pool = iter(make_prompts(tokenizer, total, args.prompt_tokens, firsts=firsts))
    prompts = {c: [[next(pool) for _ in range(counts[c])] for _ in range(rounds)] for c in levels}
    # Prefill groups of every size, then every decode batch size up to the largest level.
    stages = [*range(1, prefill_batch_size + 1), max(levels)]
    pool = iter(make_prompts(tokenizer, sum(stages), args.prompt_tokens, seed=1, firsts=firsts))
    warmup = [([next(pool) for _ in range(n)], n) for n in stages]
    return Plan(levels, rounds, args.max_tokens, args.prompt_tokens, warmup, prompts)


async def warm_up(backend, plan: Plan) -> None:
    """Every prefill group size and decode batch size, before anything is measured."""
    for prompts, concurrency in plan.warmup:
        results, _ = await backend.run_level(prompts, concurrency, WARMUP_TOKENS)
        if failed := [r.error for r in results if r.error]:
            raise RuntimeError(f"{backend.name} warm-up failed: {failed[0]}")


async def measure(backend, prompts: list[Prompt], concurrency: int, max_tokens: int) -> Round:
    server_pid = backend.server_pid()
    before = process_cpu_seconds(server_pid), process_cpu_seconds()
    results, wall = await backend.run_level(prompts, concurrency, max_tokens)
    after = process_cpu_seconds(server_pid), process_cpu_seconds()
    client_cpu = cpu_delta(before[1], after[1]) if server_pid is not None else None
    backend.report_exit()
    return Round(results, wall, cpu_delta(before[0], after[0]), client_cpu)


async def run_levels(backends: list, plan: Plan) -> dict[int, dict[str, LevelResult]]:
    """Level by level, round by round, one backend at a time in a rotating order."""
    by_level = {}
    for c in plan.levels:
        rounds: dict[str, list[Round]] = {b.name: [] for b in backends}
        for i, prompts in enumerate(plan.prompts[c]):
            for backend in backends[i % len(backends) :] + backends[: i % len(backends)]:
                one = await measure(backend, prompts, c, plan.max_tokens)
                rounds[backend.name].append(one)
                print(f"  c={c} round {i + 1}: {backend.name} {one.tok_s:.1f} tok/s", flush=True)
        by_level[c] = {
            name: summarize(name, c, runs, plan.max_tokens) for name, runs in rounds.items()
        }
    return by_level


def ratio(a: LevelResult | None, b: LevelResult | None, attr: str) -> float | None:
    if a is None or b is None or not getattr(b, attr):
        return None
    return getattr(a, attr) / getattr(b, attr)


def paired_ratios(a: LevelResult | None, b: LevelResult | None) -> list[float]:
    """a/b tok/s within each round: drift between rounds, large on a shared host, cancels."""
    if a is None or b is None:
        return []
    return [x / y for x, y in zip(a.tok_s_rounds, b.tok_s_rounds, strict=True) if y]


def level_checks(c: int, rows: dict[str, LevelResult]) -> list[dict]:
    """The issue's targets that apply at this concurrency."""
    ours, raw, peer = rows.get(MLX_SERVING), rows.get(RAW), rows.get(MLX_LM_SERVER)
    checks = []
    if (r := ratio(ours, raw, "tok_s")) is not None:
        checks.append(
            check(c, "tok/s mlx_serving/raw", r, r >= RAW_RATIO_MIN, f">= {RAW_RATIO_MIN}")
        )
    if c == SERVER_TOKS_AT and (r := ratio(ours, peer, "tok_s")) is not None:
        ok = r >= SERVER_TOKS_RATIO_MIN and ours.failures == 0
        target = f">= {SERVER_TOKS_RATIO_MIN}, 0 failures (had {ours.failures})"
        checks.append(check(c, "tok/s mlx_serving/mlx_lm_server", r, ok, target))
    if c == SERVER_TTFT_AT and (r := ratio(ours, peer, "ttft_p50_ms")) is not None:
        target = f"<= {SERVER_TTFT_RATIO_MAX}"
        checks.append(
            check(c, "TTFT p50 mlx_serving/mlx_lm_server", r, r <= SERVER_TTFT_RATIO_MAX, target)
        )
    return checks


def check(c: int, name: str, value: float, ok: bool, target: str) -> dict:
    return {"concurrency": c, "name": name, "value": value, "target": target, "pass": ok}


def format_level(c: int, rows: dict[str, LevelResult], plan: Plan, checks: list[dict]) -> str:
    n = len(plan.prompts[c][0])
    lines = [
        f"\n== concurrency {c}: {n} requests x {plan.rounds} round(s), "
        f"{describe_lengths(plan.prompt_tokens)} prompt tokens, max_tokens {plan.max_tokens} ==",
        f"{'backend':<14}{'tok/s':>8}{'(min-max)':>16}{'TTFT p50':>11}{'TTFT p95':>11}"
        f"{'ITL p50':>10}{'fail':>5}{'short':>6}{'cpu srv/cli':>13}  prompt_tokens",
    ]
    for name in BACKENDS:
        if (r := rows.get(name)) is not None:
            lines.append(format_row(r))
    for name in (MLX_SERVING, ENGINE):
        if (r := rows.get(name)) is not None and r.engine_ttft_p50_ms is not None:
            decode = "-" if r.engine_itl_p50_ms is None else f"{r.engine_itl_p50_ms:.2f}ms/token"
            lines.append(
                f"{name} inside the engine: TTFT p50 {r.engine_ttft_p50_ms:.1f}ms, "
                f"p95 {r.engine_ttft_p95_ms:.1f}ms; decode {decode}"
            )
    if (r := ratio(rows.get(ENGINE), rows.get(RAW), "tok_s")) is not None:
        lines.append(f"engine/raw (no wire): tok/s x{r:.3f}")
    ours = rows.get(MLX_SERVING)
    for peer in (RAW, MLX_LM_SERVER):
        toks, ttft = (
            ratio(ours, rows.get(peer), "tok_s"),
            ratio(ours, rows.get(peer), "ttft_p50_ms"),
        )
        if toks is not None:
            lines.append(f"mlx_serving/{peer}: tok/s x{toks:.3f}, TTFT p50 x{ttft:.3f}")
    if (paired := paired_ratios(ours, rows.get(RAW))) and len(paired) > 1:
        rounds = ", ".join(f"{r:.2f}" for r in paired)
        lines.append(
            f"mlx_serving/raw round by round: {rounds} (median {float(np.median(paired)):.3f})"
        )
    for item in checks:
        verdict = "PASS" if item["pass"] else "FAIL"
        lines.append(f"[{verdict}] {item['name']} = {item['value']:.3f} (target {item['target']})")
    return "\n".join(lines)


def format_row(r: LevelResult) -> str:
    spread = f"({r.tok_s_min:.1f}-{r.tok_s_max:.1f})"
    errors = f"  errors: {r.errors}" if r.errors else ""
    return (
        f"{r.backend:<14}{r.tok_s:>8.1f}{spread:>16}{r.ttft_p50_ms:>9.1f}ms{r.ttft_p95_ms:>9.1f}ms"
        f"{r.itl_p50_ms:>8.1f}ms{r.failures:>5}{r.short:>6}{format_cpu(r):>13}"
        f"  {describe_lengths(r.prompt_tokens)}{errors}"
    )


def describe_lengths(lengths) -> str:
    """118, or 64-256 for a range (a (min, max) pair, or the lengths seen)."""
    if not lengths:
        return "-"
    shortest, longest = min(lengths), max(lengths)
    return str(shortest) if shortest == longest else f"{shortest}-{longest}"


def format_cpu(r: LevelResult) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return f"{seconds(r.server_cpu_s)}/{seconds(r.client_cpu_s)}s"


def engine_config(args):
    """The engine settings of raw, engine and mlx_serving alike (the server's from the
    environment it inherits)."""
    from mlx_serving.engine.config import EngineConfig
    from mlx_serving.server.config import ENV_PREFIX

    settings = dict(args.engine)
    if not args.fuse:
        settings["fuse_projections"] = False
    for key, value in settings.items():
        os.environ[f"{ENV_PREFIX}ENGINE_{key.upper()}"] = str(value).lower()
    return EngineConfig(**settings)


def make_backends(args, model: Path, config) -> list:
    backends = []
    if MLX_LM_SERVER not in args.skip:
        backends.append(MlxLmServerBackend(model, args.startup_timeout))
    if MLX_SERVING not in args.skip:
        backends.append(MlxServingBackend(model, args.startup_timeout, args.server_arg))
    if RAW not in args.skip:
        backends.append(RawBackend(model, config))
    if ENGINE not in args.skip:
        backends.append(EngineBackend(model, config))
    return backends


async def run(args) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model = chosen_model_path(args)
    config = engine_config(args)
    plan = make_plan(load_tokenizer(model), args, config.prefill_batch_size)
    backends = make_backends(args, model, config)
    print(f"model {model}; backends {[b.name for b in backends]}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        for backend in backends:
            await stack.enter_async_context(backend)
            await warm_up(backend, plan)
        by_level = await run_levels(backends, plan)
    report = {"model": str(model), "config": describe_args(args), "levels": {}, "checks": []}
    for c, rows in by_level.items():
        checks = level_checks(c, rows)
        print(format_level(c, rows, plan, checks))
        report["levels"][str(c)] = {name: asdict(r) for name, r in rows.items()}
        report["checks"] += checks
    verdict = all(item["pass"] for item in report["checks"])
    print(f"\ntargets: {'PASS' if verdict else 'FAIL'} ({len(report['checks'])} checked)")
    return report


def describe_args(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def name_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    if bad := set(names) - set(BACKENDS):
        raise argparse.ArgumentTypeError(f"unknown backends {sorted(bad)}; choose from {BACKENDS}")
    return names


def engine_setting(text: str) -> tuple[str, object]:
    from mlx_serving.server.config import engine_keys, parse_override

    key, _, value = text.partition("=")
    if key not in engine_keys():
        raise argparse.ArgumentTypeError(f"unknown engine key {key!r}; one of {engine_keys()}")
    try:
        return key, parse_override(f"engine.{key}", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def length_range(text: str) -> tuple[int, int]:
    """118, or 64-256."""
    shortest, _, longest = text.partition("-")
    try:
        pair = int(shortest), int(longest or shortest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of tokens, or MIN-MAX") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return pair


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=length_range, default=(118, 118))
    parser.add_argument(
        "--requests-per-level",
        type=int,
        help=f"default: 2 x concurrency, at least {MIN_REQUESTS_PER_LEVEL}",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat each level, interleaved")
    parser.add_argument(
        "--skip", type=name_list, action="extend", default=[], help=",".join(BACKENDS)
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="as --engine fuse_projections=false",
    )
    parser.add_argument(
        "--engine",
        type=engine_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine setting (CONFIG.md's `engine` keys) for raw, engine and mlx_serving alike",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `mlx_serving.server.cli serve`, as --server-arg=--flag=value",
    )
    return parser.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
