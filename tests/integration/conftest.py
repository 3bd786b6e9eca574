"""Fixtures for tests against a real (private, userspace) Open vSwitch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import world


@pytest.fixture
def ovs_world() -> Iterator[world.OVSWorld]:
    """A fresh namespace with its own ovsdb-server and ovs-vswitchd.

    Cheap (well under a second), so every test gets its own.  Yields an
    :class:`~tests.world.OVSWorld`: ``.netns``, ``.ovs`` (``.remote``,
    ``.vsctl()``...), ``.start_driver()``.
    """
    world.require()
    with world.OVSWorld() as w:
        yield w


@pytest.fixture(scope="module")
def ovs_world_module() -> Iterator[world.OVSWorld]:
    """Like ``ovs_world`` but shared by a module's tests; they must clean up."""
    world.require()
    with world.OVSWorld() as w:
        yield w


@pytest.fixture
def driver(ovs_world: world.OVSWorld) -> world.Driver:
    """The driver under test, running against ``ovs_world``'s OVSDB."""
    return ovs_world.start_driver()
