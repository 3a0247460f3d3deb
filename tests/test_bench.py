"""Smoke test of scripts/bench.py: it runs end to end and reports sane numbers.

Timing thresholds are the script's business (ratios measured side by side), never a test's.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

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
    assert {check["name"] for check in report["checks"]} == {"tok/s mlx_serving/raw"}
