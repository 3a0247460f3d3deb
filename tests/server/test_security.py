"""Security of the wire: TLS and mutual TLS with rotation, bearer tokens, per-client stream
limits and the request size limit, through real servers on 127.0.0.1."""

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import yaml
from conftest import start_app
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import STARTUP_SECONDS, child_env, start_server, stop_server
from wire_helpers import (
    error_info,
    reason,
    retry_seconds,
    rpc_error,
    wait_for_subscribers,
    wait_until,
)

from mlx_serving.server import cli
from mlx_serving.server.auth import (
    TOKENS_RECHECK_SECONDS,
    Scope,
    TokenError,
    TokenStore,
    bearer_token,
    client_address,
    token_store,
)
from mlx_serving.server.config import ConfigError, load_config
from mlx_serving.server.tls import ServerCertificates
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

# The servers run on the session loop, as conftest.py starts them.
session_loop = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
ADMIN = "admin-3f9c2e"
READER = "reader-81d07a"
# A failed handshake is retried by the channel until its deadline; this bounds each attempt.
REFUSED_SECONDS = 3


# ---- certificates ---------------------------------------------------------------------------


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """NAME.pem and NAME.key, each replaced in one step, as rotation tools do."""
        paths = (directory / f"{name}.pem", directory / f"{name}.key")
        for path, data in zip(paths, (self.cert_pem(), self.key_pem()), strict=True):
            staged = path.with_suffix(".new")
            staged.write_bytes(data)
            os.replace(staged, path)
        return paths


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(days=1))
        .not_valid_after(now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued, name: str, *, server: bool, serial: int | None = None, expired: bool = False
) -> Issued:
    """A leaf for the server (localhost, 127.0.0.1) or a client, signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    ends = now() - datetime.timedelta(days=1) if expired else now() + datetime.timedelta(days=30)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(days=2))
        .not_valid_after(ends)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass
class Pki:
    directory: Path
    ca: Issued
    other_ca: Issued
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client(self, ca: Issued | None = None, expired: bool = False) -> Issued:
        return issue(ca or self.ca, "client", server=False, expired=expired)


@pytest.fixture
def pki(tmp_path) -> Pki:
    ca, other_ca = make_ca("test CA"), make_ca("another CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    cert_file, key_file = issue(ca, "server", server=True, serial=1).write(tmp_path, "server")
    return Pki(tmp_path, ca, other_ca, ca_file, cert_file, key_file)


def tls_channel(address: str, trusted: Issued, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted.cert_pem(),
        private_key=client.key_pem() if client else None,
        certificate_chain=client.cert_pem() if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


async def list_models(channel: grpc.aio.Channel, token: str | None = None):
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = model_grpc.ModelServiceStub(channel)
    return await stub.ListModels(
        model_pb.ListModelsRequest(), metadata=metadata, timeout=REFUSED_SECONDS
    )


async def refused_handshake(channel: grpc.aio.Channel) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_models(channel)
    assert refused.value.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ), refused.value


async def served_serial(port: int, ca_file: Path) -> int:
    """The serial of the certificate a new TLS connection to the port is shown."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.transport.abort()  # the server's HTTP/2 preface makes a clean TLS close fail


@pytest_asyncio.fixture(loop_scope="session")
async def serve(model_path):
    """A factory of servers with the test model and ServingApp options, stopped afterwards."""
    apps = []

    async def make(**options):
        apps.append(await start_app(model_path, **options))
        return apps[-1]

    yield make
    for app in apps:
        await app.stop(0)


# ---- TLS ------------------------------------------------------------------------------------


@session_loop
async def test_tls_serves_clients_that_trust_its_ca(serve, pki):
    app = await serve(certificates=ServerCertificates(pki.cert_file, pki.key_file))
    async with tls_channel(app.address, pki.ca) as channel:
        listed = await list_models(channel)
    assert [m.model_id for m in listed.models] == [MODEL_ID]
    await refused_handshake(tls_channel(app.address, pki.other_ca))
    await refused_handshake(grpc.aio.insecure_channel(app.address))


