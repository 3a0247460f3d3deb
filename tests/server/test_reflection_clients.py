"""A generic client with no proto files: `buf curl`, through server reflection alone."""

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture


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
