"""One model sharded over several processes (`mx.distributed`): rank 0 leads, the others follow.

Every rank runs `mlx-serving serve` under `mlx.launch` (docs/DISTRIBUTED.md). Rank 0 is the
server as ever: its engine process loads each model tensor-sharded with mlx-lm's `shard`
(a slice of every attention and MLP projection per rank), and drives generation. A rank past 0
serves nothing: it runs `follow`, which loads the same shards and replays, on a BatchGenerator
of its own, every call rank 0's scheduler makes on a model's BatchGenerator that changes what it
computes (`insert`, `remove`, `next`, a fresh generator), in the same order. So every collective
inside a forward pass (the all_sums of the sharded projections) meets its partner on every rank.

The decisions stay with rank 0: admission, gathering a prefill's company, time limits, stop
strings, cancellation. Followers get the decisions (plain data: prompt ids, max tokens, stop
token sequences, uids to remove), never the inputs they were made from. Sampling is rank 0's
alone: in each step its sampled tokens are summed into every rank's (the followers add zeros,
`ShardedGenerationBatch._sample`), so every rank feeds the same tokens to the next step whatever
sampler, logits processor or constraint chose them.

Rank 0 sends one message per batch step (the pickled ops since the last one, then `next`);
loads and unloads are sent at once. The control channel is a TCP connection from rank 0 to each
follower, set up through the group at the start (`open_channel`): rank 0 listens on the address
mlx.launch gave every rank for it and admits only followers presenting a key it sent them
through the group. A send never waits for the batch's stream, so rank 0 builds step k+1 while
step k computes, and an idle follower waits in the kernel. Where a follower cannot connect
(a Thunderbolt ring of three Macs or more, where rank 0's ring address is not everyone's),
every rank falls back to `mx.distributed` itself: one all_sum of a CONTROL_BYTES buffer per
message (rank 0's bytes plus the followers' zeros), run on the batch's own stream so that it
keeps its place among the forward passes' collectives.

What reaches into a model's cache or runs the model outside the batch generator is off for a
sharded model: the prefix cache, forks of one prefill for n > 1 (each sample prefills alone),
prefill warm-up, speculative decoding (pairing a draft is refused) and prompt_logprobs
(refused).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import pickle
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

from .batch_cache import make_cache
from .capacity import kv_bytes_from_args
from .errors import FieldViolation, InvalidRequest, ModelLoadFailed
from .fused_batch import FusedGenerationBatch
from .loading import build_model
from .models import ModelSource
from .requests import GenerationRequest
from .sources import checked_model_path

log = logging.getLogger(__name__)

# Set by mlx.launch in every rank's environment.
RANK_ENV = "MLX_RANK"
# The first all_sum of every message: an 8-byte length, then the message's first bytes.
CONTROL_BYTES = 1024
LENGTH_BYTES = 8

# The process's group, once `init_group` made it (one per process).
_group: mx.distributed.Group | None = None


def launched_rank() -> int | None:
    """This process's rank if mlx.launch started it, else None (no group is made here)."""
    value = os.environ.get(RANK_ENV)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def init_group() -> mx.distributed.Group:
    """The global group, of every rank mlx.launch started (the backend its environment says)."""
    global _group
    if _group is None:
        _group = mx.distributed.init(strict=True)
    return _group


def leader_from_env(stream: Any) -> Leader | None:
    """Rank 0's Leader when launched over two ranks or more; None otherwise. `stream`: the
    one every batch runs on (the channel's messages must keep their order among its
    collectives)."""
    if launched_rank() is None:
        return None
    try:
        group = init_group()
    except RuntimeError as exc:  # mlx.launch -n 1 gives the ring backend an empty hostfile
        log.warning("no distributed group (%s): serving unsharded, in this process alone", exc)
        return None
    if group.size() < 2:
        return None
    if group.rank() != 0:
        raise RuntimeError("only rank 0 runs an engine; the other ranks follow it")
    log.info("rank 0 of %d: leading; every model is sharded over the ranks", group.size())
    return Leader(group, stream)


# ---- the channel ---------------------------------------------------------------------------