@session_loop
async def test_mutual_tls_refuses_clients_without_a_valid_certificate(serve, pki):
    certificates = ServerCertificates(pki.cert_file, pki.key_file, pki.ca_file)
    app = await serve(certificates=certificates)
    async with tls_channel(app.address, pki.ca, pki.client()) as channel:
        assert (await list_models(channel)).models
    await refused_handshake(tls_channel(app.address, pki.ca))
    await refused_handshake(tls_channel(app.address, pki.ca, pki.client(pki.other_ca)))
    await refused_handshake(tls_channel(app.address, pki.ca, pki.client(expired=True)))


@session_loop
async def test_a_rotated_certificate_is_served_to_new_connections(serve, pki):
    app = await serve(certificates=ServerCertificates(pki.cert_file, pki.key_file))
    assert await served_serial(app.port, pki.ca_file) == 1

    issue(pki.ca, "server", server=True, serial=2).write(pki.directory, "server")
    app.reload()  # what SIGHUP does
    assert await served_serial(app.port, pki.ca_file) == 2

    issue(pki.ca, "server", server=True, serial=3).write(pki.directory, "server")
    assert await served_serial(app.port, pki.ca_file) == 3  # the files changed: no signal
    async with tls_channel(app.address, pki.ca) as channel:
        assert (await list_models(channel)).models


@session_loop
async def test_a_broken_rotation_keeps_the_previous_certificate(serve, pki, caplog):
    app = await serve(certificates=ServerCertificates(pki.cert_file, pki.key_file))
    pki.key_file.write_bytes(issue(pki.ca, "other", server=True).key_pem())  # no longer a pair
    assert await served_serial(app.port, pki.ca_file) == 1
    assert "not the private key" in caplog.text
    issue(pki.ca, "server", server=True, serial=4).write(pki.directory, "server")
    assert await served_serial(app.port, pki.ca_file) == 4


@session_loop
@pytest.mark.parametrize(
    ("broken", "key", "problem"),
    [
        ("cert_file", "server.tls.cert_file", "cannot read"),
        ("key_file", "server.tls.key_file", "holds no PEM private key"),
        ("client_ca_file", "server.tls.client_ca_file", "is not PEM"),
    ],
)
async def test_unusable_tls_files_are_config_errors(pki, broken, key, problem):
    files = {
        "cert_file": str(pki.cert_file),
        "key_file": str(pki.key_file),
        "client_ca_file": str(pki.ca_file),
    }
    if broken == "cert_file":
        files[broken] = str(pki.directory / "absent.pem")
    elif broken == "key_file":
        files[broken] = str(pki.cert_file)
    else:
        (pki.directory / "junk.pem").write_text("junk")
        files[broken] = str(pki.directory / "junk.pem")
    config = load_config(None, {}, {"server": {"tls": files}})
    with pytest.raises(ConfigError) as error:
        cli.make_app(config)
    assert error.value.problems[0].startswith(f"{key}: ")
    assert problem in error.value.problems[0]


# ---- tokens ---------------------------------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\n{ADMIN}\n\n{READER} generate\n")
    return path


@session_loop
async def test_calls_need_a_configured_token(serve, tokens_file):
    app = await serve(tokens=TokenStore(tokens_file))
    async with grpc.aio.insecure_channel(app.address) as channel:
        models = model_grpc.ModelServiceStub(channel)
        request = model_pb.ListModelsRequest()
        for metadata in (None, bearer("wrong"), (("authorization", f"Basic {ADMIN}"),)):
            error = await rpc_error(models.ListModels(request, metadata=metadata))
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            assert reason(error) == "UNAUTHENTICATED"
            assert error_info(error).metadata["request_id"]
        listed = await models.ListModels(request, metadata=bearer(ADMIN))
        assert [m.model_id for m in listed.models] == [MODEL_ID]
        # Past authentication: the engine answers.
        missing = models.UnloadModel(
            model_pb.UnloadModelRequest(model_id="x"), metadata=bearer(ADMIN)
        )
        assert (await rpc_error(missing)).code() is grpc.StatusCode.NOT_FOUND


