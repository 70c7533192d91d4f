"""The settings tree: one frozen pydantic model, loaded from YAML, overridden from the
environment, built once in `headrace.app` and passed down through constructors.

Environment overrides: `HEADRACE_<SECTION>__<FIELD>=value` sets `section.field` (`__` separates
levels, list items are numbered from 0: `HEADRACE_MODELS__0__MAX_BATCH_SIZE=8`); values are read
as YAML scalars. They apply on top of the file; `headrace serve` flags apply on top of both.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from headrace.errors import ConfigError
from headrace.protocol.datatypes import DATATYPES

ENV_PREFIX = "HEADRACE_"
ENV_SEPARATOR = "__"
ENV_CONFIG_PATH = "HEADRACE_CONFIG"
"""Names the config file for `headrace serve` without --config; not a settings override."""
ENV_WORKER_ID = "HEADRACE_WORKER_ID"
"""Set by the supervisor of `headrace serve --workers N` in each worker process (0 to N-1);
not a settings override. It also completes
the capture writer id."""
ENV_CAPTURE_HASH_SALT = "HEADRACE_CAPTURE_HASH_SALT"
"""Salt of the SHA-256 hashes capture writes for hashed fields (kept out of config files).
Not a settings override."""
_NOT_OVERRIDES = frozenset({ENV_CONFIG_PATH, ENV_WORKER_ID, ENV_CAPTURE_HASH_SALT})
DEFAULT_PORT = 8800
"""Headrace's default gRPC port: clear of Triton's 8000 (HTTP), 8001 (gRPC) and 8002 (metrics)."""

_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSettings(_Frozen):
    """A declared input or output tensor."""

    name: str = Field(min_length=1)
    """Tensor name as clients send it."""
    datatype: str
    """Protocol datatype: BOOL, UINT8-64, INT8-64, FP16, FP32, FP64, BF16 or BYTES."""
    dims: tuple[int, ...]
    """Shape without the batch dimension (for batching models); -1 is any size."""
    optional: bool = False
    """Inputs only: whether a request may leave this input out."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype '{value}'; expected one of {', '.join(DATATYPES)}")
        return value

    @field_validator("dims")
    @classmethod
    def _valid_dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim < -1 for dim in value):
            raise ValueError("dimensions are >= 0, or -1 for any size")
        return value


class BatchingSettings(_Frozen):
    """The dynamic batcher in front of one model version. Unset values come from the
    backend's model metadata where it has them (Triton's dynamic_batching), else the
    defaults documented here. Models with max_batch_size 0 are never batched."""

    enabled: bool = True
    """Batch requests of this model; off sends each request to the backend as it comes."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Items per batch (sum of the requests' first dimensions); default: the model's
    max_batch_size."""
    max_queue_delay_us: int | None = Field(default=None, ge=0)
    """How long the oldest waiting request may wait for its batch to fill, from its
    arrival; default 0: dispatch what is queued as soon as an in-flight slot is free (batches
    grow while the model is busy, as Triton's default)."""
    preferred_batch_sizes: tuple[int, ...] | None = None
    """Dispatch at once when this many items are queued (the largest reachable size)."""
    max_inflight_batches: int | None = Field(default=None, ge=1)
    """Batches of this model running at once; more wait in the queue, where they grow.
    Default: the backend's hint (Triton: endpoints x `triton.max_inflight_per_endpoint`),
    else 1, one model instance."""
    max_queue_size: int = Field(default=1024, ge=1)
    """Requests waiting at most; beyond it requests get RESOURCE_EXHAUSTED at once."""
    priority_levels: int = Field(default=1, ge=1)
    """Priority levels; a request's `priority` parameter picks one: 1 is the highest (as in
    Triton), 0 or absent means `default_priority_level`. FIFO within a level."""
    default_priority_level: int | None = Field(default=None, ge=1)
    """Level of requests without a priority; default: the lowest level."""

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(size < 1 for size in value):
            raise ValueError("preferred batch sizes are >= 1")
        return value

    @model_validator(mode="after")
    def _default_level_in_range(self) -> BatchingSettings:
        level = self.default_priority_level
        if level is not None and level > self.priority_levels:
            raise ValueError(
                f"default_priority_level {level} is not among the {self.priority_levels} levels"
            )
        return self


