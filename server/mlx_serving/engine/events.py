"""Engine events and the bus that fans them out to subscribers without slowing the engine."""

import asyncio
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelLoaded:
    model_path: str
    load_seconds: float


@dataclass(frozen=True)
class ModelUnloaded:
    reason: str = ""


@dataclass(frozen=True)
class GenerationStarted:
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class GenerationCompleted:
    tokens_generated: int
    duration_seconds: float
    tokens_per_second: float
    finish_reason: str


@dataclass(frozen=True)
class ErrorOccurred:
    message: str
    code: str = ""


Payload = ModelLoaded | ModelUnloaded | GenerationStarted | GenerationCompleted | ErrorOccurred


@dataclass(frozen=True)
class Event:
    payload: Payload
    model_id: str = ""
    request_id: str = ""
    time: float = field(default_factory=time.time)


DEFAULT_SUBSCRIBER_BUFFER = 1024


class Subscription:
    """One subscriber's bounded buffer; when full, new events are dropped and counted."""

    def __init__(self, kinds: frozenset[type] | None, model_ids: frozenset[str] | None, size: int):
        self.kinds = kinds
        self.model_ids = model_ids
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self.dropped = 0

    def wants(self, event: Event) -> bool:
        if self.kinds and type(event.payload) not in self.kinds:
            return False
        return not (self.model_ids and event.model_id and event.model_id not in self.model_ids)

    def offer(self, event: Event | None) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1


class EventBus:
    """Lives on the event loop; the engine thread publishes through `loop.call_soon_threadsafe`."""

    def __init__(self, buffer_size: int = DEFAULT_SUBSCRIBER_BUFFER):
        self.buffer_size = buffer_size
        self._subscriptions: set[Subscription] = set()

    def subscribe(
        self, kinds: frozenset[type] | None = None, model_ids: frozenset[str] | None = None
    ) -> Subscription:
        subscription = Subscription(kinds, model_ids, self.buffer_size)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, event: Event) -> None:
        for subscription in self._subscriptions:
            if subscription.wants(event):
                subscription.offer(event)

    def close(self) -> None:
        """Ends every subscription's stream with a None sentinel, making room for it if needed."""
        for subscription in self._subscriptions:
            while subscription.queue.full():
                subscription.queue.get_nowait()
                subscription.dropped += 1
            subscription.queue.put_nowait(None)
