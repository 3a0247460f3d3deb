"""The aio server: the four services, health, reflection, and the order of start and stop.

Health says SERVING only once the engine runs, the preloaded models are loaded and a warm-up
token was generated; it says NOT_SERVING again as soon as the engine fails (crash or wedge)
or a graceful shutdown begins, and SERVING again once a restarted engine has its models back.
"""

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.observer import EngineObserver
from mlx_serving.v1 import (
    events_service_pb2,
    events_service_pb2_grpc,
    generate_service_pb2,
    generate_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)

from .auth import (
    DEFAULT_MAX_STREAMS_PER_CLIENT,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
    AuthInterceptor,
    StreamLimitInterceptor,
    TokenStore,
    stream_limits,
)
from .interceptor import ContractInterceptor
from .reflection import enable_reflection
from .services import EventsService, GenerateService, ModelService, TokenizeService
from .telemetry import Telemetry
from .tls import ServerCertificates

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051

# The contract allows a 4 MiB text prompt and 2^20 token ids (up to 5 bytes each on the
# wire); gRPC's default 4 MiB receive limit would refuse them before validation.
MAX_RECEIVE_MESSAGE_BYTES = 16 << 20
# What a default gRPC client accepts: a bigger response would fail there with
# RESOURCE_EXHAUSTED, so the server refuses it first, saying why.
DEFAULT_MAX_RESPONSE_BYTES = 4 << 20

# After the engine has ended every generation, what handlers get to send their last message.
STREAM_FLUSH_SECONDS = 0.5

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# (module with the descriptor, servicer class, function adding it to a server)
SERVICES = (
    (model_service_pb2, ModelService, model_service_pb2_grpc.add_ModelServiceServicer_to_server),
    (
        generate_service_pb2,
        GenerateService,
        generate_service_pb2_grpc.add_GenerateServiceServicer_to_server,
    ),
    (
        tokenize_service_pb2,
        TokenizeService,
        tokenize_service_pb2_grpc.add_TokenizeServiceServicer_to_server,
    ),
    (
        events_service_pb2,
        EventsService,
        events_service_pb2_grpc.add_EventsServiceServicer_to_server,
    ),
)