class ShadowSettings(_Frozen):
    """Shadow traffic: a sample of this model's answered requests mirrored to a candidate
    (another model version in this Headrace, or any Open Inference Protocol endpoint), after
    the primary answered. The primary never waits for the candidate and never sees its errors;
    both calls are captured with the same request id, the shadow's record marked with the
    request parameter `headrace_shadow`."""

    endpoint: str | None = None
    """Candidate `host:port` (a Triton server or another Headrace); None: a model served by
    this Headrace."""
    model: str | None = None
    """Candidate model name; default: the primary's name."""
    version: str = ""
    """Candidate model version; empty: the endpoint's (or this Headrace's) latest version."""
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of answered requests mirrored."""
    timeout_s: float = Field(default=5.0, gt=0)
    """Longest a shadow call may take; beyond it the call is abandoned and counted."""
    max_queue_size: int = Field(default=256, ge=1)
    """Mirrored requests waiting for a shadow slot at most; beyond, new ones are dropped and
    counted (`headrace_shadow_requests_total{result="dropped"}`)."""
    max_concurrency: int = Field(default=4, ge=1)
    """Shadow calls in flight at once."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"shadow endpoint '{value}' is not host:port")
        return value


class DriftSettings(_Frozen):
    """Live drift of this model's inputs and outputs against a reference profile (built with
    `headrace drift profile`): PSI and KS distance per feature over a sliding window,
    exported as `headrace_drift_psi` and `headrace_drift_ks`. Computed off the request path,
    in a worker thread; when it falls behind, calls are dropped from the window and counted."""

    profile_path: Path
    """Reference profile JSON (relative paths: to the config file)."""
    window_rows: int = Field(default=1000, ge=10)
    """Rows (tensor rows, not requests) per tensor in the sliding window."""
    window_s: float | None = Field(default=None, gt=0)
    """Also forget rows older than this; None keeps the last `window_rows` whatever their age."""
    min_rows: int = Field(default=100, ge=1)
    """Rows the window needs before the gauges are set."""
    update_interval_s: float = Field(default=5.0, gt=0)
    """How often PSI and KS are recomputed."""
    max_queue_size: int = Field(default=1024, ge=1)
    """Answered calls waiting for the drift worker at most; beyond, they are dropped and
    counted (`headrace_drift_dropped_total`)."""


CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
"""Metadata a capture config may not select: tokens must never land in the store."""


class ModelCaptureSettings(_Frozen):
    """What capture keeps of one model's calls (when `capture.enabled`)."""

    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of calls captured, decided per call before it runs (1: every call)."""
    headers: tuple[str, ...] = ()
    """Client metadata headers (lowercase names) kept with each record."""
    drop: tuple[str, ...] = ()
    """Tensors left out of the records: `inputs.NAME` or `outputs.NAME`."""
    hash: tuple[str, ...] = ()
    """Values replaced by their salted SHA-256 (hex) before they are stored:
    `headers.NAME`, `parameters.NAME`, or `inputs.NAME` of a BYTES input (each element).
    The salt comes from the HEADRACE_CAPTURE_HASH_SALT environment variable."""
    max_record_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A call whose request plus response exceed this is recorded without tensors
    (`truncated`), its metadata kept."""
    on_spool_full: Literal["drop", "refuse"] = "drop"
    """When the spool reaches `capture.spool_max_bytes`: `drop` serves the call and drops
    its record (counted in headrace_capture_records_total{outcome="dropped"}); `refuse`
    answers UNAVAILABLE before the call runs, for models that must never serve an
    uncaptured prediction."""

    @field_validator("headers")
    @classmethod
    def _lowercase_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        headers = tuple(header.lower() for header in value)
        secret = sorted(set(headers) & CREDENTIAL_HEADERS)
        if secret:
            raise ValueError(
                f"header '{secret[0]}' carries credentials and is never captured "
                "(the caller's name is, as the record's identity)"
            )
        return headers

    @field_validator("drop")
    @classmethod
    def _tensor_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            kind, _, name = item.partition(".")
            if kind not in ("inputs", "outputs") or not name:
                raise ValueError(f"'{item}' is not inputs.NAME or outputs.NAME")
        return value

    @field_validator("hash")
    @classmethod
    def _hashable_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            kind, _, name = item.partition(".")
            if kind not in ("headers", "parameters", "inputs") or not name:
                raise ValueError(f"'{item}' is not headers.NAME, parameters.NAME or inputs.NAME")
        return tuple(
            f"headers.{item[len('headers.') :].lower()}" if item.startswith("headers.") else item
            for item in value
        )


