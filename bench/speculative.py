"""Speculative decoding inside the batch: tok/s and TTFT at k = 0, 2, 4 draft tokens.

Random weights agree with nothing, so the models are built to bound the effect. The target is
the preset with every layer's residual writers (o_proj, down_proj) zeroed: it costs what the
preset costs, and its next token depends on the current token alone. The "same" draft is that
model with one layer: it computes the same function, so every proposal is accepted (the
ceiling). The "other" draft has one layer, other random embeddings and an output layer of its
own, untied (with tied embeddings both models would predict "the current token again" and agree
every time, whatever the embeddings): it is (almost) never right (the overhead floor: drafting
and verifying for nothing). One engine holds the target twice, each copy paired with one
draft; k = 0 is the target without speculation (the batch's ordinary step). Closed loop of
greedy requests, EOS ignored; variants alternate within every round, in an order that rotates
each round. Ratios: tok/s over k = 0's, of the medians; acceptance as the engine's usage reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
import zlib
from pathlib import Path

from . import report
from .client import make_prompts
from .model_maker import add_model_arguments, chosen_model_path
from .options import int_list

PROMPT_TOKENS = 32
DRAFTS = ("same", "other")

COLUMNS = [
    report.Column("streams", "streams"),
    report.Column("variant", "variant"),
    report.Column("tok/s (median)", "tok_s", ".1f"),
    report.Column("per round", "tok_s_rounds", ".1f"),
    report.Column("TTFT ms", "ttft_ms", ".1f"),
    report.Column("accepted", "acceptance", ".2f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="tiny")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    parser.add_argument("--draft-tokens", type=int_list, default=[2, 4])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)


def build_models(source: Path) -> dict[str, Path]:
    """The target and its two drafts, beside `source` (built once, then reused)."""
    import mlx.core as mx

    config = json.loads((source / "config.json").read_text())
    layers = config["num_hidden_layers"]
    tag = f"{source.name}-spec-v2"
    paths = {name: source.parent / f"{tag}-{name}" for name in ("target", "same", "other")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    weights = mx.load(str(source / "model.safetensors"))
    silent = {
        name: mx.zeros_like(w) if name.endswith(("o_proj.weight", "down_proj.weight")) else w
        for name, w in weights.items()
    }
    one_layer = {
        name: w
        for name, w in silent.items()
        if ".layers." not in name or name.split(".layers.")[1].startswith("0.")
    }
    embeddings = weights["model.embed_tokens.weight"]
    other = {**one_layer, "lm_head.weight": embeddings}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = other[name]
        key = mx.random.key(zlib.crc32(f"spec-other:{name}".encode()))
        scale = mx.std(w.astype(mx.float32)).item() or 0.02
        other[name] = (mx.random.normal(w.shape, key=key) * scale).astype(w.dtype)
    for name, tensors, n_layers, untied in (
        ("target", silent, layers, {}),
        ("same", one_layer, 1, {}),
        ("other", other, 1, {"tie_word_embeddings": False}),
    ):
        path = paths[name]
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors*"))
        settings = {**config, "num_hidden_layers": n_layers, **untied}
        (path / "config.json").write_text(json.dumps(settings))
        mx.save_safetensors(str(path / "model.safetensors"), tensors, {"format": "mlx"})
    return paths


async def generate_one(engine, model_id: str, ids, max_tokens: int, k: int) -> dict:
    """One greedy request, EOS ignored: its tokens, TTFT and draft-token usage."""
    from mlx_serving.engine.requests import GenerationRequest, SamplingParams

    request = GenerationRequest(
        model_id=model_id,
        token_ids=tuple(ids),
        max_tokens=max_tokens,
        ignore_eos=True,
        sampling=SamplingParams(temperature=0.0),
        draft_tokens=k,
    )
    started = time.perf_counter()
    first, tokens, usage = None, 0, None
    async for chunk in engine.generate(request):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
        tokens += len(chunk.token_ids)
        usage = chunk.usage or usage
    return {"tokens": tokens, "ttft": first, "usage": usage}


async def one_round(engine, model_id: str, prompts, max_tokens: int, k: int) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(generate_one(engine, model_id, p.ids, max_tokens, k) for p in prompts)
    )
    elapsed = time.perf_counter() - started
    if short := [r["tokens"] for r in results if r["tokens"] != max_tokens]:
        raise RuntimeError(f"a generation ended early, after {short[0]} tokens")
    return {
        "tok_s": sum(r["tokens"] for r in results) / elapsed,
        "ttft": statistics.mean(r["ttft"] for r in results),
        "proposed": sum(r["usage"].draft_tokens_proposed for r in results),
        "accepted": sum(r["usage"].draft_tokens_accepted for r in results),
    }


async def measure(args) -> dict[tuple[int, str], list[dict]]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_serving.engine.engine import Engine
    from mlx_serving.engine.models import ModelSource

    paths = build_models(chosen_model_path(args))
    variants = ["k=0"] + [f"{d} k={k}" for d in DRAFTS for k in args.draft_tokens]
    count = sum(args.concurrency) * len(variants) * (args.rounds + 1)
    pool = iter(make_prompts(load_tokenizer(paths["target"]), count, PROMPT_TOKENS))
    engine = Engine()
    runs: dict[tuple[int, str], list[dict]] = {}
    try:
        await engine.start()
        for draft in DRAFTS:
            await engine.load_model(ModelSource(local_path=str(paths[draft])), f"draft-{draft}")
            await engine.load_model(
                ModelSource(local_path=str(paths["target"])),
                f"target-{draft}",
                draft_model_id=f"draft-{draft}",
            )
        for streams in args.concurrency:
            for variant in variants:  # warm-up: first shapes compiled
                model_id, k = where(variant)
                await one_round(engine, model_id, [next(pool) for _ in range(streams)], 8, k)
            for i in range(args.rounds):
                shift = i % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    model_id, k = where(variant)
                    prompts = [next(pool) for _ in range(streams)]
                    result = await one_round(engine, model_id, prompts, args.max_tokens, k)
                    runs.setdefault((streams, variant), []).append(result)
                    print(
                        f"  {streams} streams, round {i + 1}: {variant} {result['tok_s']:.1f} "
                        f"tok/s, TTFT {1000 * result['ttft']:.1f} ms"
                    )
    finally:
        await engine.shutdown(0)
    return runs


def where(variant: str) -> tuple[str, int]:
    """The model id and draft tokens of a variant."""
    if variant == "k=0":
        return "target-same", 0
    draft, k = variant.split(" k=")
    return f"target-{draft}", int(k)


def run(args) -> dict:
    runs = asyncio.run(measure(args))
    rows = []
    for (streams, variant), results in runs.items():
        proposed = sum(r["proposed"] for r in results)
        rows.append(
            {
                "streams": streams,
                "variant": variant,
                "tok_s": statistics.median(r["tok_s"] for r in results),
                "tok_s_rounds": [r["tok_s"] for r in results],
                "ttft_ms": 1000 * statistics.median(r["ttft"] for r in results),
                "acceptance": sum(r["accepted"] for r in results) / proposed if proposed else None,
            }
        )
    ratios = [
        report.median_ratio(
            f"{variant}/k=0 at {streams} streams",
            [r["tok_s"] for r in runs[(streams, variant)]],
            [r["tok_s"] for r in runs[(streams, "k=0")]],
            metric="tok_s",
        )
        for streams in args.concurrency
        for variant in sorted({v for (_, v) in runs if v != "k=0"})
    ]
    checks = []
    ratio = {r["name"]: r["value"] for r in ratios}
    if 4 in args.draft_tokens:
        first, last = args.concurrency[0], args.concurrency[-1]
        ceiling = ratio.get(f"same k=4/k=0 at {first} streams")
        floor = ratio.get(f"other k=4/k=0 at {last} streams")
        if ceiling is not None:
            checks.append(
                report.check_entry(
                    f"full acceptance, k=4, {first} stream(s)", ceiling, ">= 1.8", ceiling >= 1.8
                )
            )
        if floor is not None:
            checks.append(
                report.check_entry(
                    f"zero acceptance, k=4, {last} streams", floor, ">= 0.85", floor >= 0.85
                )
            )
    # The floor is a floor only if the other draft is (almost) never right.
    for row in rows:
        if row["variant"].startswith("other") and row["acceptance"] is not None:
            name = f"other draft's acceptance, {row['variant']}, {row['streams']} stream(s)"
            value = row["acceptance"]
            checks.append(report.check_entry(name, value, "<= 0.1", value <= 0.1))
    return report.make_report("speculative", args, rows, ratios, checks)