class Channel:
    """Messages from rank 0 to every other rank, as all_sums on `stream`: the fallback where
    the followers cannot reach rank 0 over TCP (see `open_channel`)."""

    kind = "collective"

    def __init__(self, group: mx.distributed.Group, stream: Any):
        self.group = group
        self.stream = stream
        # Messages sent, and the seconds spent sending them.
        self.sent = 0
        self.seconds = 0.0

    def _sum(self, data: np.ndarray) -> np.ndarray:
        total = mx.distributed.all_sum(mx.array(data), group=self.group, stream=self.stream)
        mx.eval(total)
        return np.array(total, copy=False)

    def send(self, ops: list) -> None:
        started = time.perf_counter()
        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        head = np.zeros(CONTROL_BYTES, np.uint8)
        head[:LENGTH_BYTES] = np.frombuffer(len(payload).to_bytes(LENGTH_BYTES, "little"), np.uint8)
        first = payload[: CONTROL_BYTES - LENGTH_BYTES]
        head[LENGTH_BYTES : LENGTH_BYTES + len(first)] = np.frombuffer(first, np.uint8)
        self._sum(head)
        rest = payload[len(first) :]
        if rest:
            self._sum(np.frombuffer(rest, np.uint8).copy())
        self.sent += 1
        self.seconds += time.perf_counter() - started

    def receive(self) -> list:
        head = self._sum(np.zeros(CONTROL_BYTES, np.uint8))
        length = int.from_bytes(head[:LENGTH_BYTES].tobytes(), "little")
        payload = head[LENGTH_BYTES : LENGTH_BYTES + length].tobytes()
        if length > len(payload):
            payload += self._sum(np.zeros(length - len(payload), np.uint8)).tobytes()
        return pickle.loads(payload)

    def close(self) -> None:
        pass


class SocketChannel(Channel):
    """Messages from rank 0 over a TCP connection to each follower: a send never waits for the
    batch's stream (rank 0 builds the next step while this one computes), and a follower waits
    for the next message in the kernel, not spinning in a collective."""

    kind = "tcp"

    def __init__(self, group: mx.distributed.Group, stream: Any, sockets: list[socket.socket]):
        super().__init__(group, stream)
        self.sockets = sockets

    def send(self, ops: list) -> None:
        started = time.perf_counter()
        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        frame = len(payload).to_bytes(LENGTH_BYTES, "little") + payload
        for connection in self.sockets:
            connection.sendall(frame)
        self.sent += 1
        self.seconds += time.perf_counter() - started

    def receive(self) -> list:
        (connection,) = self.sockets
        length = int.from_bytes(read_exactly(connection, LENGTH_BYTES), "little")
        return pickle.loads(read_exactly(connection, length))

    def close(self) -> None:
        for connection in self.sockets:
            connection.close()


