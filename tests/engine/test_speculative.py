"""Speculative decoding inside the continuous batch (speculative.py), with the scheduler stepped
in this process: greedy output is token-identical with and without speculation, alone and in a
mixed batch, with a draft that always agrees (the target itself) and one that rarely does (a
different random model)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from model_variants import model_variant

from mlx_serving.engine import speculative as speculative_module
from mlx_serving.engine.admission import admit
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.errors import DraftIncompatible, ModelNotFound
from mlx_serving.engine.loading import load_model
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.protocol import END
from mlx_serving.engine.requests import FinishReason, GenerationChunk, GenerationRequest
from mlx_serving.engine.requests import SamplingParams as Sampling
from mlx_serving.engine.scheduler import Scheduler
from mlx_serving.engine.speculative import (
    MIN_ACCEPTANCE,
    PROBE_BATCH,
    PROBE_STEPS,
    REPROBE_EVERY,
    Draft,
    roll_back,
)

MODEL_ID, DRAFT_ID = "tiny", "draft"
# Prefill as mlx-lm schedules it, so that runs with and without a draft step alike.
QUIET_PREFILL = {"prefill_pacing": 0} if hasattr(EngineConfig, "prefill_pacing") else {}
GREEDY = Sampling(temperature=0)
PROMPTS = [
    "Hello world",
    "Once upon a time",
    "1 2 3",
    "The quick brown fox",
    "a",
    "def fibonacci(n):",
    "zz top",
    "hello hello hello",
]


def random_draft(source: Path, target: Path, layers: int = 2, seed: int = 7) -> Path:
    """A copy of the test model (same tokenizer) with fewer layers and other random weights:
    a draft the model rarely agrees with."""
    shutil.copytree(source, target)
    settings = json.loads((target / "config.json").read_text())
    settings["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(settings))
    weights = mx.load(str(target / "model.safetensors"))
    kept = {}
    for i, (name, weight) in enumerate(sorted(weights.items())):
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
            continue
        if name.endswith("norm.weight"):
            kept[name] = weight
            continue
        scale = mx.std(weight.astype(mx.float32)).item() or 0.02
        noise = mx.random.normal(weight.shape, key=mx.random.key(seed + i)) * scale
        kept[name] = noise.astype(weight.dtype)
    mx.save_safetensors(str(target / "model.safetensors"), kept, {"format": "mlx"})
    return target


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(ModelSource(local_path=str(model_path)), MODEL_ID)


@pytest.fixture(scope="module")
def same_draft(model_path):
    """The model itself as its draft: every proposal is accepted."""
    return load_model(ModelSource(local_path=str(model_path)), DRAFT_ID)


@pytest.fixture(scope="module")
def other_draft(model_path, tmp_path_factory):
    path = random_draft(model_path, tmp_path_factory.mktemp("drafts") / "other")
    return load_model(ModelSource(local_path=str(path)), DRAFT_ID)


class Run:
    """A scheduler with the model (and a draft), stepped until its requests end."""

    def __init__(self, loaded, draft=None, draft_tokens: int = 4):
        self.loaded = loaded
        self.scheduler = Scheduler(EngineConfig(prefill_gather_seconds=0, **QUIET_PREFILL))
        self.scheduler.add_model(loaded)
        if draft is not None:
            self.scheduler.add_model(draft)
            self.scheduler.pair(MODEL_ID, DRAFT_ID, draft_tokens)
        self.tokens: dict[int, list[int]] = {}
        self.text: dict[int, str] = {}
        self.chunks: dict[int, list[GenerationChunk]] = {}
        self.ends: dict[int, object] = {}
        self.events: list = []

    def admit(self, rid: int, text: str, max_tokens: int = 40, **fields) -> None:
        fields.setdefault("sampling", GREEDY)
        fields.setdefault("ignore_eos", True)
        request = GenerationRequest(MODEL_ID, text=text, max_tokens=max_tokens, **fields)
        prompt = self.loaded.tokenizer.encode(text)
        info = self.loaded.info
        self.scheduler.admit(admit(info, request, prompt, info.context_length), rid=rid)

    def step(self) -> None:
        output = self.scheduler.step()
        self.events += output.events if output else []
        for delivery in output.deliveries if output else ():
            rid = delivery[0]
            item = delivery[1] if len(delivery) == 2 else GenerationChunk(*delivery[1:])
            if isinstance(item, GenerationChunk):
                self.chunks.setdefault(rid, []).append(item)
                self.tokens.setdefault(rid, []).extend(item.token_ids)
                self.text[rid] = self.text.get(rid, "") + item.text
            else:
                self.ends[rid] = item

    def finish(self, steps: int = 1000) -> "Run":
        with mx.stream(self.scheduler.stream):
            for _ in range(steps):
                if not self.scheduler.sequences:
                    self.scheduler.close()
                    return self
                self.step()
        raise AssertionError(f"not finished: {list(self.scheduler.sequences)}")

    def last(self, rid: int) -> GenerationChunk:
        return self.chunks[rid][-1]


def baseline(loaded, requests: list[dict]) -> Run:
    run = Run(loaded)
    for rid, fields in enumerate(requests):
        run.admit(rid, **{k: v for k, v in fields.items() if k != "draft_tokens"})
    return run.finish()


def speculative(loaded, draft, requests: list[dict], draft_tokens: int = 4) -> Run:
    run = Run(loaded, draft, draft_tokens)
    for rid, fields in enumerate(requests):
        run.admit(rid, **fields)
    return run.finish()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_alone_with_a_draft_that_always_agrees(loaded, same_draft, k):
    requests = [dict(text="Once upon a time", draft_tokens=k)]
    base, spec = baseline(loaded, requests), speculative(loaded, same_draft, requests)
    assert spec.tokens[0] == base.tokens[0] and len(base.tokens[0]) == 40
    usage = spec.last(0).usage
    assert usage.draft_tokens_proposed > 0
    assert usage.draft_tokens_accepted == usage.draft_tokens_proposed
    # k + 1 tokens a step: 40 tokens in about 40 / (k + 1) steps.
    assert usage.draft_tokens_proposed >= 40 * k // (k + 1) - k


def test_alone_with_a_draft_that_rarely_agrees(loaded, other_draft):
    requests = [dict(text=text, draft_tokens=4) for text in PROMPTS[:2]]
    base, spec = baseline(loaded, requests), speculative(loaded, other_draft, requests)
    for rid in range(2):
        assert spec.tokens[rid] == base.tokens[rid]
        usage = spec.last(rid).usage
        assert usage.draft_tokens_accepted < usage.draft_tokens_proposed * MIN_ACCEPTANCE
        # It stopped speculating after its first PROBE_STEPS steps.
        assert usage.draft_tokens_proposed == 4 * PROBE_STEPS


def test_rows_joining_a_draft_of_no_use_mostly_do_not_probe(loaded, other_draft):
    """Once the draft's proposals are known to be refused, one joining row in REPROBE_EVERY
    speculates (to notice a workload it suits); the others decode as usual from the start."""
    run = Run(loaded, other_draft)
    with mx.stream(run.scheduler.stream):
        run.admit(0, PROMPTS[0], 60, draft_tokens=4)
        for _ in range(2 + PROBE_STEPS):
            run.step()
        for rid in range(1, 1 + REPROBE_EVERY):
            run.admit(rid, PROMPTS[rid % 8], 10, draft_tokens=4)
    run.finish()
    probed = [
        rid for rid in range(1, 1 + REPROBE_EVERY) if run.last(rid).usage.draft_tokens_proposed
    ]
    assert probed == [REPROBE_EVERY]
    assert run.last(0).usage.draft_tokens_proposed == 4 * PROBE_STEPS


@pytest.mark.parametrize("rows", [1, PROBE_BATCH, 4 * PROBE_BATCH, 16 * PROBE_BATCH])
def test_a_draft_of_no_use_is_probed_less_the_larger_the_batch_it_would_slow(rows):
    """A probe makes every row's step a speculative one, so its cost grows with the batch."""
    draft = Draft("draft", model=None)
    assert all(draft.probes(rows) for _ in range(5))  # nothing known yet
    draft.note(proposed=40, accepted=0)
    probed = sum(draft.probes(rows) for _ in range(256))
    assert probed == 256 // (REPROBE_EVERY * max(1, rows // PROBE_BATCH))
    draft.note(proposed=10**6, accepted=10**6)
    for _ in range(40):
        draft.note(proposed=4, accepted=4)
    assert draft.probes(rows)  # right again: every joining row speculates


