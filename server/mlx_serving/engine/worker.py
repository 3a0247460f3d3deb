"""The engine process: its main, its pipes, the dispatch of commands, and model loading.

The facade (engine.py) spawns `run_engine_process`, so that the Python work of the wire layer
never competes with the decode loop for a GIL: on a GPU a small model's batch step is bound by
the host, and every microsecond the event loop holds the GIL was a microsecond of decoding
lost. Typed commands (protocol.py) arrive over one pipe; replies go back over another, one
StepOutput per loop turn for every request's chunks, every event and every observation.
"""

import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx

from .config import EngineConfig
from .distributed import leader_from_env
from .errors import ModelLoadFailed, ModelSourceNotFound, RequestAborted
from .loading import (
    LoadedModel,
    build_model,
    describe_model,
    read_tokenizer,
    weight_bytes,
    weight_chunks,
)
from .models import ModelSource
from .prefill import WarmUp, buckets_wanted
from .protocol import (
    PROBES_ENV,
    AbortAll,
    Admit,
    Call,
    Cancel,
    Died,
    Failure,
    Load,
    LoadProgress,
    Observe,
    Pair,
    Probe,
    Result,
    Stop,
    Stopped,
    Unload,
    WatchTokens,
)
from .scheduler import Scheduler
from .sources import checked_model_path, shorten

log = logging.getLogger(__name__)

# A loading model's weights are read this many bytes per loop turn, between batch steps.
LOAD_CHUNK_BYTES = 64 << 20
# How long an otherwise idle engine waits for a command at a time while a load waits on its
# thread (finding the model, reading its tokenizer).
LOADING_POLL_SECONDS = 0.005
# How often an idle engine wakes to show the facade's watchdog it is alive.
HEARTBEAT_SECONDS = 0.5
# How often the engine gives free heap pages back to the system (see `Worker._trim_heap`).
HEAP_TRIM_SECONDS = 5.0
# Returned by a command whose caller is answered later (a load).
DEFERRED = object()
# "module:function", called with the Worker before its loop starts: benchmarks record what the
# loop does from inside the process (bench/engine_stats.py). Unset in service.
BENCH_HOOK_ENV = "BENCH_ENGINE_HOOK"


@dataclass
class Loading:
    """A model being loaded without holding up the batches of the models already loaded: its
    directory is found (or downloaded) and its tokenizer read on a thread, and its weights
    are read a chunk per loop turn, between batch steps."""

    call_id: int | None
    model_id: str
    source: ModelSource
    started: float
    # The thread's job in hand: the model's directory, then its tokenizer.
    job: Future
    path: Path | None = None
    model: Any = None
    config: dict = field(default_factory=dict)
    chunks: list = field(default_factory=list)
    total_bytes: int = 0
    read_bytes: int = 0
    # Its prefill shapes still to compile (prefill.WarmUp), once its tokenizer is read.
    warmup: Iterator[None] | None = None


# What a finished warm-up yields.
WARMED_UP = object()


