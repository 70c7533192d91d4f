"""The Triton backend: models served by Triton Inference Server(s), over gRPC.

At start-up each model is described by Triton itself (ModelMetadata, ModelConfig), so the
Headrace config names only the model and its endpoints. One grpc.aio channel per endpoint
address, shared by the models on it. Calls carry the remaining deadline, raw tensor contents
both ways, and Triton's status codes come back to the client as codes (`UpstreamError`).

A call that fails as if its endpoint were gone (UNAVAILABLE: refused, reset, not ready) is
retried once on another endpoint: inference on a stateless model is idempotent, so running it
twice is harmless, and a dead server then costs the client nothing.

Models with `shared_memory.enabled` pass large tensors through system shared-memory regions
registered with each endpoint (`headrace.backends.shared_memory`), falling back to bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import propagate, trace

from headrace.backends.shared_memory import (
    SharedMemoryLayout,
    SharedMemoryPool,
    SystemSharedMemory,
)
from headrace.config import TritonModelSettings, TritonSettings, TritonTlsSettings
from headrace.errors import ConfigError, StartupError, UpstreamError
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol import model_config_pb2 as config_pb
from headrace.protocol.converters import request_to_proto, response_from_proto
from headrace.protocol.datatypes import DATATYPES
from headrace.routing import Endpoint, EndpointPool
from headrace.routing.discovery import is_dns, resolve
from headrace.spec import BatchingHints, ModelSpec, TensorSpec

BACKEND_NAME = "triton"
_BY_CONFIG_TYPE = {datatype.config_type: datatype for datatype in DATATYPES.values()}
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

_logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Model:
    settings: TritonModelSettings
    remote_name: str
    pool: EndpointPool
    spec: ModelSpec | None = None
    tls: TritonTlsSettings | None = None
    """TLS to the endpoints (the model's own, else `triton.tls`); None: plaintext."""
    shared_memory: dict[str, SharedMemoryPool] = field(default_factory=dict)
    """Shared-memory regions by endpoint address, made on first use."""


def _tensors(
    configured: Sequence[config_pb.ModelInput] | Sequence[config_pb.ModelOutput],
) -> tuple[TensorSpec, ...]:
    specs = []
    for tensor in configured:
        datatype = _BY_CONFIG_TYPE.get(tensor.data_type)
        if datatype is None:
            raise StartupError(f"tensor '{tensor.name}' has unsupported type {tensor.data_type}")
        optional = bool(getattr(tensor, "optional", False))
        specs.append(TensorSpec(tensor.name, datatype, tuple(tensor.dims), optional))
    return tuple(specs)


def channel_credentials(tls: TritonTlsSettings) -> grpc.ChannelCredentials:
    """Credentials for a TLS channel to Triton: the CA to trust, and the client certificate
    for mutual TLS.

    Raises:
        ConfigError: a file cannot be read (the message names the key and the file).
    """
    contents: dict[str, bytes | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        try:
            contents[key] = path.read_bytes() if path is not None else None
        except OSError as exc:
            raise ConfigError(f"triton tls.{key}: cannot read {path}: {exc.strerror}") from exc
    return grpc.ssl_channel_credentials(
        root_certificates=contents["ca_file"],
        private_key=contents["key_file"],
        certificate_chain=contents["cert_file"],
    )


class TritonBackend:
    """Runs requests on Triton servers through per-model endpoint pools."""

    def __init__(self, models: Sequence[TritonModelSettings], settings: TritonSettings) -> None:
        self._settings = settings
        self._models: dict[str, _Model] = {}
        for model in models:
            pool = EndpointPool(
                model.name,
                max_inflight_per_endpoint=settings.max_inflight_per_endpoint or 1,
                ejection_consecutive_failures=settings.ejection_consecutive_failures,
                ejection_s=settings.ejection_s,
                unhealthy_after_failed_checks=settings.health_check_unhealthy_threshold,
            )
            self._models[model.name] = _Model(
                model, model.remote_name or model.name, pool, tls=model.tls or settings.tls
            )
        # AsyncStub exists only in the generated .pyi: the runtime stub is the same class.
        self._channels: dict[
            tuple[str, TritonTlsSettings | None],
            tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceAsyncStub],
        ] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.shared_memory_prefix = f"headrace-{os.getpid()}-{secrets.token_hex(3)}-"
        """Names of this backend's shared-memory regions (/dev/shm files, Triton regions)."""
        self._shared_memory_allocator = SystemSharedMemory()
        self._pool_numbers = itertools.count()

    # -- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve endpoints, describe every model from Triton, start health checks.

        Raises:
            StartupError: no endpoint of a model described it within
                `triton.startup_timeout_s`.
        """
        for model in self._models.values():
            model.pool.set_addresses(await resolve(model.settings.endpoints))
            model.spec = await self._discover(model)
            if any(is_dns(endpoint) for endpoint in model.settings.endpoints):
                self._tasks.append(asyncio.create_task(self._refresh_dns(model)))
            self._tasks.append(asyncio.create_task(self._check_health(model)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for model in self._models.values():
            pools, model.shared_memory = model.shared_memory, {}
            for shared in pools.values():
                await shared.close()
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close(None)

    def model_specs(self) -> Sequence[ModelSpec]:
        return [model.spec for model in self._models.values() if model.spec is not None]

    def is_ready(self, spec: ModelSpec) -> bool:
        model = self._models.get(spec.name)
        return model is not None and model.pool.ready()

    def model_names(self) -> list[str]:
        """The configured models' names (as Headrace serves them)."""
        return list(self._models)

    def pool(self, name: str) -> EndpointPool:
        """The endpoint pool of a model (for health views and tests)."""
        return self._models[name].pool

    def shared_memory_pools(self, name: str) -> dict[str, SharedMemoryPool]:
        """A model's shared-memory pools by endpoint address (for tests and the bench)."""
        return dict(self._models[name].shared_memory)

    def _shared_memory_pool(self, model: _Model, address: str) -> SharedMemoryPool:
        shared = model.shared_memory.get(address)
        if shared is None:
            shared = model.shared_memory[address] = SharedMemoryPool(
                self._shared_memory_allocator,
                self._stub(address, model.tls),
                address=address,
                prefix=f"{self.shared_memory_prefix}{next(self._pool_numbers)}-",
                capacity_bytes=model.settings.shared_memory.pool_bytes,
            )
        return shared

    # -- calls -------------------------------------------------------------------------

    def _stub(
        self, address: str, tls: TritonTlsSettings | None
    ) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        """The stub of the channel to `address` (one per address and TLS setting)."""
        entry = self._channels.get((address, tls))
        if entry is None:
            settings = self._settings
            options: list[tuple[str, str | int]] = [
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                # A restarted Triton is found again within a health-check interval or two,
                # not after grpc's default backoff of up to two minutes.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if tls is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                if tls.server_name is not None:
                    options.append(("grpc.ssl_target_name_override", tls.server_name))
                channel = grpc.aio.secure_channel(address, channel_credentials(tls), options)
            stub: pb_grpc.GRPCInferenceServiceAsyncStub = pb_grpc.GRPCInferenceServiceStub(channel)
            entry = self._channels[(address, tls)] = (channel, stub)
        return entry[1]

    async def infer(
        self, spec: ModelSpec, request: InferenceRequest, timeout_s: float | None = None
    ) -> InferenceResponse:
        model = self._models[spec.name]
        layout = (
            SharedMemoryLayout.plan(spec, request, model.settings.shared_memory)
            if model.settings.shared_memory.enabled
            else None
        )
        message: pb.ModelInferRequest | None = None
        # The headrace.backend span is current here: Triton's own spans join its trace.
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        metadata = tuple(carrier.items())
        span = trace.get_current_span()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s if timeout_s is not None else None
        tried: list[Endpoint] = []
        while True:
            endpoint = await model.pool.acquire(exclude=tried)
            remaining = None if deadline is None else max(0.001, deadline - loop.time())
            if span.is_recording():
                span.set_attribute("server.address", endpoint.address)
            shared = region = None
            try:
                if layout is not None:
                    shared = self._shared_memory_pool(model, endpoint.address)
                    region = await shared.acquire(layout.byte_size)
                if layout is not None and region is not None:
                    layout.write(region, request)
                    sent = layout.message(region, request, model.remote_name, spec.version)
                else:
                    if message is None:
                        message = request_to_proto(request, model.remote_name, spec.version)
                    sent = message
                reply = await self._stub(endpoint.address, model.tls).ModelInfer(
                    sent, timeout=remaining, metadata=metadata
                )
                if layout is not None and region is not None:
                    response = layout.response(region, reply)
                else:
                    response = response_from_proto(reply)
            except grpc.aio.AioRpcError as exc:
                unreachable = exc.code() in _RETRYABLE
                if unreachable and shared is not None:
                    shared.forget_registrations()  # a restarted Triton knows none of them
                model.pool.release(endpoint, unreachable=unreachable)
                tried.append(endpoint)
                if unreachable and len(tried) == 1 and model.pool.ready():
                    _logger.info(
                        "retrying model %s elsewhere: %s answered %s",
                        spec.name,
                        endpoint.address,
                        exc.code().name,
                    )
                    continue
                raise UpstreamError(
                    exc.code(), f"Triton at {endpoint.address}: {exc.details()}"
                ) from exc
            except BaseException:
                model.pool.release(endpoint)
                raise
            finally:
                if shared is not None and region is not None:
                    shared.release(region)
            model.pool.release(endpoint)
            response.model_name = spec.name
            response.model_version = spec.version
            response.id = request.id
            response.endpoint = endpoint.address
            return response

    # -- discovery and health -----------------------------------------------------------

    async def _discover(self, model: _Model) -> ModelSpec:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.startup_timeout_s
        version = model.settings.version or ""
        problems: dict[str, str] = {}
        while True:
            for endpoint in model.pool.endpoints:
                stub = self._stub(endpoint.address, model.tls)
                try:
                    metadata = await stub.ModelMetadata(
                        pb.ModelMetadataRequest(name=model.remote_name, version=version),
                        timeout=self._settings.health_check_timeout_s,
                    )
                    config = await stub.ModelConfig(
                        pb.ModelConfigRequest(name=model.remote_name, version=version),
                        timeout=self._settings.health_check_timeout_s,
                    )
                except grpc.aio.AioRpcError as exc:
                    problems[endpoint.address] = f"{exc.code().name}: {exc.details()}"
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        raise StartupError(
                            f"model '{model.settings.name}': Triton at {endpoint.address} "
                            f"does not serve '{model.remote_name}': {exc.details()}"
                        ) from exc
                    continue
                return self._spec(model, metadata, config.config)
            if loop.time() >= deadline:
                described = "; ".join(f"{a}: {p}" for a, p in problems.items())
                raise StartupError(
                    f"model '{model.settings.name}': no endpoint described it within "
                    f"{self._settings.startup_timeout_s:g} s ({described or 'no endpoints'})"
                )
            await asyncio.sleep(0.2)

    def _spec(
        self, model: _Model, metadata: pb.ModelMetadataResponse, config: config_pb.ModelConfig
    ) -> ModelSpec:
        versions = sorted((v for v in metadata.versions if v.isdigit()), key=int)
        version = model.settings.version or (versions[-1] if versions else "1")
        batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
        if batching is not None and model.settings.batching.enabled:
            _logger.warning(
                "model %s: Triton's dynamic batcher is on as well as Headrace's; requests "
                "are batched twice (turn one off)",
                model.settings.name,
            )
        instances = sum(max(group.count, 1) for group in config.instance_group) or 1
        model.pool.limit = self._settings.max_inflight_per_endpoint or instances
        endpoints = max(1, len(model.pool.endpoints))
        hints = BatchingHints(
            preferred_batch_sizes=tuple(batching.preferred_batch_size) if batching else (),
            max_queue_delay_us=batching.max_queue_delay_microseconds if batching else None,
            max_inflight_batches=endpoints * model.pool.limit,
        )
        return ModelSpec(
            name=model.settings.name,
            version=version,
            platform=config.platform or metadata.platform,
            backend=config.backend or BACKEND_NAME,
            inputs=_tensors(config.input),
            outputs=_tensors(config.output),
            max_batch_size=config.max_batch_size,
            parameters={key: value.string_value for key, value in config.parameters.items()},
            batching_hints=hints,
        )

    async def _check_health(self, model: _Model) -> None:
        interval = self._settings.health_check_interval_s
        while True:
            await asyncio.sleep(interval)
            spec = model.spec
            checks = [self._probe(endpoint, model, spec) for endpoint in model.pool.endpoints]
            for endpoint, healthy in zip(
                model.pool.endpoints, await asyncio.gather(*checks), strict=True
            ):
                shared = model.shared_memory.get(endpoint.address)
                if shared is not None and healthy and not endpoint.healthy:
                    shared.forget_registrations()  # back after an outage: maybe restarted
                model.pool.record_health(endpoint, healthy)

    async def _probe(self, endpoint: Endpoint, model: _Model, spec: ModelSpec | None) -> bool:
        if asyncio.get_running_loop().time() < endpoint.ejected_until:
            return False
        stub = self._stub(endpoint.address, model.tls)
        timeout = self._settings.health_check_timeout_s
        with contextlib.suppress(grpc.aio.AioRpcError):
            server = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)
            ready = await stub.ModelReady(
                pb.ModelReadyRequest(name=model.remote_name, version=spec.version if spec else ""),
                timeout=timeout,
            )
            return server.ready and ready.ready
        return False

    async def _refresh_dns(self, model: _Model) -> None:
        while True:
            await asyncio.sleep(self._settings.dns_refresh_s)
            addresses = await resolve(model.settings.endpoints)
            if addresses:  # a failed lookup keeps the endpoints we have
                model.pool.set_addresses(addresses)


__all__ = ["BACKEND_NAME", "TritonBackend"]