class LocalModelSettings(_Frozen):
    """A model run in-process by the local backend: a Python callable over numpy arrays."""

    backend: Literal["local"] = "local"
    name: str = Field(pattern=_NAME_PATTERN)
    """Model name clients address."""
    version: str = Field(default="1", pattern=r"^[0-9]+$")
    """Version number; the highest served version answers requests that name none."""
    max_batch_size: int = Field(default=0, ge=0)
    """0: the model has no batch dimension. N: the first dimension of every tensor is the
    batch, of 1 to N items, and `dims` leave it out."""
    inputs: tuple[TensorSettings, ...] = Field(min_length=1)
    outputs: tuple[TensorSettings, ...] = Field(min_length=1)
    entrypoint: str = Field(pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_.]*$")
    """`package.module:attribute` or `path/to/file.py:attribute` (relative to the config
    file). Called with `init_args` as keyword arguments, it returns the model: a callable
    taking a dict of input arrays and returning a dict of output arrays."""
    init_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the entrypoint."""
    execution: Literal["inline", "thread"] = "thread"
    """`thread` runs the model in the local backend's worker threads so a slow model never
    blocks the event loop; `inline` calls it on the event loop, for models that take
    microseconds (identity, lookups)."""
    parameters: dict[str, str] = Field(default_factory=dict)
    """Free-form parameters reported in ModelConfig."""
    batching: BatchingSettings = BatchingSettings()
    """The dynamic batcher in front of this model (batching models only)."""
    shadow: ShadowSettings | None = None
    """Mirror a sample of this model's traffic to a candidate; None: no shadow traffic."""
    drift: DriftSettings | None = None
    """Live drift against a reference profile; None: no drift monitoring."""

    capture: ModelCaptureSettings = ModelCaptureSettings()
    """What capture keeps of this model's calls."""

    @model_validator(mode="after")
    def _unique_tensor_names(self) -> LocalModelSettings:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [tensor.name for tensor in tensors]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"{kind} declare {duplicates} more than once")
        return self


class SharedMemorySettings(_Frozen):
    """System shared memory for a Triton model's large tensors, for endpoints on this host
    (Headrace and Triton share /dev/shm). Small requests and an exhausted pool use bytes."""

    enabled: bool = False
    """Pass large tensors through shared-memory regions registered with each endpoint."""
    min_tensor_bytes: int = Field(default=64 * 1024, ge=0)
    """A request goes through shared memory when one of its inputs holds at least this many
    bytes; then all its inputs (and outputs, see `max_output_bytes`) do."""
    pool_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    """Most bytes of regions this model keeps per endpoint (in use and free together)."""
    max_output_bytes: int | None = Field(default=None, ge=1)
    """Bytes reserved for an output whose size Triton decides (a -1 beyond the batch
    dimension); an output larger than this fails the call (Triton's INVALID_ARGUMENT). None:
    such outputs come back as bytes. Outputs of fixed dims get exactly their size."""


class TritonTlsSettings(_Frozen):
    """TLS (and mutual TLS) on the channels to Triton. The files are read when a channel is
    first made (start-up)."""

    ca_file: Path | None = None
    """PEM CA bundle that signed Triton's certificate; None: the system's trusted roots."""
    cert_file: Path | None = None
    """PEM client certificate chain Headrace presents (mutual TLS; with `key_file`)."""
    key_file: Path | None = None
    """PEM private key of `cert_file`."""
    server_name: str | None = None
    """The name Triton's certificate is checked against (and sent as SNI), when it differs
    from the endpoint's host (an IP address, a Kubernetes service name)."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> TritonTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return self


class TritonModelSettings(_Frozen):
    """A model served by Triton Inference Server(s); its signature and batching hints are
    read from Triton (ModelMetadata, ModelConfig) at start-up."""

    backend: Literal["triton"]
    name: str = Field(pattern=_NAME_PATTERN)
    """Model name clients address."""
    version: str | None = Field(default=None, pattern=r"^[0-9]+$")
    """Triton model version to serve; default: the version Triton serves for an empty one."""
    remote_name: str | None = None
    """The model's name on Triton, when it differs from `name`."""
    endpoints: tuple[str, ...] = Field(min_length=1)
    """Triton gRPC addresses: `host:port`, or `dns:///host:port` for a name re-resolved every
    `triton.dns_refresh_s` (a Kubernetes headless service: one address per pod)."""
    batching: BatchingSettings = BatchingSettings()
    """Headrace's batcher in front of this model."""
    shared_memory: SharedMemorySettings = SharedMemorySettings()
    """Large tensors through system shared memory (only for endpoints on this host)."""
    shadow: ShadowSettings | None = None
    """Mirror a sample of this model's traffic to a candidate; None: no shadow traffic."""
    drift: DriftSettings | None = None
    """Live drift against a reference profile; None: no drift monitoring."""

    tls: TritonTlsSettings | None = None
    """TLS to this model's endpoints, instead of `triton.tls`."""
    capture: ModelCaptureSettings = ModelCaptureSettings()
    """What capture keeps of this model's calls."""

    @field_validator("endpoints")
    @classmethod
    def _endpoint_form(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for endpoint in value:
            address = endpoint.removeprefix("dns:///")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoint '{endpoint}' is not host:port or dns:///host:port")
        return value


def _backend_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("backend", "local"))
    return str(getattr(value, "backend", "local"))


