"""Lint, drift and type checks, run as tests so the one README test command covers them.

tests/conftest.py runs this module first, and ends the run when a `fail_fast` check fails.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def find_tool(name: str) -> str:
    """A console script of the test venv: beside this interpreter first, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra, pip install -e '.[test]'")
    return found


def check(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"


@pytest.mark.fail_fast
def test_ruff_check() -> None:
    check([sys.executable, "-m", "ruff", "check", "--no-cache", "."])


@pytest.mark.fail_fast
def test_ruff_format() -> None:
    check([sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."])


@pytest.mark.fail_fast
def test_import_contracts() -> None:
    check([find_tool("lint-imports"), "--no-cache"])


@pytest.mark.fail_fast
def test_stubs_are_current() -> None:
    check([sys.executable, "scripts/gen_protos.py", "--check"])


@pytest.mark.fail_fast
def test_buf_lint() -> None:
    check([sys.executable, "scripts/gen_protos.py", "--lint"])


@pytest.mark.fail_fast
def test_buf_format() -> None:
    check([find_tool("buf"), "format", "--diff", "--exit-code"])


@pytest.mark.fail_fast
def test_buf_breaking() -> None:
    """The contract keeps what the baseline image promised; to change it on purpose, run
    `python scripts/gen_protos.py --update-baseline` and commit the new baseline with it."""
    check([find_tool("buf"), "breaking", "--against", "proto/baseline/mlx_serving_v1.binpb"])


@pytest.mark.fail_fast
def test_mypy() -> None:
    """The server's packages type-check ([tool.mypy] in pyproject.toml says what and how)."""
    check([sys.executable, "-m", "mypy"])
