"""The request mix and the clients that drive it: the same prompts for every backend, and
closed loops (each client sends its next request when its previous one ends)."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# Token ids whose text is a word of letters, to build prompt text from; the first of a large
# vocabulary are plenty.
WORD_IDS = 8192


@dataclass
class Prompt:
    ids: list[int]
    # Decodes from ids and encodes back to exactly them, for the text-only HTTP server.
    text: str


@dataclass
class RequestResult:
    start: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    error: str | None = None
    # As the engine measured them (the final message's usage): from admission to the first
    # token, and the request's decode rate. The client's figures minus these are the wire's.
    engine_ttft: float | None = None
    engine_tok_s: float | None = None

    def arrived(self, n: int, now: float) -> None:
        """n tokens reached the client in one message; its gap is spread over them."""
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        else:
            self.itl.extend([(now - self.last) / n] * n)
        self.last = now
        self.tokens += n


def describe_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        return f"{code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def prompt_words(tokenizer) -> list[str]:
    """Words of the tokenizer's own vocabulary, so prompts suit whatever model is measured."""
    size = min(len(tokenizer.get_vocab()), WORD_IDS)
    words = {tokenizer.decode([i]).strip() for i in range(size)}
    return sorted(w for w in words if len(w) > 1 and w.isascii() and w.isalpha())


def make_prompts(
    tokenizer,
    count: int,
    n_tokens: int | tuple[int, int],
    seed: int = 0,
    firsts: set[int] | None = None,
) -> list[Prompt]:
    """Distinct prompts of exactly n_tokens ids (or each of its own length in a (min, max)
    range, drawn from `seed`) that survive decode → encode unchanged.

    Distinct first tokens (none of them in, and each added to, `firsts`) keep every prefix
    cache (ours and mlx_lm.server's) out of play.
    """
    shortest, longest = (n_tokens, n_tokens) if isinstance(n_tokens, int) else n_tokens
    words, rng = prompt_words(tokenizer), random.Random(seed)
    prompts, firsts = [], set() if firsts is None else firsts
    n_tokens = rng.randint(shortest, longest)
    for _ in range(count * 200):
        text = " ".join(rng.choice(words) for _ in range(2 * n_tokens + 20))
        offset = rng.randrange(8)
        ids = tokenizer.encode(text, add_special_tokens=False)[offset : offset + n_tokens]
        text = tokenizer.decode(ids)
        if len(ids) == n_tokens and ids[0] not in firsts and tokenizer.encode(text) == ids:
            prompts.append(Prompt(ids, text))
            firsts.add(ids[0])
            if len(prompts) == count:
                return prompts
            n_tokens = rng.randint(shortest, longest)
    raise RuntimeError(f"could only make {len(prompts)} distinct {n_tokens}-token prompts")


def describe_lengths(lengths) -> str:
    """118, or 64-256 for a range (a (min, max) pair, or the lengths seen)."""
    if not lengths:
        return "-"
    shortest, longest = min(lengths), max(lengths)
    return str(shortest) if shortest == longest else f"{shortest}-{longest}"


async def closed_loop(
    call: Callable[[Prompt, int], Awaitable[RequestResult]],
    prompts: list[Prompt],
    concurrency: int,
    max_tokens: int,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients share the prompt list, each sending its next when one ends."""
    pending, results = iter(prompts), []

    async def client() -> None:
        for prompt in pending:
            results.append(await call(prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def generator_closed_loop(
    generator, prompts: list[Prompt], concurrency: int, max_tokens: int
) -> tuple[list[RequestResult], float]:
    """The closed loop on an mlx-lm BatchGenerator, in this thread: a finished request's
    client inserts its next prompt before the following step."""
    pending, active, done = collections.deque(prompts), {}, []

    def insert() -> None:
        prompt = pending.popleft()
        result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt.ids))
        (uid,) = generator.insert([prompt.ids], max_tokens=[max_tokens])
        active[uid] = result

    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        insert()
    while active:
        _, responses = generator.next()
        now = time.perf_counter()
        for response in responses:
            active[response.uid].arrived(1, now)
            if response.finish_reason is not None:
                done.append(active.pop(response.uid))
                if pending:
                    insert()
    return done, time.perf_counter() - start


def tokens_per_second(results: list[RequestResult], wall_s: float) -> float:
    tokens = sum(r.tokens for r in results if r.error is None)
    return tokens / wall_s if wall_s > 0 else 0.0
