"""Property: no request the contract accepts can kill the engine, whatever shares its batch.

Hypothesis draws batches of requests with arbitrary valid controls, for models whose
vocabularies differ from their tokenizer's (fewer rows, more rows): each request either
completes or is refused with InvalidRequest, and the engine keeps running.
"""

import asyncio

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_variants import model_variant

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import InvalidRequest
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.requests import ChatMessage, GenerationRequest, SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENIZER_VOCAB = 2048
# Model id → rows of its embedding and output layer.
MODELS = {"tiny": TOKENIZER_VOCAB, "fewer-rows": 1000, "more-rows": 3000}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path, tmp_path_factory):
    engine = Engine(EngineConfig(max_batch_size=8))
    await engine.start()
    root = tmp_path_factory.mktemp("vocabularies")
    for model_id, rows in MODELS.items():
        path = (
            model_path
            if rows == TOKENIZER_VOCAB
            else model_variant(model_path, root / model_id, rows=rows)
        )
        await engine.load_model(ModelSource(local_path=str(path)), model_id)
    yield engine
    await engine.shutdown(0)


def token_ids(limit: int = 4000):
    return st.integers(min_value=0, max_value=limit)


sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.sampled_from([0, 1, 2, 999, 1000, 1001, 2047, 2048, 2049, 2999, 3000, 100_000]),
    min_p=st.floats(0, 1),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    repetition_penalty=st.floats(0, 10, exclude_min=True),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    penalty_context=st.integers(1, 4096),
    logit_bias=st.lists(st.tuples(token_ids(), st.floats(-100, 100)), max_size=4).map(
        lambda pairs: tuple(dict(pairs).items())
    ),
)

requests = st.builds(
    GenerationRequest,
    model_id=st.sampled_from(sorted(MODELS)),
    text=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    token_ids=st.one_of(st.none(), st.lists(token_ids(), min_size=1, max_size=8).map(tuple)),
    max_tokens=st.integers(1, 4),
    sampling=sampling,
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2, unique=True).map(tuple),
    stop_token_ids=st.lists(token_ids(), max_size=3).map(tuple),
    ignore_eos=st.booleans(),
    include_stop=st.booleans(),
).map(lambda r: r if (r.text is None) != (r.token_ids is None) else chat(r))


def chat(request: GenerationRequest) -> GenerationRequest:
    """Neither or both prompts drawn: make it a chat prompt."""
    from dataclasses import replace

    message = ChatMessage("user", request.text or "hi")
    return replace(request, text=None, token_ids=None, messages=(message,))


async def outcome(engine: Engine, request: GenerationRequest) -> str:
    try:
        chunks = [chunk async for chunk in engine.generate(request)]
    except InvalidRequest:
        return "refused"
    assert chunks[-1].finish_reason is not None
    return "done"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(requests, min_size=1, max_size=4))
async def test_no_valid_request_kills_the_engine(engine, batch):
    outcomes = await asyncio.gather(*(outcome(engine, request) for request in batch))
    assert set(outcomes) <= {"done", "refused"}
    assert engine.alive


async def test_a_model_with_fewer_rows_refuses_tokens_past_them(engine):
    info = engine.get_model("fewer-rows")
    assert info.vocab_size == 1000
    with pytest.raises(InvalidRequest) as refused:
        await anext(engine.generate(GenerationRequest("fewer-rows", token_ids=(5, 1500))))
    assert refused.value.violations[0].field == "tokens.ids[1]"