@pytest.mark.parametrize("which", ["same", "other"])
def test_a_batch_of_8_mixed(loaded, same_draft, other_draft, which):
    """Speculative rows of several k beside rows that do not speculate (k 0, with a penalty):
    every greedy row's tokens are the same as without speculation; a seeded sampled row
    speculates too (its tokens match in distribution, not one by one: see below)."""
    draft = same_draft if which == "same" else other_draft
    requests = [
        dict(text=PROMPTS[0], draft_tokens=4),
        dict(text=PROMPTS[1], draft_tokens=0),
        dict(text=PROMPTS[2], draft_tokens=2),
        dict(text=PROMPTS[3]),  # the pairing's default, 3
        dict(text=PROMPTS[4], sampling=Sampling(temperature=0.8, seed=5), draft_tokens=4),
        dict(text=PROMPTS[5], draft_tokens=1, max_tokens=17),
        dict(text=PROMPTS[6], sampling=Sampling(temperature=0, presence_penalty=0.5)),
        dict(text=PROMPTS[7], draft_tokens=4, logprobs=True, top_logprobs=2),
    ]
    base = baseline(loaded, requests)
    spec = speculative(loaded, draft, requests, draft_tokens=3)
    for rid in range(8):
        if rid != 4:
            assert spec.tokens[rid] == base.tokens[rid], rid
            assert spec.text[rid] == base.text[rid]
        assert spec.last(rid).finish_reason is FinishReason.MAX_TOKENS
    usages = {rid: spec.last(rid).usage for rid in range(8)}
    for rid in (0, 2, 3, 4, 5, 7):
        assert usages[rid].draft_tokens_proposed > 0
    for rid in (1, 6):  # k 0, a logits processor: no speculation
        assert usages[rid].draft_tokens_proposed == 0
    if which == "same":
        assert all(u.draft_tokens_accepted == u.draft_tokens_proposed for u in usages.values())
    # Logprobs for every emitted token, the same as without speculation.
    spec_entries = [e for c in spec.chunks[7] for e in c.logprobs]
    base_entries = [e for c in base.chunks[7] for e in c.logprobs]
    assert len(spec_entries) == len(spec.tokens[7]) == 40
    for got, want in zip(spec_entries, base_entries, strict=True):
        assert got.token[:2] == want.token[:2]
        assert got.token[2] == pytest.approx(want.token[2], abs=1e-4)
        assert [t[0] for t in got.top] == [t[0] for t in want.top]


