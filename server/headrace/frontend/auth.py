"""Bearer-token authentication and per-token scopes, as one thin server interceptor.

A call carries `authorization: Bearer <token>` metadata. Headrace keeps only each token's
SHA-256 (`server.auth.tokens`, `server.auth.tokens_file`); the token itself is never stored,
logged, traced or captured: its holder's *name* is, as `current_identity()`.

What each token may do:

- open methods (no token needed): grpc.health.v1.Health, ServerLive and ServerReady while
  `server.auth.open_health`; server reflection while `server.auth.open_reflection`;
- any valid token: ServerMetadata;
- admin tokens (`admin: true`): RepositoryIndex and ModelStatistics (`ADMIN_METHODS`), which
  describe every model and its traffic;
- model-scoped (`models`: names or globs): ModelInfer, ModelStreamInfer (each message),
  ModelMetadata, ModelReady, ModelConfig. The servicer calls `authorize_model` with the name
  the request addresses, before looking the model up, so a token learns nothing about models
  outside its scope (PERMISSION_DENIED whether or not the model exists).

Missing, malformed or unknown token: UNAUTHENTICATED. Valid token, wrong model or admin
method: PERMISSION_DENIED. The identity lives in a contextvar set for the call (tasks the
handler starts inherit it) and is the span attribute `enduser.id`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import grpc
import yaml
from opentelemetry import trace
from pydantic import TypeAdapter, ValidationError

from headrace.config import AuthSettings, AuthTokenSettings
from headrace.errors import (
    ConfigError,
    HeadraceError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from headrace.telemetry.interceptor import (
    HEALTH_SERVICE,
    REFLECTION_SERVICES,
    Behaviour,
    MethodPredicate,
    in_services,
    wrap_rpc_behaviour,
)

AUTHORIZATION_METADATA = "authorization"
BEARER_PREFIX = "Bearer "
TOKEN_PREFIX = "hr_"
"""Tokens `headrace token create` makes start with this, so secret scanners can find them."""
IDENTITY_ATTRIBUTE = "enduser.id"
"""Span attribute holding the caller's token name (OpenTelemetry's end-user convention)."""
INFERENCE_SERVICE = "inference.GRPCInferenceService"
ADMIN_METHODS = frozenset({"RepositoryIndex", "ModelStatistics"})
"""Inference-service methods only admin tokens may call."""
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady"})
"""Inference-service methods that count as health checks (open with `open_health`)."""

_logger = logging.getLogger(__name__)
_TOKEN_LIST = TypeAdapter(tuple[AuthTokenSettings, ...])


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token belongs to, and what it may do."""

    name: str
    models: tuple[str, ...]
    admin: bool

    def may_use(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)


_current: ContextVar[Identity | None] = ContextVar("headrace_identity", default=None)


def current_identity() -> str:
    """The name of the token the current call presented; "" when auth is off or the call
    is an open one. For captures and logs: never the token."""
    identity = _current.get()
    return identity.name if identity is not None else ""


