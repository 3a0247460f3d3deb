"""Structured output, logprobs and the request controls, on the scheduler alone (in process)."""

import json
import re

import jsonschema
import mlx.core as mx
import pytest
from test_scheduler import MODEL_ID, Streams, run

from mlx_serving.engine.admission import admit
from mlx_serving.engine.constraints import check_constraint
from mlx_serving.engine.errors import InvalidRequest
from mlx_serving.engine.requests import Constraint, FinishReason, GenerationRequest
from mlx_serving.engine.requests import SamplingParams as Sampling

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}@[a-z]{3,5}\.(com|org)"
CHOICES = ("yes", "no", "maybe not")
SEEDS = range(12)


def admission(loaded, text: str, **fields):
    fields.setdefault("max_tokens", 96)
    fields.setdefault("sampling", Sampling(temperature=1.0))
    request = GenerationRequest(MODEL_ID, text=text, **fields)
    return admit(loaded.info, request, loaded.tokenizer.encode(text), 2048)


def generate(scheduler, loaded, requests: list[dict]) -> Streams:
    """Admit every request (a dict of GenerationRequest fields plus "text") into one batch."""
    streams = Streams()
    for rid, fields in enumerate(requests):
        fields = dict(fields)
        scheduler.admit(admission(loaded, fields.pop("text", f"prompt {rid}"), **fields), rid)
    run(scheduler, streams, range(len(requests)), steps=2000)
    return streams


def finished(streams: Streams, rid: int) -> FinishReason:
    assert streams.ends[rid] is not None, streams.ends[rid]
    return streams.last(rid).finish_reason


def test_every_constrained_output_is_valid_at_temperature_one(scheduler, loaded):
    kinds = [
        Constraint("json_schema", json.dumps(SCHEMA)),
        Constraint("regex", REGEX),
        Constraint("choice", CHOICES),
        Constraint("json_object"),
    ]
    requests = [
        {"constraint": kind, "sampling": Sampling(temperature=1.0, seed=seed)}
        for seed in SEEDS
        for kind in kinds
    ]
    streams = generate(scheduler, loaded, requests)
    complete_objects = 0
    for rid, request in enumerate(requests):
        text, kind = streams.text(rid), request["constraint"].kind
        if kind == "json_object" and finished(streams, rid) is FinishReason.STRUCTURE_INCOMPLETE:
            # A random model's keys and strings may run past max_tokens: said, not hidden.
            assert text.startswith("{")
            continue
        assert finished(streams, rid) is FinishReason.END_OF_SEQUENCE, (kind, text)
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES
        else:
            assert isinstance(json.loads(text), dict)
            complete_objects += 1
    assert complete_objects >= 2


def test_constrained_and_free_requests_share_a_batch(scheduler, loaded):
    """Free rows generate as they do alone; constrained ones, with different schemas, hold."""
    greedy = Sampling(temperature=0)
    alone = generate(scheduler, loaded, [{"text": "free", "sampling": greedy, "max_tokens": 12}])
    requests = [
        {"text": "free", "sampling": greedy, "max_tokens": 12},
        {"constraint": Constraint("regex", r"[0-9]{3}-[0-9]{4}")},
        {"constraint": Constraint("json_schema", json.dumps(SCHEMA))},
        {"text": "free", "sampling": greedy, "max_tokens": 12},
        {"constraint": Constraint("choice", CHOICES)},
    ]
    streams = generate(scheduler, loaded, requests)
    assert streams.text(0) == streams.text(3) == alone.text(0)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", streams.text(1))
    jsonschema.validate(json.loads(streams.text(2)), SCHEMA)
    assert streams.text(4) in CHOICES


def test_a_seeded_constrained_request_is_reproducible_in_any_company(scheduler, loaded):
    seeded = {
        "text": "same prompt",
        "constraint": Constraint("regex", REGEX),
        "sampling": Sampling(1.0, seed=7),
    }
    alone = generate(scheduler, loaded, [seeded]).text(0)
    crowd = [{"constraint": Constraint("json_object")}, seeded, {"max_tokens": 20}, seeded]
    streams = generate(scheduler, loaded, crowd)
    assert streams.text(1) == streams.text(3) == alone


