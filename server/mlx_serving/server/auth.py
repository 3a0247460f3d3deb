"""Who may call the server, and how many streams each client may hold open.

`AuthInterceptor` checks the "authorization: Bearer TOKEN" metadata of every RPC before anything
else of ours runs, against every configured token in constant time. A token is "TOKEN" (every
RPC) or "TOKEN generate" (everything but LoadModel and UnloadModel). Health and reflection stay
open unless protected. The token file is read again on SIGHUP and when it changes.

`StreamLimitInterceptor` counts each client's open Generate and Subscribe streams, from start to
end whatever ends them. A client is its token when tokens are configured, else its address.

Both end a refused call with a status, set rather than raised, like ContractInterceptor, and
never raise themselves.
"""

import hmac
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from .interceptor import REQUEST_ID, end_with, log_internal
from .status import permission_denied, too_many_streams, unauthenticated

log = logging.getLogger(__name__)

TOKENS_FILE_KEY = "security.tokens_file"
TOKENS_ENV_KEY = "security.tokens_env"

# How often, at most, a request looks whether the token file changed.
TOKENS_RECHECK_SECONDS = 1.0

DEFAULT_MAX_STREAMS_PER_CLIENT = 64
DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT = 4

GENERATE_METHOD = "/mlx_serving.v1.GenerateService/Generate"
SUBSCRIBE_METHOD = "/mlx_serving.v1.EventsService/Subscribe"

# What probes and tools use: open unless security.protect_health.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# What a "generate" token may call: serving, never changing what is loaded.
GENERATE_SCOPE = (
    "/mlx_serving.v1.GenerateService/",
    "/mlx_serving.v1.TokenizeService/",
    "/mlx_serving.v1.EventsService/",
    "/mlx_serving.v1.ModelService/ListModels",
    "/mlx_serving.v1.ModelService/GetModel",
    *OPEN_SERVICES,
)


Stamp = tuple[int, int, int] | None


class Scope(StrEnum):
    ALL = "all"
    GENERATE = "generate"


@dataclass(frozen=True)
class Token:
    secret: bytes
    scope: Scope


