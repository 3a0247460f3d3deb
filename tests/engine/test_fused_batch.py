"""Sampled rows drawn by one fused call per step, inside the scheduler's real batches: a seeded
row draws the same tokens alone and among others, greedy and constrained and per-row rows
beside it are untouched, and bias and penalties act on the fused rows."""

import mlx.core as mx
import pytest
from test_scheduler import GREEDY, Streams, admission, run

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.fused_batch import FusedGenerationBatch, FusedRow, fused_eligible
from mlx_serving.engine.requests import Constraint
from mlx_serving.engine.requests import SamplingParams as Sampling
from mlx_serving.engine.scheduler import Scheduler

SAMPLED = Sampling(temperature=0.9, top_p=0.95, top_k=40, seed=7)


def tokens(streams: Streams, rid: int) -> list[int]:
    return [t for chunk in streams.chunks[rid] for t in chunk.token_ids]


def generate(scheduler: Scheduler, loaded, requests: list[dict]) -> list[list[int]]:
    """Admits every request in one go, runs them all to the end; their tokens, in order."""
    streams = Streams()
    rids = list(range(1, len(requests) + 1))
    for rid, fields in zip(rids, requests, strict=True):
        scheduler.admit(admission(loaded, **fields), rid)
    run(scheduler, streams, rids)
    return [tokens(streams, rid) for rid in rids]


@pytest.fixture
def scheduler_with(loaded):
    """A scheduler on the tiny model with the given EngineConfig fields."""
    made = []

    def make(**fields) -> Scheduler:
        scheduler = Scheduler(EngineConfig(prefill_gather_seconds=0, **fields))
        scheduler.add_model(loaded)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def test_the_generator_batch_is_the_fused_one(scheduler):
    (slot,) = scheduler.slots.values()
    assert isinstance(slot.generator._generation_batch, FusedGenerationBatch)


def test_which_rows_the_fused_sampler_takes():
    assert fused_eligible(SAMPLED, constrained=False, min_tokens=0)
    assert not fused_eligible(GREEDY, constrained=False, min_tokens=0)
    assert not fused_eligible(SAMPLED, constrained=True, min_tokens=0)
    assert not fused_eligible(SAMPLED, constrained=False, min_tokens=3)
    repetition = Sampling(temperature=0.9, repetition_penalty=1.2)
    assert not fused_eligible(repetition, constrained=False, min_tokens=0)


def test_a_seeded_row_draws_the_same_alone_and_in_company(scheduler, loaded):
    with mx.stream(scheduler.stream):
        (alone,) = generate(scheduler, loaded, [dict(text="one two", sampling=SAMPLED)])
        company = [
            dict(text="one two", sampling=SAMPLED),
            dict(text="three four five", sampling=Sampling(temperature=1.2, seed=1)),
            dict(text="six", sampling=Sampling(temperature=0.5, min_p=0.1, seed=2)),
            dict(text="seven eight", sampling=GREEDY),
        ]
        together = generate(scheduler, loaded, company)
    assert len(alone) == 8
    assert together[0] == alone


def test_greedy_rows_beside_fused_ones_keep_their_greedy_tokens(scheduler, loaded):
    with mx.stream(scheduler.stream):
        greedy_only = generate(scheduler, loaded, [dict(text="a b c", sampling=GREEDY)])
        mixed = generate(
            scheduler,
            loaded,
            [
                dict(text="x", sampling=SAMPLED),
                dict(text="a b c", sampling=GREEDY),
                dict(text="y z", sampling=Sampling(temperature=1.0, repetition_penalty=1.3)),
                dict(text="q", sampling=Sampling(temperature=0.8, seed=3), min_tokens=2),
            ],
        )
    assert mixed[1] == greedy_only[0]
    assert all(len(row) == 8 for row in mixed)


def test_a_constrained_row_beside_fused_ones_keeps_to_its_choice(scheduler, loaded):
    with mx.stream(scheduler.stream):
        rows = generate(
            scheduler,
            loaded,
            [
                dict(text="x", sampling=SAMPLED),
                dict(
                    text="pick",
                    sampling=Sampling(temperature=1.0, seed=5),
                    constraint=Constraint("choice", ("yes", "no")),
                    max_tokens=16,
                ),
                dict(text="y", sampling=Sampling(temperature=0.7, seed=9)),
            ],
        )
    assert loaded.tokenizer.decode(rows[1]).strip() in ("yes", "no")
    assert len(rows[0]) == len(rows[2]) == 8


def test_logit_bias_acts_on_fused_rows(scheduler, loaded):
    favourite = 300
    sampling = Sampling(temperature=1.0, seed=4, logit_bias=((favourite, 100.0),))
    with mx.stream(scheduler.stream):
        rows = generate(
            scheduler,
            loaded,
            [dict(text="x", sampling=sampling), dict(text="y", sampling=SAMPLED)],
        )
    assert rows[0] == [favourite] * 8
    assert set(rows[1]) != {favourite}


def test_a_presence_penalty_keeps_fused_rows_from_repeating(scheduler, loaded):
    # A bias makes three tokens all but certain; a presence penalty larger than the bias, over a
    # window longer than the output, lets each of them be drawn once and no token twice.
    favourites = ((300, 30.0), (301, 30.0), (302, 30.0))
    plain = Sampling(temperature=1.0, seed=11, logit_bias=favourites)
    penalized = Sampling(
        temperature=1.0, seed=11, logit_bias=favourites, presence_penalty=50.0, penalty_context=64
    )
    with mx.stream(scheduler.stream):
        rows = generate(
            scheduler,
            loaded,
            [
                dict(text="x", sampling=plain, max_tokens=12),
                dict(text="x", sampling=penalized, max_tokens=12),
            ],
        )
    assert set(rows[0]) <= {300, 301, 302}
    assert sorted(rows[1][:3]) == [300, 301, 302]
    assert len(set(rows[1])) == len(rows[1])


def test_turned_off_rows_sample_with_mlx_lms_per_row_samplers(scheduler_with, loaded):
    scheduler = scheduler_with(fused_sampler=False)
    streams = Streams()
    with mx.stream(scheduler.stream):
        scheduler.admit(admission(loaded, text="x", sampling=SAMPLED), 1)
        (sequence,) = scheduler.sequences.values()
        assert not isinstance(sequence.generator_args["samplers"], FusedRow)
        run(scheduler, streams, [1])
    assert len(tokens(streams, 1)) == 8
