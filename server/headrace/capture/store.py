"""Object stores the capture files go to: a local folder, or any S3-compatible store.

Paths are relative to the store's root (a folder, or a bucket and prefix), `/`-separated.
`put` is atomic from a reader's view: a local file is written under a temporary name and
renamed; an S3 object appears only once its single PUT or its multipart upload completes
(pyarrow.fs.S3FileSystem switches to multipart for large files by itself).

S3 credentials come only from the standard AWS chain (environment, profile and
~/.aws/credentials, web identity, instance role): the AWS SDK inside pyarrow resolves them.
Each S3 operation is tried up to `max_attempts` times with exponential backoff and jitter;
refused credentials or a missing bucket fail at once with `ObjectStoreAccessError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import pyarrow.fs as pafs

from headrace.config import CaptureStoreSettings, LocalStoreSettings, S3StoreSettings
from headrace.errors import ObjectStoreAccessError, ObjectStoreError

_LOGGER = logging.getLogger("headrace.capture.store")
_TEMPORARY_SUFFIX = ".tmp"
# What the AWS SDK (through pyarrow) says when retrying cannot help.
_ACCESS_REFUSALS = (
    "ACCESS_DENIED",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_ACCESS_KEY_ID",
    "NO_SUCH_BUCKET",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "Bucket '",  # pyarrow's "Bucket 'x' not found"
)
_T = TypeVar("_T")
UPLOAD_CHUNK_BYTES = 5 * 1024 * 1024
"""Writes to pyarrow's S3 stream are this size, S3's smallest part."""


@runtime_checkable
class ObjectStore(Protocol):
    """Where capture files are stored and read from."""

    @property
    def uri(self) -> str:
        """Where the store is, for messages (`/path`, `s3://bucket/prefix`)."""
        ...

    def put(self, path: str, data: bytes) -> None:
        """Store `data` at `path`, replacing what was there; readers see the old or the new
        object, never a part.

        Raises:
            ObjectStoreError: it could not be stored (after the store's retries).
        """
        ...

    def get(self, path: str) -> bytes:
        """The object at `path`.

        Raises:
            ObjectStoreError: it does not exist or could not be read.
        """
        ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(path, size in bytes) of every object under `prefix` (a folder path), by path."""
        ...

    def close(self) -> None:
        """Release the store; an operation waiting to retry gives up."""
        ...


def _relative(path: str) -> str:
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"object path {path!r} must not contain '.' or '..'")
    return "/".join(parts)


class LocalStore:
    """Objects as files under a folder."""

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self._fsync = fsync

    @property
    def uri(self) -> str:
        return str(self.root)

    def put(self, path: str, data: bytes) -> None:
        target = self.root / _relative(path)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}{_TEMPORARY_SUFFIX}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as file:
                file.write(data)
                if self._fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temporary, target)
            if self._fsync:
                descriptor = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise ObjectStoreError(f"cannot write {target}: {exc.strerror or exc}") from exc

    def get(self, path: str) -> bytes:
        target = self.root / _relative(path)
        try:
            return target.read_bytes()
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {target}: {exc.strerror or exc}") from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self.root / _relative(prefix) if _relative(prefix) else self.root
        found: list[tuple[str, int]] = []
        for folder, folders, files in os.walk(base):
            folders.sort()
            for name in files:
                if name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX):
                    continue  # a put in progress, or one a crash interrupted
                file = Path(folder, name)
                try:
                    size = file.stat().st_size
                except FileNotFoundError:
                    continue
                found.append((file.relative_to(self.root).as_posix(), size))
        return iter(sorted(found))

    def close(self) -> None:
        pass