def authorize_model(model: str) -> None:
    """Check that the current call may use `model` (a no-op when auth is off).

    Raises:
        PermissionDeniedError (PERMISSION_DENIED): the token's `models` do not cover it.
    """
    identity = _current.get()
    if identity is not None and not identity.may_use(model):
        raise PermissionDeniedError(
            f"token '{identity.name}' may not use model '{model}' "
            "(its `models` in server.auth do not cover it)"
        )


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 Headrace keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def read_tokens_file(path: Any) -> tuple[AuthTokenSettings, ...]:
    """The token entries of a tokens file (a YAML list of `AuthTokenSettings`).

    Raises:
        ConfigError: the file cannot be read or an entry is invalid.
    """
    try:
        entries = yaml.safe_load(path.read_text()) or []
        return _TOKEN_LIST.validate_python(entries)
    except OSError as exc:
        raise ConfigError(f"server.auth.tokens_file: cannot read {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"server.auth.tokens_file {path}: not a list of tokens: {exc}") from exc


class TokenStore:
    """The known tokens by hash: the config's, plus the tokens file's (reloadable)."""

    def __init__(self, settings: AuthSettings) -> None:
        """Raises ConfigError: the tokens file cannot be read, or names a token twice."""
        self._settings = settings
        self._by_hash = self._load()

    def _load(self) -> dict[str, Identity]:
        entries = list(self._settings.tokens)
        if self._settings.tokens_file is not None:
            entries += read_tokens_file(self._settings.tokens_file)
        by_hash: dict[str, Identity] = {}
        names: set[str] = set()
        for entry in entries:
            if entry.name in names or entry.sha256 in by_hash:
                raise ConfigError(f"server.auth: token '{entry.name}' is given twice")
            names.add(entry.name)
            by_hash[entry.sha256] = Identity(entry.name, entry.models, entry.admin)
        return by_hash

    def reload(self) -> None:
        """Read the tokens file again (SIGHUP); a file that cannot be read keeps the tokens
        already known, and is logged."""
        try:
            self._by_hash = self._load()
        except ConfigError as exc:
            _logger.error("tokens reload failed, keeping the current tokens: %s", exc)
            return
        _logger.info("tokens reloaded: %d known", len(self._by_hash))

    def identify(self, token: str) -> Identity | None:
        """The identity of `token`, None if unknown. Looked up by hash: the token is never
        compared (or kept) in clear."""
        return self._by_hash.get(hash_token(token))


def open_methods(settings: AuthSettings) -> MethodPredicate:
    """The methods callable without a token under `settings`."""
    predicates: list[MethodPredicate] = []
    if settings.open_health:
        health_paths = frozenset(f"/{INFERENCE_SERVICE}/{method}" for method in HEALTH_METHODS)
        predicates += [in_services(HEALTH_SERVICE), lambda d: d.method in health_paths]
    if settings.open_reflection:
        predicates.append(in_services(*REFLECTION_SERVICES))

    def predicate(details: grpc.HandlerCallDetails) -> bool:
        return any(check(details) for check in predicates)

    return predicate


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    values = [value for key, value in metadata or () if key == AUTHORIZATION_METADATA]
    if not values:
        raise UnauthenticatedError(
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
        )
    value = values[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if len(values) > 1 or not text.startswith(BEARER_PREFIX) or not text[len(BEARER_PREFIX) :]:
        raise UnauthenticatedError("authorization metadata must be one 'Bearer <token>'")
    return text[len(BEARER_PREFIX) :].strip()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every call but the open ones, refuses admin methods to other tokens,
    and makes the caller's `Identity` current for the call (see the module docstring)."""

    def __init__(self, store: TokenStore, open_method: MethodPredicate) -> None:
        self._store = store
        self._open = open_method

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or self._open(handler_call_details):
            return handler
        method = handler_call_details.method
        try:
            identity = self._identify(method, handler_call_details.invocation_metadata)
        except HeadraceError as exc:
            refusal = exc
            _logger.debug("refused %s: %s", method, refusal.message)
            return wrap_rpc_behaviour(handler, lambda _, streaming: _refuse(refusal, streaming))
        return wrap_rpc_behaviour(
            handler, lambda behaviour, streaming: _as(identity, behaviour, streaming)
        )

    def _identify(
        self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> Identity:
        identity = self._store.identify(_bearer_token(metadata))
        if identity is None:
            raise UnauthenticatedError("invalid bearer token")
        service, _, name = method.lstrip("/").partition("/")
        if service == INFERENCE_SERVICE and name in ADMIN_METHODS and not identity.admin:
            raise PermissionDeniedError(
                f"token '{identity.name}' may not call {name}: an admin method "
                "(`admin: true` in server.auth)"
            )
        return identity


def _refuse(refusal: HeadraceError, streaming: bool) -> Behaviour:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(refusal.code, refusal.message)

    async def refuse_stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(refusal.code, refusal.message)
        yield  # pragma: no cover - abort raises; the yield makes this a generator

    return refuse_stream if streaming else refuse


def _as(identity: Identity, behaviour: Behaviour, streaming: bool) -> Behaviour:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = _current.set(identity)
        trace.get_current_span().set_attribute(IDENTITY_ATTRIBUTE, identity.name)
        try:
            return await behaviour(request, context)
        finally:
            _current.reset(token)

    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        token = _current.set(identity)
        trace.get_current_span().set_attribute(IDENTITY_ATTRIBUTE, identity.name)
        closed = False
        try:
            async for response in behaviour(request, context):
                yield response
        except GeneratorExit:
            # Closed while suspended, maybe from another context where the token cannot be
            # reset; the call's context ends with it anyway.
            closed = True
            raise
        finally:
            if not closed:
                _current.reset(token)

    return stream if streaming else unary