ModelSettings = Annotated[
    Annotated[LocalModelSettings, Tag("local")] | Annotated[TritonModelSettings, Tag("triton")],
    Discriminator(_backend_of),
]
"""A model entry; `backend` (default `local`) selects its kind."""


class TritonSettings(_Frozen):
    """How Headrace talks to Triton servers (all Triton models)."""

    max_message_bytes: int = Field(default=128 * 1024 * 1024, ge=4 * 1024 * 1024)
    """Largest gRPC message to or from Triton, each direction."""
    keepalive_time_s: float = Field(default=30.0, gt=0)
    """HTTP/2 keepalive ping interval on idle Triton channels."""
    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    """How long a keepalive ping may go unanswered before the connection is dropped."""
    startup_timeout_s: float = Field(default=30.0, gt=0)
    """How long start-up waits for some endpoint of each model to describe it."""
    max_inflight_per_endpoint: int | None = Field(default=None, ge=1)
    """Calls of one model in flight to one endpoint; further batches wait in Headrace, where
    they grow, rather than in Triton's queue. Default: the model's instance count on Triton
    (its instance_group), so each instance has one batch and the next keeps growing."""
    health_check_interval_s: float = Field(default=2.0, gt=0)
    """Active health checks (ServerReady, ModelReady) per endpoint."""
    health_check_timeout_s: float = Field(default=1.0, gt=0)
    health_check_unhealthy_threshold: int = Field(default=2, ge=1)
    """Failed health checks in a row that mark an endpoint unhealthy: a single check that
    times out while Headrace itself is saturated does not take a working Triton out of the
    pool (a dead one is also ejected by its failed calls)."""
    ejection_consecutive_failures: int = Field(default=2, ge=1)
    """Consecutive failed calls (UNAVAILABLE, unreachable) that eject an endpoint."""
    ejection_s: float = Field(default=5.0, gt=0)
    """How long an ejected endpoint gets no traffic; it returns after that once a health
    check passes."""
    dns_refresh_s: float = Field(default=10.0, gt=0)
    """How often `dns:///` endpoints are re-resolved."""
    tls: TritonTlsSettings | None = None
    """TLS to every Triton endpoint (a model's own `tls` wins); None: plaintext."""


class TlsSettings(_Frozen):
    """TLS on the front end. The files are read at start-up and again on SIGHUP; connections
    already open keep their session, new ones get the new certificate."""

    cert_file: Path
    """PEM certificate chain the server presents."""
    key_file: Path
    """PEM private key of that certificate."""
    client_ca_file: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""


class LimitsSettings(_Frozen):
    """What one client may ask of the front end. Each refusal names its limit and key."""

    max_request_elements: int = Field(default=64 * 1024 * 1024, ge=1)
    """Tensor elements in one inference request, all inputs together (a shape's product);
    beyond it the request gets INVALID_ARGUMENT before anything is decoded."""
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """Bytes of tensor data in one inference request (shape x datatype size; BYTES: their
    serialized size), all inputs together; beyond it INVALID_ARGUMENT."""
    max_tensor_rank: int = Field(default=16, ge=1, le=32)
    """Dimensions of one tensor; more get INVALID_ARGUMENT."""
    max_request_batch_size: int | None = Field(default=None, ge=1)
    """Items (first dimension) in one request to a batching model, whatever the model's own
    max_batch_size; None leaves it to each model. Beyond: INVALID_ARGUMENT."""
    max_inflight_requests: int | None = Field(default=4096, ge=1)
    """Inference requests in progress at once, across all models, calls and streams (queued
    in a batcher or running); beyond it requests get RESOURCE_EXHAUSTED at once with a
    `grpc-retry-pushback-ms` hint. None: no limit beyond the batchers' queues."""
    max_concurrent_streams: int | None = Field(default=None, ge=1)
    """Calls open at once on one client connection (HTTP/2 streams,
    `grpc.max_concurrent_streams`); more wait in the client until one ends, except calls a
    client opens before it has read the server's limit (right after connecting), which are
    refused (UNAVAILABLE, RST_STREAM REFUSED_STREAM). None: grpc's default, no limit, since
    clients firing hundreds of calls on a fresh connection are common."""
    keepalive_time_s: float = Field(default=60.0, gt=0)
    """The server pings an idle connection this often to find dead clients."""
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    """A connection whose ping goes unanswered this long is closed."""
    min_client_ping_interval_s: float = Field(default=10.0, ge=0)
    """Clients may ping no more often than this (`grpc.http2.min_ping_interval_without_data_ms`);
    a client pinging faster `max_ping_strikes` times is sent GOAWAY (ENHANCE_YOUR_CALM)."""
    max_ping_strikes: int = Field(default=2, ge=0)
    """Too-frequent pings tolerated before the connection is closed (0: no limit)."""
    permit_keepalive_without_calls: bool = True
    """Whether clients may ping a connection with no call open (tritonclient does)."""


