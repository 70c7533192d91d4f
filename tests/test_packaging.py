"""Packaging: every package under server/headrace ships (pyproject lists them explicitly)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT / "server").parts)
        for init in (ROOT / "server" / "headrace").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert "headrace.configs" in listed


def test_embedded_default_config_ships_in_the_package() -> None:
    from headrace.config import default_config_text

    assert default_config_text() == (ROOT / "configs" / "default.yaml").read_text()
