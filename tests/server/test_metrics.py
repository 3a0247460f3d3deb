"""Prometheus metrics: exact counts after a known sequence of RPCs, scraped over HTTP."""

import asyncio
import urllib.request
from collections.abc import Callable

import grpc
import pytest
import pytest_asyncio
from engine_probes import break_loop, probe, wait_until_idle
from prometheus_client.parser import text_string_to_metric_families
from wire_helpers import generate_all, rpc_error, wait_for_subscribers

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.observer import EngineObserver
from mlx_serving.server.app import ServingApp
from mlx_serving.server.metrics import Metrics, MetricsObserver
from mlx_serving.server.telemetry import (
    DEADLINE_SLACK_S,
    TelemetrySettings,
    final_code,
    make_telemetry,
)
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

# The async tests share the session loop of the fixtures; not a module-wide pytestmark, which
# would mark the plain test below too (a PytestWarning for each of its cases).
session_loop = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
GENERATE = "/mlx_serving.v1.GenerateService/Generate"
TOKENIZE = "/mlx_serving.v1.TokenizeService/Tokenize"
SUBSCRIBE = "/mlx_serving.v1.EventsService/Subscribe"
# These share no prefix with each other (the warm-up stays out of the prefix cache).
PROMPT = (5, 6, 7, 8, 9, 10)
OTHER_PROMPT = (300, 301, 302, 303)
# The warm-up decodes its one token in a batch step.
WARM_UP_TOKENS = 1


async def start_app(model_path, settings: TelemetrySettings) -> ServingApp:
    app = ServingApp(Engine(), "127.0.0.1", 0, telemetry=make_telemetry(settings))
    await app.start([(MODEL_ID, ModelSource(local_path=str(model_path)))])
    return app


@pytest_asyncio.fixture(loop_scope="session")
async def app(model_path):
    app = await start_app(model_path, TelemetrySettings(enabled=True, prometheus_port=0))
    yield app
    await app.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def channel(app):
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield channel


def request(prompt: tuple[int, ...], max_tokens: int, **fields) -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID,
        tokens=generate_pb.TokenIds(ids=prompt),
        max_tokens=max_tokens,
        temperature=0,
        ignore_eos=True,
        **fields,
    )


async def scrape(app: ServingApp) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, labels) → value."""
    url = f"http://{app.metrics_address}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await asyncio.to_thread(get))
        for sample in family.samples
    }


def pick(samples: dict, suffixes: tuple[str, ...]) -> dict[tuple[str, frozenset], float]:
    """The samples whose name ends with one of `suffixes` (counters, histogram counts)."""
    return {key: value for key, value in samples.items() if key[0].endswith(suffixes)}


def sample(name: str, **labels) -> tuple[str, frozenset]:
    return "mlx_serving_" + name, frozenset(labels.items())


async def scrape_until(app: ServingApp, done: Callable[[dict], bool]) -> dict:
    """Scrape until `done(samples)` or 5 s pass (an RPC ends on the server a moment after its
    client sees it end); the caller then asserts on the last scrape, showing any difference."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        samples = await scrape(app)
        if done(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.05)