class AuthTokenSettings(_Frozen):
    """One bearer token: its name, its SHA-256 (never the token itself) and its scopes.
    `headrace token create` makes a token and prints this entry."""

    name: str = Field(pattern=_NAME_PATTERN)
    """Who holds the token; spans, logs and captures record this name, never the token."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Lowercase hex SHA-256 of the token."""
    models: tuple[str, ...] = ()
    """Models the token may use (names or shell-style globs: `sales_*`, `*`): ModelInfer,
    ModelStreamInfer, ModelMetadata, ModelReady, ModelConfig."""
    admin: bool = False
    """Whether the token may call the admin methods (RepositoryIndex, ModelStatistics)."""


class AuthSettings(_Frozen):
    """Bearer-token authentication (`authorization: Bearer <token>` metadata) and per-token
    scopes. Off by default."""

    enabled: bool = False
    """Require a valid token on every call but the open ones below."""
    tokens: tuple[AuthTokenSettings, ...] = ()
    """Tokens (hashed) given in the config itself."""
    tokens_file: Path | None = None
    """A YAML file holding a list of token entries (as `tokens`), read at start-up and again
    on SIGHUP; its entries add to `tokens`."""
    open_health: bool = True
    """Let grpc.health.v1 Health, ServerLive and ServerReady through without a token
    (Kubernetes probes carry none)."""
    open_reflection: bool = False
    """Let server reflection through without a token."""

    @model_validator(mode="after")
    def _tokens_when_enabled(self) -> AuthSettings:
        if self.enabled and not self.tokens and self.tokens_file is None:
            raise ValueError("auth is enabled but no tokens or tokens_file are given")
        names = [token.name for token in self.tokens]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"tokens {duplicates} are declared more than once")
        return self


