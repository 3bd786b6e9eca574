"""Fixtures for end-to-end tests: a real dockerd using the driver over OVS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import world
from tests.e2e.cli import E2E


@pytest.fixture(scope="module")
def docker_world() -> Iterator[world.DockerWorld]:
    """A namespace with private OVS and dockerd (``--iptables=false``).

    Module-scoped because dockerd takes seconds to start.  Yields a
    :class:`~tests.world.DockerWorld`: ``.netns``, ``.ovs``, ``.dockerd``
    (``.docker()``...) with the image ``ovsdriver-test/busybox`` imported,
    ``.start_driver()``.  Tests sharing it should use the ``driver``
    fixture, which resets the engine and OVS after each test.
    """
    world.require(docker=True)
    with world.DockerWorld() as w:
        yield w


@pytest.fixture(scope="module")
def docker_world_iptables() -> Iterator[world.DockerWorld]:
    """Like ``docker_world`` with ``--iptables=true``, as a real user has it.

    The engine then sets the namespace's FORWARD policy to DROP: use this to
    test NAT and published ports under realistic firewall rules.
    """
    world.require(docker=True)
    with world.DockerWorld(iptables=True) as w:
        yield w


def _driver_in(w: world.DockerWorld) -> Iterator[world.Driver]:
    d = w.start_driver()
    try:
        yield d
    finally:
        # Remove containers and networks while the driver still answers,
        # then leave OVS empty for the next test of the module.
        try:
            w.dockerd.reset()
        finally:
            d.close()
            w.ovs.reset()


@pytest.fixture
def driver(docker_world: world.DockerWorld) -> Iterator[world.Driver]:
    """A fresh driver (unique name: ``-d driver.name``) in ``docker_world``.

    Afterwards all containers and user networks are removed, the driver is
    stopped and every OVS bridge deleted, so tests sharing the module's
    world start clean.
    """
    yield from _driver_in(docker_world)


@pytest.fixture
def driver_iptables(
    docker_world_iptables: world.DockerWorld,
) -> Iterator[world.Driver]:
    """Like ``driver``, in ``docker_world_iptables``."""
    yield from _driver_in(docker_world_iptables)


@pytest.fixture
def e2e(docker_world: world.DockerWorld, driver: world.Driver) -> E2E:
    """The docker CLI and the host of ``docker_world``, with a fresh driver
    (``driver`` cleans up every container, network and bridge afterwards)."""
    return E2E(docker_world, driver)
