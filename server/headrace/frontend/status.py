"""The one place errors become gRPC statuses, and tolerant request decoding."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from headrace.errors import HeadraceError, InvalidArgumentError

_logger = logging.getLogger(__name__)

MessageT = TypeVar("MessageT", bound=Message)
RequestT = TypeVar("RequestT")


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """What the tolerant deserializer hands a handler for bytes that are not its message."""

    type_name: str
    reason: str

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"request is not a valid {self.type_name} message: {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class WireMessage(Generic[MessageT]):
    """A decoded request together with the bytes it came from (capture stores them as
    received, without serializing the message again)."""

    message: MessageT
    data: bytes


def tolerant_deserializer(
    message_type: type[MessageT],
) -> Callable[[bytes], MessageT | MalformedMessage]:
    """A request deserializer that never raises.

    grpc answers INTERNAL when a deserializer raises; Headrace answers INVALID_ARGUMENT instead,
    so the handler receives a `MalformedMessage` and reports it through `StatusBoundary`.
    """
    type_name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> MessageT | MalformedMessage:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedMessage(type_name, str(exc) or "cannot decode")

    return deserialize


def wire_deserializer(
    message_type: type[MessageT],
) -> Callable[[bytes], WireMessage[MessageT] | MalformedMessage]:
    """`tolerant_deserializer` that also keeps the wire bytes (a reference, no copy)."""
    type_name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> WireMessage[MessageT] | MalformedMessage:
        try:
            return WireMessage(message_type.FromString(data), data)
        except DecodeError as exc:
            return MalformedMessage(type_name, str(exc) or "cannot decode")

    return deserialize


def serialized(message: Message | bytes) -> bytes:
    """A response serializer that passes bytes through: a handler that already serialized its
    answer (for capture) returns the bytes, and they are sent as they are."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def require_message(request: RequestT | MalformedMessage) -> RequestT:
    """The decoded request.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): the bytes on the wire were not a valid message.
    """
    if isinstance(request, MalformedMessage):
        raise request.error()
    return request


class StatusBoundary:
    """Async context manager wrapped around each handler body: a `HeadraceError` aborts the
    call with its own code, message and trailing metadata; anything else unexpected aborts
    with INTERNAL (details go to the log, not to the client). Aborts and cancellation pass
    through untouched."""

    __slots__ = ("_context", "_method")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        self._context = context
        self._method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
            return
        if isinstance(exc, HeadraceError):
            if exc.trailing_metadata:
                self._context.set_trailing_metadata(tuple(exc.trailing_metadata.items()))
            await self._context.abort(exc.code, exc.message)
        if isinstance(exc, Exception):
            _logger.error("unexpected error in %s", self._method, exc_info=exc)
            await self._context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {self._method}; see the server log"
            )
