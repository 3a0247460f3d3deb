"""Hooks for metrics: the engine calls them at the moments that matter.

The engine knows nothing of Prometheus or OpenTelemetry; the server passes an observer that
records what it wants. The engine process records each call and the facade replays them, in
order, on the event loop once per step: a hook may be slow-ish, but must not block.
"""


class EngineObserver:
    """Does nothing; subclass and override what you record."""

    def request_queued(self, model_id: str) -> None:
        """A request was admitted and waits for prefill."""

    def request_started(self, model_id: str, queue_seconds: float) -> None:
        """A request's prefill began, `queue_seconds` after admission."""

    def first_token(self, model_id: str, seconds: float) -> None:
        """A request produced its first token, `seconds` after admission."""

    def tokens(self, model_id: str, count: int, seconds_since_previous: float) -> None:
        """A request produced `count` more tokens (inter-token latency when count is 1)."""

    def request_finished(
        self,
        model_id: str,
        finish_reason: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        seconds: float,
        started: bool,
    ) -> None:
        """A request left the engine, for any reason; `started`: its prefill had begun."""

    def step(self, model_id: str, batch_size: int, seconds: float) -> None:
        """One batch step of one model: `batch_size` sequences decoding, taking `seconds`."""

    def prefix_cache_lookup(self, hit: bool) -> None:
        """A request's prompt was looked up in the prefix cache."""

    def prefix_cache_size(self, nbytes: int) -> None:
        """The prefix cache's size changed."""

    def models_loaded(self, count: int) -> None:
        """The number of ready models changed."""

    def kv_cache(self, model_id: str, reserved_bytes: int, budget_bytes: int) -> None:
        """The KV bytes a model's running sequences reserve (prompt + max_tokens each, as
        admission counts them) changed, or the model was loaded; `budget_bytes` is its budget.
        Both 0: the model was unloaded."""

    def draft_tokens(self, model_id: str, proposed: int, accepted: int) -> None:
        """Speculative decoding: a generation that speculated ended, having had `proposed`
        draft tokens proposed, of which the model accepted `accepted`."""


HOOKS = tuple(name for name in vars(EngineObserver) if not name.startswith("_"))


class RecordingObserver(EngineObserver):
    """The engine process's observer: it records each call, and the facade replays them on the
    real observer with the step's results (a tuple append per call on the hot path)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def take(self) -> list[tuple[str, tuple]]:
        calls, self.calls = self.calls, []
        return calls


def _recorder(name: str):
    def record(self: RecordingObserver, *args) -> None:
        self.calls.append((name, args))

    record.__name__ = name
    return record


for _name in HOOKS:
    setattr(RecordingObserver, _name, _recorder(_name))


def replay(observer: EngineObserver, calls: list[tuple[str, tuple]]) -> None:
    for name, args in calls:
        getattr(observer, name)(*args)
