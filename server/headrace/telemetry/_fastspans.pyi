"""Types of the C module `_fastspans.c` (optional; see `headrace.telemetry.spans`)."""

from collections.abc import Callable
from typing import Any

class Starter:
    def __init__(
        self,
        tracer: Any,
        getrandbits: Callable[[int], int],
        non_recording: Callable[[int, int, int, Any], Any],
        flags: list[Any],
        no_state: Any,
        bound: int,
    ) -> None: ...
    def start(
        self,
        name: str,
        parent: Any,
        kind: Any,
        attributes: tuple[dict[str, Any], int],
        start_time: int | None = None,
        shared: bool = True,
    ) -> Any: ...
    def start_current(
        self, name: str, context: Any, kind: Any, attributes: tuple[dict[str, Any], int]
    ) -> tuple[Any, object]: ...

def install(span_type: type) -> tuple[Callable[..., None], Callable[..., None]]: ...
def configure(
    variable: Any,
    span_key: str,
    context_type: type,
    parent_of: Callable[[Any], Any],
    end_failed: Callable[[Any, BaseException], None],
    detach: Callable[[Any], None],
    non_recording_type: type,
) -> None: ...
def end_current(span: Any, token: object, error: BaseException | None) -> None: ...

class Recorder:
    dropped: int
    def __init__(
        self, spans: Any, wake: Callable[[], None], max_queued: int, batch_size: int
    ) -> None: ...
    def record(self, span: Any) -> None: ...