class Worker:
    """The engine process's loop: take commands, step the scheduler, send what it produced."""

    def __init__(
        self, config: EngineConfig, commands: Connection, results: Connection, heartbeat: Any
    ):
        self.config = config
        self.scheduler = Scheduler(config)
        # Rank 0 of a group mlx.launch started: every model sharded over the ranks.
        self.leader = self.scheduler.sharding = leader_from_env(self.scheduler.stream)
        self._commands = commands
        self._results = results
        # When the loop last showed progress (time.monotonic, shared memory): the facade's
        # watchdog reads it.
        self._heartbeat = heartbeat
        self.running = True
        self.loading: list[Loading] = []
        self.load_chunk_bytes = LOAD_CHUNK_BYTES
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="mlx-engine-loader")
        self._malloc_trim = glibc_malloc_trim()
        self._trimmed = time.monotonic()
        self._call_id: int | None = None
        self._handlers = {
            Admit: lambda c: self.scheduler.admit(c.admission, c.rid, c.internal, c.fork_of),
            Cancel: lambda c: self.scheduler.cancel(c.rid),
            Load: self._load,
            Unload: lambda c: self._unload(c.model_id),
            AbortAll: lambda c: self.scheduler.abort_all(RequestAborted(c.reason)),
            Observe: lambda c: self.scheduler.set_observing(c.recording),
            WatchTokens: lambda c: self.scheduler.set_token_events(c.wanted),
            Stop: lambda c: setattr(self, "running", False),
            Probe: self._probe,
            Pair: lambda c: self.scheduler.pair(c.model_id, c.draft_model_id, c.draft_tokens),
        }

    def run(self) -> None:
        try:
            with mx.stream(self.scheduler.stream):
                while self.running:
                    self._take_commands()
                    self._beat()
                    self._send(self.scheduler.step())
                    if self.loading:
                        self._continue_loading()
                    self._trim_heap()
        except BaseException as exc:
            log.exception("engine loop died")
            self._send(self.scheduler.take_output())  # what was decided, such as events
            self._send(Died(f"engine loop died: {type(exc).__name__}"))
        finally:
            for loading in self.loading:
                stopped = ModelLoadFailed(f"the engine stopped before {loading.model_id!r} loaded")
                self._answer(loading.call_id, stopped)
            self.scheduler.close()
            if self.leader is not None:
                self.leader.close()
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._send(Stopped())

    def _beat(self) -> None:
        self._heartbeat.value = time.monotonic()

    def _trim_heap(self) -> None:
        """Give the C heap's free pages back to the system now and then.

        Steps allocate and free host buffers of ever-changing sizes (prompts, batches, KV
        caches) from several threads, and glibc keeps the freed memory in its arenas: under a
        64-stream soak the engine's RSS doubled in 10 minutes while MLX's own count of live and
        cached bytes stayed flat. `malloc_trim` returns it (a few milliseconds, every
        HEAP_TRIM_SECONDS).
        """
        now = time.monotonic()
        if self._malloc_trim is None or now - self._trimmed < HEAP_TRIM_SECONDS:
            return
        self._trimmed = now
        self._malloc_trim(0)

    def _take_commands(self) -> None:
        self._beat()
        if self.scheduler.idle:
            # Idle, unless loading: then look at the pipe between pieces of the load.
            if self._commands.poll(self._idle_wait()):
                self._run(self._commands.recv())
                if not self.scheduler.idle:
                    self._coalesce()
        while self.running and self._commands.poll():
            self._beat()
            self._run(self._commands.recv())

    def _coalesce(self) -> None:
        """Idle → busy: let concurrent arrivals join the first step, so they share its prefill.

        A lone request waits `coalesce_seconds` for company. Once a second one has come, the
        arrivals are a burst, and they gather as arrivals at a running batch do (`_release`):
        until a prefill batch's worth waits or `prefill_gather_seconds` have passed since the
        first. A burst reaches an idle engine spread out, the more so over the wire, where the
        server makes each request an admission in turn: sixteen gRPC requests sent at once came
        0.5 ms apart on a 2-core host, so a fixed 2 ms wait prefilled the first 3 alone and the
        other 13 after that pass, in groups of 5, 3 and 5, each a prefill pass and a join of its
        own (bench/engine_stats.py), where the in-process engine, its 16 in 2 ms, made two of 8.
        """
        config = self.config
        first = time.perf_counter()
        deadline = first + config.coalesce_seconds
        while self.running and self.scheduler.waiting() < config.prefill_batch_size:
            wait = deadline - time.perf_counter()
            if wait <= 0 or not self._commands.poll(wait):
                return
            self._beat()
            self._run(self._commands.recv())
            deadline = max(deadline, first + config.prefill_gather_seconds)

    def _idle_wait(self) -> float:
        """How long an idle loop may wait for a command: until its next heartbeat, unless a
        model is loading; a moment if that load waits on its thread; not at all if it has
        weights to read."""
        if not self.loading:
            return min(HEARTBEAT_SECONDS, self.config.wedge_timeout_seconds / 4)
        head = self.loading[0]
        waiting = head.path is None or (not head.chunks and not head.job.done())
        return LOADING_POLL_SECONDS if waiting else 0.0

    def _run(self, message: Any) -> None:
        """Run a command; a `Call`'s caller gets the result or the error."""
        call_id, command = (
            (message.call_id, message.command) if isinstance(message, Call) else (None, message)
        )
        self._call_id = call_id
        try:
            value = self._handlers[type(command)](command)
        except Exception as exc:
            if call_id is None:
                log.error("engine command %s failed", type(command).__name__, exc_info=exc)
            # Without its traceback: exc → traceback → this frame → exc is a cycle that keeps
            # the command's arguments alive until the garbage collector's next full pass.
            value = exc.with_traceback(None)
        if call_id is not None and value is not DEFERRED:
            self._answer(call_id, value)

    def _answer(self, call_id: int | None, value: Any) -> None:
        """A Result, or a Failure when `value` is an exception; the command's events first."""
        if call_id is None:
            return
        self._send(self.scheduler.take_output())
        reply = Failure(call_id, value) if isinstance(value, Exception) else Result(call_id, value)
        try:
            payload = pickle.dumps(reply)
        except Exception as exc:  # a result or third-party error that cannot cross processes
            error = RuntimeError(
                f"{type(value).__name__}: {value}" if isinstance(value, Exception) else repr(exc)
            )
            payload = pickle.dumps(Failure(call_id, error))
        self._send_payload(payload)

    def _send(self, reply: Any) -> None:
        if reply is not None:
            self._send_payload(pickle.dumps(reply))

    def _send_payload(self, payload: bytes) -> None:
        """To the facade; once it has gone (it closed the pipe) there is no one left to tell."""
        try:
            self._results.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.running = False

    def _probe(self, command: Probe) -> Any:
        if not os.environ.get(PROBES_ENV):
            raise PermissionError(f"probes are off (set {PROBES_ENV} to allow them)")
        module, name = command.function.split(":")
        return getattr(importlib.import_module(module), name)(self, *command.args)

    def _load(self, command: Load) -> Any:
        """Start loading; the caller is answered `(info, path)` once the model is ready."""
        job = self._loader.submit(checked_model_path, command.source)
        started = time.perf_counter()
        self.loading.append(Loading(self._call_id, command.model_id, command.source, started, job))
        return DEFERRED

    def _unload(self, model_id: str) -> None:
        self.scheduler.unload(model_id)
        if self.leader is not None:
            self.leader.unload(model_id)

    def _continue_loading(self) -> None:
        """One short piece of the oldest load: build the (lazy) model once its directory is
        found, read one chunk of its weights, or finish once its tokenizer is read."""
        loading = self.loading[0]
        try:
            if loading.path is None:
                if not loading.job.done():
                    return
                loading.path = loading.job.result()
                loading.model, loading.config = build_model(
                    loading.path,
                    fuse=self.config.fuse_projections and self.leader is None,
                    decode_kernel=self.config.decode_attention_kernel,
                )
                if self.leader is not None:
                    self.leader.load(loading.model_id, loading.source, loading.model)
                loading.chunks = weight_chunks(loading.model, self.load_chunk_bytes)
                loading.total_bytes = weight_bytes(loading.model)
                loading.job = self._loader.submit(read_tokenizer, loading.path, loading.config)
                self._send(LoadProgress(loading.model_id, 0, loading.total_bytes))
            elif loading.chunks:
                chunk = loading.chunks.pop(0)
                mx.eval(chunk)
                loading.read_bytes += sum(w.nbytes for w in chunk)
                self._send(LoadProgress(loading.model_id, loading.read_bytes, loading.total_bytes))
            elif loading.warmup is not None:
                if next(loading.warmup, WARMED_UP) is WARMED_UP:
                    self._finish_loading(loading, loading.path, loading.job.result())
            elif loading.job.done():
                loading.job.result()  # the tokenizer, read before any time goes to warming up
                if buckets_wanted(self.config.prefill_buckets) and self.leader is None:
                    loading.warmup = iter(self._warm_up(loading))
                else:
                    self._finish_loading(loading, loading.path, loading.job.result())
        except Exception as exc:
            if self.loading and self.loading[0] is loading:
                self.loading.pop(0)
            if not isinstance(exc, (ModelLoadFailed, ModelSourceNotFound)):
                # MLX's message may quote the model's files: the detail is for the log only.
                log.warning("cannot load %s", describe_source(loading), exc_info=exc)
                exc = ModelLoadFailed(
                    f"cannot load {describe_source(loading)} ({type(exc).__name__})"
                )
            self._answer(loading.call_id, exc.with_traceback(None))
            if self.leader is not None and loading.model is not None:
                self.leader.unload(loading.model_id)
            mx.clear_cache()

    def _warm_up(self, loading: Loading) -> WarmUp:
        batch = min(self.config.prefill_batch_size, self.config.max_batch_size or 1 << 30)
        return WarmUp(loading.model_id, loading.model, batch, self.config.prefill_step_size)

    def _finish_loading(self, loading: Loading, path: Path, tokenizer) -> None:
        info = describe_model(
            loading.model_id, loading.source, loading.model, tokenizer, loading.config, path
        )
        loaded = LoadedModel(model=loading.model, tokenizer=tokenizer, info=info, path=path)
        self.loading.pop(0)
        self.scheduler.add_model(loaded, time.perf_counter() - loading.started)
        self._answer(loading.call_id, (loaded.info, str(loaded.path)))


