"""A scenario's command-line options from its options dataclass: one `--kebab-case` option per
field, defaulting to the field's value in the scenario's defaults, and the common checks of a
load (counts, clients, the measurement window)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class _Load(Protocol):
    @property
    def trials(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def elements(self) -> int: ...
    @property
    def warmup_s(self) -> float: ...
    @property
    def duration_s(self) -> float: ...


L = TypeVar("L", bound=_Load)


def option_name(field_name: str) -> str:
    """`duration_s` -> `--duration-s`."""
    return "--" + field_name.replace("_", "-")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


_ints.__name__ = "comma-separated int"
_floats.__name__ = "comma-separated float"
_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    tuple[int, ...]: _ints,
    tuple[float, ...]: _floats,
}


def add_options(
    parser: argparse.ArgumentParser,
    defaults: Any,
    help: Mapping[str, str] | None = None,
    types: Mapping[str, Callable[[str], Any]] | None = None,
) -> None:
    """One option per field of the dataclass instance `defaults`, in field order, defaulting to
    its value there: int, float and str take one value, a tuple of ints or floats a
    comma-separated list, a bool is a flag (store_true). `help` gives an option's help by
    field name; `types` overrides how a field's text is parsed.

    Raises:
        TypeError: a field of a type without a parser and none in `types`.
    """
    hints = typing.get_type_hints(type(defaults))
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        text = (help or {}).get(field.name)
        hint = hints[field.name]
        if hint is bool:
            parser.add_argument(
                option_name(field.name), action="store_true", default=value, help=text
            )
            continue
        parse = (types or {}).get(field.name) or _PARSERS.get(hint)
        if parse is None:
            raise TypeError(f"no parser for {field.name}: {hint}")
        parser.add_argument(option_name(field.name), type=parse, default=value, help=text)


def options_of(cls: type[T], arguments: argparse.Namespace) -> T:
    """The dataclass `cls` from the options `add_options` parsed."""
    names = (field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls(**{name: getattr(arguments, name) for name in names})


def check_window(warmup_s: float, duration_s: float) -> None:
    """Raises ValueError: a negative warm-up or an empty measurement window."""
    if warmup_s < 0 or duration_s <= 0:
        raise ValueError("--warmup-s must be >= 0 and --duration-s > 0")


def check_clients(clients: int, limit: int, limit_option: str = "--concurrency") -> None:
    """Raises ValueError: more client processes than requests in flight (`limit`)."""
    if clients > limit:
        raise ValueError(f"--clients must not exceed {limit_option}")


def check_load(options: L) -> L:
    """`options`, checked: its trials, concurrency, clients and elements at least 1, no more
    clients than the concurrency, and `check_window`.

    Raises:
        ValueError: a count below 1, more clients than the concurrency, a negative warm-up or
            an empty window.
    """
    if min(options.trials, options.concurrency, options.clients, options.elements) < 1:
        raise ValueError("--trials, --concurrency, --clients and --elements must be >= 1")
    check_clients(options.clients, options.concurrency)
    check_window(options.warmup_s, options.duration_s)
    return options
