"""Soak: many closed-loop streams for minutes against a real `mlx-serving serve` process.

Proves that a long, busy run has no errors and no memory growth: RSS of the server process
and of its engine process is sampled every few seconds, and after the warm-up its level may not rise
more than a tolerance above the baseline: each minute's median RSS after the warm-up against the
first minute's (one sample swings several percent either way; the largest is reported).

The server runs on 127.0.0.1 only, on the tiny built-in test model. The process helpers here
(`running_server`, `engine_pid`, `rss_bytes`, ...) are shared by the other reliability scripts.

    python scripts/soak.py --minutes 10 --streams 64
"""

import argparse
import asyncio
import contextlib
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mlx_serving
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

HOST = "127.0.0.1"
MODEL_ID = "tiny"
LISTENING = re.compile(r"^mlx-serving listening on (\S+:\d+)")
METRICS = re.compile(r"^mlx-serving metrics on (http://\S+)")
STARTUP_SECONDS = 120
WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep in warm sun".split()


# ---- the server process, shared with the other scripts ------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    address: str
    log: Path
    metrics_url: str = ""
    exit_code: int | None = None
    log_text: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid


def model_path(given: str | None) -> Path:
    """The model to serve: the one given, else the built-in tiny model (built once, cached)."""
    if given:
        return Path(given)
    from mlx_serving.server.default_model import default_model_path

    return default_model_path()


