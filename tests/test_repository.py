"""Resolving model names and versions."""

from __future__ import annotations

import pytest

from headrace.backends.local import LocalBackend
from headrace.config import LocalBackendSettings, LocalModelSettings
from headrace.errors import ModelNotFoundError
from headrace.repository import ModelRepository


def _model(version: str) -> LocalModelSettings:
    return LocalModelSettings.model_validate(
        {
            "name": "m",
            "version": version,
            "entrypoint": "headrace.examples.identity:Identity",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        }
    )


@pytest.fixture
async def repository():
    backend = LocalBackend([_model("2"), _model("10"), _model("9")], LocalBackendSettings())
    await backend.start()
    yield ModelRepository([backend])
    await backend.stop()


async def test_latest_is_the_highest_number(repository) -> None:
    assert repository.resolve("m").spec.version == "10"
    assert repository.versions("m") == ["2", "9", "10"]
    assert repository.resolve("m", "9").spec.version == "9"
    assert repository.ready


async def test_not_found(repository) -> None:
    with pytest.raises(
        ModelNotFoundError, match="model 'm' has no version '3'; served versions: 2, 9, 10"
    ):
        repository.resolve("m", "3")
    with pytest.raises(ModelNotFoundError, match="unknown model 'x'"):
        repository.resolve("x", "1")
