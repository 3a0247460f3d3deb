"""Many clients at once through the real server: cancellation storms, several models, seeds."""

import asyncio
import random

import grpc
import pytest
from engine_probes import wait_until_idle
from wire_helpers import generate_all

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture


async def test_a_cancellation_storm_leaves_no_sequence_behind(generate, server):
    rng = random.Random(1234)

    async def client(i: int) -> None:
        request = generate_pb.GenerateRequest(
            model_id=MODEL_ID, text=f"client {i} " * rng.randint(1, 40), max_tokens=10_000
        )
        call = generate.Generate(request)
        reads = rng.choice([0, 0, 1, 2, 5, 20])
        try:
            for _ in range(reads):
                await call.read()
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.05)
        finally:
            call.cancel()

    async def deadline_client(i: int) -> None:
        request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="x", max_tokens=10_000)
        with pytest.raises(grpc.aio.AioRpcError):
            await generate_all(generate, request, timeout=0.05 + rng.random() * 0.3)

    await asyncio.gather(*(client(i) for i in range(24)), *(deadline_client(i) for i in range(8)))
    await wait_until_idle(server.engine, timeout=10)
    # The engine still serves.
    _, _, ids = await generate_all(
        generate, generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=4)
    )
    assert len(ids) == 4


async def test_seeded_streams_are_identical_in_three_batch_compositions(generate):
    seeded = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Once upon a time", max_tokens=16, temperature=1.0, seed=42
    )

    def neighbour(i: int, greedy: bool) -> generate_pb.GenerateRequest:
        return generate_pb.GenerateRequest(
            model_id=MODEL_ID,
            text=f"neighbour {i} " * (i + 1),
            max_tokens=8 + 5 * i,
            temperature=0 if greedy else 0.7,
            top_k=40,
        )

    alone = (await generate_all(generate, seeded))[2]
    compositions = [
        [neighbour(i, greedy=True) for i in range(3)],
        [neighbour(i, greedy=False) for i in range(7)],
    ]
    for others in compositions:
        results = await asyncio.gather(
            *(generate_all(generate, r) for r in others[:2]),
            generate_all(generate, seeded),
            *(generate_all(generate, r) for r in others[2:]),
        )
        assert results[2][2] == alone


async def test_two_models_generate_concurrently(generate, models, model_path, server):
    source = model_pb.ModelSource(local_path=str(model_path))
    await models.LoadModel(model_pb.LoadModelRequest(model_id="twin", source=source))
    try:
        requests = [
            generate_pb.GenerateRequest(model_id=m, text="Hello", max_tokens=12, temperature=0)
            for m in (MODEL_ID, "twin", MODEL_ID, "twin")
        ]
        results = await asyncio.gather(*(generate_all(generate, r) for r in requests))
        # Same weights, same greedy prompt: each model's batch gives the same tokens.
        assert len({tuple(ids) for _, _, ids in results}) == 1
        assert all(len(ids) == 12 for _, _, ids in results)
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="twin"))


async def test_a_lagging_reader_gets_tokens_coalesced_not_lost(generate, server_address):
    """Once HTTP/2 flow control stops the server's writes, queued tokens merge into one message."""
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Hello", max_tokens=60, temperature=0
    )
    _, text, ids = await generate_all(generate, request)
    # A receive window of a few hundred bytes, so a client that stops reading blocks the server.
    options = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(server_address, options=options) as channel:
        call = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(request)
        responses = [await call.read()]
        await asyncio.sleep(1.0)  # the engine finishes meanwhile
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
    assert [t for r in responses for t in r.token_ids] == ids
    assert "".join(r.text for r in responses) == text
    assert len(responses) < len(ids) // 2
