"""Generic clients with no proto files, through server reflection alone: `buf curl`, grpcurl,
ghz, and grpcio-reflection's own descriptor database; and the reflection protocol itself.

grpcurl and ghz are Go programs that .ci/run installs (pinned) into build/tools; without them
and without `go` to build them, their tests skip.
"""

import asyncio
import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from mlx_serving.server.app import SERVICE_NAMES
from mlx_serving.server.reflection import V1_FILE_NAME, V1_SERVICE_NAME
from mlx_serving.v1 import generate_service_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture
GO_TOOLS = Path(__file__).resolve().parents[2] / "build" / "tools"
TOOL_SECONDS = 30


def buf_binary() -> str:
    """`buf` of the buf-bin package (the test extra), next to this Python or on PATH."""
    found = Path(sys.executable).with_name("buf")
    return str(found) if found.exists() else shutil.which("buf") or "buf"


async def buf_curl(address: str, method: str, data: dict | None = None) -> list[dict]:
    """Calls `method` through reflection; returns the JSON messages printed (one per response)."""
    command = [buf_binary(), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    command += ["--data", json.dumps(data or {}), f"http://{address}/{method}"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    decoder, text, messages = json.JSONDecoder(), out.decode().strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


async def test_buf_curl_lists_models_through_reflection(server_address):
    (response,) = await buf_curl(server_address, "mlx_serving.v1.ModelService/ListModels")
    assert [m["modelId"] for m in response["models"]] == [MODEL_ID]
    assert response["models"][0]["state"] == "MODEL_STATE_READY"


async def test_buf_curl_streams_a_generation(server_address):
    request = {"modelId": MODEL_ID, "text": "Hello", "maxTokens": 5, "temperature": 0}
    responses = await buf_curl(server_address, "mlx_serving.v1.GenerateService/Generate", request)
    assert sum(len(r.get("tokenIds", [])) for r in responses) == 5
    assert responses[-1]["finishReason"] == "FINISH_REASON_MAX_TOKENS"


async def test_buf_curl_tokenizes_and_checks_health(server_address):
    request = {"modelId": MODEL_ID, "text": "Hello world"}
    (tokens,) = await buf_curl(server_address, "mlx_serving.v1.TokenizeService/Tokenize", request)
    (text,) = await buf_curl(
        server_address,
        "mlx_serving.v1.TokenizeService/Detokenize",
        {"modelId": MODEL_ID, "tokenIds": tokens["tokenIds"]},
    )
    assert text["text"] == "Hello world"
    (health,) = await buf_curl(server_address, "grpc.health.v1.Health/Check")
    assert health["status"] == "SERVING"


# ---- grpcurl and ghz ------------------------------------------------------------------------


def go_tool(name: str) -> str:
    """build/tools/`name`; skips without it when there is no `go` to build it, else fails."""
    path = GO_TOOLS / name
    if path.exists():
        return str(path)
    if shutil.which("go") is None:
        pytest.skip(f"{name}: not in build/tools, and no `go` to build it (see .ci/run)")
    pytest.fail(f"{name}: not in build/tools; run .ci/run's `go install` step (it pins versions)")


@pytest.fixture(scope="session")
def grpcurl_binary() -> str:
    return go_tool("grpcurl")


@pytest.fixture(scope="session")
def ghz_binary() -> str:
    return go_tool("ghz")


async def run_tool(*command: str) -> str:
    """Runs `command`, which must succeed; returns its standard output."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), TOOL_SECONDS)
    assert process.returncode == 0, f"{command}: {err.decode()}{out.decode()}"
    return out.decode()


async def test_grpcurl_describes_a_method(grpcurl_binary, server_address):
    method = "mlx_serving.v1.GenerateService.Generate"
    out = await run_tool(grpcurl_binary, "-plaintext", server_address, "describe", method)
    assert f"{method} is a method:" in out
    assert (
        "rpc Generate ( .mlx_serving.v1.GenerateRequest )"
        " returns ( stream .mlx_serving.v1.GenerateResponse );"
    ) in out


async def test_grpcurl_describes_the_v1_reflection_method(grpcurl_binary, server_address):
    method = f"{V1_SERVICE_NAME}.ServerReflectionInfo"
    out = await run_tool(grpcurl_binary, "-plaintext", server_address, "describe", method)
    assert "stream .grpc.reflection.v1.ServerReflectionRequest" in out


async def test_grpcurl_lists_the_services(grpcurl_binary, server, server_address):
    out = await run_tool(grpcurl_binary, "-plaintext", server_address, "list")
    assert sorted(out.split()) == sorted(server.reflected_services)


async def test_grpcurl_lists_health(grpcurl_binary, server_address):
    out = await run_tool(grpcurl_binary, "-plaintext", server_address, "grpc.health.v1.Health/List")
    statuses = json.loads(out)["statuses"]
    assert statuses == {name: {"status": "SERVING"} for name in ("", *SERVICE_NAMES)}


async def test_ghz_tokenizes_through_reflection(ghz_binary, server_address):
    # At most 2 calls at once: the engine refuses Tokenize past max_concurrent_tokenize (4).
    command = [ghz_binary, "--insecure", "--call", "mlx_serving.v1.TokenizeService.Tokenize"]
    command += ["-d", json.dumps({"model_id": MODEL_ID, "text": "hi"}), "-n", "20", "-c", "2"]
    report = json.loads(await run_tool(*command, "--format", "json", server_address))
    assert report["count"] == 20
    assert report["statusCodeDistribution"] == {"OK": 20}, report.get("errorDistribution")


# ---- the reflection protocol ----------------------------------------------------------------

GENERATE_FILE = generate_service_pb2.DESCRIPTOR.name
SYMBOLS = {
    # A method answers with the file of its service (the pool alone does not find methods).
    "mlx_serving.v1.GenerateService.Generate": GENERATE_FILE,
    "grpc.health.v1.Health.List": health_pb2.DESCRIPTOR.name,
    f"{V1_SERVICE_NAME}.ServerReflectionInfo": V1_FILE_NAME,
    f"{reflection_pb2.DESCRIPTOR.package}.ServerReflection.ServerReflectionInfo": (
        reflection_pb2.DESCRIPTOR.name
    ),
    "mlx_serving.v1.GenerateService": GENERATE_FILE,
    "mlx_serving.v1.GenerateRequest": GENERATE_FILE,
    "mlx_serving.v1.GenerateRequest.LogitBiasEntry": GENERATE_FILE,  # nested (map entry)
    "mlx_serving.v1.GenerateRequest.model_id": GENERATE_FILE,  # field
    "mlx_serving.v1.GenerateRequest.prompt": GENERATE_FILE,  # oneof
    "mlx_serving.v1.FinishReason": GENERATE_FILE,
    "mlx_serving.v1.FINISH_REASON_MAX_TOKENS": GENERATE_FILE,  # enum value
    "buf.validate.field": "buf/validate/validate.proto",  # extension
}
REFLECTION_SERVICES = [V1_SERVICE_NAME, f"{reflection_pb2.DESCRIPTOR.package}.ServerReflection"]


async def reflect(
    channel: grpc.aio.Channel, service: str, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream on `service` (v1 or v1alpha: the same messages)."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter(requests))
    return [response async for response in call]


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_file_containing_symbol_answers_every_kind_of_symbol(channel, service):
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in SYMBOLS]
    responses = await reflect(channel, service, requests)
    for (symbol, file_name), response in zip(SYMBOLS.items(), responses, strict=True):
        assert response.original_request.file_containing_symbol == symbol
        assert response.WhichOneof("message_response") == "file_descriptor_response", symbol
        protos = response.file_descriptor_response.file_descriptor_proto
        # The file itself first, then its dependencies.
        assert descriptor_pb2.FileDescriptorProto.FromString(protos[0]).name == file_name, symbol


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_an_unknown_symbol_is_not_found(channel, service):
    symbols = ["mlx_serving.v1.GenerateService.Nope", "mlx_serving.v1.Nope", ""]
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
    for response in await reflect(channel, service, requests):
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def describe_method(address: str, method: str) -> tuple[str, str, str, bool]:
    """(file, input, output, server streaming) of `method`, from grpcio-reflection's client."""
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        found = pool.FindMethodByName(method)
        return (
            found.containing_service.file.name,
            found.input_type.full_name,
            found.output_type.full_name,
            found.server_streaming,
        )


async def test_grpcio_reflection_client_resolves_a_method(server_address):
    # A blocking client: in a thread, as the server shares this event loop.
    described = await asyncio.to_thread(
        describe_method, server_address, "mlx_serving.v1.GenerateService.Generate"
    )
    assert described == (
        GENERATE_FILE,
        "mlx_serving.v1.GenerateRequest",
        "mlx_serving.v1.GenerateResponse",
        True,
    )