class S3Store:
    """Objects in an S3 bucket (under `prefix`), through pyarrow.fs.S3FileSystem.

    Credentials: the AWS chain, unless `access_key`/`secret_key` are given (tests and programs
    that hold them; the config never does).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str = "us-east-1",
        scheme: str = "https",
        max_attempts: int = 5,
        initial_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 60.0,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.bucket = bucket
        self.prefix = _relative(prefix)
        self.endpoint = endpoint
        self._max_attempts = max_attempts
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._closed = threading.Event()
        # Retries are ours (counted, logged, interruptible by close()); the SDK tries once.
        self._filesystem = pafs.S3FileSystem(
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            scheme=scheme,
            endpoint_override=endpoint,
            connect_timeout=connect_timeout_s,
            request_timeout=request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            # A small file goes as one PUT; multipart only once it outgrows one part.
            allow_delayed_open=True,
        )

    @classmethod
    def from_uri(cls, uri: str, **options: object) -> S3Store:
        """`s3://bucket/prefix` with S3Store's keyword options."""
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return cls(bucket, prefix=prefix, **options)  # type: ignore[arg-type]

    @property
    def uri(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, path: str) -> str:
        return "/".join(part for part in (self.bucket, self.prefix, _relative(path)) if part)

    def _with_retries(self, what: str, operation: Callable[[], _T]) -> _T:
        backoff_s = self._initial_backoff_s
        started = time.monotonic()
        for attempt in range(1, self._max_attempts + 1):
            if self._closed.is_set():
                raise ObjectStoreError(f"{what} on {self.uri}: the store is closed")
            try:
                return operation()
            except FileNotFoundError as exc:
                raise ObjectStoreError(f"{what} on {self.uri}: no such object") from exc
            except OSError as exc:
                message = str(exc)
                if any(refusal in message for refusal in _ACCESS_REFUSALS):
                    raise ObjectStoreAccessError(
                        f"{what} on {self.uri} was refused: {message} (credentials come from "
                        "the AWS chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
                    ) from exc
                if attempt == self._max_attempts:
                    raise ObjectStoreError(
                        f"{what} on {self.uri} failed {attempt} times in "
                        f"{time.monotonic() - started:.1f} s; last error: {message}"
                    ) from exc
                _LOGGER.warning(
                    "%s on %s failed (try %d of %d), retrying in %.2f s: %s",
                    what,
                    self.uri,
                    attempt,
                    self._max_attempts,
                    backoff_s,
                    message,
                )
                if self._closed.wait(backoff_s * random.uniform(0.5, 1.0)):
                    raise ObjectStoreError(f"{what} on {self.uri}: the store is closed") from exc
                backoff_s = min(backoff_s * 2, self._max_backoff_s)
        raise AssertionError("unreachable")

    def put(self, path: str, data: bytes) -> None:
        key = self._key(path)

        def upload() -> None:
            # Written in parts: pyarrow sends a file smaller than its part size as one PUT,
            # and a larger one as a multipart upload (one write of everything would be a
            # single PUT of any size). A failed part fails the close, so no partial object is
            # ever completed; an abandoned multipart upload is left to the bucket's lifecycle.
            view = memoryview(data)
            with self._filesystem.open_output_stream(key) as stream:
                for start in range(0, len(view), UPLOAD_CHUNK_BYTES):
                    stream.write(view[start : start + UPLOAD_CHUNK_BYTES])

        self._with_retries(f"upload of {path} ({len(data)} bytes)", upload)

    def get(self, path: str) -> bytes:
        key = self._key(path)

        def download() -> bytes:
            with self._filesystem.open_input_stream(key) as stream:
                return bytes(stream.readall())

        return self._with_retries(f"download of {path}", download)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self._key(prefix)
        start = len(self._key("")) + 1

        def listing() -> list[tuple[str, int]]:
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            return [
                (info.path[start:], info.size)
                for info in self._filesystem.get_file_info(selector)
                if info.type == pafs.FileType.File
            ]

        return iter(sorted(self._with_retries(f"listing of {prefix or '/'}", listing)))

    def close(self) -> None:
        self._closed.set()


def make_store(settings: CaptureStoreSettings) -> ObjectStore:
    """The object store `settings` describe."""
    if isinstance(settings, LocalStoreSettings):
        return LocalStore(settings.path, fsync=settings.fsync)
    if isinstance(settings, S3StoreSettings):
        return S3Store(
            settings.bucket,
            prefix=settings.prefix,
            endpoint=settings.endpoint,
            region=settings.region,
            scheme=settings.scheme,
            max_attempts=settings.max_attempts,
            initial_backoff_s=settings.initial_backoff_s,
            max_backoff_s=settings.max_backoff_s,
            connect_timeout_s=settings.connect_timeout_s,
            request_timeout_s=settings.request_timeout_s,
        )
    raise TypeError(f"unknown capture store settings {type(settings).__name__}")
