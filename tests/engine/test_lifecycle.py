import asyncio
import contextlib
import ctypes.util
import os
import shutil
import time

import pytest
from engine_probes import (
    break_loop,
    count_steps_while_loading,
    environment_variable,
    hold_exit,
    loaded_libraries,
    probe,
    set_load_chunk_bytes,
    steps_while_loading,
    wait_until_idle,
)

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import (
    EngineUnavailable,
    ModelAlreadyExists,
    ModelLoadFailed,
    ModelNotFound,
    RequestAborted,
)
from mlx_serving.engine.events import (
    GenerationCompleted,
    GenerationStarted,
    ModelLoaded,
    ModelUnloaded,
    TokenGenerated,
)
from mlx_serving.engine.models import ModelSource, ModelState
from mlx_serving.engine.requests import GenerationRequest, SamplingParams
from mlx_serving.engine.worker import backend_conflict, installed_mlx_backends

MODEL_ID = "tiny"  # loaded by the engine fixture in conftest.py

LONG = GenerationRequest(MODEL_ID, text="Tell me a story", max_tokens=100_000)


async def test_closing_a_stream_removes_its_sequence(engine):
    stream = engine.generate(LONG)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    await wait_until_idle(engine)


async def test_cancelling_before_admission_leaves_nothing_behind(engine):
    async def consume():
        async for _ in engine.generate(LONG):
            pass

    tasks = [asyncio.create_task(consume()) for _ in range(6)]
    await asyncio.sleep(0)
    for i, task in enumerate(tasks):
        if i % 2 == 0:
            task.cancel()
    await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_until_idle(engine)


async def test_load_list_unload(engine, model_path):
    info = await engine.load_model(ModelSource(local_path=str(model_path)))
    assert info.model_id == model_path.name
    assert info.state is ModelState.READY
    assert info.parameter_count > 1_000_000
    assert info.has_chat_template and info.vocab_size > 0 and info.dtype == "float32"
    with pytest.raises(ModelAlreadyExists):
        await engine.load_model(ModelSource(repo_id="acme/other"), MODEL_ID)
    # The same source under the same id is the model there.
    assert await engine.load_model(ModelSource(local_path=str(model_path))) == info
    assert [m.model_id for m in engine.list_models()] == [MODEL_ID, model_path.name]
    await engine.unload_model(model_path.name)
    with pytest.raises(ModelNotFound):
        engine.get_model(model_path.name)


async def test_loading_a_missing_directory_fails_and_keeps_nothing(engine, tmp_path):
    with pytest.raises(ModelLoadFailed):
        await engine.load_model(ModelSource(local_path=str(tmp_path / "missing")), "x")
    assert [m.model_id for m in engine.list_models()] == [MODEL_ID]


