"""Smoke tests of the benchmark package (`python -m bench`): every subcommand runs end to end
on the tiny model and reports sane numbers in the shared result format.

Timing thresholds are the benchmarks' business (ratios measured side by side), never a test's.
"""

import argparse
import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"command", "machine", "arguments", "rows", "ratios", "checks"}


def run_bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    assert bench_main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS and report["command"] == argv[0]
    assert report["machine"]["mlx"] and report["machine"]["device"]
    return report


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_serving_reports_every_backend_and_the_stock_ratio(tmp_path):
    out = tmp_path / "serving.json"
    command = [sys.executable, "-m", "bench", "serving", "--model-preset", "tiny"]
    command += ["--concurrency", "1,2", "--max-tokens", "8", "--skip", "mlx_lm_server"]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=ROOT, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "serving/stock" in done.stdout and "engine/stock" in done.stdout
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS and report["command"] == "serving"
    rows = {(row["concurrency"], row["backend"]): row for row in report["rows"]}
    assert set(rows) == {(c, b) for c in (1, 2) for b in ("stock", "engine", "mlx_serving")}
    for row in rows.values():
        assert row["failures"] == 0 and row["short"] == 0, row["errors"]
        assert row["tokens"] == row["requests"] * 8
        assert row["prompt_tokens"] == [118]
        for key in ("tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms"):
            assert positive(row[key]), key
    for c in (1, 2):
        # What the engine measured, next to what the client did: the wire is the difference.
        for name in ("engine", "mlx_serving"):
            row = rows[c, name]
            assert 0 < row["engine_ttft_p50_ms"] <= row["ttft_p50_ms"], name
            assert row["engine_itl_p50_ms"] > 0, name
        assert rows[c, "stock"]["engine_ttft_p50_ms"] is None
    ratios = {(r["concurrency"], r["name"], r["metric"]): r["value"] for r in report["ratios"]}
    for c in (1, 2):
        assert positive(ratios[c, "mlx_serving/stock", "tok_s"])
        assert positive(ratios[c, "engine/stock", "tok_s"])
    assert not any("mlx_lm_server" in name for _, name, _ in ratios)
    assert {check["name"] for check in report["checks"]} == {
        "c=1 mlx_serving/stock tok_s",
        "c=2 mlx_serving/stock tok_s",
    }


def test_serving_records_the_engine_steps_of_both_engine_backends(tmp_path):
    out, steps = tmp_path / "serving.json", tmp_path / "steps"
    command = [sys.executable, "-m", "bench", "serving", "--model-preset", "tiny"]
    command += ["--concurrency", "2", "--max-tokens", "8", "--skip", "stock,mlx_lm_server"]
    command += ["--engine-stats", str(steps)]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=ROOT, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engine steps" in done.stdout
    report = json.loads(out.read_text())
    rows = {row["backend"]: row for row in report["engine_steps"]}
    assert set(rows) == {"engine", "mlx_serving"}
    for name, row in rows.items():
        # Every request of the level, seen from inside its engine process.
        assert row["admitted"] == row["finished"] == 8, name
        assert row["tokens"] == 8 * 8, name
        assert row["decode_only_steps"] > 0 and row["prefill_steps"] > 0, name
        assert 0 < row["prefill_passes_per_request"] <= 1, name
        assert positive(row["process_cpu_ms_per_token"]), name
    # Each engine process (one per backend) described itself.
    assert len(list(steps.glob("*.process.json"))) == 2


