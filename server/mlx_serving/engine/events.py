"""Engine events and the bus that fans them out to subscribers without slowing the engine."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .requests import ChatMessage

Metadata = tuple[tuple[str, str], ...]

# GenerationCompleted.finish_reason of a sequence the engine ended (its model was unloaded, the
# engine shut down, the sequence failed) rather than its reader or its own end.
ABORTED = "aborted"


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    model_path: str
    quantization: str = ""
    parameters: int = 0
    metadata: Metadata = ()


@dataclass(frozen=True)
class ModelUnloaded:
    model: str
    reason: str = ""
    metadata: Metadata = ()


@dataclass(frozen=True)
class ModelInvalidated:
    model: str
    reason: str
    metadata: Metadata = ()


@dataclass(frozen=True)
class GenerationStarted:
    """The prompt as the request gave it: exactly one of text, messages, token_ids."""

    model: str
    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    token_ids: tuple[int, ...] | None = None
    max_tokens: int | None = None
    metadata: Metadata = ()


@dataclass(frozen=True)
class TokenGenerated:
    """One per token, for subscribers that ask; an empty end_of_sequence one closes a stream."""

    model: str
    token: str
    token_id: int = 0
    logprob: float | None = None
    end_of_sequence: bool = False
    metadata: Metadata = ()


@dataclass(frozen=True)
class GenerationCompleted:
    """finish_reason: a requests.FinishReason's value, or ABORTED (the wire says CANCELLED)."""

    model: str
    tokens_generated: int
    duration_seconds: float
    throughput: float | None = None
    finish_reason: str = ""
    metadata: Metadata = ()
    # Speculative decoding: draft tokens proposed for the request, and accepted.
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0


@dataclass(frozen=True)
class ErrorOccurred:
    error: str
    code: str = ""
    model: str = ""
    metadata: Metadata = ()


@dataclass(frozen=True)
class RuntimeStatus:
    """status is one of "ready", "busy", "error", "shutdown"."""

    status: str
    models_loaded: int
    active_tasks: int = 0
    metadata: Metadata = ()


Payload = (
    ModelLoaded
    | ModelUnloaded
    | ModelInvalidated
    | GenerationStarted
    | TokenGenerated
    | GenerationCompleted
    | ErrorOccurred
    | RuntimeStatus
)


@dataclass(frozen=True)
class Event:
    payload: Payload
    model_id: str = ""
    request_id: str = ""
    time: float = field(default_factory=time.time)
    # The request's GenerateRequest.client_request_id.
    client_request_id: str = ""


DEFAULT_SUBSCRIBER_BUFFER = 1024


class Subscription:
    """One subscriber's bounded buffer; when full, new events are dropped and counted.

    `kinds` None means every kind but TokenGenerated, which is only sent to those who list it.
    """

    def __init__(self, kinds: frozenset[type] | None, model_ids: frozenset[str] | None, size: int):
        self.kinds = kinds
        self.model_ids = model_ids
        self.queue: asyncio.Queue[Any] = asyncio.Queue(size)
        self.dropped = 0

    @property
    def wants_tokens(self) -> bool:
        return self.kinds is not None and TokenGenerated in self.kinds

    def wants(self, event: Event) -> bool:
        kind = type(event.payload)
        if self.kinds is None and kind is TokenGenerated:
            return False
        if self.kinds is not None and kind not in self.kinds:
            return False
        return not (self.model_ids and event.model_id and event.model_id not in self.model_ids)

    def offer(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1


class EventBus:
    """Lives on the event loop; the facade publishes the engine process's events once per step,
    and each subscriber gets the events it wants as they are (the wire layer encodes them)."""

    def __init__(self, buffer_size: int = DEFAULT_SUBSCRIBER_BUFFER):
        self.buffer_size = buffer_size
        self._subscriptions: set[Subscription] = set()
        # The facade tells the engine process whether to build per-token events: none, no cost.
        self.token_subscribers = 0

    def subscribe(
        self, kinds: frozenset[type] | None = None, model_ids: frozenset[str] | None = None
    ) -> Subscription:
        subscription = Subscription(kinds, model_ids, self.buffer_size)
        self._subscriptions.add(subscription)
        self.token_subscribers += subscription.wants_tokens
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            self.token_subscribers -= subscription.wants_tokens

    def publish(self, event: Event) -> None:
        for subscription in self._subscriptions:
            if subscription.wants(event):
                subscription.offer(event)

    def publish_all(self, events: list[Event]) -> None:
        for event in events:
            self.publish(event)

    def close(self) -> None:
        """Ends every subscription's stream with a None sentinel, making room for it if needed."""
        for subscription in self._subscriptions:
            while subscription.queue.full():
                subscription.queue.get_nowait()
                subscription.dropped += 1
            subscription.queue.put_nowait(None)
