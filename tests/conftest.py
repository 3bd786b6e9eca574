"""Suite-wide pytest setup: marks tests by folder, reports world readiness.

World fixtures live in ``integration/conftest.py`` (Open vSwitch) and
``e2e/conftest.py`` (dockerd); the machinery behind them is ``tests/world.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import world

_HERE = Path(__file__).resolve().parent
_MARKS_BY_FOLDER = {
    "integration": ("integration",),
    "e2e": ("e2e",),
    "packaging": ("packaging", "e2e"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by folder, so ``-m "not e2e"`` selects the fast ones and
    ``-m packaging`` the package tests."""
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(_HERE).parts[0]
        except ValueError:
            continue
        for mark in _MARKS_BY_FOLDER.get(folder, ()):
            item.add_marker(mark)


def pytest_report_header() -> list[str]:
    """Say up front whether integration and e2e tests can run here."""
    lines = []
    for label, docker in (("integration (OVS)", False), ("e2e (dockerd)", True)):
        missing = world.missing_requirements(docker)
        lines.append(f"{label}: {'missing ' + ', '.join(missing) if missing else 'ready'}")
    return lines