# Fully-qualified names, from the generated descriptors.
SERVICE_NAMES = tuple(
    service.full_name
    for module, _, _ in SERVICES
    for service in module.DESCRIPTOR.services_by_name.values()
)


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's aio servicer (1.85 has Check and Watch only), with `List`."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service with a status (the server's overall one under ""), as Check answers."""
        statuses = {
            service: health_pb2.HealthCheckResponse(status=status)
            for service, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


class ServingApp:
    """Owns the engine's life cycle and the gRPC server in front of it.

    With `telemetry`, its interceptors go ahead of ContractInterceptor (so spans and RPC counts
    see validation and the final status) and its observer goes into the engine. With `tokens`,
    AuthInterceptor comes next, so a call without a valid token does no work; then the
    per-client stream limits, then ContractInterceptor.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        telemetry: Telemetry | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        *,
        certificates: ServerCertificates | None = None,
        tokens: TokenStore | None = None,
        protect_health: bool = False,
        max_request_bytes: int = MAX_RECEIVE_MESSAGE_BYTES,
        max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT,
        max_subscriptions_per_client: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
    ):
        self.engine = engine
        self.host = host
        self.requested_port = port
        self.port = 0
        self.telemetry = telemetry
        self.certificates = certificates
        self.tokens = tokens
        self.stream_limits = StreamLimitInterceptor(
            stream_limits(max_streams_per_client, max_subscriptions_per_client),
            by_token=tokens is not None,
            retry_after=engine.config.retry_after_seconds,
        )
        interceptors = [self.stream_limits, ContractInterceptor(max_response_bytes)]
        if tokens is not None:
            interceptors.insert(0, AuthInterceptor(tokens, protect_health))
        if telemetry is not None:
            install_observer(engine, telemetry.observer)
            interceptors[:0] = telemetry.interceptors
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_request_bytes),
                # Linux gRPC sets SO_REUSEPORT: a second server would share the port silently.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.servicers = {servicer: servicer(engine) for _, servicer, _ in SERVICES}
        for _, servicer, add_to_server in SERVICES:
            add_to_server(self.servicers[servicer], self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.reflected_services = enable_reflection(
            self.server, (*SERVICE_NAMES, health.SERVICE_NAME)
        )
        self._watcher: asyncio.Task | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        """HOST:PORT as bound (the real port when asked for port 0)."""
        return host_port(self.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        """The bound Prometheus port once started; None when metrics are off."""
        return self.telemetry.prometheus_port if self.telemetry else None

    @property
    def metrics_address(self) -> str:
        """HOST:PORT serving /metrics once started; "" when metrics are off."""
        if self.telemetry is None or self.metrics_port is None:
            return ""
        return host_port(self.telemetry.prometheus_host, self.metrics_port)

    async def start(
        self,
        models: Iterable[tuple[str, ModelSource] | tuple[str, ModelSource, str, int | None]] = (),
    ) -> int:
        """Listen, start the engine, load `models` ((id or "", source) pairs, or (id, source,
        draft model id, draft tokens) with a draft model) and warm up.

        Returns the bound port. On failure the caller still calls `stop`.
        """
        await self._set_health(NOT_SERVING)  # the aio HealthServicer starts out SERVING
        self.port = self._add_port(host_port(self.host, self.requested_port))
        if self.telemetry is not None:
            self.telemetry.start()
        await self.engine.start()
        await self.server.start()
        for model_id, source, *draft in models:
            started = time.monotonic()
            draft_id, tokens = (str(draft[0]), cast(int | None, draft[1])) if draft else ("", None)
            info = await self.engine.load_model(source, model_id, False, draft_id, tokens)
            seconds = time.monotonic() - started
            where = ModelService.source_text(source)
            log.info("loaded model %s from %s in %.1f s", info.model_id, where, seconds)
        await self.engine.warm_up()
        await self._set_health(SERVING)
        self._watcher = asyncio.create_task(self._watch_engine(), name="mlx-serving-engine-watch")
        return self.port

    def reload(self) -> None:
        """SIGHUP: the TLS files and the token file, read again now."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.tokens is not None:
            self.tokens.reload()

    def _add_port(self, address: str) -> int:
        if self.certificates is None:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, self.certificates.credentials())

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """NOT_SERVING; new requests still taken for `drain_delay` seconds (load balancers that
        watch health stop sending meanwhile); then in-flight generations get `grace` seconds
        to finish before they end."""
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if drain_delay:
            log.info("health is NOT_SERVING; new requests are refused in %g s", drain_delay)
            await asyncio.sleep(drain_delay)
        await self.engine.shutdown(grace)
        await self.server.stop(STREAM_FLUSH_SECONDS)
        if self._watcher is not None:
            await self._watcher
        if self.telemetry is not None:
            # Stopping the metrics HTTP server and flushing spans block briefly.
            await asyncio.to_thread(self.telemetry.shutdown)

    async def _watch_engine(self) -> None:
        """Health follows the engine: NOT_SERVING from a failure until a restart has its models
        ready again, SERVING then; the watch ends when the engine gives up or stops."""
        serving = True
        while not self._stopping:
            if self.engine.alive != serving:
                serving = self.engine.alive
                await self._follow_engine(serving)
            elif self.engine.gave_up:
                log.error("the engine failed too often in a row: it is not restarted again")
                return
            else:
                await self.engine.wait_state_change()

    async def _follow_engine(self, alive: bool) -> None:
        if alive:
            log.warning("the engine is back: health is SERVING")
            await self._set_health(SERVING)
            return
        log.error("the engine stopped: health is NOT_SERVING")
        if self.telemetry is not None:
            self.telemetry.engine_stopped()
        await self._set_health(NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)


def install_observer(engine: Engine, observer: EngineObserver) -> None:
    """Give the (not yet started) engine the telemetry's observer, never replacing another."""
    if engine.observer is not observer and type(engine.observer) is not EngineObserver:
        raise ValueError("the engine already has an observer of its own")
    engine.observer = observer


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