@session_loop
async def test_a_generate_token_may_serve_but_not_load(serve, tokens_file):
    app = await serve(tokens=TokenStore(tokens_file))
    async with grpc.aio.insecure_channel(app.address) as channel:
        request = generate_pb.GenerateRequest(model_id=MODEL_ID, text="Hi", max_tokens=3)
        stub = generate_grpc.GenerateServiceStub(channel)
        responses = [r async for r in stub.Generate(request, metadata=bearer(READER))]
        assert sum(len(r.token_ids) for r in responses) == 3
        tokenized = await tokenize_grpc.TokenizeServiceStub(channel).Tokenize(
            tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="Hi"), metadata=bearer(READER)
        )
        assert tokenized.token_ids
        models = model_grpc.ModelServiceStub(channel)
        await models.GetModel(model_pb.GetModelRequest(model_id=MODEL_ID), metadata=bearer(READER))
        load = model_pb.LoadModelRequest(
            model_id="more", source=model_pb.ModelSource(local_path="/nowhere")
        )
        for call in (
            models.LoadModel(load, metadata=bearer(READER)),
            models.UnloadModel(
                model_pb.UnloadModelRequest(model_id=MODEL_ID), metadata=bearer(READER)
            ),
        ):
            error = await rpc_error(call)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            assert error_info(error).reason == "PERMISSION_DENIED"
            assert error_info(error).metadata["token_scope"] == "generate"
    assert [m.model_id for m in app.engine.list_models()] == [MODEL_ID]


@session_loop
async def test_an_edited_token_file_takes_effect(serve, tokens_file):
    app = await serve(tokens=TokenStore(tokens_file))
    async with grpc.aio.insecure_channel(app.address) as channel:
        tokens_file.write_text("second-token\n")
        app.reload()  # what SIGHUP does: at once
        assert (
            await rpc_error(list_models_call(channel, ADMIN))
        ).code() is grpc.StatusCode.UNAUTHENTICATED
        assert (await list_models(channel, "second-token")).models

        tokens_file.write_text("third-token\n")  # no signal: seen within a second
        await asyncio.sleep(TOKENS_RECHECK_SECONDS + 0.1)
        error = await rpc_error(list_models_call(channel, "second-token"))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (await list_models(channel, "third-token")).models


def list_models_call(channel: grpc.aio.Channel, token: str):
    return model_grpc.ModelServiceStub(channel).ListModels(
        model_pb.ListModelsRequest(), metadata=bearer(token)
    )


@session_loop
async def test_health_and_reflection_are_open_unless_protected(serve, tokens_file):
    open_app = await serve(tokens=TokenStore(tokens_file))
    closed_app = await serve(tokens=TokenStore(tokens_file), protect_health=True)
    check = health_pb2.HealthCheckRequest()
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    async with grpc.aio.insecure_channel(open_app.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = [a async for a in reflection.ServerReflectionInfo(iter([listing]))]
        assert answers[0].list_services_response.service
    async with grpc.aio.insecure_channel(closed_app.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        error = await rpc_error(health.Check(check))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (await health.Check(check, metadata=bearer(READER))).status
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [a async for a in reflection.ServerReflectionInfo(iter([listing]))]
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_tokens_parse_and_compare():
    store = token_store(None, "MY_TOKENS", {"MY_TOKENS": f"{ADMIN}, {READER} generate,"})
    assert store is not None
    assert (store.scope_of(ADMIN), store.scope_of(READER)) == (Scope.ALL, Scope.GENERATE)
    assert store.scope_of(ADMIN[:-1]) is None and store.scope_of("") is None
    assert token_store(None, None) is None
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Bearer")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert client_address("ipv4:127.0.0.1:5555") == "ipv4:127.0.0.1"
    assert client_address("ipv6:[::1]:5555") == "ipv6:[::1]"


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        ("tok admin\n", {}, 'entry 1: expected "TOKEN" or "TOKEN generate"'),
        ("# nothing\n", {}, "no tokens configured"),
        (None, {}, "$MY_TOKENS is not set or empty"),
    ],
)
def test_bad_tokens_are_refused_without_showing_them(tmp_path, text, env, problem):
    path = tmp_path / "tokens"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TokenError) as error:
        token_store(
            str(path) if text is not None else None, "MY_TOKENS" if text is None else None, env
        )
    assert problem in str(error.value)
    assert "admin" not in str(error.value)


# ---- limits ---------------------------------------------------------------------------------


def long_generation() -> generate_pb.GenerateRequest:
    return generate_pb.GenerateRequest(
        model_id=MODEL_ID, text="Once", max_tokens=100_000, temperature=0, ignore_eos=True
    )