class ServerSettings(_Frozen):
    """The gRPC front end."""

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """gRPC port; 0 picks a free one, which the start-up log reports."""
    shutdown_grace_period_s: float = Field(default=10.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish before they are
    cancelled."""
    max_message_bytes: int = Field(default=128 * 1024 * 1024, ge=4 * 1024 * 1024)
    """Largest gRPC message accepted or sent, each direction."""
    tls: TlsSettings | None = None
    """TLS (and mutual TLS) on the gRPC port; None serves plaintext."""
    stream_max_inflight_requests: int = Field(default=256, ge=1)
    """Requests of one ModelStreamInfer stream processed at once; the stream stops reading
    (and HTTP/2 flow control pushes back on the client) while this many are open."""
    system_shared_memory: bool = False
    """Let clients on this host register system shared memory regions and pass tensors
    through them (Triton's extension; tritonclient.utils.shared_memory). Off by default: a
    client that may register any /dev/shm object of Headrace's user can read and write it."""
    workers: int | None = Field(default=None, ge=1)
    """Worker processes of `headrace serve`, all serving `port` (SO_REUSEPORT: the kernel
    spreads new connections over them) under one supervisor that restarts a worker that dies.
    None: one per core this process may use (CPU affinity and cgroup CPU quota). 1: a single
    process, no supervisor. `headrace serve --workers N` overrides it."""
    limits: LimitsSettings = LimitsSettings()
    """Request, connection and keepalive limits."""
    auth: AuthSettings = AuthSettings()
    """Bearer tokens and their scopes."""


class LoggingSettings(_Frozen):
    """Process logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level written."""
    format: Literal["text", "json"] = "text"
    """`text`: one human-readable line per record. `json`: one JSON object per line with
    `time`, `level`, `logger`, `message`, and `trace_id`/`span_id` of the span current when
    the record was made (absent outside traced work)."""


class TracingSettings(_Frozen):
    """OpenTelemetry tracing. `exporter: none` (the default) turns tracing off entirely: no
    spans are made and no trace context is read or passed on."""

    exporter: Literal["otlp_grpc", "otlp_http", "console", "none"] = "none"
    """Where finished spans go: an OTLP receiver over gRPC or HTTP (a Collector, Jaeger,
    Tempo), standard output (debugging), or nowhere (tracing off)."""
    endpoint: str | None = None
    """OTLP endpoint, e.g. `http://collector:4317` (otlp_grpc; `https://` for TLS) or
    `http://collector:4318/v1/traces` (otlp_http). Default: the exporter's own
    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else localhost:4317 or localhost:4318/v1/traces)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Headers sent with every export (authentication tokens); never logged."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new traces recorded. Parent-based: a request whose incoming `traceparent` is
    sampled (or not) keeps that decision, so a trace is never recorded in part."""
    service_name: str = Field(default="headrace", min_length=1)
    """Resource attribute `service.name`."""
    service_instance_id: str | None = None
    """Resource attribute `service.instance.id`; default: a random UUID per process."""
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    """More resource attributes (`deployment.environment.name`, ...); OTEL_RESOURCE_ATTRIBUTES
    is merged in too, these win."""
    trace_health: bool = False
    """Also trace grpc.health.v1.Health and reflection calls (probes call them every few
    seconds; off keeps them out of traces)."""
    export_timeout_s: float = Field(default=10.0, gt=0)
    """Longest one export may take."""
    export_delay_ms: int = Field(default=5000, ge=1)
    """Longest a finished span waits before it is exported (spans are exported in batches
    off the request path)."""
    max_export_batch_spans: int = Field(default=4096, ge=1)
    """Spans per OTLP export request at most. Spans are exported as soon as this many are
    waiting (or `export_delay_ms` has passed); an OTLP gRPC request is also split where it
    would pass 3 MiB (a gRPC receiver takes 4 MiB by default). Each export costs the
    exporter and the receiver a fixed few hundred microseconds of CPU whatever its size:
    larger batches, fewer of them (the SDK exports 512 at a time, the Collector's batch
    processor 8192)."""
    max_queued_spans: int = Field(default=16384, ge=1)
    """Finished spans waiting to be sent to the exporter process at most; beyond, new spans
    are dropped (counted and logged), never waited for. At least `max_export_batch_spans`
    (the sender is woken at that many), best a few times it (the slack while it sends)."""
    export_niceness: int = Field(default=0, ge=0, le=19)
    """Niceness added to the span exporter process (OTLP encoding and export run there, off
    the serving process). Above 0 it yields the CPU to serving under contention, and spans
    are dropped if it falls more than `max_queued_spans` behind."""

    @model_validator(mode="after")
    def _batch_within_queue(self) -> TracingSettings:
        if self.max_export_batch_spans > self.max_queued_spans:
            raise ValueError(
                f"max_export_batch_spans ({self.max_export_batch_spans}) must be at most"
                f" max_queued_spans ({self.max_queued_spans}): the sender wakes when a batch"
                " is queued"
            )
        return self


METRICS_DEFAULT_PORT = 8802
"""Prometheus /metrics port: next to Headrace's gRPC 8800, clear of Triton's 8000-8002."""


class MetricsSettings(_Frozen):
    """Prometheus metrics, served over HTTP at /metrics on a port of their own."""

    enabled: bool = False
    """Serve metrics (off by default so two Headrace processes on one host never contend
    for the port unasked)."""
    host: str = "0.0.0.0"
    """Address the /metrics server listens on."""
    port: int = Field(default=METRICS_DEFAULT_PORT, ge=0, le=65535)
    """/metrics port; 0 picks a free one, which the start-up log reports."""


class LocalBackendSettings(_Frozen):
    """The in-process backend."""

    worker_threads: int = Field(default=4, ge=1)
    """Threads running models whose `execution` is `thread`."""


_CREDENTIAL_KEYS = (
    "access_key",
    "secret_key",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "credentials",
    "password",
)


class LocalStoreSettings(_Frozen):
    """Capture files in a local folder (the embedded default)."""

    kind: Literal["local"] = "local"
    """Selects this store (the default kind)."""
    path: Path
    """The folder; created when missing. Files are written to a temporary name and renamed,
    so readers never see half a file."""
    fsync: bool = True
    """Flush each file (and its folder) to disk before it counts as stored, so a machine crash
    after the spool segment is deleted loses nothing."""


class S3StoreSettings(_Frozen):
    """Capture files in an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph, ...).

    Credentials are never part of the config: they come from the standard AWS chain
    (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE` and
    ~/.aws/credentials, web identity, the instance's role)."""

    kind: Literal["s3"]
    """Selects this store."""
    bucket: str = Field(min_length=1, pattern=r"^[^/]+$")
    """The bucket; it must exist (Headrace creates none)."""
    prefix: str = ""
    """Folder inside the bucket the capture layout starts at ("" for the bucket's root)."""
    endpoint: str | None = None
    """`host:port` of a store other than AWS (MinIO, SeaweedFS, ...); None for AWS S3."""
    region: str = "us-east-1"
    """The bucket's region (request signing)."""
    scheme: Literal["https", "http"] = "https"
    """Protocol to the endpoint; `http` only for a store on a trusted network or loopback."""
    max_attempts: int = Field(default=5, ge=1)
    """Tries per operation before it fails (the writer then keeps the spool segment and tries
    the whole file again later)."""
    initial_backoff_s: float = Field(default=0.2, gt=0)
    """Wait after the first failed try; doubled after each further one (with jitter)."""
    max_backoff_s: float = Field(default=10.0, gt=0)
    """Longest wait between two tries."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """How long one try waits to connect."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """How long one try (one request) may take once connected."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        if isinstance(value, dict):
            found = [key for key in value if str(key).lower() in _CREDENTIAL_KEYS]
            if found:
                raise ValueError(
                    f"{', '.join(found)}: S3 credentials are never read from the config; set "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile"
                )
        return value


def _store_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "local"))
    return str(getattr(value, "kind", "local"))