def test_requests_that_join_a_speculating_batch(loaded, same_draft):
    """Rows join (their draft caches prefilled) and leave while others speculate."""
    base = baseline(
        loaded,
        [dict(text=t, max_tokens=m) for t, m in zip(PROMPTS, [60, 7, 30, 12] * 2, strict=True)],
    )
    run = Run(loaded, same_draft)
    with mx.stream(run.scheduler.stream):
        for rid, (text, max_tokens) in enumerate(zip(PROMPTS, [60, 7, 30, 12] * 2, strict=True)):
            run.admit(rid, text, max_tokens, draft_tokens=rid % 5)
            for _ in range(3):
                run.step()
    run.finish()
    for rid in range(8):
        assert run.tokens[rid] == base.tokens[rid], rid


def test_max_tokens_inside_the_accepted_tokens(loaded, same_draft):
    """Lengths that are not a multiple of k + 1: the last step's extra tokens are dropped."""
    for max_tokens in (1, 2, 3, 6, 11):
        requests = [dict(text=PROMPTS[1], max_tokens=max_tokens, draft_tokens=4)]
        spec = speculative(loaded, same_draft, requests)
        assert spec.tokens[0] == baseline(loaded, requests).tokens[0]
        assert len(spec.tokens[0]) == max_tokens
        assert spec.last(0).finish_reason is FinishReason.MAX_TOKENS
        assert spec.last(0).usage.completion_tokens == max_tokens


