"""The reliability scripts (docs/RELIABILITY.md) run, tiny, as a user runs them: each as
`python scripts/NAME.py`, passing and saying so, so that CI proves they still work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_serving

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    roots = [str(Path(p).resolve().parent) for p in mlx_serving.__path__]
    path = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )


@pytest.mark.parametrize(
    ("script", "args", "verdict"),
    [
        (
            "soak.py",
            ["--minutes", "0.08", "--streams", "4", "--warmup-seconds", "2"]
            + ["--sample-seconds", "1", "--report-seconds", "1", "--tolerance", "0.5"],
            "soak: PASS",
        ),
        (
            "cancel_storm.py",
            ["--requests", "20", "--runs", "1", "--min-ratio", "0.2"],
            "cancel storm: PASS",
        ),
        (
            "slow_readers.py",
            ["--seconds", "5", "--streams", "2", "--read-every", "0.2"],
            "slow readers: PASS",
        ),
        ("fuzz_rpcs.py", ["--cases", "40", "--seconds", "10", "--batch", "40"], "fuzz: PASS"),
    ],
    ids=["soak", "cancel_storm", "slow_readers", "fuzz_rpcs"],
)
def test_script_passes(script, args, verdict, model_path):
    done = run_script(script, *args, "--model", str(model_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdict in done.stdout


def test_a_failing_check_exits_1(model_path):
    """A pass condition no run can meet (a 1e9-fold speed-up) fails the script, with 1."""
    done = run_script(
        "cancel_storm.py",
        "--requests",
        "4",
        "--runs",
        "1",
        "--min-ratio",
        "1e9",
        "--model",
        str(model_path),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cancel storm: FAIL" in done.stdout