async def open_streams(stub, count: int, metadata=None) -> list:
    """`count` running Generate streams, each past its first token."""
    streams = [stub.Generate(long_generation(), metadata=metadata) for _ in range(count)]
    for stream in streams:
        await stream.read()
    return streams


@session_loop
async def test_a_client_may_hold_only_so_many_generate_streams(serve):
    app = await serve(max_streams_per_client=2)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = generate_grpc.GenerateServiceStub(channel)
        streams = await open_streams(stub, 2)
        error = await rpc_error(stub.Generate(long_generation()))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).reason == "TOO_MANY_STREAMS"
        assert error_info(error).metadata["max_streams_per_client"] == "2"
        assert retry_seconds(error) == app.engine.config.retry_after_seconds
        for stream in streams:
            stream.cancel()
        await wait_until(lambda: not app.stream_limits.open)
        (again,) = await open_streams(stub, 1)
        again.cancel()


@session_loop
async def test_with_tokens_each_token_is_a_client(serve, tokens_file):
    app = await serve(tokens=TokenStore(tokens_file), max_streams_per_client=1)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = generate_grpc.GenerateServiceStub(channel)
        streams = await open_streams(stub, 1, bearer(ADMIN))
        error = await rpc_error(stub.Generate(long_generation(), metadata=bearer(ADMIN)))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        streams += await open_streams(stub, 1, bearer(READER))  # same address, other client
        for stream in streams:
            stream.cancel()


@session_loop
async def test_a_client_may_hold_only_so_many_subscriptions(serve):
    app = await serve(max_subscriptions_per_client=2)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = events_grpc.EventsServiceStub(channel)
        subscriptions = [stub.Subscribe(events_pb.SubscribeRequest()) for _ in range(2)]
        await wait_for_subscribers(app.engine, 2)
        error = await rpc_error(stub.Subscribe(events_pb.SubscribeRequest()))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).metadata["max_subscriptions_per_client"] == "2"
        for subscription in subscriptions:
            subscription.cancel()
        await wait_until(lambda: not app.stream_limits.open)


@session_loop
async def test_a_request_over_max_request_bytes_is_refused(serve):
    app = await serve(max_request_bytes=65536)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = tokenize_grpc.TokenizeServiceStub(channel)
        fits = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="a" * 60_000)
        assert (await stub.Tokenize(fits)).token_ids
        too_big = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="a" * 70_000)
        error = await rpc_error(stub.Tokenize(too_big))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- the process ----------------------------------------------------------------------------


def test_sighup_reads_the_token_file_again(model_path, tmp_path, tokens_file):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"security": {"tokens_file": str(tokens_file)}}))
    log = tmp_path / "server.log"
    process, address = start_server(["--config", str(config), "--model", f"tiny={model_path}"], log)
    try:
        with grpc.insecure_channel(address) as channel:
            models = model_grpc.ModelServiceStub(channel)
            models.ListModels(model_pb.ListModelsRequest(), metadata=bearer(ADMIN))
            tokens_file.write_text("after-sighup\n")
            process.send_signal(signal.SIGHUP)
            wait_for_line(log, "1 token(s) loaded")
            with pytest.raises(grpc.RpcError) as refused:
                models.ListModels(model_pb.ListModelsRequest(), metadata=bearer(ADMIN))
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            models.ListModels(model_pb.ListModelsRequest(), metadata=bearer("after-sighup"))
    finally:
        stop_server(process, log)


def wait_for_line(log: Path, text: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log.read_text()}"
        time.sleep(0.02)


def test_an_unreadable_tls_file_exits_2_without_a_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    missing = tmp_path / "missing.pem"
    tls = {"cert_file": str(missing), "key_file": str(missing)}
    config.write_text(yaml.safe_dump({"server": {"tls": tls}}))
    command = [sys.executable, "-m", "mlx_serving.server.cli", "serve", "--config", str(config)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=child_env(), timeout=STARTUP_SECONDS
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"server.tls.cert_file: cannot read {missing}: No such file or directory\n"
    )


def test_only_loopback_hosts_count_as_private():
    assert all(map(cli.is_loopback, ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost")))
    assert not any(map(cli.is_loopback, ("0.0.0.0", "::", "10.0.0.1", "example.com")))