def test_a_stop_token_inside_the_accepted_tokens(loaded, same_draft):
    """A stop token ends the sequence where it is, whatever was accepted after it."""
    free = baseline(loaded, [dict(text=PROMPTS[0], max_tokens=30)]).tokens[0]
    stop_id = free[6]
    requests = [dict(text=PROMPTS[0], max_tokens=30, stop_token_ids=(stop_id,), draft_tokens=4)]
    base, spec = baseline(loaded, requests), speculative(loaded, same_draft, requests)
    assert spec.tokens[0] == base.tokens[0]
    assert spec.text[0] == base.text[0]
    assert spec.last(0).finish_reason is base.last(0).finish_reason is FinishReason.STOP_SEQUENCE
    assert spec.last(0).usage.completion_tokens == base.last(0).usage.completion_tokens


def test_a_stop_string_inside_the_accepted_tokens(loaded, same_draft):
    free = baseline(loaded, [dict(text=PROMPTS[3], max_tokens=30)])
    stop = free.text[0][len(free.text[0]) // 3 :][:3]
    assert stop.strip()
    requests = [dict(text=PROMPTS[3], max_tokens=30, stop=(stop,), draft_tokens=4)]
    base, spec = baseline(loaded, requests), speculative(loaded, same_draft, requests)
    assert spec.text[0] == base.text[0] and stop not in spec.text[0]
    assert spec.last(0).finish_reason is FinishReason.STOP_SEQUENCE
    assert spec.last(0).matched_stop == stop
    # The client sees no token past the stop.
    assert spec.tokens[0] == base.tokens[0]


def test_cancel_while_speculating(loaded, same_draft):
    run = Run(loaded, same_draft)
    with mx.stream(run.scheduler.stream):
        run.admit(0, PROMPTS[0], 200, draft_tokens=4)
        run.admit(1, PROMPTS[1], 30, draft_tokens=4)
        for _ in range(4):
            run.step()
        run.scheduler.cancel(0)
    run.finish()
    # The reader left: nothing more is sent to it, and its row left the batch.
    assert 0 not in run.ends and 0 < len(run.tokens[0]) < 200
    alone = baseline(loaded, [dict(text=PROMPTS[1], max_tokens=30)])
    assert run.tokens[1] == alone.tokens[0]


def test_unloading_the_draft_finishes_requests_without_speculation(loaded, model_path):
    """The pair is dissolved: requests in flight go on, without speculation, to the same
    tokens; new ones do not speculate."""
    draft = load_model(ModelSource(local_path=str(model_path)), DRAFT_ID)
    requests = [dict(text=t, max_tokens=40, draft_tokens=4) for t in PROMPTS[:3]]
    base = baseline(loaded, requests)
    run = Run(loaded, draft)
    with mx.stream(run.scheduler.stream):
        for rid, fields in enumerate(requests):
            run.admit(rid, **fields)
        for _ in range(4):
            run.step()
        run.scheduler.unload(DRAFT_ID)
        assert run.scheduler.slots[MODEL_ID].loaded.info.draft_model_id == ""
        run.admit(3, PROMPTS[3], 10, draft_tokens=4)
    run.finish()
    for rid in range(3):
        assert run.tokens[rid] == base.tokens[rid]
        assert run.ends[rid] == END
        usage = run.last(rid).usage
        assert 0 < usage.draft_tokens_accepted == usage.draft_tokens_proposed < 40
    assert run.last(3).usage.draft_tokens_proposed == 0


def test_unloading_the_model_ends_its_requests_as_ever(loaded, model_path):
    draft = load_model(ModelSource(local_path=str(model_path)), DRAFT_ID)
    target = load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
    run = Run(target, draft)
    with mx.stream(run.scheduler.stream):
        run.admit(0, PROMPTS[0], 40, draft_tokens=4)
        for _ in range(3):
            run.step()
        run.scheduler.unload(MODEL_ID)
        run.step()
    assert type(run.ends[0]).__name__ == "RequestAborted"
    assert run.last(0).finish_reason is FinishReason.CANCELLED
    assert DRAFT_ID in run.scheduler.slots and run.scheduler.slots[DRAFT_ID].draft is None
    run.scheduler.close()


def test_pairing_checks_compatibility(loaded, model_path, tmp_path):
    scheduler = Scheduler(EngineConfig())
    scheduler.add_model(loaded)
    other_vocab = model_variant(model_path, tmp_path / "rows", rows=1500)
    scheduler.add_model(load_model(ModelSource(local_path=str(other_vocab)), DRAFT_ID))
    with pytest.raises(DraftIncompatible, match="vocabulary sizes differ"):
        scheduler.pair(MODEL_ID, DRAFT_ID, 4)
    scheduler.unload(DRAFT_ID)
    swapped = shutil.copytree(model_path, tmp_path / "swapped")
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = [word for word, i in vocab.items() if i in (300, 301)]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    scheduler.add_model(load_model(ModelSource(local_path=str(swapped)), DRAFT_ID))
    with pytest.raises(DraftIncompatible, match="vocabularies differ"):
        scheduler.pair(MODEL_ID, DRAFT_ID, 4)
    with pytest.raises(DraftIncompatible, match="not loaded"):
        scheduler.pair(MODEL_ID, "nothing", 4)
    with pytest.raises(DraftIncompatible, match="drafts for another"):
        scheduler.pair(MODEL_ID, MODEL_ID, 4)
    with pytest.raises(ModelNotFound):
        scheduler.pair("nothing", DRAFT_ID, 4)
    assert scheduler.slots[MODEL_ID].draft is None
    scheduler.close()


def test_roll_back_moves_each_rows_garbage_into_its_left_padding(loaded):
    """The cache after a verify pass and roll_back holds what a cache fed only the accepted
    tokens holds (same keys where each row's padding ends)."""
    from mlx_lm.generate import _merge_caches

    from mlx_serving.engine.batch_cache import make_cache

    model = loaded.model
    prompts = [[5, 6, 7], [8, 9]]
    fed = [[11, 12, 13], [14, 15, 16]]
    accepted = [1, 3]  # tokens kept of `fed`: 2 and 0 of garbage

    def prefilled():
        caches = []
        for prompt in prompts:
            cache = make_cache(model)
            model(mx.array(prompt)[None], cache=cache)
            caches.append(cache)
        return _merge_caches(caches)

    cache = prefilled()
    model(mx.array(fed), cache=cache)
    roll_back(cache, [3 - a for a in accepted])
    reference = []
    for prompt, tokens, a in zip(prompts, fed, accepted, strict=True):
        one = make_cache(model)
        model(mx.array(prompt + tokens[:a])[None], cache=one)
        reference.append(one)
    for layer, c in enumerate(cache):
        for row, one in enumerate(reference):
            length = one[layer].offset
            pad = c.host_left_padding[row]
            assert c._idx - pad == length
            assert c.offset[row].item() == length
            keys = c.keys[row, :, pad : c._idx]
            assert mx.allclose(keys, one[layer].keys[0, :, :length], atol=1e-5)


def sampled_tokens(loaded, draft, seeds, draft_tokens: int, max_tokens: int = 3) -> list:
    """Each seed's tokens for one prompt, all the seeds' requests in one batch."""
    requests = [
        dict(
            text=PROMPTS[1],
            max_tokens=max_tokens,
            sampling=Sampling(temperature=1.0, top_k=2, seed=seed),
            draft_tokens=draft_tokens,
        )
        for seed in seeds
    ]
    run = baseline(loaded, requests) if draft is None else speculative(loaded, draft, requests)
    return [tuple(run.tokens[rid]) for rid in range(len(seeds))]


def total_variation(a: list, b: list) -> float:
    counts: dict = {}
    for value in a:
        counts[value] = counts.get(value, 0) + 1 / len(a)
    for value in b:
        counts[value] = counts.get(value, 0) - 1 / len(b)
    return sum(abs(c) for c in counts.values()) / 2


@pytest.mark.parametrize("which", ["same", "other"])
def test_seeded_sampling_matches_no_speculation_in_distribution(
    loaded, same_draft, other_draft, which, monkeypatch
):
    """Over 400 seeds, the second and third tokens (the first is drawn as ever) with
    speculation are distributed as without: a total variation distance under 0.15 each (top-k
    2 keeps the categories few: at most 8 for the third token, so chance alone stays near
    0.05). With a draft that always agrees every proposal passes; with one that rarely does,
    the residual (p - q)+ draws nearly every token."""
    # Every row speculates every step, however poor its draft.
    monkeypatch.setattr(speculative_module, "MIN_ACCEPTANCE", 0.0)
    draft = same_draft if which == "same" else other_draft
    seeds = range(400)
    plain = sampled_tokens(loaded, None, seeds, 0)
    spec = sampled_tokens(loaded, draft, seeds, 3)
    assert [t[0] for t in spec] == [t[0] for t in plain]  # the first token: the fused sampler's
    for position in (1, 2):
        distance = total_variation([t[position] for t in spec], [t[position] for t in plain])
        assert distance < 0.15, (position, distance)
    # Not a vacuous check: the tokens vary, and the draft's own choices would be far off.
    assert len({t[1] for t in plain}) >= 3


def test_seeded_sampling_is_reproducible_across_batch_compositions(loaded, other_draft):
    """A seeded speculating row gives the same tokens alone and beside other rows."""
    request = dict(text=PROMPTS[3], max_tokens=30, sampling=Sampling(temperature=0.8, seed=11))
    alone = speculative(loaded, other_draft, [request])
    crowd = speculative(
        loaded,
        other_draft,
        [dict(text=t, sampling=Sampling(temperature=0.7, seed=i)) for i, t in enumerate(PROMPTS)]
        + [request]
        + [dict(text=PROMPTS[0], draft_tokens=2), dict(text=PROMPTS[2], draft_tokens=0)],
    )
    assert crowd.tokens[8] == alone.tokens[0]
    assert crowd.last(8).usage.draft_tokens_proposed == alone.last(0).usage.draft_tokens_proposed


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_the_benchmark_runs_end_to_end(model_path, tmp_path, tied):
    """`python -m bench speculative` on a copy of the test model: every variant, its
    acceptance as built (the "same" draft always right, the "other" one almost never, also
    when the model ties its output layer to its embeddings, as Llama-3.2-1B does)."""
    from bench.__main__ import main as bench_main

    model = shutil.copytree(model_path, tmp_path / "model")
    if tied:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        weights = mx.load(str(model / "model.safetensors"))
        del weights["lm_head.weight"]
        mx.save_safetensors(str(model / "model.safetensors"), weights, {"format": "mlx"})
    out = tmp_path / "report.json"
    argv = ["speculative", "--model", str(model), "--concurrency", "2", "--rounds", "1"]
    assert bench_main([*argv, "--max-tokens", "12", "--draft-tokens", "2", "--json", str(out)]) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"k=0", "same k=2", "other k=2"}
    assert all(row["tok_s"] > 0 for row in rows.values())
    assert rows["same k=2"]["acceptance"] == 1.0
    # None: no row probed in the measured round (the draft was known to be of no use).
    assert rows["other k=2"]["acceptance"] in (None, 0.0) or rows["other k=2"]["acceptance"] < 0.2