async def test_hugging_face_ids_resolve_from_the_local_cache(model_path, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny-hf" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in model_path.iterdir():
        (snapshot / file.name).symlink_to(file)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    # The engine process reads the environment it starts with.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = Engine()
    await engine.start()
    try:
        info = await engine.load_model(ModelSource(repo_id="acme/tiny-hf"))
        assert info.model_id == "tiny-hf" and info.state is ModelState.READY
        with pytest.raises(ModelLoadFailed, match="not in the Hugging Face cache"):
            await engine.load_model(ModelSource(repo_id="acme/absent"))
    finally:
        await engine.shutdown(0)


async def test_unloading_ends_in_flight_generations(engine):
    events = engine.subscribe(frozenset({GenerationCompleted}))
    stream = engine.generate(LONG)
    await anext(stream)
    await engine.unload_model(MODEL_ID)
    with pytest.raises(RequestAborted):
        async for _ in stream:
            pass
    # The engine ended it, not its client.
    assert (await anext(events)).payload.finish_reason == "aborted"
    await events.aclose()


async def test_events_follow_a_generation(engine, model_path):
    kinds = frozenset({GenerationStarted, GenerationCompleted, ModelLoaded, ModelUnloaded})
    events = engine.subscribe(kinds)
    request = GenerationRequest(
        MODEL_ID, text="hi", max_tokens=3, sampling=SamplingParams(0), request_id="r1"
    )
    async for _ in engine.generate(request):
        pass
    await engine.load_model(ModelSource(local_path=str(model_path)), "second")
    await engine.unload_model("second")
    got = [await anext(events) for _ in range(4)]
    assert [type(e.payload) for e in got] == [
        GenerationStarted,
        GenerationCompleted,
        ModelLoaded,
        ModelUnloaded,
    ]
    assert got[0].request_id == "r1" and got[1].payload.tokens_generated == 3
    assert got[0].payload.text == "hi" and got[0].payload.max_tokens == 3
    assert [e.model_id for e in got] == [MODEL_ID, MODEL_ID, "second", "second"]
    assert [e.payload.model for e in got] == [MODEL_ID, MODEL_ID, "second", "second"]
    await events.aclose()
    assert not engine.events._subscriptions


async def test_token_events_cost_nothing_without_a_token_subscriber(engine):
    everything = engine.subscribe()
    request = GenerationRequest(MODEL_ID, text="hi", max_tokens=3, sampling=SamplingParams(0))
    async for _ in engine.generate(request):
        pass
    assert engine.events.token_subscribers == 0
    kinds = []
    while not everything.subscription.queue.empty():
        kinds.append(type((await anext(everything)).payload))
    assert TokenGenerated not in kinds and GenerationCompleted in kinds
    await everything.aclose()


async def test_a_dead_engine_thread_ends_streams_and_says_so(model_path):
    engine = Engine(EngineConfig(max_engine_restarts=0))
    await engine.start()
    try:
        await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
        stream = engine.generate(LONG)
        await anext(stream)

        await probe(engine, break_loop)
        with pytest.raises(EngineUnavailable):
            async for _ in stream:
                pass
        await asyncio.wait_for(engine.wait_stopped(), 1)
        assert not engine.alive and engine.gave_up
        with pytest.raises(EngineUnavailable):
            await anext(engine.generate(LONG))
    finally:
        await engine.shutdown(0)


async def test_a_dead_engine_thread_is_restarted_with_its_models(engine):
    request = GenerationRequest(MODEL_ID, text="Hello", max_tokens=6, sampling=SamplingParams(0))
    before = [t async for c in engine.generate(request) for t in c.token_ids]
    pid = engine.process_id
    stream = engine.generate(LONG)
    await anext(stream)

    await probe(engine, break_loop)
    with pytest.raises(EngineUnavailable):
        async for _ in stream:
            pass
    assert not engine.alive
    with pytest.raises(EngineUnavailable) as refused:
        await anext(engine.generate(LONG))
    assert getattr(refused.value, "retry_after", 0) > 0  # worth retrying
    while not engine.alive:
        await asyncio.wait_for(engine.wait_state_change(), 30)
    assert engine.process_id != pid and not engine.gave_up
    assert engine.get_model(MODEL_ID).state is ModelState.READY
    assert [t async for c in engine.generate(request) for t in c.token_ids] == before


async def test_shutdown_lets_streams_finish_within_the_grace_period(engine):
    short = GenerationRequest(MODEL_ID, text="hi", max_tokens=5, sampling=SamplingParams(0))
    chunks = []

    async def consume():
        async for chunk in engine.generate(short):
            chunks.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    await engine.shutdown(5)
    await task
    assert chunks[-1].finish_reason is not None
    assert not engine.alive


async def test_the_engine_process_exits_at_once_once_stopped_whatever_its_threads_do():
    """Past its loop the engine process skips the teardown (OpenBLAS's exit handler, joining a
    thread that missed its wakeup, held it in about 1 shutdown in 50 under load): a thread that
    never ends holds nothing."""
    engine = Engine()
    await engine.start()
    process = engine._process
    await probe(engine, hold_exit)
    started = time.monotonic()
    await engine.shutdown(0)
    assert time.monotonic() - started < 10
    assert process.exitcode == 0


async def test_the_engine_process_prefills_without_cudnn_attention_unless_told(monkeypatch):
    """cuDNN's attention graph for a new prompt length stalls the batch on CUDA, so MLX is told
    not to use it; the setting, or a variable the server was started with, says otherwise."""
    variable = "MLX_CUDA_USE_CUDNN_SDPA"

    async def seen(config: EngineConfig) -> str | None:
        engine = Engine(config)
        await engine.start()
        try:
            return await probe(engine, environment_variable, variable)
        finally:
            await engine.shutdown(0)

    monkeypatch.delenv(variable, raising=False)
    assert await seen(EngineConfig()) == "0"
    assert await seen(EngineConfig(cudnn_prefill_attention=True)) == "1"
    assert variable not in os.environ  # the server's own environment is left as it was
    monkeypatch.setenv(variable, "1")
    assert await seen(EngineConfig()) == "1"


async def test_loading_a_model_does_not_hold_up_the_others(engine, model_path):
    """A load reads its weights a piece per loop turn, between the batch steps of the models
    already loaded: their streams go on while it loads."""
    await probe(engine, set_load_chunk_bytes, 1)  # one weight per turn
    await probe(engine, count_steps_while_loading)
    tokens = 0

    async def read(stream):
        nonlocal tokens
        async for chunk in stream:
            tokens += len(chunk.token_ids)

    reader = asyncio.create_task(read(engine.generate(LONG)))
    while tokens == 0:
        await asyncio.sleep(0.01)
    before = tokens
    load = asyncio.create_task(engine.load_model(ModelSource(local_path=str(model_path)), "second"))
    progress = set()
    while not load.done():
        with contextlib.suppress(ModelNotFound):  # not registered yet
            loading = engine.get_model("second")
            progress.add((loading.weight_bytes_loaded, loading.weight_bytes))
        await asyncio.sleep(0.001)
    info = await load
    during = tokens - before
    reader.cancel()
    assert info.state is ModelState.READY
    # Its progress showed while it loaded: bytes read of the weights' size.
    assert info.weight_bytes == info.weight_bytes_loaded > 0
    assert any(0 < read < size == info.weight_bytes for read, size in progress), progress
    assert during >= 5, f"only {during} tokens while the model loaded"
    # At least a step per weight read (the tiny model has 27, fused).
    assert await probe(engine, steps_while_loading) >= 27
    text = GenerationRequest("second", text="Hello", max_tokens=8, ignore_eos=True)
    assert [c async for c in engine.generate(text)][-1].usage.completion_tokens == 8
    await engine.unload_model("second")
    await wait_until_idle(engine)


async def test_a_model_whose_weights_cannot_be_read_fails_to_load(engine, model_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadFailed):
        await engine.load_model(ModelSource(local_path=str(broken)), "broken")
    assert [m.model_id for m in engine.list_models()] == [MODEL_ID]
    request = GenerationRequest(MODEL_ID, text="Hello", max_tokens=4, ignore_eos=True)
    assert [c async for c in engine.generate(request)][-1].usage.completion_tokens == 4


def test_two_mlx_backends_installed_side_by_side_are_reported():
    assert installed_mlx_backends()  # this machine runs MLX on one of them
    assert backend_conflict(["mlx-cpu"]) is None
    message = backend_conflict(["mlx-cpu", "mlx-cuda-13"])
    assert "pip uninstall -y mlx-cpu mlx-cuda-13 && pip install mlx-cuda-13==" in message


@pytest.mark.skipif(
    ctypes.util.find_library("jemalloc") is None or not os.path.exists("/proc/self/maps"),
    reason="needs jemalloc installed (Debian: libjemalloc2) and Linux's /proc",
)
async def test_the_engine_process_allocates_with_jemalloc_unless_told(monkeypatch):
    """glibc's heap fragments under the engine's changing buffers (docs/RELIABILITY.md, soak):
    the engine process is started with jemalloc preloaded; the server's own environment and
    the preloads it already had are kept."""

    async def maps(config: EngineConfig) -> tuple[str, str | None]:
        engine = Engine(config)
        await engine.start()
        try:
            libraries = await probe(engine, loaded_libraries)
            return libraries, await probe(engine, environment_variable, "LD_PRELOAD")
        finally:
            await engine.shutdown(0)

    before = os.environ.get("LD_PRELOAD")
    libraries, preload = await maps(EngineConfig())
    assert "libjemalloc" in libraries
    assert preload is not None and preload.startswith("libjemalloc")
    if before:
        assert preload.endswith(before)
    assert os.environ.get("LD_PRELOAD") == before
    libraries, _ = await maps(EngineConfig(jemalloc=False))
    assert "libjemalloc" not in libraries
