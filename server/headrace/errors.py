"""The error tree and the one table from errors to gRPC status codes.

Every failure Headrace reports to a client is a `HeadraceError` subclass; each subclass names its
gRPC status code once, here. The servicer turns them into statuses in one place
(`headrace.frontend.servicer.status_boundary`); nothing else formats statuses. Codes from
upstream servers (Triton's UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) travel as
codes: a backend raises `UpstreamError` carrying the upstream code, never a string of it.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc


class HeadraceError(Exception):
    """Base of every error Headrace reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, trailing_metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.trailing_metadata: Mapping[str, str] = trailing_metadata or {}


class InvalidArgumentError(HeadraceError):
    """The request is malformed or does not match the model's signature."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnauthenticatedError(HeadraceError):
    """The call carries no bearer token, or one Headrace does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(HeadraceError):
    """The caller's token does not cover this model or method."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ModelNotFoundError(HeadraceError):
    """No model (or no version of it) by that name is served."""

    code = grpc.StatusCode.NOT_FOUND


class ModelUnavailableError(HeadraceError):
    """The model exists but cannot take requests now."""

    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExistsError(HeadraceError):
    """What the request would create exists already (a shared memory region's name)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotEnabledError(HeadraceError):
    """The request needs a feature this server has turned off; the message names the setting."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhaustedError(HeadraceError):
    """A bounded queue or limit refused the request; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(HeadraceError):
    """The request's deadline passed before it was answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelExecutionError(HeadraceError):
    """The model raised, or returned outputs that break its own signature."""

    code = grpc.StatusCode.INTERNAL


class UpstreamError(HeadraceError):
    """An upstream server (Triton) answered with a status; its code passes through unchanged."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        trailing_metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message, trailing_metadata=trailing_metadata)
        self.code = code


class StartupError(Exception):
    """Headrace cannot start (a port cannot be bound, a model cannot be loaded)."""


class ConfigError(StartupError):
    """The configuration cannot be loaded or used; the message names the file (or model) and
    the field."""


class TritonLaunchError(StartupError):
    """A local tritonserver (headrace.launchers.triton) cannot be found, prepared or started;
    the message says what is missing, and carries the tail of Triton's log once it ran."""


class ObjectStoreError(Exception):
    """An object store (the capture destination) refused an operation, or could not be reached
    within its retries; the message names the store, the path and the cause. Capture keeps the
    spool segment and tries again later; readers report it."""


class ObjectStoreAccessError(ObjectStoreError):
    """The object store refused the credentials or the bucket (retrying will not help)."""


class SeaweedFSLaunchError(StartupError):
    """A local SeaweedFS (headrace.launchers.seaweedfs) cannot be found or started; the
    message carries the tail of its log once it ran."""
