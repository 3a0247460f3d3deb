"""Requests the contract accepts, sent as an attacker would: none may take the server down,
freeze the other streams, leak, or answer with a status that misleads.

Each test is a regression test for something seen through the real server.
"""

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from engine_probes import break_steps, poison_seed, probe
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_variants import model_variant
from wire_helpers import field_violations, rpc_error

from mlx_serving.engine.config import EngineConfig
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
VOCAB = 2048
HUGE_TEXT = "hello world, " * (4 * 1024 * 1024 // 13)  # just under the contract's 4 MiB
# Health must answer this fast whatever else the server is doing.
HEALTH_SECONDS = 0.1


def bystander() -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Once upon a time", max_tokens=100_000, ignore_eos=True
    )


async def health_latency(channel, rounds: int = 10) -> float:
    """The second slowest of `rounds` health checks, a few ms apart; the slowest must still be
    under half a second: on a shared 2-core machine one check may meet a pause of the host's."""
    stub = health_pb2_grpc.HealthStub(channel)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    times.sort()
    assert times[-1] < 0.5, times
    return times[-2] if len(times) > 1 else times[-1]


async def tokens_during(stream, seconds: float) -> tuple[int, float]:
    """Tokens a running stream received in `seconds`, and the longest gap between messages."""
    count, gap, last = 0, 0.0, time.perf_counter()
    deadline = last + seconds
    while time.perf_counter() < deadline:
        response = await stream.read()
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
        count += len(response.token_ids)
    return count, gap


async def test_a_top_k_past_the_vocabulary_samples_and_harms_no_one(generate, server):
    witness = generate.Generate(bystander())
    await witness.read()
    for top_k in (VOCAB - 1, VOCAB, VOCAB + 1, 100_000):
        request = generate_pb.GenerateRequest(
            model_id=MODEL_ID, text="hi", top_k=top_k, temperature=1.0, max_tokens=4, seed=1
        )
        responses = [r async for r in generate.Generate(request)]
        assert responses[-1].finish_reason != generate_pb.FINISH_REASON_UNSPECIFIED
    # top_k at the vocabulary keeps every token: the same as no top_k at all.
    same = [
        generate_pb.GenerateRequest(
            model_id=MODEL_ID, text="hi", top_k=k, max_tokens=8, seed=7, ignore_eos=True
        )
        for k in (0, VOCAB, 100_000)
    ]
    outputs = [[t async for r in generate.Generate(q) for t in r.token_ids] for q in same]
    assert outputs[0] == outputs[1] == outputs[2]
    assert (await tokens_during(witness, 0.2))[0] > 0
    witness.cancel()
    assert server.engine.alive


async def test_a_sequence_whose_sampling_raises_fails_alone(generate, server):
    await probe(server.engine, poison_seed, 666)
    witness = generate.Generate(bystander())
    await witness.read()
    poisoned = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", seed=666, max_tokens=5)
    error = await rpc_error(generate.Generate(poisoned))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "request id" in error.details() and "poison" not in error.details()
    assert (await tokens_during(witness, 0.2))[0] > 0
    witness.cancel()
    assert server.engine.alive


async def test_a_failing_batch_step_ends_its_streams_and_the_engine_serves_on(fresh_server):
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        generate = generate_grpc.GenerateServiceStub(channel)
        stream = generate.Generate(bystander())
        await stream.read()
        await probe(app.engine, break_steps, MODEL_ID)
        error = await rpc_error(stream)
        assert error.code() is grpc.StatusCode.INTERNAL and "request id" in error.details()
        again = generate_pb.GenerateRequest(model_id=MODEL_ID, text="hi", max_tokens=3)
        responses = [r async for r in generate.Generate(again)]
        assert responses[-1].finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
        assert app.engine.alive
        assert await health_latency(channel, 2) < 1


async def test_huge_prompts_are_refused_without_freezing_streams_or_health(
    generate, channel, server
):
    witness = generate.Generate(bystander())
    await witness.read()
    chat = generate_pb.ChatPrompt(
        messages=[generate_pb.ChatMessage(role="user", content=HUGE_TEXT)]
    )
    huge = [
        generate_pb.GenerateRequest(model_id=MODEL_ID, text=HUGE_TEXT),
        generate_pb.GenerateRequest(model_id=MODEL_ID, chat=chat),
    ] * 2
    # Sent from threads on a channel of their own: the test's event loop is the server's too,
    # and serializing 16 MiB on it would be the test's delay, not the server's.
    calls = [asyncio.ensure_future(asyncio.to_thread(refused, server, r)) for r in huge]
    assert await health_latency(channel) < HEALTH_SECONDS
    tokens, gap = await tokens_during(witness, 0.3)
    errors = await asyncio.gather(*calls)
    for error, request in zip(errors, huge, strict=True):
        field = "text" if request.HasField("text") else "chat.messages"
        assert [f for f, _ in field_violations(error)] == [field], error
    assert tokens > 0 and gap < 0.5
    witness.cancel()