def child_env() -> dict[str, str]:
    """This interpreter's import path for mlx_serving (both PEP 420 portions), absolute."""
    roots = [str(Path(p).resolve().parent) for p in mlx_serving.__path__]
    path = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def start_server(model: Path, extra_args: list[str], log: Path) -> Server:
    """`mlx-serving serve` on a free loopback port, in a process group of its own."""
    command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--host", HOST]
    command += ["--port", "0", "--model", f"{MODEL_ID}={model}", *extra_args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    line = read_line(process, STARTUP_SECONDS)
    if not (match := LISTENING.match(line)):
        process.kill()
        raise RuntimeError(f"no address printed (got {line!r}); log:\n{log.read_text()}")
    server = Server(process, match.group(1), log)
    if "--telemetry" in extra_args:  # printed right after (maybe buffered already: no select)
        metrics = METRICS.match(process.stdout.readline().strip())
        server.metrics_url = metrics.group(1) if metrics else ""
    return server


def read_line(process: subprocess.Popen, seconds: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    return process.stdout.readline().strip() if ready else ""


def stop_server(server: Server, grace: float = 30) -> int:
    """SIGTERM, then the exit code (killed, -9, if it outlives `grace`)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        return server.process.wait()


async def wait_serving(channel: grpc.aio.Channel, server: Server) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log.read_text()}")
        with contextlib.suppress(grpc.RpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("the server never became SERVING")


@contextlib.asynccontextmanager
async def running_server(
    model: str | None, extra_args: list[str] = ()
) -> AsyncIterator[tuple[Server, grpc.aio.Channel]]:
    """A SERVING server and a channel to it; stopped (SIGTERM) afterwards."""
    with tempfile.TemporaryDirectory(prefix="mlx-serving-script-") as scratch:
        server = start_server(model_path(model), list(extra_args), Path(scratch) / "server.log")
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await wait_serving(channel, server)
                yield server, channel
        finally:
            server.exit_code = stop_server(server)
            server.log_text = server.log.read_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def telemetry_args() -> list[str]:
    """Metrics on, on a free loopback port."""
    return ["--telemetry", "--prometheus-port", str(free_port())]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def metric(exposition: str, name: str) -> float:
    """The sum over its label sets of one metric in Prometheus text."""
    pattern = re.compile(rf"^mlx_serving_{name}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(exposition))


def children(pid: int) -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def engine_pid(server_pid: int) -> int | None:
    """The server's child that has MLX loaded: the engine process (not the template worker)."""
    for pid in children(server_pid):
        with contextlib.suppress(OSError):
            if "libmlx" in Path(f"/proc/{pid}/maps").read_text():
                return pid
    return None


def rss_bytes(pid: int | None) -> int:
    """VmRSS from /proc (psutil is not a dependency); 0 for a process that is gone."""
    if pid is None:
        return 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def prompt_pool(size: int, seed: int = 0) -> list[str]:
    """A fixed set of prompts: the prefix cache saturates during the warm-up, not after it."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 40))) for _ in range(size)]


# ---- the soak -----------------------------------------------------------------------------


@dataclass
class Tally:
    started: float
    until: float
    report_seconds: float
    tokens_by_period: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    errors: list[str] = field(default_factory=list)

    def add_tokens(self, count: int) -> None:
        """Tokens of the run itself; those of the last requests, after its end, are not."""
        now = time.monotonic()
        if now < self.until:
            period = int((now - self.started) / self.report_seconds)
            self.tokens_by_period[period] = self.tokens_by_period.get(period, 0) + count

    def rate(self, period: int) -> float:
        """Tokens per second of a period (the last may be shorter)."""
        start = self.started + period * self.report_seconds
        length = min(self.report_seconds, self.until - start)
        return self.tokens_by_period[period] / length


async def closed_loop_stream(stub, prompts: list[str], max_tokens: int, until: float, tally: Tally):
    """One client: the next request as soon as the previous one ends."""
    rng = random.Random()
    while time.monotonic() < until:
        request = generate_pb.GenerateRequest(
            model_id=MODEL_ID,
            text=rng.choice(prompts),
            max_tokens=rng.randint(max_tokens // 2, max_tokens),
            temperature=0,
            ignore_eos=True,
        )
        try:
            async for reply in stub.Generate(request, timeout=120):
                tally.add_tokens(len(reply.token_ids))
            tally.requests += 1
        except grpc.RpcError as error:
            tally.errors.append(f"{error.code().name}: {error.details()}")


async def sample_rss(server: Server, every: float, until: float, samples: list[tuple]):
    """(seconds since start, server RSS, engine RSS, prefix cache bytes) every `every` s."""
    engine = engine_pid(server.pid)
    started = time.monotonic()
    while True:
        exposition = await asyncio.to_thread(scrape, server.metrics_url)
        cache = metric(exposition, "prefix_cache_bytes")
        at = time.monotonic() - started
        samples.append((at, rss_bytes(server.pid), rss_bytes(engine), cache))
        if time.monotonic() + every > until:
            return
        await asyncio.sleep(every)


# RSS is judged by the median of each window of this length after the warm-up: one sample
# swings several percent either way as batches and caches come and go; growth moves the medians.
WINDOW_SECONDS = 60.0


def rss_growth(samples: list[tuple], warmup: float, column: int) -> tuple[int, float, float]:
    """The baseline RSS (the median of the first window after the warm-up), the largest growth
    of a later window's median above it, and the largest single sample's (reported, not
    judged: a spike is not growth)."""
    after = [s for s in samples if s[0] >= warmup] or [samples[-1]]
    start = after[0][0]
    windows: dict[int, list[int]] = {}
    for sample in after:
        windows.setdefault(int((sample[0] - start) // WINDOW_SECONDS), []).append(sample[column])
    medians = [statistics.median(values) for _, values in sorted(windows.items())]
    baseline = int(medians[0])
    largest = max(s[column] for s in after)
    return baseline, max(medians) / baseline - 1, largest / baseline - 1


async def soak(args) -> bool:
    seconds = args.minutes * 60
    server_args = telemetry_args() + args.server_args
    if args.prefix_cache_bytes is not None:
        server_args += ["--prefix-cache-bytes", str(args.prefix_cache_bytes)]
    async with running_server(args.model, server_args) as (server, channel):
        stub = generate_grpc.GenerateServiceStub(channel)
        prompts = prompt_pool(args.prompts)
        started = time.monotonic()
        until = started + seconds
        tally, samples = Tally(started, until, args.report_seconds), []
        load_before = load_average()
        streams = [
            closed_loop_stream(stub, prompts, args.max_tokens, until, tally)
            for _ in range(args.streams)
        ]
        await asyncio.gather(sample_rss(server, args.sample_seconds, until, samples), *streams)
        load_after = load_average()
    return report(args, server, tally, samples, (load_before, load_after))


def report(args, server: Server, tally: Tally, samples: list[tuple], loads) -> bool:
    print(f"soak: {args.streams} streams, {args.minutes:g} min, max_tokens {args.max_tokens}")
    print(f"load average before/after: {loads[0]} / {loads[1]} ({os.cpu_count()} CPUs)")
    print(f"requests completed: {tally.requests}, errors: {len(tally.errors)}")
    for error in sorted(set(tally.errors))[:10]:
        print(f"  error: {error}")
    for period in sorted(tally.tokens_by_period):
        print(f"  period {period} (of {args.report_seconds:g} s): {tally.rate(period):.0f} tok/s")
    print("samples (s, server RSS, engine RSS, prefix cache):")
    for at, server_rss, engine_rss, cache in samples:
        print(f"  {at:6.0f}  {mib(server_rss):>11}  {mib(engine_rss):>11}  {mib(cache):>11}")
    passed = not tally.errors and tally.requests > 0 and server.exit_code == 0
    for name, column in (("server", 1), ("engine", 2)):
        baseline, growth, spike = rss_growth(samples, args.warmup_seconds, column)
        ok = baseline > 0 and growth <= args.tolerance
        passed &= ok
        print(
            f"{name} RSS after warm-up {mib(baseline)}, largest growth of a minute's median "
            f"{growth:.1%} (largest single sample {spike:+.1%}): {verdict(ok)}"
        )
    print(f"server exit code {server.exit_code}")
    print(f"soak: {verdict(passed)}")
    return passed


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_checks(name: str, checks: dict[str, bool]) -> bool:
    """Print each check's verdict, then the proof's; whether every check passed."""
    for text, ok in checks.items():
        print(f"  {verdict(ok)}: {text}")
    passed = all(checks.values())
    print(f"{name}: {verdict(passed)}")
    return passed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    parser.add_argument("--streams", type=int, default=64, help="concurrent closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per request")
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts in the mix")
    parser.add_argument("--warmup-seconds", type=float, default=60.0, help="before the baseline")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sample period")
    parser.add_argument("--report-seconds", type=float, default=60.0, help="tok/s period")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed RSS growth")
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    parser.add_argument(
        "--prefix-cache-bytes", type=int, help="the server's prefix cache (default: its own)"
    )
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="more `serve` flags"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return 0 if asyncio.run(soak(parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