CaptureStoreSettings = Annotated[
    Annotated[LocalStoreSettings, Tag("local")] | Annotated[S3StoreSettings, Tag("s3")],
    Discriminator(_store_kind),
]
"""Where capture files go; `kind` (default `local`) selects the store."""


class CaptureSettings(_Frozen):
    """Capture of every inference call (ModelInfer, ModelStreamInfer) to Parquet files in an
    object store, through a local spool: a call's record is in the spool before its answer
    leaves; a background stage turns sealed spool segments into files and deletes them once
    stored. Per-model rules live in each model's `capture` section."""

    enabled: bool = False
    """Capture calls. Off (the default without a `capture` section) costs nothing."""
    spool_dir: Path = Path("headrace-captures/spool")
    """The spool's folder; each writer (process) uses a subfolder named by its writer id."""
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    """Disk cap of one writer's spool; beyond it each model's `on_spool_full` applies."""
    segment_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A spool segment is sealed (ready for upload) once it holds this many bytes..."""
    segment_max_age_s: float = Field(default=5.0, gt=0)
    """...or once it is this old: the most a record waits before its upload starts."""
    fsync_interval_ms: int | None = Field(default=None, ge=0)
    """None: records are written to the OS before the answer leaves (safe against a crash
    of the process, not of the machine). 0: also fsynced before the answer leaves (safe
    against a machine crash; one fsync per group commit). N: fsynced every N ms in the
    background (a machine crash loses at most the last N ms)."""
    writer_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")
    """Names this process's files (`{writer_id}-{worker}-...`); default: the host name.
    The worker number comes from HEADRACE_WORKER_ID (default 0)."""
    store: CaptureStoreSettings = LocalStoreSettings(path=Path("headrace-captures"))
    """Where the Parquet files go: `kind: local` (a folder) or `kind: s3`."""
    max_file_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    """A spool segment's records are split into Parquet files of about this size."""
    upload_retry_max_s: float = Field(default=30.0, gt=0)
    """Longest wait between upload retries while the store fails (backoff doubles from
    0.5 s up to this)."""
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    """At shutdown, how long uploading what is spooled may take; what is left stays in the
    spool for the next start."""
    converter_niceness: int = Field(default=10, ge=0, le=19)
    """Scheduling niceness added to the worker process that turns spool segments into
    Parquet: when the host's CPUs are saturated, serving keeps them and the conversion waits
    (the spool absorbs the backlog, up to `spool_max_bytes`); on a host with spare CPU it
    changes nothing. Above 0 the worker also runs as SCHED_BATCH on Linux (no wake-up
    preemption of serving threads). 0 competes with serving as an equal."""
    converter_cpu_share: float = Field(default=0.2, gt=0, le=1)
    """Most of one CPU the conversion of a segment may take while no other segment waits:
    the worker pauses between chunks of records to stay within this share of the time since
    the segment began, for at most half of `segment_max_age_s`, then finishes at full speed.
    A segment's conversion is a burst of CPU (about 15 us a small record: 0.2 s for 5 s of
    3,000 calls/s) that, on a host whose CPUs serving saturates, shows in the latency of the
    calls it overlaps; spread out it costs the same CPU but no tail. With a backlog (the store
    was down, a shutdown flush) there is no pausing. 1: never pause."""