def test_max_tokens_inside_a_structure_says_so(scheduler, loaded):
    streams = generate(
        scheduler,
        loaded,
        [{"constraint": Constraint("json_schema", json.dumps(SCHEMA)), "max_tokens": 4}],
    )
    assert finished(streams, 0) is FinishReason.STRUCTURE_INCOMPLETE
    assert streams.last(0).usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint("json_schema", "{"), "not valid JSON"),
        (Constraint("json_schema", '{"type": "nonsense"}'), "nonsense"),
        (Constraint("regex", "(("), "regex"),
        (Constraint("grammar", "start: missing_rule"), "missing_rule"),
    ],
)
def test_an_invalid_constraint_is_refused_naming_its_field(constraint, message):
    with pytest.raises(InvalidRequest) as caught:
        check_constraint(constraint, 1 << 16)
    (violation,) = caught.value.violations
    assert violation.field == constraint.kind and message in violation.description


def test_a_constraint_over_the_size_limit_is_refused():
    with pytest.raises(InvalidRequest, match="100 bytes"):
        check_constraint(Constraint("regex", "a" * 101), 100)


def test_logprobs_are_the_models_own_alone_and_in_a_batch(scheduler, loaded):
    """log_softmax of the model's logits for the same tokens (mlx-lm's model, no cache), for
    the chosen token and the top alternatives, with penalties that change the sampling."""
    wanted = {
        "logprobs": True,
        "top_logprobs": 5,
        "max_tokens": 10,
        "sampling": Sampling(temperature=1.0, seed=3, repetition_penalty=1.5),
        "text": "logprobs please",
    }
    others = [{"max_tokens": 14}, {"constraint": Constraint("choice", CHOICES)}]
    for requests, rid in (([wanted], 0), ([others[0], wanted, others[1]], 1)):
        streams = generate(scheduler, loaded, requests)
        ids = [t for chunk in streams.chunks[rid] for t in chunk.token_ids]
        entries = [e for chunk in streams.chunks[rid] for e in chunk.logprobs]
        assert len(entries) == len(ids) == 10
        prompt = loaded.tokenizer.encode("logprobs please")
        logits = loaded.model(mx.array(prompt + ids)[None])[0, len(prompt) - 1 : -1]
        expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for position, (token, entry) in enumerate(zip(ids, entries, strict=True)):
            row = expected[position]
            assert entry.token[0] == token
            assert abs(entry.token[2] - row[token].item()) < 1e-3
            best = mx.argsort(-row)[:5].tolist()
            assert [t for t, _, _ in entry.top] == best
            for t, piece, value in entry.top:
                assert abs(value - row[t].item()) < 1e-3
                assert piece == loaded.tokenizer.decode([t])


def test_prompt_logprobs(scheduler, loaded):
    text = "the prompt's own logprobs"
    streams = generate(scheduler, loaded, [{"text": text, "prompt_logprobs": 2, "max_tokens": 2}])
    entries = streams.chunks[0][0].prompt_logprobs
    prompt = loaded.tokenizer.encode(text)
    assert [e.token[0] for e in entries] == prompt[1:]
    logits = loaded.model(mx.array(prompt)[None])[0, :-1]
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for position, entry in enumerate(entries):
        assert abs(entry.token[2] - expected[position, prompt[position + 1]].item()) < 1e-3
        assert len(entry.top) == 2


def test_min_tokens_holds_back_the_end_of_sequence(scheduler, loaded):
    eos = sorted(loaded.tokenizer.eos_token_ids)[0]
    forced = Sampling(temperature=0, logit_bias=((eos, 100.0),))
    streams = generate(
        scheduler,
        loaded,
        [
            {"sampling": forced, "max_tokens": 20},
            {"sampling": forced, "max_tokens": 20, "min_tokens": 5},
        ],
    )
    assert streams.last(0).usage.completion_tokens == 1
    assert streams.last(1).usage.completion_tokens == 6
    assert finished(streams, 1) is FinishReason.END_OF_SEQUENCE