def test_serving_holds_more_streams_than_the_servers_per_client_bound(tmp_path):
    """The benchmark is one client: past the server's per-client bound (64) no stream may be
    refused."""
    out = tmp_path / "serving.json"
    command = [sys.executable, "-m", "bench", "serving", "--model-preset", "tiny"]
    command += ["--concurrency", "65", "--requests-per-level", "65", "--max-tokens", "2"]
    command += ["--skip", "stock,engine,mlx_lm_server", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    [row] = json.loads(out.read_text())["rows"]
    assert row["failures"] == 0 and row["tok_s"] > 0


def test_stock_runs_the_model_as_mlx_lm_loads_it(model_path):
    """No fused projections, no kernel: what a user would run without us."""
    from mlx_lm.models import llama

    from bench.backends import StockBackend
    from mlx_serving.engine.config import EngineConfig

    async def attention_classes():
        async with StockBackend(model_path, EngineConfig()) as stock:
            return {type(m) for m in stock.model.modules() if "Attention" in type(m).__name__}

    assert asyncio.run(attention_classes()) == {llama.Attention}


def test_prompts_can_each_have_their_own_length(model_path):
    """--prompt-tokens MIN-MAX: distinct prompts of lengths spread over the range."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from bench.client import describe_lengths, make_prompts
    from bench.options import length_range

    assert length_range("118") == (118, 118)
    assert length_range("64-256") == (64, 256)
    for bad in ("9-3", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            length_range(bad)
    tokenizer = load_tokenizer(model_path)
    prompts = make_prompts(tokenizer, 12, (20, 40), seed=3)
    lengths = [len(prompt.ids) for prompt in prompts]
    assert all(20 <= n <= 40 for n in lengths) and len(set(lengths)) > 3
    assert len({prompt.ids[0] for prompt in prompts}) == 12
    assert all(tokenizer.encode(prompt.text) == prompt.ids for prompt in prompts)
    assert describe_lengths(lengths) == f"{min(lengths)}-{max(lengths)}"
    assert describe_lengths((118, 118)) == "118"


def test_engine_settings_are_read_as_their_type():
    from bench.options import engine_setting
    from bench.servers import engine_environment

    assert engine_setting("fuse_projections=off") == ("fuse_projections", False)
    assert engine_setting("max_batch_size=64") == ("max_batch_size", 64)
    assert engine_setting("coalesce_seconds=0.01") == ("coalesce_seconds", 0.01)
    for bad in ("no_such_key=1", "max_batch_size=many", "fuse_projections=maybe"):
        with pytest.raises(argparse.ArgumentTypeError):
            engine_setting(bad)
    assert engine_environment({"fuse_projections": False, "max_batch_size": 64}) == {
        "MLX_SERVING_ENGINE_FUSE_PROJECTIONS": "false",
        "MLX_SERVING_ENGINE_MAX_BATCH_SIZE": "64",
    }


@pytest.mark.parametrize("compare", ["fusion", "batch-cache"])
def test_ab_reports_the_ratio_of_its_variants(tmp_path, compare):
    report = run_bench(
        tmp_path,
        *("ab", "--model-preset", "tiny", "--compare", compare, "--concurrency", "2"),
        *("--requests-per-level", "3", "--rounds", "2", "--max-tokens", "6"),
    )
    assert [row["variant"] for row in report["rows"]] == {
        "fusion": ["plain", "fused"],
        "batch-cache": ["stock", "host"],
    }[compare]
    assert all(positive(row["tok_s"]) and len(row["tok_s_rounds"]) == 2 for row in report["rows"])
    (ratio,) = report["ratios"]
    assert positive(ratio["value"]) and len(ratio["per_round"]) == 2
    if compare == "fusion":
        checks = {check["name"]: check["value"] for check in report["checks"]}
        assert math.isfinite(checks["logits max |fused - plain|"])
        assert checks["argmax agreement over 944 positions"] >= 0.99


def test_decode_step_splits_the_step(tmp_path):
    """Every variant runs: the kernel (where the native extension has it here) or MLX's
    attention, and the compiled decode layers or the op-by-op ones."""
    import mlx.core as mx

    from mlx_serving.engine import fusion

    compiled_batch = fusion.COMPILED_BATCH
    report = run_bench(
        tmp_path, "decode-step", "--model-preset", "tiny", "--batch", "2", "--steps", "5"
    )
    assert {(row["batch"], row["kernel"], row["compiled"]) for row in report["rows"]} == {
        (2, True, True),
        (2, True, False),
        (2, False, False),
    }
    assert [r["name"] for r in report["ratios"]] == ["kernel on/off", "compiled on/off"]
    for row in report["rows"]:
        assert positive(row["step_ms"]) and positive(row["tok_s"])
        assert min(row["build_ms"], row["dispatch_ms"], row["wait_ms"]) >= 0
    assert all(positive(r["value"]) for r in report["ratios"])
    assert sys.modules["mlx_lm.generate"].mx is mx, "mlx-lm's module is left as it was"
    assert fusion.COMPILED_BATCH == compiled_batch, "the engine's bound is left as it was"


def test_new_shapes_times_every_group_twice(tmp_path):
    report = run_bench(tmp_path, "new-shapes", "--model-preset", "tiny")
    assert len(report["rows"]) == len(report["ratios"]) == 9
    for row in report["rows"]:
        assert all(positive(row[k]) for k in ("first_ms", "first_all_ms", "second_ms"))


def test_token_events_counts_what_the_subscriber_read(tmp_path):
    report = run_bench(
        tmp_path, "token-events", "--streams", "2", "--max-tokens", "6", "--rounds", "1"
    )
    assert all(positive(row["tok_s"]) for row in report["rows"])
    assert positive(report["ratios"][0]["value"])
    (check,) = report["checks"]
    assert check["value"] == 12 and check["met"]


def test_make_model_builds_a_loadable_model(tmp_path):
    from mlx_lm import load

    shape = ["num_hidden_layers=1", "hidden_size=64", "intermediate_size=128", "head_dim=16"]
    overrides = [arg for item in shape for arg in ("--set", item)]
    report = run_bench(tmp_path, "make-model", str(tmp_path / "m"), "--preset", "small", *overrides)
    (row,) = report["rows"]
    assert row["path"] == str(tmp_path / "m") and row["overrides"]["hidden_size"] == 64
    model, _ = load(row["path"])
    assert model.args.hidden_size == 64 and positive(row["parameters"])


def test_grammars_times_every_workload_with_llguidance(tmp_path, model_path):
    report = run_bench(
        tmp_path,
        *("grammars", "--tokenizer", str(model_path), "--libraries", "llguidance"),
        *("--batch", "2,3", "--steps", "12", "--compiles", "1", "--rounds", "1"),
    )
    rows = {(row["workload"], row["fill"]): row for row in report["rows"]}
    workloads, fills = ("json", "regex", "choice"), ("batched", "per row")
    assert set(rows) == {(w, f) for w in workloads for f in fills}
    for row in rows.values():
        assert row["library"] == "llguidance" and positive(row["vocab"]) and row["version"]
        for key in ("compile_ms", "first_mask_ms", "mask_ms_2", "mask_ms_3"):
            assert positive(row[key]), key
        assert row["rejected"] == 0
    assert rows["choice", "per row"]["finished"] > 0
    (check,) = report["checks"]
    assert check["value"] == 0 and check["met"]


def test_sampling_times_every_variant(tmp_path):
    """The fused sampler's native op (where the extension has it here), its fallback, per row."""
    from mlx_serving.engine import native

    report = run_bench(
        tmp_path,
        *("sampling", "--shapes", "3x500,2x70", "--rounds", "2", "--steps", "2", "--warmup", "1"),
    )
    variants = {"fallback", "per-row"} | ({"native"} if native.extension_for_device() else set())
    assert {(r["rows"], r["vocab"], r["variant"]) for r in report["rows"]} == {
        (rows, vocab, v) for rows, vocab in ((3, 500), (2, 70)) for v in variants
    }
    assert all(positive(row["ms"]) and len(row["ms_rounds"]) == 2 for row in report["rows"])
    assert all(positive(ratio["value"]) for ratio in report["ratios"])
    assert len(report["ratios"]) == (4 if "native" in variants else 0)


def test_sampled_serves_every_variant_end_to_end(tmp_path, monkeypatch):
    """Three engines (per-row, fused in MLX, native) on the same sampled closed loop."""
    monkeypatch.delenv("MLX_SERVING_NATIVE", raising=False)
    report = run_bench(
        tmp_path,
        *("sampled", "--model-preset", "tiny", "--concurrency", "2"),
        *("--rounds", "1", "--max-tokens", "4"),
    )
    variants = {row["variant"] for row in report["rows"]}
    assert variants == {"per-row", "fused", "native"}
    assert all(positive(row["tok_s"]) for row in report["rows"])
    assert {ratio["name"] for ratio in report["ratios"]} == {
        "native/fused at 2 streams",
        "native/per-row at 2 streams",
    }
