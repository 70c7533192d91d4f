"""Types of the C module `_fastspans.c` (optional; see `headrace.telemetry.spans`)."""

from collections.abc import Callable
from typing import Any

class Starter:
    def __init__(
        self,
        tracer: Any,
        random_bytes: Callable[[int], bytes],
        non_recording: Callable[[int, int, int, Any], Any],
        flags: list[Any],
        no_state: Any,
        bound: int,
        no_attributes: dict[str, Any],
        internal: int,
        links: bool,
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
        self,
        name: str,
        context: Any,
        kind: Any,
        attributes: tuple[dict[str, Any], int],
        parent: Any = None,
        /,
    ) -> tuple[Any, object]: ...
    def span_id(self) -> int: ...
    def record_prepared(
        self,
        name: str,
        parent: Any,
        attributes: tuple[dict[str, Any], int],
        start_ns: int,
        end_ns: int,
        link: Any = None,
        status: Any = None,
    ) -> None: ...

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
    def __init__(self, wake: Callable[[], None], max_queued: int, batch_size: int) -> None: ...
    def __len__(self) -> int: ...
    def record(self, span: Any) -> None: ...
    def take(self, count: int) -> list[Any]: ...

class ServerSpans:
    def __init__(
        self,
        starter: Starter,
        name: str,
        kind: Any,
        by_peer: dict[str, Any],
        for_peer: Callable[[str], Any],
        metadata: Any,
        extract: Callable[[Any], Any],
        no_parent: Any,
        code_type: type,
        error_numbers: frozenset[int],
        finish: Callable[[Any, object | None, Any, Any, BaseException | None], None],
        status_key: str,
    ) -> None: ...
    def start(self, context: Any) -> tuple[Any, object, Any]: ...
    def finish(
        self,
        span: Any,
        token: object | None,
        attributes: Any,
        context: Any,
        error: BaseException | None,
    ) -> None: ...