def read_exactly(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = connection.recv(size - len(data))
        if not piece:
            raise ConnectionError("rank 0 closed the control connection")
        data += piece
    return bytes(data)


def leader_host() -> str | None:
    """An address of rank 0 that the other ranks reach, from what mlx.launch told every rank:
    the ring's first address (ring), the coordinator (JACCL), the NCCL host."""
    try:
        if path := os.environ.get("MLX_HOSTFILE"):
            hosts = json.loads(Path(path).read_text())
            return str(hosts[0][0]).rsplit(":", 1)[0].strip("[]")
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        pass
    if coordinator := os.environ.get("MLX_JACCL_COORDINATOR"):
        return coordinator.rsplit(":", 1)[0].strip("[]")
    return os.environ.get("NCCL_HOST_IP") or None


# Where rank 0 listens (port, 2 bytes), the followers' key (KEY_BYTES), the host's length and
# the host, summed into every rank at the start.
KEY_BYTES = 16
HOST_BYTES = 255
CONNECT_SECONDS = 20.0


def open_channel(group: mx.distributed.Group, stream: Any) -> Channel:
    """The control channel, made by every rank at once (two all_sums): TCP from rank 0 to each
    follower where every follower can connect to rank 0, else all_sums (`Channel`).

    Rank 0 listens on an address of its own that mlx.launch gave every rank, on a port of the
    system's choosing, and accepts only followers that present the key it sent them through
    the group; then it stops listening.
    """
    leader = group.rank() == 0
    listener, announce = None, np.zeros(2 + KEY_BYTES + 1 + HOST_BYTES, np.uint8)
    key = secrets.token_bytes(KEY_BYTES)
    if leader and (host := leader_host()) is not None and len(host.encode()) <= HOST_BYTES:
        try:
            listener = socket.create_server((host, 0), backlog=group.size())
        except OSError as exc:
            log.warning("cannot listen for the other ranks on %s (%s)", host, exc)
        else:
            port = listener.getsockname()[1]
            encoded = host.encode()
            header = port.to_bytes(2, "little") + key + bytes([len(encoded)]) + encoded
            announce[: len(header)] = np.frombuffer(header, np.uint8)
    announced = Channel(group, stream)._sum(announce).tobytes()
    port = int.from_bytes(announced[:2], "little")
    key = announced[2 : 2 + KEY_BYTES]
    host = announced[3 + KEY_BYTES : 3 + KEY_BYTES + announced[2 + KEY_BYTES]].decode()
    sockets: list[socket.socket] = []
    if port:
        try:
            sockets = accept_followers(listener, key, group.size() - 1) if listener else []
            if not leader:
                connection = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
                connection.sendall(key)
                sockets = [connection]
        except OSError as exc:
            log.warning("no control connection with rank 0 at %s:%d (%s)", host, port, exc)
            sockets = []
    if listener is not None:
        listener.close()
    # Every rank agrees on TCP, or every rank falls back.
    ready = np.array([1 if sockets or not port else 0], np.int32)
    if leader:
        ready[0] = int(len(sockets) == group.size() - 1)
    agreed = int(Channel(group, stream)._sum(ready)[0]) == group.size() and port > 0
    if not agreed:
        for connection in sockets:
            connection.close()
        return Channel(group, stream)
    for connection in sockets:
        connection.settimeout(None)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SocketChannel(group, stream, sockets)


def accept_followers(listener: socket.socket, key: bytes, count: int) -> list[socket.socket]:
    """`count` connections that present `key`, in CONNECT_SECONDS; others are closed."""
    deadline = time.monotonic() + CONNECT_SECONDS
    accepted: list[socket.socket] = []
    while len(accepted) < count:
        listener.settimeout(max(0.0, deadline - time.monotonic()))
        connection, _ = listener.accept()
        connection.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            presented = read_exactly(connection, KEY_BYTES)
        except (OSError, ConnectionError):
            presented = b""
        if hmac.compare_digest(presented, key):
            accepted.append(connection)
        else:
            connection.close()
    return accepted


# ---- the batch classes every rank uses for a sharded model -----------------------------------


class ShardedGenerationBatch(FusedGenerationBatch):
    """FusedGenerationBatch whose sampled tokens are rank 0's on every rank: rank 0 samples,
    the others add zeros to its tokens (one all_sum of a token per row)."""

    def _sample(self, logprobs: mx.array, inputs: mx.array) -> mx.array:
        group = init_group()
        if group.rank() == 0:
            tokens = super()._sample(logprobs, inputs).astype(mx.int32)
        else:
            tokens = mx.zeros((logprobs.shape[0],), mx.int32)
        return mx.distributed.all_sum(tokens, group=group).astype(mx.uint32)


class ShardedPrompts:
    """Mixed into the generator's prompt batch class: the batch a prefill turns into is a
    ShardedGenerationBatch, whose first step (in its constructor) already agrees on tokens."""

    def generate(self, tokens: list[list[int]]) -> ShardedGenerationBatch:
        # mlx-lm 0.32.2's PromptProcessingBatch.generate, with our generation batch class.
        batch: Any = self
        if any(len(t) > 1 for t in tokens):
            batch.prompt([t[:-1] for t in tokens])
        last_token = mx.array([t[-1] for t in tokens])
        generation = ShardedGenerationBatch(
            batch.model,
            batch.uids,
            last_token,
            batch.prompt_cache,
            batch.tokens,
            batch.samplers,
            batch.fallback_sampler,
            batch.logits_processors,
            batch.stop_sequences,
            batch.max_tokens,
        )
        batch.uids = []
        batch.prompt_cache = []
        batch.tokens = []
        batch.samplers = []
        batch.logits_processors = []
        batch.max_tokens = []
        return generation


_sharded_prompt_classes: dict[type, type] = {}


def sharded_prompt_class(base: type) -> type:
    """`base` (a PromptProcessingBatch class) with ShardedPrompts mixed in."""
    if issubclass(base, ShardedPrompts):
        return base
    if base not in _sharded_prompt_classes:
        _sharded_prompt_classes[base] = type(f"Sharded{base.__name__}", (ShardedPrompts, base), {})
    return _sharded_prompt_classes[base]


def prepare_generator(generator: BatchGenerator) -> None:
    """Make a fresh generator's batches the sharded ones (its prompt batch keeps its class,
    bucketed or not, with ShardedPrompts mixed in)."""
    generator._generation_batch = ShardedGenerationBatch.empty(generator.model, generator.sampler)
    prompts = generator._prompt_batch
    prompts.__class__ = sharded_prompt_class(type(prompts))


def prompt_class_name(generator: BatchGenerator) -> str:
    """The generator's prompt batch class (before ShardedPrompts), as `module:qualname`."""
    cls = type(generator._prompt_batch)
    base = (
        next(c for c in cls.__mro__ if c is not ShardedPrompts and c is not cls)
        if issubclass(cls, ShardedPrompts)
        else cls
    )
    return f"{base.__module__}:{base.__qualname__}"


def prompt_class(name: str) -> type:
    """The prompt batch class `prompt_class_name` named: mlx-lm's or one of this package's."""
    module, _, qualname = name.partition(":")
    if not (module.startswith("mlx_lm.") or module.startswith(__package__ + ".")):
        raise ValueError(f"unexpected prompt batch class {name!r}")
    import importlib

    cls = getattr(importlib.import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, PromptProcessingBatch)):
        raise ValueError(f"{name!r} is no prompt batch class")
    return cls


