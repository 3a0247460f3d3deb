"""A model's batch capacity and KV budget: derived from its cache's cost per token and free
memory, and the budget holding arrivals back in the scheduler."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_scheduler import MODEL_ID, Streams, admission

from mlx_serving.engine import capacity as capacity_module
from mlx_serving.engine.capacity import (
    MAX_BATCH_SIZE,
    available_memory,
    batch_capacity,
    capacity_context,
    kv_budget,
    kv_bytes_per_token,
    measured_kv_bytes_per_token,
    meminfo_available,
    model_capacity,
)
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.scheduler import Scheduler

# The test model: 4 layers x 2 KV heads x head dim 64 x (keys, values) x float32.
TINY_KV_BYTES_PER_TOKEN = 4 * 2 * 64 * 2 * 4
LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 6


class WithoutArgs:
    """The test model with no `args`: its cost per token must be measured."""

    def __init__(self, model):
        self.model, self.layers = model, model.layers

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def test_kv_bytes_per_token_is_what_a_cache_holds_per_token(loaded):
    model = loaded.model
    per_token = kv_bytes_per_token(model)
    assert per_token == TINY_KV_BYTES_PER_TOKEN
    cache = make_prompt_cache(model)
    tokens = 256  # one whole allocation step of mlx-lm's KVCache: no room unused
    model(mx.array([list(range(1, tokens + 1))]), cache=cache)
    mx.eval([c.state for c in cache])
    assert sum(c.offset for c in cache) == tokens * len(cache)
    assert sum(c.nbytes for c in cache) == tokens * per_token
    # Measured, as for a model whose arguments do not say it: the same.
    assert measured_kv_bytes_per_token(model) == per_token
    assert kv_bytes_per_token(WithoutArgs(model)) == per_token


def test_batch_capacity_is_how_many_typical_sequences_fit():
    per_sequence = 4096 * 2048
    assert batch_capacity(4096, 2048, 10 * per_sequence + per_sequence - 1) == 10
    assert batch_capacity(4096, 2048, per_sequence - 1) == 1  # at least one
    assert batch_capacity(4096, 2048, 0) == 1
    assert batch_capacity(1, 1, 10**12) == MAX_BATCH_SIZE
    assert batch_capacity(0, 0, 5) == 5  # no cost per token: no division by zero


def test_the_budget_and_context_come_from_the_config_or_memory():
    config = EngineConfig()
    assert kv_budget(config, 1000) == 500  # kv_memory_fraction 0.5
    assert kv_budget(EngineConfig(kv_memory_fraction=0.25), 1000) == 250
    assert kv_budget(EngineConfig(max_kv_bytes=77), 1000) == 77
    assert capacity_context(config, 32768) == 2048
    assert capacity_context(config, 512) == 512  # no more than the model's context
    assert capacity_context(config, 0) == 2048  # no context stated: default_context_length
    assert capacity_context(EngineConfig(default_context_length=1000), 0) == 1000
    assert capacity_context(EngineConfig(capacity_context_tokens=100), 4096) == 100


def test_model_capacity_derives_what_is_not_configured(loaded):
    model, per_sequence = loaded.model, TINY_KV_BYTES_PER_TOKEN * 1024
    derived = model_capacity(model, 1024, EngineConfig(), available_bytes=2 * 7 * per_sequence)
    assert derived.kv_bytes_per_token == TINY_KV_BYTES_PER_TOKEN
    assert derived.free_bytes == 2 * 7 * per_sequence
    assert (derived.context_tokens, derived.kv_budget, derived.batch_size) == (
        1024,
        7 * per_sequence,
        7,
    )
    explicit = EngineConfig(max_batch_size=3, max_kv_bytes=5 * per_sequence)
    assert model_capacity(model, 1024, explicit, available_bytes=10**15).batch_size == 3
    budget_only = model_capacity(model, 1024, EngineConfig(max_kv_bytes=5 * per_sequence))
    assert (budget_only.kv_budget, budget_only.batch_size) == (5 * per_sequence, 5)
    assert budget_only.free_bytes is None  # memory not even asked


def test_free_memory_is_read(tmp_path):
    assert available_memory() > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemFree:  10 kB\nMemAvailable:  42 kB\n")
    assert meminfo_available(meminfo) == 42 * 1024
    meminfo.write_text("MemTotal:  100 kB\n")
    assert meminfo_available(meminfo) is None
    assert meminfo_available(tmp_path / "absent") is None


@pytest.fixture
def free_memory(monkeypatch):
    """Free memory pinned to 40 test-model sequences of 2048 tokens (20 within the budget)."""
    size = 40 * TINY_KV_BYTES_PER_TOKEN * 2048
    monkeypatch.setattr(capacity_module, "available_memory", lambda: size)
    return size


def test_the_generator_gets_the_derived_batch_size_unless_one_is_configured(loaded, free_memory):
    for config, expected in ((EngineConfig(), 20), (EngineConfig(max_batch_size=5), 5)):
        scheduler = Scheduler(config)
        try:
            scheduler.add_model(loaded)
            slot = scheduler.slots[MODEL_ID]
            assert slot.capacity.batch_size == slot.generator.completion_batch_size == expected
            assert slot.capacity.kv_budget == free_memory // 2
            assert loaded.info.max_batch_size == expected
            assert loaded.info.max_kv_bytes == free_memory // 2
            event = scheduler.take_output().events[-1].payload
            assert ("max_batch_size", str(expected)) in event.metadata
        finally:
            scheduler.close()


def burst(scheduler: Scheduler, loaded, n: int, max_tokens: int = 12) -> tuple[dict, list[int]]:
    """`n` long prompts at once, run to the end; each step's running sequences recorded."""
    streams, running = Streams(), []
    rids = list(range(1, n + 1))
    for rid in rids:
        scheduler.admit(admission(loaded, f"{rid}. {LONG}", max_tokens, ignore_eos=True), rid)
    slot = scheduler.slots[MODEL_ID]
    for _ in range(500):
        if all(rid in streams.ends for rid in rids):
            break
        streams.take(scheduler.step())
        per_token = slot.capacity.kv_bytes_per_token
        reserved = sum(s.kv_tokens for s in slot.sequences.values()) * per_token
        assert len(slot.sequences) <= 1 or reserved <= slot.capacity.kv_budget
        running.append(len(slot.sequences))
    assert all(rid in streams.ends for rid in rids)
    return {rid: streams.text(rid) for rid in rids}, running


