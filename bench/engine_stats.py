"""What the engine process does step by step, recorded inside it, for `serving --engine-stats`.

The engine process runs `install(worker)` when BENCH_ENGINE_HOOK names it (the engine's
worker calls the hook before its loop). From then on every turn of the loop that stepped a
batch is one record, written as JSON lines to BENCH_ENGINE_STATS/<pid>.jsonl by a thread
every half second: its start and end (time.perf_counter: CLOCK_MONOTONIC, comparable across
processes), the process's and the loop thread's CPU time at its start, the decode batch size
before and after, the tokens decoded, the prompt tokens prefilled and in how many rows, the
sequences inserted (a release of waiting requests) and joined to the decode batch (extends),
and the batch's KV cache length (left padding included). Admissions and ends are recorded
with their times too. With BENCH_ENGINE_PROFILE set, the loop thread runs under cProfile
and its statistics are written to <pid>.prof every few seconds.

`summarize(records, start, end)` turns the records of a time window into figures per
completed request and per decoded token.
"""

from __future__ import annotations

import cProfile
import json
import os
import threading
import time
from pathlib import Path

STATS_ENV = "BENCH_ENGINE_STATS"
PROFILE_ENV = "BENCH_ENGINE_PROFILE"
HOOK = "bench.engine_stats:install"
FLUSH_SECONDS = 0.5
PROFILE_DUMP_SECONDS = 3.0


class Recorder:
    def __init__(self, directory: Path):
        self.path = directory / f"{os.getpid()}.jsonl"
        self.records: list = []
        # Within the current loop turn.
        self.turn: dict | None = None

    def add(self, record: list) -> None:
        self.records.append(record)  # list.append is atomic under the GIL

    def flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        records, self.records = self.records, []
        if records:
            with self.path.open("a") as out:
                out.writelines(json.dumps(r) + "\n" for r in records)


def install(worker) -> None:
    """Wrap the scheduler's step, admissions and ends, and mlx-lm's batch classes."""
    from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

    directory = Path(os.environ[STATS_ENV])
    directory.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(directory)
    threading.Thread(target=recorder.flush_forever, daemon=True).start()
    scheduler = worker.scheduler
    profiler = cProfile.Profile() if os.environ.get(PROFILE_ENV) else None
    profile_path = directory / f"{os.getpid()}.prof"
    dumped = [time.perf_counter()]

    step, admit, end = scheduler.step, scheduler.admit, scheduler._end

    def timed_step():
        turn = recorder.turn = {
            "gen_before": -1,
            "gen_after": -1,
            "tokens": 0,
            "prompt_tokens": 0,
            "prefill_rows": 0,
            "prefill_passes": 0,
            "inserted": 0,
            "inserts": 0,
            "joined": 0,
            "joins": 0,
            "kv_len": 0,
        }
        cpu, thread_cpu, started = time.process_time(), time.thread_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            return step()
        finally:
            if profiler is not None:
                profiler.disable()
            ended = time.perf_counter()
            recorder.turn = None
            if turn["gen_before"] >= 0:  # a batch was stepped
                recorder.add(["step", started, ended, cpu, thread_cpu, turn])
            if profiler is not None and ended - dumped[0] > PROFILE_DUMP_SECONDS:
                dumped[0] = ended
                profiler.dump_stats(profile_path)

    def timed_admit(admission, rid, internal=False, fork_of=None):
        recorder.add(["admit", time.perf_counter(), rid, len(admission.prompt), internal])
        return admit(admission, rid, internal, fork_of)

    def timed_end(slot, sequence, final, *args, **kwargs):
        recorder.add(["end", time.perf_counter(), sequence.rid, sequence.completion_tokens])
        return end(slot, sequence, final, *args, **kwargs)

    scheduler.step, scheduler.admit, scheduler._end = timed_step, timed_admit, timed_end

    generator_next, generator_insert = BatchGenerator.next, BatchGenerator.insert

    def next_(self):
        turn = recorder.turn
        if turn is None:
            return generator_next(self)
        counters = self._counters
        before_tokens, before_prompt = counters.generation_tokens, counters.prompt_tokens
        turn["gen_before"] = len(self._generation_batch)
        cache = getattr(self._generation_batch, "prompt_cache", None)
        if cache:
            turn["kv_len"] = int(getattr(cache[0], "_idx", 0) or 0)
        result = generator_next(self)
        turn["gen_after"] = len(self._generation_batch)
        turn["tokens"] += counters.generation_tokens - before_tokens
        prompt = counters.prompt_tokens - before_prompt
        if prompt:
            turn["prompt_tokens"] += prompt
            turn["prefill_passes"] += 1
            turn["prefill_rows"] += len(self._prompt_batch)
        return result

    def insert(self, prompts, *args, **kwargs):
        turn = recorder.turn
        if turn is not None:
            turn["inserts"] += 1
            turn["inserted"] += len(prompts)
        return generator_insert(self, prompts, *args, **kwargs)

    BatchGenerator.next, BatchGenerator.insert = next_, insert
    wrapped: set[type] = set()

    def wrap_extend(cls: type) -> None:
        if cls in wrapped:
            return
        wrapped.add(cls)
        original = cls.extend

        def extend(self, batch):
            turn = recorder.turn
            if turn is not None and len(batch):
                turn["joins"] += 1
                turn["joined"] += len(batch)
            return original(self, batch)

        cls.extend = extend

    # The generation batch classes the scheduler uses (fused_batch, speculative) subclass
    # mlx-lm's; wrap the one that defines `extend` for each.
    from mlx_lm.generate import GenerationBatch

    from mlx_serving.engine.speculative import SpeculativeGenerationBatch

    # The scheduler's batch (SpeculativeGenerationBatch) only: its `extend` calls mlx-lm's.
    del GenerationBatch, PromptProcessingBatch
    wrap_extend(next(c for c in SpeculativeGenerationBatch.__mro__ if "extend" in vars(c)))
    describe_process(directory / f"{os.getpid()}.process.json", recorder)


