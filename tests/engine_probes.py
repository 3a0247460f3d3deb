"""Functions the tests run inside the engine process: `await probe(engine, fn, *args)` runs
`fn(worker, *args)` there (a `Probe` command) and returns its result.

They must live in a module the engine process can import by name (this one: tests/ is on the
path of every test and of the process spawned for it), never in a test function. Probes are
refused unless PROBES_ENV is set in the engine's environment: importing this module sets it.
"""

import asyncio
import os
import time

from mlx_serving.engine.protocol import PROBES_ENV, Probe
from mlx_serving.engine.worker import Worker

os.environ[PROBES_ENV] = "1"


async def probe(engine, fn, *args):
    return await engine._call(Probe(f"{fn.__module__}:{fn.__name__}", args))


def sequences_held(worker: Worker) -> int:
    """Sequences the engine still runs: ours, and anywhere inside mlx-lm's batch generators."""
    total = len(worker.scheduler.sequences)
    for slot in worker.scheduler.slots.values():
        generator = slot.generator
        total += len(slot) + len(generator._unprocessed_sequences)
        total += len(generator._prompt_batch) + len(generator._generation_batch)
    return total


def record_inserts(worker: Worker, model_id: str) -> None:
    """From now on, remember how many sequences each insert into `model_id`'s batch brings."""
    generator = worker.scheduler.slots[model_id].generator
    original = generator.insert
    worker.inserted = []

    def recording_insert(prompts, **kwargs):
        worker.inserted.append(len(prompts))
        return original(prompts, **kwargs)

    generator.insert = recording_insert


def inserted(worker: Worker) -> list[int]:
    return worker.inserted


def break_steps(worker: Worker, model_id: str) -> None:
    """The next batch step of `model_id` raises, as a bug in the decode loop would."""
    worker.scheduler.slots[model_id].generator.next = _broken_step


def poison_seed(worker: Worker, seed: int) -> None:
    """Requests with this seed get a sampler that raises (a sampling bug of one sequence)."""
    from mlx_serving.engine import scheduler as module

    original = module.make_sampler

    def make_sampler(params):
        if params.seed != seed:
            return original(params)

        def sample(logprobs):
            raise ValueError("poisoned sampler")

        return sample

    eligible = module.fused_eligible

    def fused_eligible(params, constrained, min_tokens):
        # The poisoned row must get mlx-lm's sampler (from make_sampler), not the fused one.
        return params.seed != seed and eligible(params, constrained, min_tokens)

    module.make_sampler = make_sampler
    module.fused_eligible = fused_eligible


def break_loop(worker: Worker) -> None:
    """The engine's loop itself raises after its next step, as a bug of the engine's would."""
    worker.scheduler._report_status = _broken_step


def _broken_step():
    raise RuntimeError("injected fault")


def wedge_steps(worker: Worker, model_id: str, seconds: float) -> None:
    """The next batch step of `model_id` hangs for `seconds`, as a stuck device would."""
    generator = worker.scheduler.slots[model_id].generator
    original = generator.next

    def wedged_step():
        time.sleep(seconds)
        return original()

    generator.next = wedged_step


async def wait_until_idle(engine, timeout: float = 3.0) -> None:
    """No request in the facade, no sequence in the engine process."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = await probe(engine, sequences_held)
        if engine.active_requests() == 0 and held == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the engine still holds {held} sequences")
        await asyncio.sleep(0.01)


def record_deliveries(worker: Worker) -> None:
    """From now on, remember which request ids each message to the facade carries."""
    worker.delivered = []
    original = worker.scheduler.take_output

    def recording_take_output():
        output = original()
        if output is not None and output.deliveries:
            worker.delivered.append([rid for rid, *_ in output.deliveries])
        return output

    worker.scheduler.take_output = recording_take_output


def delivered(worker: Worker) -> list[list[int]]:
    return worker.delivered


def record_first_tokens(worker: Worker) -> None:
    """From now on, pair each message to the facade with the requests whose first token the
    steps since the message before produced: (produced, carried) request ids."""
    worker.first_tokens = []
    seen: set[int] = set()
    produced: list[int] = []
    for slot in worker.scheduler.slots.values():

        def recording_next(slot=slot, next_=slot.generator.next):
            prompt_responses, responses = next_()
            for response in responses:
                if response.uid not in seen and response.uid in slot.sequences:
                    seen.add(response.uid)
                    produced.append(slot.sequences[response.uid].rid)
            return prompt_responses, responses

        slot.generator.next = recording_next
    original = worker.scheduler.take_output

    def recording_take_output():
        output = original()
        carried = {rid for rid, *_ in output.deliveries} if output is not None else set()
        worker.first_tokens.append((list(produced), carried))
        produced.clear()
        return output

    worker.scheduler.take_output = recording_take_output


def first_tokens(worker: Worker) -> list[tuple[list[int], set[int]]]:
    return [entry for entry in worker.first_tokens if entry[0]]


def environment_variable(worker: Worker, name: str) -> str | None:
    return os.environ.get(name)


def loaded_libraries(worker: Worker) -> str:
    """The engine process's memory map (which shared libraries it loaded)."""
    with open("/proc/self/maps") as maps:
        return maps.read()


def set_load_chunk_bytes(worker: Worker, size: int) -> None:
    worker.load_chunk_bytes = size


def count_steps_while_loading(worker: Worker) -> None:
    """From now on, count the batch steps taken while a model is being loaded."""
    worker.steps_while_loading = 0
    step = worker.scheduler._step

    def counting_step(slot):
        if worker.loading:
            worker.steps_while_loading += 1
        step(slot)

    worker.scheduler._step = counting_step


def steps_while_loading(worker: Worker) -> int:
    return worker.steps_while_loading


def frozen_objects(worker: Worker) -> int:
    """How many objects the engine process froze out of the cyclic collector's walks."""
    import gc

    return gc.get_freeze_count()


def hold_exit(worker: Worker) -> None:
    """A thread that never ends and that the interpreter's teardown joins, as a C library's
    thread joined at exit may never end."""
    import threading

    threading.Thread(target=threading.Event().wait, name="never-ends", daemon=False).start()