class Settings(_Frozen):
    """Everything Headrace is configured with."""

    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    local_backend: LocalBackendSettings = LocalBackendSettings()
    triton: TritonSettings = TritonSettings()
    capture: CaptureSettings = CaptureSettings()
    models: tuple[ModelSettings, ...] = ()
    """Models to serve; a name may appear once per version. `backend` (default `local`)
    selects the settings type."""

    @model_validator(mode="after")
    def _unique_model_versions(self) -> Settings:
        seen: set[tuple[str, str]] = set()
        for model in self.models:
            key = (model.name, model.version or "")
            if key in seen:
                version = f"version {model.version}" if model.version else "(latest version)"
                raise ValueError(f"model '{model.name}' {version} is declared twice")
            seen.add(key)
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Map dotted settings paths to (variable name, value) for HEADRACE_* variables."""
    overrides: dict[str, tuple[str, Any]] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in _NOT_OVERRIDES:
            continue
        path = variable[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
        overrides[".".join(path)] = (variable, yaml.safe_load(text) if text else text)
    return overrides


def _apply(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: no list item {part} at '{'.'.join(parts[:index])}'")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{origin}: '{'.'.join(parts[:index])}' is not a section")


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in (
            "local",
            "triton",
            "s3",
        ):  # the discriminator's tag tells a reader nothing
            text += f".{part}" if text else str(part)
    return text


_PATH_KEYS = ("cert_file", "key_file", "client_ca_file", "ca_file", "tokens_file")


def _resolve_paths(tree: dict[str, Any], base_dir: Path) -> None:
    """File paths in the TLS and auth sections are relative to the config file."""
    server = tree.get("server")
    triton = tree.get("triton")
    sections: list[Any] = []
    if isinstance(server, dict):
        sections += [server.get("tls"), server.get("auth")]
    if isinstance(triton, dict):
        sections.append(triton.get("tls"))
    sections += [model.get("tls") for model in tree.get("models") or [] if isinstance(model, dict)]
    for section in sections:
        if not isinstance(section, dict):
            continue
        for key in _PATH_KEYS:
            value = section.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                section[key] = str(base_dir / value)


def default_config_text() -> str:
    """The embedded default config (configs/default.yaml, shipped inside the package)."""
    return importlib.resources.files("headrace.configs").joinpath("default.yaml").read_text()


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings from a YAML file (the embedded default when `path` is None), then apply
    HEADRACE_* variables from `environ`, then `overrides` (dotted paths, e.g. "server.port").

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid; the message
            names the file (or variable) and the field.
    """
    source = str(path) if path is not None else "<embedded default config>"
    try:
        text = path.read_text() if path is not None else default_config_text()
        tree = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")

    origins: dict[str, str] = {}
    for dotted, (variable, value) in _env_overrides(environ or {}).items():
        _apply(tree, dotted, value, variable)
        origins[dotted] = variable
    for dotted, value in (overrides or {}).items():
        _apply(tree, dotted, value, "command line")
        origins[dotted] = "command line"

    base_dir = path.resolve().parent if path is not None else None
    if base_dir is not None:
        _resolve_paths(tree, base_dir)
    for model in tree.get("models") or []:
        drift = model.get("drift") if isinstance(model, dict) else None
        profile_path = drift.get("profile_path") if isinstance(drift, dict) else None
        relative = isinstance(profile_path, str) and not Path(profile_path).is_absolute()
        if base_dir is not None and isinstance(drift, dict) and relative:
            drift["profile_path"] = str(base_dir / str(profile_path))
        entrypoint = model.get("entrypoint") if isinstance(model, dict) else None
        if base_dir is not None and isinstance(entrypoint, str):
            module, _, attribute = entrypoint.rpartition(":")
            if module.endswith(".py") and not Path(module).is_absolute():
                model["entrypoint"] = f"{base_dir / module}:{attribute}"
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = _location(error["loc"])
            origin = next(
                (origins[key] for key in origins if re.sub(r"\[(\d+)\]", r".\1", where) == key),
                source,
            )
            lines.append(f"{origin}: {where or '<top level>'}: {error['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from exc