class TokenError(Exception):
    """Tokens that cannot be read; `key` is the config key naming where they come from."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def parse_tokens(entries: Iterable[str], key: str, where: str) -> list[Token]:
    """`TOKEN` or `TOKEN generate` per entry; blank entries and `#` comments are skipped.
    A bad entry is named by its number, never by its text (it may be a secret)."""
    tokens = []
    for number, entry in enumerate(entries, 1):
        words = entry.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] != Scope.GENERATE):
            problem = f'{where}, entry {number}: expected "TOKEN" or "TOKEN generate"'
            raise TokenError(key, problem)
        scope = Scope.GENERATE if len(words) == 2 else Scope.ALL
        tokens.append(Token(words[0].encode(), scope))
    return tokens


def read_tokens_file(path: Path) -> list[Token]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise TokenError(TOKENS_FILE_KEY, f"cannot read {path}: {problem}") from None
    return parse_tokens(text.splitlines(), TOKENS_FILE_KEY, str(path))


def read_tokens_env(name: str, environ: Mapping[str, str]) -> list[Token]:
    if not environ.get(name, "").strip():
        raise TokenError(TOKENS_ENV_KEY, f"${name} is not set or empty")
    return parse_tokens(environ[name].split(","), TOKENS_ENV_KEY, f"${name}")


class TokenStore:
    """The tokens of a file and of an environment variable. The file is read again on SIGHUP
    (`reload`) and, at most once a second, when a request finds it changed; a file that no
    longer reads keeps the tokens it had."""

    def __init__(self, path: Path | None = None, env_tokens: Sequence[Token] = ()):
        self.path = path
        self._env_tokens = tuple(env_tokens)
        self._file_tokens: tuple[Token, ...] = ()
        self._stamp: Stamp = None
        self._checked_at = 0.0
        if path is not None:
            self._stamp = file_stamp(path)
            self._file_tokens = tuple(read_tokens_file(path))
            self._checked_at = time.monotonic()
        if not self._env_tokens and not self._file_tokens:
            key = TOKENS_FILE_KEY if path is not None else TOKENS_ENV_KEY
            raise TokenError(key, "no tokens configured: every call would be refused")

    def scope_of(self, token: str) -> Scope | None:
        """The token's scope, None if it is no configured token. Compared with each token in
        constant time, without stopping at a match, so timing tells nothing."""
        self._recheck()
        given = token.encode(errors="replace")
        scope = None
        for candidate in (*self._file_tokens, *self._env_tokens):
            if hmac.compare_digest(given, candidate.secret) and scope is None:
                scope = candidate.scope
        return scope

    def reload(self) -> None:
        """Read the token file now, changed or not."""
        if self.path is None:
            return
        self._stamp = file_stamp(self.path)
        try:
            tokens = read_tokens_file(self.path)
        except TokenError as exc:
            log.error("tokens not reloaded, the previous ones stay valid: %s", exc)
            return
        self._file_tokens = tuple(tokens)
        log.info("%d token(s) loaded from %s", len(tokens), self.path)
        if not tokens and not self._env_tokens:
            log.warning("%s holds no tokens: every call is refused", self.path)

    def _recheck(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked_at < TOKENS_RECHECK_SECONDS:
            return
        self._checked_at = now
        if file_stamp(self.path) != self._stamp:
            self.reload()


def file_stamp(path: Path) -> Stamp:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def token_store(
    tokens_file: str | None, tokens_env: str | None, environ: Mapping[str, str] = os.environ
) -> TokenStore | None:
    """The configured tokens; None when neither source is set (no authentication).
    Raises TokenError when a source cannot be read, or neither holds a token."""
    if not tokens_file and not tokens_env:
        return None
    env_tokens = read_tokens_env(tokens_env, environ) if tokens_env else []
    return TokenStore(Path(tokens_file) if tokens_file else None, env_tokens)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's first "authorization: Bearer TOKEN"; None if missing or not so."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenStore, protect_health: bool = False):
        self.tokens = tokens
        self.protect_health = protect_health

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        request_id = uuid.uuid4().hex
        try:
            status = self.refusal(method, handler_call_details.invocation_metadata, request_id)
        except Exception:
            status = log_internal(method, request_id)
        if status is not None:
            return refused(status, method, request_id)
        return await continuation(handler_call_details)

    def refusal(self, method: str, metadata, request_id: str) -> grpc.Status | None:
        """Why the call may not go on; None if it may."""
        if not self.protect_health and method.startswith(OPEN_SERVICES):
            return None
        token = bearer_token(metadata)
        if token is None:
            problem = 'missing or malformed "authorization: Bearer TOKEN" metadata'
            return unauthenticated(problem, request_id)
        scope = self.tokens.scope_of(token)
        if scope is None:
            return unauthenticated("the bearer token is not valid", request_id)
        if scope is Scope.GENERATE and not method.startswith(GENERATE_SCOPE):
            return permission_denied(method, str(scope), request_id)
        return None


def refused(status: grpc.Status, method: str, request_id: str) -> grpc.RpcMethodHandler:
    """A handler that only ends the call with `status`, taking requests as reflection (the
    only request-streaming RPC) sends them, or as one message."""

    async def end(request, context: grpc.aio.ServicerContext) -> None:
        REQUEST_ID.set(request_id)
        end_with(context, status)

    if method.endswith("/ServerReflectionInfo"):
        return grpc.stream_unary_rpc_method_handler(end)
    return grpc.unary_unary_rpc_method_handler(end)


@dataclass(frozen=True)
class StreamLimit:
    """At most `most` streams of a method per client; `setting` names the config key."""

    most: int
    setting: str
    what: str


def stream_limits(max_streams: int, max_subscriptions: int) -> dict[str, StreamLimit]:
    return {
        GENERATE_METHOD: StreamLimit(max_streams, "max_streams_per_client", "Generate streams"),
        SUBSCRIBE_METHOD: StreamLimit(
            max_subscriptions, "max_subscriptions_per_client", "Subscribe streams"
        ),
    }


def client_address(peer: str) -> str:
    """The peer without its port: "ipv4:127.0.0.1:5555" → "ipv4:127.0.0.1"."""
    address, _, port = peer.rpartition(":")
    return address if address and port.isdigit() else peer


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limits: Mapping[str, StreamLimit], by_token: bool, retry_after: float):
        self.limits = dict(limits)
        self.by_token = by_token
        self.retry_after = retry_after
        self.open: Counter[tuple[str, str]] = Counter()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        limit = self.limits.get(method)
        if limit is None or handler is None or handler.unary_stream is None:
            return handler
        try:
            token = bearer_token(handler_call_details.invocation_metadata)
            client = token if self.by_token and token else None
            return grpc.unary_stream_rpc_method_handler(
                self._counted(handler.unary_stream, method, limit, client),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        except Exception:
            request_id = uuid.uuid4().hex
            return refused(log_internal(method, request_id), method, request_id)

    def _counted(
        self, behavior: Callable, method: str, limit: StreamLimit, token: str | None
    ) -> Callable:
        async def counted(request, context: grpc.aio.ServicerContext):
            key = (method, token or client_address(context.peer()))
            if self.open[key] >= limit.most:
                request_id = uuid.uuid4().hex
                REQUEST_ID.set(request_id)
                status = too_many_streams(
                    limit.what, limit.setting, limit.most, self.retry_after, request_id
                )
                end_with(context, status)
                return None
            self.open[key] += 1
            try:
                return await behavior(request, context)
            finally:
                self.open[key] -= 1
                if not self.open[key]:
                    del self.open[key]

        return counted
