"""The example clients under clients/ (Go, Node.js, Java), each run against the real server.

clients/build.sh builds them (.ci/run calls it before the tests, so here it only finds them up
to date); a language whose toolchain is missing is skipped. The Go code generated from proto/
is checked for drift, as scripts/gen_protos.py --check does for the Python stubs.
"""

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("server")))
from server_process import start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"
MODEL_ID = "tiny-llama"
BUILD_SECONDS = 900  # a cold build downloads its dependencies; .ci/run does it beforehand
RUN_SECONDS = 60
JAR = "mlx-serving-client-example.jar"

# language: (tools it needs, its directory, the command that runs the built client)
LANGUAGES = {
    "go": (("go",), CLIENTS / "go", [".bin/client"]),
    "node": (("node", "npm"), CLIENTS / "node", ["node", "client.js"]),
    "java": (("java", "mvn"), CLIENTS / "java", ["java", "-jar", f"target/{JAR}"]),
}


def toolchain_env() -> dict[str, str]:
    """This environment without LD_PRELOAD: the OpenBLAS that .ci/run preloads for MLX starts
    threads in every process it enters, and the JVM's and Node's crash on it."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the example client needs it")


@pytest.fixture(scope="module")
def address(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `mlx-serving serve` process for every client."""
    log = tmp_path_factory.mktemp("clients") / "server.log"
    process, address = start_server(["--model", f"{MODEL_ID}={model_path}"], log)
    yield address
    stop_server(process, log)


def build(language: str) -> None:
    done = subprocess.run(
        ["bash", str(CLIENTS / "build.sh"), language],
        capture_output=True,
        text=True,
        env=toolchain_env(),
        timeout=BUILD_SECONDS,
    )
    assert done.returncode == 0, f"clients/build.sh {language} failed:\n{done.stdout}{done.stderr}"


def section(output: str, title: str) -> str:
    """The lines after `== title ==`, up to the next section."""
    match = re.search(rf"^== {title} ==\n(.*?)(?=^== |\Z)", output, re.S | re.M)
    assert match, f"no '== {title} ==' section in:\n{output}"
    return match.group(1)


@pytest.mark.parametrize("language", LANGUAGES)
def test_client(language: str, address: str) -> None:
    tools, directory, command = LANGUAGES[language]
    require(*tools)
    build(language)
    done = subprocess.run(
        [*command, "--addr", address, "--model", MODEL_ID],
        cwd=directory,
        capture_output=True,
        text=True,
        errors="replace",  # the random-weight model's text is not always valid UTF-8 in pieces
        env=toolchain_env(),
        timeout=RUN_SECONDS,
    )
    output = done.stdout
    assert done.returncode == 0, f"{language} client failed:\n{output}{done.stderr}"

    # (1) streamed text, then (2) the usage of the last message.
    stream = section(output, "stream")
    text, _, usage_line = stream.rstrip("\n").rpartition("\n")
    assert text.strip(), f"no text streamed:\n{stream}"
    usage = re.fullmatch(
        r"usage: prompt_tokens=(\d+) completion_tokens=(\d+) finish_reason=(FINISH_REASON_\w+)",
        usage_line,
    )
    assert usage, f"no usage line:\n{stream}"
    assert int(usage[1]) > 0 and 0 < int(usage[2]) <= 32
    assert usage[3] in ("FINISH_REASON_MAX_TOKENS", "FINISH_REASON_END_OF_SEQUENCE")

    # (3) the rich status of an invalid request: a BadRequest naming max_tokens.
    invalid = section(output, "invalid request")
    assert invalid.startswith("status: INVALID_ARGUMENT: "), invalid
    assert re.search(r"^field violation: max_tokens: \S", invalid, re.M), invalid
    # ErrorInfo, where the server adds it, names a reason.
    for reason in re.findall(r"^error info: reason=(\S*)", invalid, re.M):
        assert reason, invalid

    # (4) a stream cancelled midway, (5) a deadline.
    cancelled = section(output, "cancel")
    assert cancelled.startswith("received 3 messages, cancelling\nstatus: CANCELLED"), cancelled
    assert section(output, "deadline").startswith("status: DEADLINE_EXCEEDED"), output


def test_go_code_is_current(tmp_path: Path) -> None:
    """clients/go/gen is what clients/go/generate.sh makes from proto/ now."""
    require("go")
    env = {**toolchain_env(), "PROTOC": f"{sys.executable} -m grpc_tools.protoc"}
    done = subprocess.run(
        ["bash", str(CLIENTS / "go" / "generate.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_SECONDS,
    )
    assert done.returncode == 0, f"generate.sh failed:\n{done.stdout}{done.stderr}"
    fresh, committed = tmp_path / "gen", CLIENTS / "go" / "gen"
    names = {p.relative_to(fresh) for p in fresh.rglob("*.go")}
    names |= {p.relative_to(committed) for p in committed.rglob("*.go")}
    stale = sorted(
        str(name)
        for name in names
        if not (
            (fresh / name).is_file()
            and (committed / name).is_file()
            and filecmp.cmp(fresh / name, committed / name, shallow=False)
        )
    )
    listed = "\n  ".join(stale)
    assert not stale, f"clients/go/gen is stale, run clients/go/generate.sh:\n  {listed}"
