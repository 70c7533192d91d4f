"""The in-process backend: models are Python callables over numpy arrays.

It serves the embedded default config, and doubles as the backend tests and benchmarks use to
measure Headrace itself.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from headrace.config import LocalBackendSettings, LocalModelSettings, TensorSettings
from headrace.errors import ConfigError, HeadraceError, ModelExecutionError
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.protocol.datatypes import DATATYPES
from headrace.spec import ModelSpec, TensorSpec

LocalModel = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
"""A loaded local model: input arrays by name in, output arrays by name out."""

PLATFORM = "headrace_local"
BACKEND_NAME = "local"

_logger = logging.getLogger(__name__)


def _tensor_spec(settings: TensorSettings) -> TensorSpec:
    return TensorSpec(settings.name, DATATYPES[settings.datatype], settings.dims, settings.optional)


def spec_from_settings(settings: LocalModelSettings) -> ModelSpec:
    """The signature a local model's config declares."""
    return ModelSpec(
        name=settings.name,
        version=settings.version,
        platform=PLATFORM,
        backend=BACKEND_NAME,
        inputs=tuple(_tensor_spec(tensor) for tensor in settings.inputs),
        outputs=tuple(_tensor_spec(tensor) for tensor in settings.outputs),
        max_batch_size=settings.max_batch_size,
        parameters=dict(settings.parameters),
    )


def _resolve_entrypoint(entrypoint: str) -> Any:
    module_name, _, attribute = entrypoint.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        module_spec = importlib.util.spec_from_file_location(f"headrace_model_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def load_model(settings: LocalModelSettings) -> LocalModel:
    """Import the entrypoint and call it with `init_args` to build the model.

    Raises:
        ConfigError: the entrypoint cannot be imported or called, or returns no callable.
    """
    where = f"model '{settings.name}' version {settings.version}"
    try:
        factory = _resolve_entrypoint(settings.entrypoint)
        model = factory(**settings.init_args)
    except Exception as exc:
        raise ConfigError(
            f"{where}: entrypoint '{settings.entrypoint}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(model):
        raise ConfigError(f"{where}: entrypoint '{settings.entrypoint}' returned no callable")
    return model  # type: ignore[no-any-return]


class _LoadedModel:
    __slots__ = ("inline", "model", "spec")

    def __init__(self, spec: ModelSpec, model: LocalModel, inline: bool) -> None:
        self.spec = spec
        self.model = model
        self.inline = inline


class LocalBackend:
    """Runs local models inline or on a thread pool owned by this backend."""

    def __init__(
        self, models: Sequence[LocalModelSettings], settings: LocalBackendSettings
    ) -> None:
        self._model_settings = tuple(models)
        self._settings = settings
        self._loaded: dict[tuple[str, str], _LoadedModel] = {}
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        for settings in self._model_settings:
            spec = spec_from_settings(settings)
            model = load_model(settings)
            self._loaded[(spec.name, spec.version)] = _LoadedModel(
                spec, model, inline=settings.execution == "inline"
            )
            _logger.info("loaded local model %s version %s", spec.name, spec.version)
        if any(not loaded.inline for loaded in self._loaded.values()):
            self._executor = ThreadPoolExecutor(
                max_workers=self._settings.worker_threads, thread_name_prefix="headrace-local"
            )

    async def stop(self) -> None:
        if self._executor is not None:
            # Threads cannot be interrupted; in-flight model calls finish on their own.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._loaded.clear()

    def model_specs(self) -> Sequence[ModelSpec]:
        return [loaded.spec for loaded in self._loaded.values()]

    def is_ready(self, spec: ModelSpec) -> bool:
        return (spec.name, spec.version) in self._loaded

    async def infer(
        self, spec: ModelSpec, request: InferenceRequest, timeout_s: float | None = None
    ) -> InferenceResponse:
        # timeout_s is not enforced: a model call cannot be interrupted, and abandoning it
        # would leave its thread busy with nobody waiting. Callers' deadlines still end their
        # own waits (gRPC cancels the call).
        loaded = self._loaded[(spec.name, spec.version)]
        try:
            if loaded.inline or self._executor is None:
                outputs = loaded.model(request.inputs)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(self._executor, loaded.model, request.inputs)
        except (asyncio.CancelledError, HeadraceError):
            raise
        except Exception as exc:
            _logger.exception("model %s version %s raised", spec.name, spec.version)
            raise ModelExecutionError(
                f"model '{spec.name}' version {spec.version} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(outputs, Mapping):
            raise ModelExecutionError(
                f"model '{spec.name}' returned {type(outputs).__name__}, not a mapping of "
                "output names to arrays"
            )
        return InferenceResponse(
            model_name=spec.name,
            model_version=spec.version,
            id=request.id,
            outputs=spec.conform_outputs(outputs, spec.batch_size(request)),
            endpoint=BACKEND_NAME,
        )
