"""One model sharded over two processes: `mlx.launch` with the ring backend on loopback.

Rank 0 serves gRPC and leads, rank 1 follows (engine/distributed.py). Through a real client on
a socket: greedy output as mlx-lm's own unsharded generation gives it, several streams batched
together, a cancelled stream that leaves the others and the ranks in step, a refused feature,
and a clean stop of the whole group from a SIGTERM to rank 0.
"""

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from server_process import child_env
from wire_helpers import generate_all

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL_ID = "tiny"
LISTENING = re.compile(r"mlx-serving listening on (\S+:\d+):")
STARTUP_SECONDS = 120
PROMPTS = [
    [5, 17, 300, 41, 9],
    [1000, 2, 3],
    [77] * 12,
    [250, 251, 252, 253, 254, 255, 256],
    # Past the control channel's first all_sum (CONTROL_BYTES) once pickled.
    [(i * 37) % 2000 + 4 for i in range(700)],
]


def free_port_pair() -> int:
    """A port P with P and P + 1 free: the ring backend listens on one port per rank."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free ports")


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes mlx.launch started (they exec into `serve`)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in env:
            if item.startswith(b"MLX_RANK="):
                ranks[int(item.split(b"=", 1)[1])] = int(entry.name)
    return ranks


@dataclass
class Group:
    process: subprocess.Popen  # mlx.launch, leader of the process group of every rank
    address: str  # rank 0's gRPC address
    log: Path  # every rank's stderr


@pytest.fixture(scope="module")
def group(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("sharded") / "ranks.log"
    rank_command = [
        sys.executable, "-m", "mlx_serving.server.cli", "serve", "--port", "0",
        "--model", f"{MODEL_ID}={model_path}",
    ]  # fmt: skip
    launcher = [
        sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
        "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
        "--starting-port", str(free_port_pair()), "--", *rank_command,
    ]  # fmt: skip
    process = subprocess.Popen(
        launcher,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        # Prefill chunks paced by measured step times would vary from run to run.
        env=child_env(MLX_SERVING_ENGINE_PREFILL_PACING="0"),
        # Its own process group: every rank and engine process is in it, so none outlives us.
        start_new_session=True,
    )
    try:
        address = wait_for_address(process, log)
        yield Group(process, address, log)
    finally:
        stop_group(process)


def wait_for_address(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_SECONDS
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline().decode()
            if match := LISTENING.search(line):
                return match.group(1)
            if not line and process.poll() is not None:
                break
    pytest.fail(f"rank 0 never listened; log:\n{log.read_text()}")


def stop_group(process: subprocess.Popen) -> None:
    """Every process of the group gone, whatever state the test left it in."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def reference(model_path) -> dict[tuple[int, ...], list[int]]:
    """mlx-lm's own greedy generation with the whole (unsharded) model, 24 tokens a prompt."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_path))
    expected = {}
    for prompt in PROMPTS:
        tokens = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=24)]
        expected[tuple(prompt)] = [int(t) for t in tokens]
    return expected


def request(prompt: list[int], max_tokens: int = 24, **options) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID,
        tokens=generate_pb.TokenIds(ids=prompt),
        max_tokens=max_tokens,
        temperature=0,
        ignore_eos=True,
        **options,
    )


@pytest_asyncio.fixture(loop_scope="module")
async def stub(group):
    async with grpc.aio.insecure_channel(group.address) as channel:
        yield generate_service_pb2_grpc.GenerateServiceStub(channel)


async def test_greedy_output_is_the_unsharded_models(stub, reference):
    for prompt in (PROMPTS[0], PROMPTS[-1]):
        _, _, ids = await generate_all(stub, request(prompt))
        assert ids == reference[tuple(prompt)]


async def test_concurrent_streams_batch_and_match(stub, reference):
    results = await asyncio.gather(*(generate_all(stub, request(p)) for p in PROMPTS))
    for prompt, (_, _, ids) in zip(PROMPTS, results, strict=True):
        assert ids == reference[tuple(prompt)]


async def test_a_cancelled_stream_leaves_the_others_and_the_ranks_in_step(stub, reference, group):
    cancelled = stub.Generate(request(PROMPTS[2], max_tokens=2000))
    others = [asyncio.ensure_future(generate_all(stub, request(p))) for p in PROMPTS[:2]]
    for _ in range(3):
        await cancelled.read()
    cancelled.cancel()
    for prompt, task in zip(PROMPTS[:2], others, strict=True):
        assert (await task)[2] == reference[tuple(prompt)]
    # A later request, with the cancelled prompt: the ranks still agree on every step.
    later = await asyncio.gather(*(generate_all(stub, request(p)) for p in PROMPTS[2:]))
    for prompt, (_, _, ids) in zip(PROMPTS[2:], later, strict=True):
        assert ids == reference[tuple(prompt)]
    assert group.process.poll() is None
    assert sorted(rank_pids(group.process.pid)) == [0, 1]


async def test_sampled_streams_agree_across_ranks(stub):
    """Rank 0 samples; its tokens are every rank's (a disagreement would desynchronise the
    caches, and the greedy request after would differ from the reference)."""
    sampled = request(PROMPTS[1], max_tokens=16)
    sampled.temperature, sampled.seed = 1.0, 7
    first = (await generate_all(stub, sampled))[2]
    second = (await generate_all(stub, sampled))[2]
    assert first == second and len(first) == 16


async def test_constraints_samples_and_logprobs_run_on_rank_0(stub, reference):
    """Rank 0 alone masks, samples and measures; the followers only follow its tokens."""
    constrained = request(PROMPTS[0], max_tokens=8, regex="[a-c]{3}x")
    constrained.ignore_eos = False
    _, text, _ = await generate_all(stub, constrained)
    assert re.fullmatch("[a-c]{3}x", text)
    responses, _, _ = await generate_all(stub, request(PROMPTS[1], n=2, logprobs=True))
    for index in (0, 1):
        ids = [t for r in responses if r.index == index for t in r.token_ids]
        assert ids == reference[tuple(PROMPTS[1])]
    assert sum(len(r.logprobs) for r in responses) == 2 * 24


async def test_prompt_logprobs_are_refused(stub):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate_all(stub, request(PROMPTS[0], max_tokens=2, prompt_logprobs=1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sharded" in error.value.details()


async def test_sigterm_to_rank_0_stops_every_rank(group):
    ranks = rank_pids(group.process.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[0], signal.SIGTERM)
    assert group.process.wait(timeout=30) == 0
    log = group.log.read_text()
    assert "rank 1 of 2: following rank 0" in log
    assert "rank 0 stopped" in log
    channel = re.search(r"control channel \((\w+)\): (\d+) messages, (\d+) µs each", log)
    assert channel is not None and channel.group(1) == "tcp"
    print(f"\ncontrol channel: {channel.group(2)} messages, {channel.group(3)} µs each")


CHANNELS = """
import sys
import mlx.core as mx
from mlx_serving.engine.distributed import Channel, init_group, open_channel

group = init_group()
stream = mx.new_stream(mx.default_device())
messages = [[("next", "m", (i, i))] for i in range(3)] + [[("insert", list(range(5000)))]]
for channel in (open_channel(group, stream), Channel(group, stream)):
    for message in messages:
        if group.rank() == 0:
            channel.send(message)
        else:
            assert channel.receive() == message, channel.kind
    print(f"rank {group.rank()}: {channel.kind} ok", flush=True)
"""


async def test_both_control_channels_carry_long_messages(tmp_path):
    """TCP, and the all_sum fallback (a first buffer, then the rest of a long message)."""
    script = tmp_path / "channels.py"
    script.write_text(CHANNELS)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mlx._distributed_utils.launch import main; main()",
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "--starting-port",
            str(free_port_pair()),
            "--",
            sys.executable,
            str(script),
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    assert process.returncode == 0, stderr
    for rank in (0, 1):
        for kind in ("tcp", "collective"):
            assert f"rank {rank}: {kind} ok" in stdout