def budget_scheduler(loaded, sequences: float) -> Scheduler:
    """A scheduler whose KV budget holds `sequences` of the burst's requests."""
    prompt = len(admission(loaded, f"1. {LONG}", 12).prompt)
    budget = int(sequences * (prompt + 12) * TINY_KV_BYTES_PER_TOKEN)
    scheduler = Scheduler(EngineConfig(prefill_gather_seconds=0, max_kv_bytes=budget))
    scheduler.add_model(loaded)
    return scheduler


def test_a_burst_of_long_prompts_waits_for_the_kv_budget(loaded, scheduler):
    unlimited, running = burst(scheduler, loaded, 6)
    assert max(running) == 6
    limited = budget_scheduler(loaded, 2.5)
    with mx.stream(limited.stream):
        texts, running = burst(limited, loaded, 6)
    limited.close()
    assert max(running) == 2  # two fit, a third waits; none refused
    assert texts == unlimited  # greedy: the same tokens however they were batched


def test_a_request_larger_than_the_budget_runs_alone(loaded, scheduler):
    expected, _ = burst(scheduler, loaded, 3)
    limited = budget_scheduler(loaded, 0.5)
    with mx.stream(limited.stream):
        texts, running = burst(limited, loaded, 3)
    limited.close()
    assert max(running) == 1
    assert texts == expected


async def test_the_facade_reports_the_model_s_derived_batch_size(engine):
    info = engine.get_model(MODEL_ID)
    assert 1 <= info.max_batch_size <= MAX_BATCH_SIZE
    assert info.max_kv_bytes > 0