def test_structured_output_beside_speculating_rows(loaded, same_draft):
    """A constrained row does not speculate, but shares the speculative steps: its masks are
    applied at position 0 of each verify pass exactly as in an ordinary step."""
    import re

    from mlx_serving.engine.requests import Constraint

    pattern = r"[0-9]{3}-[0-9]{4}"
    requests = [
        dict(text=PROMPTS[0], constraint=Constraint("regex", pattern), draft_tokens=4),
        dict(text=PROMPTS[1], draft_tokens=4),
        dict(text=PROMPTS[2], draft_tokens=2),
        dict(text=PROMPTS[3], max_tokens=25, draft_tokens=3),
    ]
    base, spec = baseline(loaded, requests), speculative(loaded, same_draft, requests)
    for rid in range(4):
        assert spec.tokens[rid] == base.tokens[rid], rid
    assert re.fullmatch(pattern, spec.text[0])
    assert spec.last(0).usage.draft_tokens_proposed == 0
    assert all(spec.last(rid).usage.draft_tokens_proposed for rid in (1, 2, 3))


def test_token_events_for_every_token(loaded, same_draft):
    from mlx_serving.engine.events import TokenGenerated

    run = Run(loaded, same_draft)
    run.scheduler.set_token_events(True)
    with mx.stream(run.scheduler.stream):
        run.admit(0, PROMPTS[1], 21, draft_tokens=4)
    run.finish()
    tokens = [e.payload for e in run.events if isinstance(e.payload, TokenGenerated)]
    assert [t.token_id for t in tokens if not t.end_of_sequence] == run.tokens[0]
    assert [t.end_of_sequence for t in tokens].count(True) == 1
    assert run.last(0).usage.draft_tokens_accepted > 0
