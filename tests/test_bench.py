"""Smoke test of scripts/bench.py: it runs end to end and reports sane numbers.

Timing thresholds are the script's business (ratios measured side by side), never a test's.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--model-preset",
        "tiny",
        "--concurrency",
        "1,2",
        "--max-tokens",
        "8",
        "--skip",
        "mlx_lm_server",
        "--json",
        str(out),
    ]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["levels"]) == {"1", "2"}
    for level in report["levels"].values():
        assert set(level) == {"raw", "engine", "mlx_serving"}
        for row in level.values():
            assert row["failures"] == 0 and row["short"] == 0
            assert row["tokens"] == row["requests"] * 8
            assert row["prompt_tokens"] == [118]
            for key in ("tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms"):
                assert math.isfinite(row[key]) and row[key] > 0, key
        # What the engine measured, next to what the client did: the wire is the difference.
        for name in ("engine", "mlx_serving"):
            row = level[name]
            assert 0 < row["engine_ttft_p50_ms"] <= row["ttft_p50_ms"], name
            assert row["engine_itl_p50_ms"] > 0, name
        assert level["raw"]["engine_ttft_p50_ms"] is None
    assert {check["name"] for check in report["checks"]} == {"tok/s mlx_serving/raw"}


def test_prompts_can_each_have_their_own_length(model_path, monkeypatch):
    """--prompt-tokens MIN-MAX: distinct prompts of lengths spread over the range."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench

    assert bench.length_range("118") == (118, 118)
    assert bench.length_range("64-256") == (64, 256)
    for bad in ("9-3", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.length_range(bad)
    prompts = bench.make_prompts(load_tokenizer(model_path), 12, (20, 40), seed=3)
    lengths = [len(prompt.ids) for prompt in prompts]
    assert all(20 <= n <= 40 for n in lengths) and len(set(lengths)) > 3
    assert len({prompt.ids[0] for prompt in prompts}) == 12
    assert bench.describe_lengths(lengths) == f"{min(lengths)}-{max(lengths)}"
    assert bench.describe_lengths((118, 118)) == "118"