def describe_source(loading: Loading) -> str:
    """The source a load was given, short enough for a message (a path may be 4 KiB)."""
    return repr(shorten(str(loading.path or loading.source.local_path or loading.source.repo_id)))


def glibc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is another (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_engine_process(
    config: EngineConfig, commands: Connection, results: Connection, heartbeat: Any, log_level: int
) -> None:
    """The engine process's main: log as the server does, then run until told to stop.

    Signals are the server's to handle: a Ctrl-C or a SIGTERM sent to the whole process group
    must start a graceful shutdown, not kill the engine under the streams it should finish. The
    engine still ends with the server: its command pipe closes when the server exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    log.info("MLX %s on %s", mlx_version(), mx.default_device())
    if conflict := backend_conflict(installed_mlx_backends()):
        log.warning(conflict)
    worker = Worker(config, commands, results, heartbeat)
    # Everything imported so far lives as long as the process. Spawned, the process also
    # imports the server's main module (multiprocessing runs it as __mp_main__): with grpc, about
    # 105,000 objects the cyclic collector would walk at every full collection, 87 ms each on
    # the H200's host, a stall of every stream (bench serving --engine-stats). Frozen, they are
    # never walked; what the process makes later is collected as before.
    gc.freeze()
    if hook := os.environ.get(BENCH_HOOK_ENV):
        module, name = hook.split(":")
        getattr(importlib.import_module(module), name)(worker)
    worker.run()
    exit_now()


def exit_now() -> NoReturn:
    """End the engine process once its loop has ended and said so (`Stopped`), or a follower
    rank once rank 0 has stopped, without the interpreter's and the C libraries' teardown.

    Nothing is left to finalize: every reply went down the pipe as it was made. The teardown
    could only hold the process: with Debian's OpenBLAS preloaded (the CPU setup .ci/run uses),
    about 1 shutdown in 50 on a loaded 2-core host hung in OpenBLAS's exit handler, which joins
    its worker thread while that thread sleeps on a wakeup it missed (gdb: _dl_fini →
    gotoblas_quit → blas_thread_shutdown_ → pthread_join), until the server gave up waiting
    30 s later and killed it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


MLX_BACKENDS = ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal")


def installed_mlx_backends() -> list[str]:
    backends = []
    for name in MLX_BACKENDS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
            backends.append(name)
    return backends


def backend_conflict(backends: list[str]) -> str | None:
    """MLX's backend packages all ship mlx/lib/libmlx.so: with two installed, the one installed
    last runs, whichever that was, and removing either breaks the other."""
    if len(backends) < 2:
        return None
    keep = next((name for name in backends if name.startswith("mlx-cuda")), backends[-1])
    others = " ".join(name for name in backends if name != keep)
    return (
        f"MLX backends {', '.join(backends)} are installed side by side and overwrite each "
        f"other's library; keep one: pip uninstall -y {others} {keep} && "
        f"pip install {keep}=={mlx_version()}"
    )


def mlx_version() -> str:
    """MLX's version, as the `mlx` distribution (which ships mlx.core) records it: the same as
    `mlx.core.__version__`, which MLX's stubs do not declare."""
    return importlib.metadata.version("mlx")