@session_loop
async def test_counts_are_exact_after_a_known_sequence_of_rpcs(app, channel):
    generate = generate_grpc.GenerateServiceStub(channel)
    subscription = events_grpc.EventsServiceStub(channel).Subscribe(
        events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_GENERATION_COMPLETED])
    )
    await wait_for_subscribers(app.engine, 1)

    first, _, first_ids = await generate_all(generate, request(PROMPT, 5))
    # Continues the first one's tokens: a prefix cache hit.
    second, _, _ = await generate_all(generate, request(PROMPT + tuple(first_ids) + (11,), 3))
    invalid = await rpc_error(generate.Generate(generate_pb.GenerateRequest(model_id=MODEL_ID)))
    not_found = await rpc_error(
        tokenize_grpc.TokenizeServiceStub(channel).Tokenize(
            tokenize_pb.TokenizeRequest(model_id="missing", text="hi")
        )
    )
    cancelled = generate.Generate(request(OTHER_PROMPT, 100_000))
    cancelled_id = (await cancelled.read()).request_id
    cancelled.cancel()
    await wait_until_idle(app.engine)
    completed = [(await subscription.read()).event for _ in range(3)]
    subscription.cancel()

    assert invalid.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not_found.code() is grpc.StatusCode.NOT_FOUND
    (cancelled_tokens,) = [
        e.generation_completed.tokens_generated for e in completed if e.request_id == cancelled_id
    ]
    assert cancelled_tokens >= 1
    usages = [first[-1].usage, second[-1].usage]
    assert [u.completion_tokens for u in usages] == [5, 3]
    cached = second[-1].usage.cached_prompt_tokens
    assert cached > 0 and first[-1].usage.cached_prompt_tokens == 0
    generated = 5 + 3 + cancelled_tokens
    prompt_tokens = sum(u.prompt_tokens for u in usages) + len(OTHER_PROMPT)
    model = {"model": MODEL_ID}
    expected = {
        sample("rpc_requests_total", method=GENERATE, code="OK"): 2,
        sample("rpc_requests_total", method=GENERATE, code="INVALID_ARGUMENT"): 1,
        sample("rpc_requests_total", method=GENERATE, code="CANCELLED"): 1,
        sample("rpc_requests_total", method=TOKENIZE, code="NOT_FOUND"): 1,
        sample("rpc_requests_total", method=SUBSCRIBE, code="CANCELLED"): 1,
        sample("rpc_duration_seconds_count", method=GENERATE): 4,
        sample("rpc_duration_seconds_count", method=TOKENIZE): 1,
        sample("rpc_duration_seconds_count", method=SUBSCRIBE): 1,
        sample("generated_tokens_total", **model): generated,
        sample("prompt_tokens_total", **model): prompt_tokens,
        sample("cached_prompt_tokens_total", **model): cached,
        sample("requests_finished_total", finish_reason="max_tokens", **model): 2,
        sample("requests_finished_total", finish_reason="cancelled", **model): 1,
        sample("prefix_cache_lookups_total", result="hit"): 1,
        sample("prefix_cache_lookups_total", result="miss"): 2,
        sample("time_to_first_token_seconds_count", **model): 3,
        sample("inter_token_latency_seconds_count", **model): generated - 3,
        sample("queue_wait_seconds_count", **model): 3,
        sample("request_duration_seconds_count", **model): 3,
    }
    counted = ("_total", "_seconds_count")
    samples = await scrape_until(app, lambda samples: pick(samples, counted) == expected)
    # The engine step and batch size histograms: their counts depend on how steps fell.
    counted_exactly = {k: v for k, v in pick(samples, counted).items() if "engine_step" not in k[0]}
    assert counted_exactly == expected

    assert samples[sample("batch_size_sum", **model)] == generated + WARM_UP_TOKENS
    steps = samples[sample("engine_step_seconds_count", **model)]
    assert steps >= samples[sample("batch_size_count", **model)] >= 1
    assert samples[sample("queue_depth", **model)] == 0
    assert samples[sample("active_sequences", **model)] == 0
    assert samples[sample("models_loaded")] == 1
    assert samples[sample("prefix_cache_bytes")] > 0


@session_loop
async def test_metrics_off_installs_nothing_and_serves_no_port(model_path):
    app = await start_app(model_path, TelemetrySettings(enabled=False, prometheus_port=0))
    try:
        assert app.metrics_port is None and app.metrics_address == ""
        assert type(app.engine.observer) is EngineObserver
        assert app.telemetry.interceptors == ()
    finally:
        await app.stop(0)


@session_loop
async def test_each_telemetry_has_a_registry_and_port_of_its_own(model_path):
    settings = TelemetrySettings(enabled=True, prometheus_port=0)
    apps = [await start_app(model_path, settings) for _ in range(2)]
    try:
        assert apps[0].metrics_port != apps[1].metrics_port
        for app in apps:
            samples = await scrape(app)
            assert samples[sample("models_loaded")] == 1
            assert not pick(samples, ("rpc_requests_total",))
    finally:
        for app in apps:
            await app.stop(0)


@session_loop
async def test_a_dead_engine_thread_leaves_no_sequence_counted(model_path):
    app = await start_app(model_path, TelemetrySettings(enabled=True, prometheus_port=0))
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stream = generate_grpc.GenerateServiceStub(channel).Generate(
                request(OTHER_PROMPT, 100_000)
            )
            await stream.read()
            assert (await scrape(app))[sample("active_sequences", model=MODEL_ID)] == 1

            await probe(app.engine, break_loop)
            assert (await rpc_error(stream)).code() is grpc.StatusCode.UNAVAILABLE
        expected = {sample("rpc_requests_total", method=GENERATE, code="UNAVAILABLE"): 1}
        samples = await scrape_until(
            app,
            lambda samples: (
                pick(samples, ("rpc_requests_total",)) == expected
                and samples[sample("models_loaded")] == 0
            ),
        )
        assert pick(samples, ("rpc_requests_total",)) == expected
        # The engine never ends the sequence it was running: the app zeroes the gauges.
        assert samples[sample("active_sequences", model=MODEL_ID)] == 0
        assert samples[sample("queue_depth", model=MODEL_ID)] == 0
        assert samples[sample("models_loaded")] == 0
    finally:
        await app.stop(0)


