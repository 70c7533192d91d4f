"""Types of the C module `_fastotlp.c` (optional; see `headrace.telemetry.export`)."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

def span_fields(
    spans: Sequence[Sequence[Any]],
    attributes_of: Callable[[Mapping[str, Any]], bytes],
    span_field: Callable[[Sequence[Any]], bytes],
    head: bytes = b"",
    /,
) -> bytes: ...
