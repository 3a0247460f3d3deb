"""The server's per-request limits (engine.max_prompt_tokens, max_generation_tokens,
max_request_tokens, max_stop_strings): refused before any work, naming the field."""

import grpc
import pytest
import pytest_asyncio
from wire_helpers import field_violations, generate_all, rpc_error

from mlx_serving.engine.config import EngineConfig
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
LIMITS = EngineConfig(
    max_prompt_tokens=8, max_generation_tokens=10, max_request_tokens=30, max_stop_strings=2
)


@pytest_asyncio.fixture(loop_scope="session")
async def limited(fresh_server):
    app = await fresh_server(LIMITS)
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield generate_grpc.GenerateServiceStub(channel)


def request(**fields) -> generate_pb.GenerateRequest:
    fields = {"model_id": MODEL_ID, "tokens": {"ids": [5, 6, 7]}, "max_tokens": 4, **fields}
    return generate_pb.GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tokens": {"ids": list(range(9))}}, "tokens.ids"),
        ({"max_tokens": 11}, "max_tokens"),
        ({"max_tokens": 9, "n": 3}, "max_tokens"),  # 3 + 3 x 9 = 30... plus one
        ({"stop": ["a", "b", "c"]}, "stop"),
    ],
)
async def test_a_request_over_a_limit_is_refused_naming_the_field(limited, fields, field):
    if fields.get("n") == 3:
        fields["tokens"] = {"ids": [5, 6, 7, 8]}  # 4 + 3 x 9 = 31 > 30
    error = await rpc_error(limited.Generate(request(**fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == [field]


async def test_requests_within_the_limits_are_served(limited):
    responses, _, ids = await generate_all(
        limited, request(tokens={"ids": list(range(8))}, max_tokens=10, stop=["x", "y"])
    )
    assert responses[-1].usage.prompt_tokens == 8
    # A prompt cut to fit by truncate_prompt_tokens counts as cut.
    responses, _, _ = await generate_all(
        limited, request(tokens={"ids": list(range(50))}, truncate_prompt_tokens=8)
    )
    assert responses[-1].usage.prompt_tokens == 8