def refused(server, request: generate_pb.GenerateRequest) -> grpc.RpcError:
    """The error a Generate sent on a blocking channel of its own ends with."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            list(generate_grpc.GenerateServiceStub(channel).Generate(request, timeout=30))
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


async def test_rejected_huge_prompts_leave_nothing_behind(generate, server):
    """With the collector off, a reference cycle holding a 4 MiB prompt would stay."""

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    request = generate_pb.GenerateRequest(model_id=MODEL_ID, text=HUGE_TEXT)
    await rpc_error(generate.Generate(request))  # warm: buffers grpc keeps
    gc.collect()
    before = rss()
    gc.disable()
    try:
        for _ in range(50):
            await rpc_error(generate.Generate(request))
        grown = rss() - before
    finally:
        gc.enable()
    assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB over 50 rejected 4 MiB prompts"
    big = [o for o in gc.get_objects() if isinstance(o, generate_pb.GenerateRequest)]
    assert not [o for o in big if o is not request and len(o.text) > 1 << 20]


async def test_a_looping_chat_template_is_stopped_and_other_models_go_on(
    fresh_server, model_path, tmp_path
):
    app = await fresh_server(EngineConfig(chat_template_timeout_seconds=0.5))
    looping = model_variant(
        model_path,
        tmp_path / "looping",
        chat_template="{% for i in range(100000) %}{% for j in range(100000) %}x"
        "{% endfor %}{% endfor %}",
    )
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(looping))
        await models.LoadModel(model_pb.LoadModelRequest(model_id="looping", source=source))
        generate = generate_grpc.GenerateServiceStub(channel)
        witness = generate.Generate(bystander())
        await witness.read()
        chat = generate_pb.ChatPrompt(messages=[generate_pb.ChatMessage(role="user", content="x")])
        request = generate_pb.GenerateRequest(model_id="looping", chat=chat)
        started = time.monotonic()
        calls = [asyncio.ensure_future(rpc_error(generate.Generate(request))) for _ in range(2)]
        assert await health_latency(channel) < HEALTH_SECONDS
        tokens, gap = await tokens_during(witness, 0.3)
        for error in await asyncio.gather(*calls):
            ((field, description),) = field_violations(error)
            assert field == "chat.messages" and "0.5 s" in description
        # Stopped at 0.5 s each, one at a time, a new worker started for the second.
        assert time.monotonic() - started < 15
        assert tokens > 0 and gap < 0.5
        # The worker was replaced: the same model renders a good template on.
        plain = generate_pb.GenerateRequest(model_id=MODEL_ID, chat=chat, max_tokens=2)
        assert [r async for r in generate.Generate(plain)][-1].finish_reason
        witness.cancel()


async def test_a_stopped_idle_engine_is_found_wedged(fresh_server):
    app = await fresh_server(EngineConfig(wedge_timeout_seconds=1.0))
    async with grpc.aio.insecure_channel(app.address) as channel:
        os.kill(app.engine._process.pid, signal.SIGSTOP)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            started = time.monotonic()
            while time.monotonic() - started < 5:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - started < 3
        finally:
            if app.engine._process.is_alive():
                os.kill(app.engine._process.pid, signal.SIGCONT)


async def test_generate_racing_unload_is_never_internal(fresh_server, model_path):
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        generate = generate_grpc.GenerateServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(model_path))
        codes = []
        for _ in range(3):
            await models.LoadModel(model_pb.LoadModelRequest(model_id="racer", source=source))
            request = generate_pb.GenerateRequest(model_id="racer", text="hi", max_tokens=20)

            async def one(request=request):
                try:
                    async for _ in generate.Generate(request):
                        pass
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    return error.code()

            calls = [asyncio.ensure_future(one()) for _ in range(40)]
            await asyncio.sleep(0.01)
            await models.UnloadModel(model_pb.UnloadModelRequest(model_id="racer"))
            codes += await asyncio.gather(*calls)
        allowed = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}
        assert set(codes) <= allowed, set(codes)
        assert grpc.StatusCode.NOT_FOUND in codes or grpc.StatusCode.UNAVAILABLE in codes


@pytest.mark.parametrize("bad", [100, 1024])
async def test_many_violations_make_a_small_invalid_argument(generate, bad):
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="hi", logit_bias={i: 1000.0 for i in range(bad)}
    )
    error = await rpc_error(generate.Generate(request))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert len(violations) <= 11 and violations[-1] == ("", f"and {bad - 10} more violations")
    trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata())
    assert trailers + len(error.details()) < 8192


async def test_a_million_bad_token_ids_are_counted_not_listed(generate):
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, tokens=generate_pb.TokenIds(ids=[VOCAB + 1] * 1_000_000)
    )
    error = await rpc_error(generate.Generate(request))
    violations = field_violations(error)
    assert violations[0][0] == "tokens.ids[0]"
    assert violations[-1] == ("", f"and {1_000_000 - 10} more violations")


async def test_tokenize_refuses_what_is_too_big_saying_why(fresh_server):
    config = EngineConfig(max_tokenize_bytes=64 << 10, max_concurrent_tokenize=2)
    app = await fresh_server(config)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = tokenize_grpc.TokenizeServiceStub(channel)
        too_long = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="x" * (65 << 10))
        error = await rpc_error(stub.Tokenize(too_long))
        assert [f for f, _ in field_violations(error)] == ["text"]
        fits = tokenize_pb.TokenizeRequest(
            model_id=MODEL_ID, text="hello world " * 5000, return_pieces=True
        )
        results = await asyncio.gather(
            *(stub.Tokenize(fits) for _ in range(6)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refused and all(r.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), (
            refused
        )
        assert any(isinstance(r, tokenize_pb.TokenizeResponse) for r in results)


async def test_unload_ends_streams_with_a_cancelled_message_then_unavailable(
    fresh_server, model_path
):
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(model_path))
        await models.LoadModel(model_pb.LoadModelRequest(model_id="gone", source=source))
        request = bystander()
        request.model_id = "gone"
        stream = generate_grpc.GenerateServiceStub(channel).Generate(request)
        first = await stream.read()
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="gone"))
        responses = [first]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                responses.append(await stream.read())
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        last = responses[-1]
        assert last.finish_reason == generate_pb.FINISH_REASON_CANCELLED
        assert last.usage.completion_tokens >= len(first.token_ids)


async def test_runtime_status_after_a_dead_engine_counts_no_models(fresh_server):
    from engine_probes import break_loop

    app = await fresh_server(EngineConfig(max_engine_restarts=0))  # dead stays dead
    async with grpc.aio.insecure_channel(app.address) as channel:
        call = events_grpc.EventsServiceStub(channel).Subscribe(
            events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_RUNTIME_STATUS])
        )
        await asyncio.sleep(0.1)
        await probe(app.engine, break_loop)
        await app.engine.wait_stopped()
        await app.stop(0)
        statuses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            statuses.append(response.event.runtime_status)
    assert [s.status for s in statuses][-2:] == [
        events_pb.RUNTIME_STATE_ERROR,
        events_pb.RUNTIME_STATE_SHUTDOWN,
    ]
    assert all(s.models_loaded == 0 for s in statuses[-2:])


async def test_no_ready_status_follows_shutdown(fresh_server):
    app = await fresh_server()
    async with grpc.aio.insecure_channel(app.address) as channel:
        call = events_grpc.EventsServiceStub(channel).Subscribe(
            events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_RUNTIME_STATUS])
        )
        stream = generate_grpc.GenerateServiceStub(channel).Generate(
            generate_pb.GenerateRequest(
                model_id=MODEL_ID, text="hi", max_tokens=30, ignore_eos=True
            )
        )
        await stream.read()
        await app.stop(5)
        statuses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            statuses.append(response.event.runtime_status.status)
    assert statuses[-1] == events_pb.RUNTIME_STATE_SHUTDOWN, statuses


async def test_a_path_too_long_is_not_found_with_a_short_message(models):
    source = model_pb.ModelSource(local_path="/tmp/" + "a" * 4090)
    error = await rpc_error(models.LoadModel(model_pb.LoadModelRequest(source=source)))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "File name too long" in error.details() and len(error.details()) < 400
    assert "None" not in error.details()


async def test_a_model_without_a_context_length_stops_at_the_configured_one(
    fresh_server, model_path, tmp_path
):
    app = await fresh_server(EngineConfig(default_context_length=64))
    unbounded = model_variant(model_path, tmp_path / "unbounded", drop=("max_position_embeddings",))
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        source = model_pb.ModelSource(local_path=str(unbounded))
        await models.LoadModel(model_pb.LoadModelRequest(model_id="unbounded", source=source))
        request = generate_pb.GenerateRequest(
            model_id="unbounded", text="hello", max_tokens=1000, ignore_eos=True
        )
        responses = [r async for r in generate_grpc.GenerateServiceStub(channel).Generate(request)]
        usage = responses[-1].usage
        assert responses[-1].finish_reason == generate_pb.FINISH_REASON_CONTEXT_LENGTH
        assert usage.prompt_tokens + usage.completion_tokens == 64


async def test_concurrent_megabyte_tokenizes_leave_health_and_streams_alone(
    tokenize, generate, channel
):
    witness = generate.Generate(bystander())
    await witness.read()
    request = tokenize_pb.TokenizeRequest(
        model_id=MODEL_ID, text="hello world, " * (1_000_000 // 13), return_pieces=True
    )
    calls = [asyncio.ensure_future(tokenize.Tokenize(request)) for _ in range(4)]
    assert await health_latency(channel) < HEALTH_SECONDS
    tokens, gap = await tokens_during(witness, 0.3)
    for response in await asyncio.gather(*calls):
        assert len(response.pieces) == len(response.token_ids) > 100_000
    assert tokens > 0 and gap < 0.5
    witness.cancel()
