"""Functions the tests run inside the engine process, through `Engine._call(fn, *args)`.

They must live in a module the engine process can import by name (this one: tests/ is on the
path of every test and of the process spawned for it), never in a test function.
"""

import asyncio
import os
import time

from mlx_serving.engine.scheduler import Scheduler


def sequences_held(scheduler: Scheduler) -> int:
    """Sequences the engine still runs: ours, and anywhere inside mlx-lm's batch generators."""
    total = len(scheduler.sequences)
    for slot in scheduler.slots.values():
        generator = slot.generator
        total += len(slot) + len(generator._unprocessed_sequences)
        total += len(generator._prompt_batch) + len(generator._generation_batch)
    return total


def record_inserts(scheduler: Scheduler, model_id: str) -> None:
    """From now on, remember how many sequences each insert into `model_id`'s batch brings."""
    generator = scheduler.slots[model_id].generator
    original = generator.insert
    scheduler.inserted = []

    def recording_insert(prompts, **kwargs):
        scheduler.inserted.append(len(prompts))
        return original(prompts, **kwargs)

    generator.insert = recording_insert


def inserted(scheduler: Scheduler) -> list[int]:
    return scheduler.inserted


def break_steps(scheduler: Scheduler, model_id: str) -> None:
    """The next batch step of `model_id` raises, as a bug in the decode loop would."""
    scheduler.slots[model_id].generator.next = _broken_step


def poison_seed(scheduler: Scheduler, seed: int) -> None:
    """Requests with this seed get a sampler that raises (a sampling bug of one sequence)."""
    from mlx_serving.engine import scheduler as module

    original = module.make_sampler

    def make_sampler(params):
        if params.seed != seed:
            return original(params)

        def sample(logprobs):
            raise ValueError("poisoned sampler")

        return sample

    module.make_sampler = make_sampler


def break_loop(scheduler: Scheduler) -> None:
    """The engine's loop itself raises after its next step, as a bug of the engine's would."""
    scheduler._report_status = _broken_step


def _broken_step():
    raise RuntimeError("injected fault")


def wedge_steps(scheduler: Scheduler, model_id: str, seconds: float) -> None:
    """The next batch step of `model_id` hangs for `seconds`, as a stuck device would."""
    generator = scheduler.slots[model_id].generator
    original = generator.next

    def wedged_step():
        time.sleep(seconds)
        return original()

    generator.next = wedged_step


async def wait_until_idle(engine, timeout: float = 3.0) -> None:
    """No request in the facade, no sequence in the engine process."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = await engine._call(sequences_held)
        if engine.active_requests() == 0 and held == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the engine still holds {held} sequences")
        await asyncio.sleep(0.01)


def record_deliveries(scheduler: Scheduler) -> None:
    """From now on, remember which request ids each message to the facade carries."""
    scheduler.delivered = []
    original = scheduler.deliver

    def recording_deliver():
        if scheduler._deliveries:
            scheduler.delivered.append([rid for rid, *_ in scheduler._deliveries])
        original()

    scheduler.deliver = recording_deliver


def delivered(scheduler: Scheduler) -> list[list[int]]:
    return scheduler.delivered


def record_first_tokens(scheduler: Scheduler) -> None:
    """From now on, pair each message to the facade with the requests whose first token the
    steps since the message before produced: (produced, carried) request ids."""
    scheduler.first_tokens = []
    seen: set[int] = set()
    produced: list[int] = []
    for slot in scheduler.slots.values():

        def recording_next(slot=slot, next_=slot.generator.next):
            prompt_responses, responses = next_()
            for response in responses:
                if response.uid not in seen and response.uid in slot.sequences:
                    seen.add(response.uid)
                    produced.append(slot.sequences[response.uid].rid)
            return prompt_responses, responses

        slot.generator.next = recording_next
    original = scheduler.deliver

    def recording_deliver():
        carried = {rid for rid, *_ in scheduler._deliveries}
        scheduler.first_tokens.append((list(produced), carried))
        produced.clear()
        original()

    scheduler.deliver = recording_deliver


def first_tokens(scheduler: Scheduler) -> list[tuple[list[int], set[int]]]:
    return [entry for entry in scheduler.first_tokens if entry[0]]


def environment_variable(scheduler: Scheduler, name: str) -> str | None:
    return os.environ.get(name)


def set_load_chunk_bytes(scheduler: Scheduler, size: int) -> None:
    scheduler.load_chunk_bytes = size


def count_steps_while_loading(scheduler: Scheduler) -> None:
    """From now on, count the batch steps taken while a model is being loaded."""
    scheduler.steps_while_loading = 0
    step = scheduler._step

    def counting_step(slot):
        if scheduler.loading:
            scheduler.steps_while_loading += 1
        step(slot)

    scheduler._step = counting_step


def steps_while_loading(scheduler: Scheduler) -> int:
    return scheduler.steps_while_loading
