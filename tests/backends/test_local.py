"""The in-process backend on its own: loading, execution modes, failures, output checks."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from headrace.backends.local import LocalBackend, spec_from_settings
from headrace.config import LocalBackendSettings, LocalModelSettings
from headrace.errors import ConfigError, ModelExecutionError
from headrace.inference import InferenceRequest

MODELS = Path(__file__).resolve().parents[1] / "models.py"


def _settings(entrypoint: str, **fields) -> LocalModelSettings:
    values = {
        "name": "m",
        "entrypoint": entrypoint,
        "max_batch_size": 4,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    }
    values.update(fields)
    return LocalModelSettings.model_validate(values)


def _request(data: np.ndarray) -> InferenceRequest:
    return InferenceRequest("m", "1", "id-1", {"INPUT0": data})


async def _infer(settings: LocalModelSettings, data: np.ndarray):
    backend = LocalBackend([settings], LocalBackendSettings(worker_threads=1))
    await backend.start()
    try:
        spec = backend.model_specs()[0]
        return await backend.infer(spec, _request(data))
    finally:
        await backend.stop()


async def test_thread_execution_runs_off_the_event_loop() -> None:
    threads: list[str] = []

    class Recorder:
        def __call__(self, inputs):
            threads.append(threading.current_thread().name)
            return {"OUTPUT0": inputs["INPUT0"]}

    import sys
    import types

    module = types.ModuleType("headrace_test_recorder")
    module.Recorder = Recorder  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        data = np.ones((2, 3), np.float32)
        response = await _infer(_settings("headrace_test_recorder:Recorder"), data)
        inline = await _infer(
            _settings("headrace_test_recorder:Recorder", execution="inline"), data
        )
    finally:
        del sys.modules[module.__name__]
    np.testing.assert_array_equal(response.outputs["OUTPUT0"], data)
    np.testing.assert_array_equal(inline.outputs["OUTPUT0"], data)
    assert threads[0].startswith("headrace-local")
    assert threads[1] == threading.current_thread().name
    assert response.id == "id-1"
    assert response.model_version == "1"


async def test_same_kind_outputs_are_cast_to_the_declared_type() -> None:
    response = await _infer(
        _settings(f"{MODELS}:Scale", init_args={"factor": 2.0}, execution="inline"),
        np.ones((1, 2), np.float32),
    )
    assert response.outputs["OUTPUT0"].dtype == np.float32


async def test_model_exception_is_internal_with_the_cause() -> None:
    with pytest.raises(ModelExecutionError, match="model 'm' version 1 failed: ValueError"):
        await _infer(_settings(f"{MODELS}:Failing"), np.ones((1, 2), np.float32))


async def test_output_shape_must_keep_the_batch() -> None:
    settings = _settings(
        "headrace.examples.identity:Identity",
        outputs=[{"name": "OUTPUT0", "datatype": "FP32", "dims": [2]}],
    )
    with pytest.raises(ModelExecutionError, match=r"shape \[1,3\] for output 'OUTPUT0'"):
        await _infer(settings, np.ones((1, 3), np.float32))


async def test_missing_output() -> None:
    settings = _settings(
        "headrace.examples.identity:Identity",
        outputs=[{"name": "SCORES", "datatype": "FP32", "dims": [-1]}],
    )
    with pytest.raises(ModelExecutionError, match="returned no output 'SCORES'"):
        await _infer(settings, np.ones((1, 3), np.float32))


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("no_such_module_xyz:Model", "No module named 'no_such_module_xyz'"),
        ("headrace.examples.identity:Missing", "has no attribute 'Missing'"),
        (f"{MODELS}:Scale", "missing 1 required positional argument: 'factor'"),
        ("/nonexistent/model.py:Model", "FileNotFoundError"),
        ("headrace.examples.identity:__doc__", "'str' object is not callable"),
    ],
)
async def test_entrypoint_failures_are_config_errors(entrypoint: str, message: str) -> None:
    backend = LocalBackend([_settings(entrypoint)], LocalBackendSettings())
    with pytest.raises(ConfigError, match="model 'm' version 1: entrypoint") as raised:
        await backend.start()
    assert message in str(raised.value)
    await backend.stop()


def test_spec_reports_platform_and_batching() -> None:
    spec = spec_from_settings(_settings("headrace.examples.identity:Identity"))
    assert (spec.platform, spec.backend, spec.max_batch_size) == ("headrace_local", "local", 4)
    assert spec.wire_shape(spec.inputs[0]) == (-1, -1)
