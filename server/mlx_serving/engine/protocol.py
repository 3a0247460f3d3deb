"""Everything that crosses between the facade (engine.py) and the engine process (worker.py).

Commands go down, replies come up, each a type of its own; nothing else is sent. A command the
facade waits on travels in a `Call`, and is answered by a `Result` or a `Failure` with the same
id. The per-step reply is the hot path: a NamedTuple (it pickles as a plain tuple), whose
mid-stream deliveries are bare `(rid, text, token ids)` tuples (a dataclass per token would cost
the decode loop ~2 µs each).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

from .admission import Admission
from .events import Event
from .models import ModelSource

# ---- commands (facade → engine process) ---------------------------------------------------


@dataclass(frozen=True)
class Admit:
    admission: Admission
    # The facade's id for the request's stream: every delivery for it carries this.
    rid: int
    # A warm-up request: no events, no metrics, no prefix cache.
    internal: bool = False
    # Another sample of the prompt of the request with this rid (GenerateRequest.n): it
    # starts from that one's prefill instead of its own.
    fork_of: int | None = None


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Load:
    """Answered with `(ModelInfo, model directory)` once the model is ready."""

    source: ModelSource
    model_id: str


@dataclass(frozen=True)
class Unload:
    model_id: str


@dataclass(frozen=True)
class Pair:
    """Make `draft_model_id` the draft model of `model_id` (speculative decoding); answered
    with the model's ModelInfo."""

    model_id: str
    draft_model_id: str
    draft_tokens: int


@dataclass(frozen=True)
class AbortAll:
    """End every running sequence (a shutdown whose grace ran out)."""

    reason: str


@dataclass(frozen=True)
class Observe:
    """Whether the facade's observer records anything (metrics): if not, nothing is measured."""

    recording: bool


@dataclass(frozen=True)
class WatchTokens:
    """Whether anyone subscribes to TokenGenerated events, which cost a device sync per token."""

    wanted: bool


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Probe:
    """Tests only: run `module:function(worker, *args)` in the engine process. Refused unless
    the process was started with PROBES_ENV set."""

    function: str
    args: tuple = ()


@dataclass(frozen=True)
class Call:
    """A command whose caller waits: answered by a Result or a Failure carrying `call_id`."""

    call_id: int
    command: Any


PROBES_ENV = "MLX_ENGINE_TEST_PROBES"

# ---- replies (engine process → facade) ----------------------------------------------------


class StepOutput(NamedTuple):
    """One per loop turn that produced anything: every reader's chunks, events, observations.

    A delivery is `(rid, text, token ids)` mid-stream, or `(rid, item)` with `item` a final
    GenerationChunk, an engine error, or END."""

    deliveries: list
    events: list[Event]
    observations: list


@dataclass(frozen=True)
class LoadProgress:
    model_id: str
    read_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Result:
    call_id: int
    value: Any


@dataclass(frozen=True)
class Failure:
    call_id: int
    error: Exception


@dataclass(frozen=True)
class Died:
    """The engine loop raised: the process ends after this."""

    reason: str


@dataclass(frozen=True)
class Stopped:
    pass


# Sent to a request's reader to end its stream.
END = "end"
