"""The served models: name and version to the backend that runs them, plus their statistics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from headrace.backends.base import Backend
from headrace.errors import ModelNotFoundError, ModelUnavailableError
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.spec import ModelSpec
from headrace.statistics import ModelStatistics


@dataclass(slots=True, eq=False)
class ServedModel:
    """One model version, the backend that runs it, and its statistics."""

    spec: ModelSpec
    backend: Backend
    statistics: ModelStatistics = field(default_factory=ModelStatistics)

    @property
    def ready(self) -> bool:
        return self.backend.is_ready(self.spec)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Run a validated request on this model version's backend.

        Raises:
            ModelUnavailableError (UNAVAILABLE): the model is not ready.
            HeadraceError: whatever the backend raises, with its code.
        """
        if not self.backend.is_ready(self.spec):
            raise ModelUnavailableError(
                f"model '{self.spec.name}' version {self.spec.version} is not ready"
            )
        return await self.backend.infer(self.spec, request)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


class ModelRepository:
    """Looks up served model versions. Built once the backends have started."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._by_name: dict[str, dict[str, ServedModel]] = {}
        for backend in backends:
            for spec in backend.model_specs():
                versions = self._by_name.setdefault(spec.name, {})
                if spec.version in versions:
                    raise ValueError(f"model '{spec.name}' version {spec.version} served twice")
                versions[spec.version] = ServedModel(spec, backend)
        self._latest = {
            name: versions[max(versions, key=_version_key)]
            for name, versions in self._by_name.items()
        }

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """The model version a request addresses; an empty version means the highest.

        Raises:
            ModelNotFoundError (NOT_FOUND): no such model, or no such version of it.
        """
        if not version:
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        else:
            versions = self._by_name.get(name)
            if versions is not None:
                served = versions.get(version)
                if served is not None:
                    return served
                raise ModelNotFoundError(
                    f"model '{name}' has no version '{version}'; served versions: "
                    f"{', '.join(sorted(versions, key=_version_key))}"
                )
        if not name:
            raise ModelNotFoundError("no model name given")
        raise ModelNotFoundError(f"unknown model '{name}'")

    def versions(self, name: str) -> list[str]:
        """The served versions of `name`, lowest first (empty if unknown)."""
        return sorted(self._by_name.get(name, {}), key=_version_key)

    def models(self) -> Sequence[ServedModel]:
        """Every served model version, by name then version."""
        return [
            self._by_name[name][version]
            for name in sorted(self._by_name)
            for version in self.versions(name)
        ]

    @property
    def ready(self) -> bool:
        """Whether every served model version can take requests."""
        return all(served.ready for served in self.models())
