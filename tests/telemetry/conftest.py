"""Fixtures of the telemetry tests: an OTLP receiver and servers that export to it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from headrace.config import Settings
from tests.conftest import ServerThread, make_settings
from tests.telemetry.receiver import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def telemetry_server(
    *models: dict[str, Any],
    tracing: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    logging: dict[str, Any] | None = None,
) -> ServerThread:
    """A server for the default and test models plus `models`, with these telemetry sections."""
    tree = make_settings().model_dump(mode="json")
    tree["models"] += list(models)
    if tracing is not None:
        tree["tracing"] = tracing
    if metrics is not None:
        tree["metrics"] = metrics
    if logging is not None:
        tree["logging"] = logging
    return ServerThread(Settings.model_validate(tree))


def exporting_to(receiver: OtlpReceiver, **fields: Any) -> dict[str, Any]:
    """Tracing settings that export every span to `receiver`."""
    return {
        "exporter": "otlp_grpc",
        "endpoint": receiver.endpoint,
        "export_delay_ms": 50,
        "sample_ratio": 1.0,
        **fields,
    }


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A fresh W3C traceparent header: (header, trace id, parent span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id