def describe_process(path: Path, recorder: Recorder) -> None:
    """What else the process holds (modules, objects, threads, environment), and the time its
    garbage collector takes, per generation, as records."""
    import gc
    import sys

    path.write_text(
        json.dumps(
            {
                "main": getattr(sys.modules.get("__mp_main__"), "__file__", None),
                "modules": len(sys.modules),
                "gc_objects": len(gc.get_objects()),
                "gc_threshold": gc.get_threshold(),
                "gc_enabled": gc.isenabled(),
                "threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc") else None,
                "environ": dict(sorted(os.environ.items())),
                "grpc": "grpc" in sys.modules,
            },
            indent=1,
        )
    )
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            now = time.perf_counter()
            recorder.add(["gc", now, info["generation"], now - started[0], info["collected"]])

    gc.callbacks.append(on_gc)


def read_records(directory: Path) -> dict[int, list]:
    """Every engine process's records, by pid."""
    out = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        out[int(path.stem)] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def summarize(records: list, start: float, end: float) -> dict:
    """Figures for the records of one time window (a level's round on one backend)."""
    steps = [r for r in records if r[0] == "step" and start <= r[1] <= end]
    admits = [r for r in records if r[0] == "admit" and start <= r[1] <= end and not r[4]]
    ends = [r for r in records if r[0] == "end" and start <= r[1] <= end]
    if not steps:
        return {}
    tokens = sum(s[5]["tokens"] for s in steps)
    decode_only = [
        s
        for s in steps
        if s[5]["prompt_tokens"] == 0 and s[5]["joins"] == 0 and s[5]["inserts"] == 0
    ]
    prefill = [s for s in steps if s[5]["prompt_tokens"]]
    joins = sum(s[5]["joins"] for s in steps)
    passes = sum(s[5]["prefill_passes"] for s in steps)
    rows = sum(s[5]["prefill_rows"] for s in steps)
    inserts = sum(s[5]["inserts"] for s in steps)
    inserted = sum(s[5]["inserted"] for s in steps)
    finished = len([e for e in ends if e[3] > 0])
    wall = steps[-1][2] - steps[0][1]
    cpu = steps[-1][3] - steps[0][3]
    thread_cpu = steps[-1][4] - steps[0][4]
    busy = sum(s[2] - s[1] for s in steps)

    def mean_ms(group: list) -> float:
        return 1e3 * sum(s[2] - s[1] for s in group) / len(group) if group else float("nan")

    decode_batch = [s[5]["gen_before"] for s in decode_only]
    kv = [s[5]["kv_len"] for s in decode_only]
    gaps = admit_gaps(ends, admits)
    collections = [r for r in records if r[0] == "gc" and start <= r[1] <= end]
    return {
        "steps": len(steps),
        "decode_only_steps": len(decode_only),
        "prefill_steps": len(prefill),
        "other_steps": len(steps) - len(decode_only) - len(prefill),
        "tokens": tokens,
        "finished": finished,
        "admitted": len(admits),
        "inserts_per_request": inserts / max(inserted, 1),
        "prefill_passes_per_request": passes / max(inserted, 1),
        "joins_per_request": joins / max(inserted, 1),
        "mean_prefill_rows": rows / passes if passes else float("nan"),
        "mean_insert_size": inserted / inserts if inserts else float("nan"),
        "mean_join_size": sum(s[5]["joined"] for s in steps) / joins if joins else float("nan"),
        "decode_only_ms": mean_ms(decode_only),
        "prefill_step_ms": mean_ms(prefill),
        "step_ms": mean_ms(steps),
        "decode_only_batch": sum(decode_batch) / len(decode_batch) if decode_batch else 0,
        "decode_only_kv_len": sum(kv) / len(kv) if kv else 0,
        "busy_share": busy / wall if wall else float("nan"),
        "process_cpu_ms_per_token": 1e3 * cpu / tokens if tokens else float("nan"),
        "loop_cpu_ms_per_token": 1e3 * thread_cpu / tokens if tokens else float("nan"),
        "wall_ms_per_step": 1e3 * wall / len(steps),
        "end_to_admit_ms_p50": percentile(gaps, 50),
        "end_to_admit_ms_p90": percentile(gaps, 90),
        "gc_ms_per_step": 1e3 * sum(r[3] for r in collections) / len(steps),
        "gc_full_collections": sum(r[2] == 2 for r in collections),
        "gc_full_ms": 1e3 * sum(r[3] for r in collections if r[2] == 2),
    }


def admit_gaps(ends: list, admits: list) -> list[float]:
    """Closed loop: each end is followed by one admission; the n-th end pairs with the n-th
    admission that came after it (ms)."""
    gaps, j = [], 0
    admit_times = sorted(a[1] for a in admits)
    for _, at, *_ in sorted(ends, key=lambda e: e[1]):
        while j < len(admit_times) and admit_times[j] < at:
            j += 1
        if j == len(admit_times):
            break
        gaps.append(1e3 * (admit_times[j] - at))
        j += 1
    return gaps


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q / 100))]