# ---- loading a shard -------------------------------------------------------------------------


def shard_model(model: nn.Module, group: mx.distributed.Group, model_id: str) -> None:
    """Slice `model`'s weights (lazy, not read yet) for this rank: mlx-lm's tensor parallelism.

    Only what a sharded model can serve here: a model mlx-lm can shard (`shard`), whose heads
    divide among the ranks, and whose KV bytes per token its config states (measuring them
    would run the model on rank 0 alone).
    """
    size = group.size()
    if not hasattr(model, "shard"):
        raise ModelLoadFailed(
            f"{model_id!r}: mlx-lm has no tensor parallelism for this architecture, so it "
            f"cannot be sharded over {size} ranks"
        )
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None)
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    for name, count in (("attention heads", heads), ("KV heads", kv_heads)):
        if isinstance(count, int) and count % size:
            raise ModelLoadFailed(
                f"{model_id!r}: its {count} {name} do not divide among {size} ranks"
            )
    if kv_bytes_from_args(model) is None:
        raise ModelLoadFailed(
            f"{model_id!r}: its KV cache is not plain per-layer keys and values, which sharded "
            "serving needs"
        )
    model.shard(group)


def load_shard(source: ModelSource, group: mx.distributed.Group, model_id: str) -> nn.Module:
    """A follower's shard of a model, read whole."""
    path = checked_model_path(source)
    model, _ = build_model(path, fuse=False)
    shard_model(model, group, model_id)
    mx.eval(model.parameters())
    return model


# ---- rank 0 ----------------------------------------------------------------------------------


class Leader:
    """Rank 0's side: the ops its scheduler makes on its models' generators, sent to the
    followers before each batch step."""

    def __init__(self, group: mx.distributed.Group, stream: Any):
        self.group = group
        self.pending: list[tuple] = []
        self.channel = open_channel(group, stream)
        log.info("control channel to the other ranks: %s", self.channel.kind)

    def refusal(self, request: GenerationRequest) -> Exception | None:
        """Why a sharded model cannot serve `request`, if it cannot."""
        if request.prompt_logprobs is not None:
            return InvalidRequest(
                FieldViolation(
                    "prompt_logprobs",
                    "not supported by a model sharded over several processes",
                )
            )
        return None

    def flush(self) -> None:
        ops, self.pending = self.pending, []
        self.channel.send(ops)

    def load(self, model_id: str, source: ModelSource, model: nn.Module) -> None:
        """Shard rank 0's (lazy) model, and have the followers load theirs now."""
        shard_model(model, self.group, model_id)
        self.pending.append(("load", model_id, source))
        self.flush()

    def unload(self, model_id: str) -> None:
        self.pending.append(("unload", model_id))
        self.flush()

    def lead(self, model_id: str, generator: BatchGenerator) -> None:
        """Make a new generator of rank 0's (the scheduler's) sharded and mirrored."""
        prepare_generator(generator)
        settings = dict(
            completion_batch_size=generator.completion_batch_size,
            prefill_batch_size=generator.prefill_batch_size,
            prefill_step_size=generator.prefill_step_size,
            prompt_class=prompt_class_name(generator),
        )
        self.pending.append(("generator", model_id, settings))
        generator.__class__ = LeadingBatchGenerator
        generator._leader = self  # type: ignore[attr-defined]
        generator._model_id = model_id  # type: ignore[attr-defined]

    def close(self) -> None:
        """Tell the followers to stop (the engine is stopping). A channel already broken (a
        follower gone) is only logged: mlx.launch ends the other ranks then."""
        try:
            self.pending.append(("stop",))
            self.flush()
        except Exception as exc:
            log.error("cannot tell the other ranks to stop: %s: %s", type(exc).__name__, exc)
        finally:
            channel = self.channel
            channel.close()
            if channel.sent:
                log.info(
                    "control channel (%s): %d messages, %.0f µs each on average",
                    channel.kind,
                    channel.sent,
                    1e6 * channel.seconds / channel.sent,
                )


