"""Property: no request to any RPC, however hostile, and no cancellation at any point makes the
server fail (INTERNAL, UNKNOWN, DATA_LOSS, an unexpected UNAVAILABLE) or stop serving.

The requests come from fuzz_strategies.py (shared with scripts/fuzz_rpcs.py, the long run):
every field of every request message, drawn from the descriptors. The server runs offline
(HF_HUB_OFFLINE=1), so a Hugging Face id is never downloaded.
"""

import os

import grpc
import pytest
import pytest_asyncio
from fuzz_strategies import (
    MODEL_ID,
    cases,
    greedy_generate_works,
    make_hostile_files,
    run_case,
    use_hostile_paths,
    violation,
)
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.server.app import ServingApp
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzzed(model_path, tmp_path_factory):
    """A server of this module's own (the fuzz may leave models and subscribers behind),
    whose engine process inherits HF_HUB_OFFLINE=1."""
    use_hostile_paths(make_hostile_files(tmp_path_factory.mktemp("hostile")))
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        app = ServingApp(Engine(EngineConfig()), "127.0.0.1", 0)
        await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
    finally:
        if offline is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield app, channel
    await app.stop(1)


# derandomize: CI sends the same 150 cases every run (the long, random run is
# scripts/fuzz_rpcs.py).
@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
async def test_no_request_or_cancel_makes_the_server_fail(fuzzed, case):
    app, channel = fuzzed
    outcome = await run_case(channel, case)
    assert violation(case, outcome) is None, violation(case, outcome)
    assert app.engine.alive


def minus_infinity_kwargs() -> struct_pb2.Struct:
    kwargs = struct_pb2.Struct()
    kwargs.fields["x"].number_value = float("-inf")
    return kwargs


# Found by scripts/fuzz_rpcs.py (docs/RELIABILITY.md): valid requests that ended INTERNAL
# before their fixes (a masked token sampled from overflowed logits; a grammar past the parser's
# limits; a Struct number JSON cannot write).
FOUND_INTERNAL_ERRORS = {
    "subnormal repetition_penalty with a constraint": dict(
        text="Hello", regex="[ab]+", repetition_penalty=1.4e-45
    ),
    "temperature FLT_MIN with json_object": dict(
        text="Hello", json_object=generate_pb.JsonObject(), temperature=1.1754944e-38
    ),
    "a grammar of 2000 alternatives (INVALID_ARGUMENT: past the parser's limits)": dict(
        text="Hello", grammar="start: " + " | ".join(f'"{i}"' for i in range(2000))
    ),
    "template_kwargs holding -inf": dict(
        chat=generate_pb.ChatPrompt(
            messages=[generate_pb.ChatMessage(role="user", content="hi")],
            template_kwargs=minus_infinity_kwargs(),
        )
    ),
}


@pytest.mark.parametrize("fields", FOUND_INTERNAL_ERRORS.values(), ids=FOUND_INTERNAL_ERRORS)
async def test_requests_the_fuzzer_found_are_no_longer_internal_errors(fuzzed, fields):
    _, channel = fuzzed
    request = generate_pb.GenerateRequest(model_id=MODEL_ID, max_tokens=4, seed=0, **fields)
    try:
        [reply async for reply in generate_grpc.GenerateServiceStub(channel).Generate(request)]
    except grpc.RpcError as error:
        assert error.code() is not grpc.StatusCode.INTERNAL, error.details()


async def test_afterwards_the_server_serves(fuzzed):
    """After everything above: a greedy Generate is served, and health is SERVING."""
    app, channel = fuzzed
    assert await greedy_generate_works(channel)
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
