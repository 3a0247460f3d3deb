"""The real `mlx-serving serve` as a child process, for the tests that need a whole process."""

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_serving

LISTENING = re.compile(r"^mlx-serving listening on (\S+:\d+)(?::| |$)")
STARTUP_SECONDS = 120


def child_env(**extra: str) -> dict[str, str]:
    """This interpreter's import path for mlx_serving (both PEP 420 portions), for the child."""
    roots = [str(Path(p).parent) for p in mlx_serving.__path__]
    path = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start_server(args: list[str], log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--port", "0", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=child_env(**env),
        # Its own process group, so a test can signal the server and its engine together.
        start_new_session=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_SECONDS)
    line = process.stdout.readline().strip() if ready else ""
    if not (match := LISTENING.match(line)):
        process.kill()
        pytest.fail(f"no address printed (got {line!r}); log:\n{log.read_text()}")
    process.startup_line = line
    return process, match.group(1)


def stop_server(process: subprocess.Popen, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, log.read_text()
    assert process.stdout.read() == ""  # the address line is all it prints
