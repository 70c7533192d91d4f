"""`python -m bench`'s plan: the standard set, and --quick's short options for each scenario
(only the options a scenario has)."""

from __future__ import annotations

import pytest

from bench.__main__ import STANDARD_SET, _scenarios, plan


def test_the_standard_set_runs_every_registered_scenario_with_its_defaults() -> None:
    scenarios = _scenarios()
    runs = plan([], scenarios)
    assert [name for name, _, _ in runs] == [n for n in STANDARD_SET if n in scenarios]
    frontend = next(arguments for name, arguments, _ in runs if name == "frontend")
    assert frontend.trials == 3
    assert frontend.duration_s == 5.0


def test_quick_shortens_windows_and_load_levels_where_a_scenario_has_them() -> None:
    runs = {name: (arguments, argv) for name, arguments, argv in plan(["--quick"], _scenarios())}
    gpu_sim, gpu_sim_argv = runs["gpu_sim"]
    assert gpu_sim.concurrencies == (1, 64)
    assert (gpu_sim.trials, gpu_sim.warmup_s, gpu_sim.duration_s) == (1, 0.5, 1.5)
    assert gpu_sim_argv[0] == "gpu_sim"
    assert runs["frontend"][0].trials == 2  # the scenario's own quick option wins
    assert runs["open_loop"][0].rates == (500.0, 2000.0)
    # telemetry has no --concurrencies: nothing it lacks is passed.
    assert "--concurrencies" not in runs["telemetry"][1]


def test_a_named_scenario_runs_alone_with_its_options() -> None:
    [(name, arguments, argv)] = plan(["stream", "--trials", "4"], _scenarios())
    assert (name, arguments.trials, argv) == ("stream", 4, ["stream", "--trials", "4"])


def test_an_unknown_scenario_does_not_parse() -> None:
    with pytest.raises(SystemExit):
        plan(["no_such_scenario"], _scenarios())