def test_a_time_limit_ends_the_generation_with_its_own_reason(scheduler, loaded):
    streams = generate(
        scheduler,
        loaded,
        [{"time_limit": 0.5, "max_tokens": 100000, "ignore_eos": True}, {"max_tokens": 3}],
    )
    assert finished(streams, 0) is FinishReason.TIME_LIMIT
    assert 0 < streams.last(0).usage.completion_tokens < 100000
    assert finished(streams, 1) is FinishReason.MAX_TOKENS


def test_truncate_prompt_tokens_keeps_the_last_tokens(loaded):
    text = "a prompt that is longer than four tokens for sure"
    request = GenerationRequest(MODEL_ID, text=text, truncate_prompt_tokens=4)
    prompt = loaded.tokenizer.encode(text)
    assert admit(loaded.info, request, prompt, 2048).prompt == tuple(prompt[-4:])
    with pytest.raises(InvalidRequest):
        admit(loaded.info, GenerationRequest(MODEL_ID, text=text), prompt, 4)
    assert admit(loaded.info, request, prompt, 5).max_tokens == 1


def test_samples_fork_from_the_first_ones_prefill(scheduler, loaded):
    """Samples 1.. start from sample 0's KV cache, and generate as a sample prefilled alone."""
    text, sampling = "fork this prompt please", Sampling(temperature=1.0, seed=11)
    alone = generate(scheduler, loaded, [{"text": text, "sampling": sampling}]).text(0)
    streams = Streams()
    scheduler.admit(admission(loaded, text, sampling=Sampling(1.0, seed=5)), 0)
    scheduler.admit(admission(loaded, text, sampling=sampling), 1, fork_of=0)
    run(scheduler, streams, [0, 1], steps=2000)
    prompt_tokens = len(loaded.tokenizer.encode(text))
    assert streams.last(1).usage.cached_prompt_tokens == prompt_tokens - 1
    assert streams.text(1) == alone


def test_forced_tool_calls_need_a_family_whose_calls_are_json():
    from types import SimpleNamespace

    from mlx_lm.tool_parsers import json_tools, pythonic

    from mlx_serving.engine.constraints import tool_call_constraint
    from mlx_serving.engine.requests import Tool

    tools = (Tool("f", parameters='{"type": "object"}'),)

    def family(parser, calling=True):
        return SimpleNamespace(
            has_tool_calling=calling,
            tool_parser=parser.parse_tool_call,
            tool_call_start="<tool_call>",
            tool_call_end="</tool_call>",
        )

    assert tool_call_constraint(family(json_tools), tools, "f").kind == "grammar"
    for tokenizer, message in (
        (family(pythonic), "pythonic"),
        (family(json_tools, calling=False), "no tool calls"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            tool_call_constraint(tokenizer, tools, "required")
    with pytest.raises(InvalidRequest, match="not a JSON schema"):
        tool_call_constraint(family(json_tools), (Tool("g", parameters="[1]"),), "g")


def test_a_tokenizer_llguidance_cannot_read_is_refused_never_ignored(
    scheduler, loaded, monkeypatch
):
    from mlx_serving.engine import constraints

    def unreadable(tokenizer):
        raise ValueError("Only fast tokenizers are supported")

    monkeypatch.setattr(constraints, "make_tokenizer", unreadable)
    streams = Streams()
    request = admission(loaded, "x", constraint=Constraint("regex", "[ab]+"))
    scheduler.admit(request, 0)
    run(scheduler, streams, [0])
    error = streams.ends[0]
    assert isinstance(error, InvalidRequest)
    (violation,) = error.violations
    assert violation.field == "regex" and "fast tokenizers" in violation.description
