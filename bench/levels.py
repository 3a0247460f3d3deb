"""What one level's rounds on one backend add up to: tok/s, latencies and CPU time."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .client import Prompt, RequestResult, tokens_per_second


@dataclass
class Round:
    """One run of one level on one backend."""

    results: list[RequestResult]
    wall_s: float
    server_cpu_s: float | None
    client_cpu_s: float | None

    @property
    def tok_s(self) -> float:
        return tokens_per_second(self.results, self.wall_s)


@dataclass
class LevelResult:
    concurrency: int
    backend: str
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
    # The prompt lengths seen.
    prompt_tokens: list[int]
    errors: list[str]
    # Inside the engine (mlx_serving and engine only): TTFT from admission, and the decode
    # interval (1 / the request's tokens/s), over every request.
    engine_ttft_p50_ms: float | None
    engine_ttft_p95_ms: float | None
    engine_itl_p50_ms: float | None
    # CPU seconds per round of the processes serving the backend (a server and its engine
    # process, or our engine's process) and of this one (the clients, and all of stock).
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
        concurrency=concurrency,
        backend=backend,
        rounds=len(rounds),
        requests=len(results),
        failures=len(results) - len(ok),
        short=sum(r.tokens < max_tokens for r in ok),
        tokens=sum(r.tokens for r in ok),
        wall_s=sum(one.wall_s for one in rounds),
        tok_s=statistics.median(tok_s),
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


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of these processes and their descendants; None without /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    total, seen, pending = 0.0, set(), list(pids)
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):  # a process or thread that has just ended
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def measure(backend, prompts: list[Prompt], concurrency: int, max_tokens: int) -> Round:
    pids = backend.server_pids()
    before = cpu_seconds(pids) if pids else None, time.process_time()
    results, wall = await backend.run_level(prompts, concurrency, max_tokens)
    after = cpu_seconds(pids) if pids else None, time.process_time()
    backend.report_exit()
    return Round(results, wall, cpu_delta(before[0], after[0]), after[1] - before[1])
