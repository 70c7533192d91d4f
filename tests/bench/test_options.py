"""bench/options.py: a scenario's options from its dataclass, and the common load checks; and
every scenario's options parsed from no arguments are its standard run's."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import pytest

from bench import backtest, shared_memory, sweep
from bench.__main__ import _scenarios
from bench.options import add_options, check_load, options_of


@dataclass(frozen=True, slots=True)
class Knobs:
    trials: int = 3
    duration_s: float = 5.0
    warmup_s: float = 2.0
    concurrency: int = 16
    clients: int = 2
    elements: int = 16
    label: str = "x"
    batched: bool = False
    levels: tuple[int, ...] = (1, 16)
    rates: tuple[float, ...] = (0.5,)


def parse(argv: list[str], defaults: Knobs = Knobs()) -> Knobs:
    parser = argparse.ArgumentParser()
    add_options(parser, defaults, {"trials": "trials per side"})
    return options_of(Knobs, parser.parse_args(argv))


def test_no_arguments_give_the_defaults_back() -> None:
    assert parse([]) == Knobs()
    assert parse([], Knobs(trials=7, levels=(2,))) == Knobs(trials=7, levels=(2,))


def test_every_field_is_a_kebab_case_option_of_its_type() -> None:
    argv = ["--trials", "4", "--duration-s", "1.5", "--warmup-s", "0", "--label", "y"]
    argv += ["--levels", "1,64", "--rates", "2,3.5", "--batched"]
    assert parse(argv) == Knobs(
        trials=4,
        duration_s=1.5,
        warmup_s=0.0,
        label="y",
        batched=True,
        levels=(1, 64),
        rates=(2.0, 3.5),
    )


def test_a_bool_field_is_a_flag() -> None:
    assert parse([]).batched is False
    assert parse(["--batched"]).batched is True
    with pytest.raises(SystemExit):
        parse(["--batched", "yes"])


def test_a_tuple_option_is_comma_separated() -> None:
    assert parse(["--levels", "8"]).levels == (8,)
    with pytest.raises(SystemExit):
        parse(["--levels", "1,x"])


def test_help_comes_from_the_mapping() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Knobs(), {"trials": "trials per side"})
    assert "trials per side" in parser.format_help()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trials": 0}, "--trials, --concurrency, --clients and --elements must be >= 1"),
        ({"elements": 0}, "--trials, --concurrency, --clients and --elements must be >= 1"),
        ({"clients": 17}, "--clients must not exceed --concurrency"),
        ({"warmup_s": -0.1}, "--warmup-s must be >= 0 and --duration-s > 0"),
        ({"duration_s": 0.0}, "--warmup-s must be >= 0 and --duration-s > 0"),
    ],
)
def test_check_load_says_what_is_wrong(change: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_load(replace(Knobs(), **change))


def test_check_load_returns_what_it_checked() -> None:
    assert check_load(Knobs()) == Knobs()


def test_every_scenario_parses_no_arguments_to_its_standard_run() -> None:
    standard = {
        "shared_memory": shared_memory.DEFAULTS,
        "gpu_sim": sweep.SweepOptions(),
        "triton": sweep.SweepOptions(),
        "backtest": backtest.BacktestOptions(records=100_000, batch_size=128, concurrency=8),
    }
    for name, scenario in _scenarios().items():
        parser = argparse.ArgumentParser()
        scenario.add_arguments(parser)
        options = scenario.options_from(parser.parse_args([]))
        expected = standard[name] if name in standard else type(options)()
        assert options == expected, name