class LeadingBatchGenerator(BatchGenerator):
    """Rank 0's BatchGenerator of a sharded model: each call that changes what it computes is
    also queued for the followers, and `next` sends the queue first."""

    _leader: Leader
    _model_id: str

    def insert_segments(
        self,
        segments,
        max_tokens=None,
        caches=None,
        all_tokens=None,
        samplers=None,
        logits_processors=None,
        stop_sequences=None,
    ):
        if any(all_tokens or ()) or any(
            c is not None and any(layer.size() for layer in c) for c in caches or ()
        ):
            raise RuntimeError("a sharded model's sequences start from an empty cache")
        uids = super().insert_segments(
            segments, max_tokens, caches, all_tokens, samplers, logits_processors, stop_sequences
        )
        self._leader.pending.append(
            ("insert", self._model_id, uids, segments, max_tokens, stop_sequences)
        )
        return uids

    def remove(self, uids, return_prompt_caches=False):
        removed = super().remove(uids, return_prompt_caches)
        self._leader.pending.append(("remove", self._model_id, list(uids)))
        return removed

    def next(self):
        # The step sizes as rank 0's prefill pacing set them for this step.
        sizes = (self.prefill_step_size, self._prompt_batch.prefill_step_size)
        self._leader.pending.append(("next", self._model_id, sizes))
        self._leader.flush()
        return super().next()

    def close(self):
        # Once: BatchGenerator.__del__ closes again, maybe after a new generator of the same
        # model was made (a failed step), which the followers must keep.
        leader = self.__dict__.pop("_leader", None)
        if leader is not None:
            leader.pending.append(("close", self._model_id))
        super().close()


# ---- ranks past 0 ----------------------------------------------------------------------------


@dataclass
class Follower:
    """A rank past 0: rank 0's ops replayed on this rank's shards, until it says stop."""

    group: mx.distributed.Group
    stream: Any = None
    models: dict[str, nn.Module] = field(default_factory=dict)
    generators: dict[str, BatchGenerator] = field(default_factory=dict)
    steps: int = 0

    def run(self) -> None:
        self.stream = self.stream or mx.new_stream(mx.default_device())
        channel = open_channel(self.group, self.stream)
        log.info("control channel from rank 0: %s", channel.kind)
        with mx.stream(self.stream):
            while True:
                for op in channel.receive():
                    if op[0] == "stop":
                        log.info("rank 0 stopped; %d batch steps followed", self.steps)
                        return
                    self.apply(op)

    def apply(self, op: tuple) -> None:
        kind, model_id, *args = op
        if kind == "load":
            (source,) = args
            started = time.perf_counter()
            self.models[model_id] = load_shard(source, self.group, model_id)
            log.info("loaded the shard of %s in %.1f s", model_id, time.perf_counter() - started)
        elif kind == "unload":
            self.models.pop(model_id, None)
            self.generators.pop(model_id, None)
            mx.clear_cache()
        elif kind == "generator":
            (settings,) = args
            generator = BatchGenerator(
                self.models[model_id],
                completion_batch_size=settings["completion_batch_size"],
                prefill_batch_size=settings["prefill_batch_size"],
                prefill_step_size=settings["prefill_step_size"],
                stream=self.stream,
            )
            prompts = generator._prompt_batch
            prompts.__class__ = prompt_class(settings["prompt_class"])
            prepare_generator(generator)
            self.generators[model_id] = generator
        elif kind == "close":
            if model_id in self.generators:
                self.generators.pop(model_id).close()
        elif kind == "insert":
            uids, segments, max_tokens, stop_sequences = args
            model = self.models[model_id]
            got = self.generators[model_id].insert_segments(
                segments,
                max_tokens,
                caches=[make_cache(model) for _ in segments],
                stop_sequences=stop_sequences,
            )
            if got != uids:
                raise RuntimeError(f"out of step with rank 0: uids {got}, not {uids}")
        elif kind == "remove":
            (uids,) = args
            self.generators[model_id].remove(uids)
        elif kind == "next":
            (sizes,) = args
            generator = self.generators[model_id]
            generator.prefill_step_size, generator._prompt_batch.prefill_step_size = sizes
            generator.next()
            self.steps += 1
        else:
            raise RuntimeError(f"unknown op {kind!r} from rank 0")


def follow() -> NoReturn:
    """A rank past 0's `serve`: no server, only rank 0's ops, until rank 0 stops."""
    group = init_group()
    log.info(
        "rank %d of %d: following rank 0, which serves gRPC; this rank serves nothing itself",
        group.rank(),
        group.size(),
    )
    Follower(group).run()
    from .worker import exit_now  # here: the worker imports this module

    exit_now()  # as rank 0's engine process does, without the C libraries' teardown