@session_loop
async def test_an_expired_deadline_counts_as_deadline_exceeded(app, channel):
    generate = generate_grpc.GenerateServiceStub(channel)
    call = generate.Generate(request(OTHER_PROMPT, 100_000), timeout=1.0)
    await call.read()  # running in the engine before the deadline strikes, however busy the CPU
    error = await rpc_error(call)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    expected = {sample("rpc_requests_total", method=GENERATE, code="DEADLINE_EXCEEDED"): 1}
    samples = await scrape_until(
        app, lambda samples: pick(samples, ("rpc_requests_total",)) == expected
    )
    assert pick(samples, ("rpc_requests_total",)) == expected
    await wait_until_idle(app.engine)
    finished = ("requests_finished_total",)
    samples = await scrape_until(app, lambda samples: bool(pick(samples, finished)))
    assert pick(samples, finished) == {
        sample("requests_finished_total", model=MODEL_ID, finish_reason="cancelled"): 1
    }


def router(name: str) -> tuple[str, frozenset]:
    """A sample of the vLLM-named gauges a router scrapes, for the model."""
    return "vllm:" + name, frozenset({("model_name", MODEL_ID)})


ROUTER_NAMES = (
    "num_requests_waiting",
    "num_requests_running",
    "kv_cache_usage_perc",
    "gpu_cache_usage_perc",
)


@session_loop
async def test_router_gauges_have_vllm_names_and_follow_a_running_stream(app, channel):
    """The names GIE's endpoint picker reads by default, with vLLM's model_name label."""
    await wait_until_idle(app.engine)
    samples = await scrape(app)
    assert {name: samples.get(router(name)) for name in ROUTER_NAMES} == dict.fromkeys(
        ROUTER_NAMES, 0
    )
    assert samples[sample("kv_cache_budget_bytes", model=MODEL_ID)] > 0
    assert samples[sample("kv_cache_reserved_bytes", model=MODEL_ID)] == 0

    stream = generate_grpc.GenerateServiceStub(channel).Generate(request(OTHER_PROMPT, 100_000))
    await stream.read()  # running: its KV cache reserves prompt + max_tokens of the budget
    samples = await scrape_until(
        app, lambda samples: samples.get(router("kv_cache_usage_perc"), 0) > 0
    )
    assert samples[router("num_requests_running")] == 1
    assert samples[router("num_requests_waiting")] == 0
    usage = samples[router("kv_cache_usage_perc")]
    budget = samples[sample("kv_cache_budget_bytes", model=MODEL_ID)]
    reserved = samples[sample("kv_cache_reserved_bytes", model=MODEL_ID)]
    assert 0 < usage <= 1 and samples[router("gpu_cache_usage_perc")] == usage
    assert usage == min(1, reserved / budget)

    stream.cancel()
    await wait_until_idle(app.engine)
    samples = await scrape_until(
        app, lambda samples: samples.get(router("kv_cache_usage_perc")) == 0
    )
    assert {name: samples.get(router(name)) for name in ROUTER_NAMES} == dict.fromkeys(
        ROUTER_NAMES, 0
    )
    assert samples[sample("kv_cache_reserved_bytes", model=MODEL_ID)] == 0


def test_kv_usage_is_the_share_of_the_budget_and_an_unloaded_model_leaves_no_series():
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    observer.kv_cache("a", 0, 1000)
    observer.request_queued("a")
    observer.request_queued("a")
    observer.request_started("a", 0.1)
    observer.kv_cache("a", 250, 1000)
    value = metrics.registry.get_sample_value
    labels = {"model_name": "a"}
    assert value("vllm:num_requests_waiting", labels) == 1
    assert value("vllm:num_requests_running", labels) == 1
    assert value("vllm:kv_cache_usage_perc", labels) == 0.25
    # A generation larger than the whole budget runs alone: the share stays within 0..1.
    observer.kv_cache("a", 3000, 1000)
    assert value("vllm:kv_cache_usage_perc", labels) == 1
    assert value("mlx_serving_kv_cache_reserved_bytes", {"model": "a"}) == 3000

    observer.kv_cache("a", 0, 0)  # unloaded
    for name in ROUTER_NAMES:
        assert value("vllm:" + name, labels) is None
    assert value("mlx_serving_queue_depth", {"model": "a"}) is None

    # No adapters: the one LoRA series has both lists empty (a picker then skips it).
    lora = {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "0"}
    assert value("vllm:lora_requests_info", lora) > 0


class LeftContext:
    """What final_code reads of a servicer context whose client has gone."""

    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining

    def code(self):
        return None


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (None, grpc.StatusCode.CANCELLED),
        (5.0, grpc.StatusCode.CANCELLED),
        (DEADLINE_SLACK_S + 0.01, grpc.StatusCode.CANCELLED),
        # the client's clock started first: its deadline passed a moment before ours
        (DEADLINE_SLACK_S / 2, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (-1.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_a_client_leaving_at_its_deadline_counts_as_deadline_exceeded(remaining, expected):
    assert final_code(LeftContext(remaining), asyncio.CancelledError()) is expected
