"""Typed engine errors; the wire layer maps each to one gRPC status.

Each carries, as attributes, what a caller needs beyond its message: the model it is about, the
state that refused the request, how long to wait before retrying. They cross the process
boundary whole (see `EngineError.__reduce__`).
"""

from dataclasses import dataclass


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    def __reduce__(self):
        # Exceptions pickle as cls(*args), which our constructors do not take: they cross from
        # the engine process whole, attributes included.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type, args: tuple, state: dict) -> "EngineError":
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ModelNotFound(EngineError):
    def __init__(self, model_id: str):
        super().__init__(f"model {model_id!r} is not loaded")
        self.model_id = model_id


class ModelAlreadyExists(EngineError):
    def __init__(self, model_id: str):
        super().__init__(f"model {model_id!r} is already loaded")
        self.model_id = model_id


class ModelNotReady(EngineError):
    def __init__(self, model_id: str, state: str):
        super().__init__(f"model {model_id!r} is {state}, not ready")
        self.model_id = model_id
        # The model's state (a ModelState value, e.g. "loading").
        self.state = state


class ModelLoadFailed(EngineError):
    """The source could not be turned into a model."""

    # The id the model was being loaded as: the engine process raises this naming the source
    # only, and the facade, which knows the id, fills it in ("" until then).
    model_id: str = ""


class DraftIncompatible(ModelLoadFailed):
    """A model cannot be paired with the draft model asked for (speculative decoding): another
    vocabulary or special tokens, a cache that cannot be rolled back, a draft not ready."""

    def __init__(self, message: str, model_id: str = ""):
        super().__init__(message)
        self.model_id = model_id


class ModelSourceNotFound(ModelLoadFailed):
    """No model directory at the path, or the repository is neither cached nor downloadable."""


class LoadRefused(EngineError):
    """A client's LoadModel (or UnloadModel) the operator's LoadPolicy does not allow; nothing
    was read."""

    def __init__(self, message: str, model_id: str = ""):
        super().__init__(message)
        # The id the model was to be loaded as ("" until the facade, which knows it, fills it).
        self.model_id = model_id


class LoadingDisabled(LoadRefused):
    """security.allow_loading is off: models change only with the server's configuration."""

    def __init__(self, model_id: str = ""):
        super().__init__("this server does not load or unload models on request", model_id)


class SourceNotAllowed(LoadRefused):
    """A path outside the model roots (whether or not it exists), or a repository when Hugging
    Face is off or its organisation is not listed."""


class RemoteCodeRefused(LoadRefused):
    """The model asks to run Python of its own, and security.trust_remote_code is off."""


class LoadCapReached(LoadRefused):
    """The load would pass max_loaded_models or max_loaded_bytes."""


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(EngineError):
    """Passed the contract's rules but not the model's (e.g. a token id past the vocabulary)."""

    def __init__(self, *violations: FieldViolation, more: int = 0):
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(summary + (f" (and {more} more)" if more else ""))
        self.violations = violations
        # Violations found beyond those listed (see admission.raise_violations).
        self.more = more


class EngineUnavailable(EngineError):
    """The engine is draining, stopped, or its thread died."""


class ShuttingDown(EngineUnavailable):
    """The server is draining before it stops: new work is refused, and is worth retrying after
    `retry_after` seconds (elsewhere, or here once the server is back)."""

    def __init__(self, retry_after: float):
        super().__init__("the server is shutting down")
        self.retry_after = retry_after


class RequestAborted(EngineError):
    """A request ended by the engine (model unloaded, shutdown) before it finished."""

    # Set when a shutdown ended it: the request is worth retrying after this many seconds
    # (elsewhere, or here once the server is back). None for an unload.
    retry_after: float | None = None


class SequenceFailed(EngineError):
    """One sequence failed inside a batch step (a bug: the engine logged the cause); the batch
    and the engine go on without it."""

    def __init__(self, request_id: str):
        super().__init__(
            f"internal error: the generation failed in the engine (request id {request_id})"
        )
        self.request_id = request_id


class EngineOverloaded(EngineError):
    """Admission queue full; the caller should retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__("too many requests in flight; retry later")
        self.retry_after = retry_after


class TokenizeOverloaded(EngineOverloaded):
    """Too many Tokenize and Detokenize calls at once (max_concurrent_tokenize): generations
    are admitted separately, so this one says nothing about them."""
