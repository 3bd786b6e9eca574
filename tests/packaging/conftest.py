"""Fixtures for the package tests: the .deb built once per run, and a
scenario (a network, two containers, ping) to run against a driver that was
installed rather than run from the checkout."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import world
from tests.e2e.cli import E2E


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ovsdriver_<version>_all.deb`` built by scripts/build-deb from this checkout."""
    world.require(docker=True)
    out = tmp_path_factory.mktemp("deb")
    result = world.run(["bash", world.REPO_ROOT / "scripts" / "build-deb", out], timeout=900)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name.startswith("ovsdriver_") and path.name.endswith("_all.deb"), path
    return path


@pytest.fixture(scope="module")
def docker_world() -> Iterator[world.DockerWorld]:
    """A namespace with private OVS and dockerd, shared by a module's tests."""
    world.require(docker=True)
    with world.DockerWorld() as w:
        yield w


def scenario(w: world.DockerWorld, driver_name: str, subnet: str) -> E2E:
    """A network of ``driver_name``, two containers on it that ping each
    other and the gateway, one publishing port 80 (a privileged port: the
    driver needs the right to hold it); returns the shortcuts to inspect it
    further."""
    e2e = E2E(w, types.SimpleNamespace(name=driver_name))
    e2e.network("pk", subnet)
    e2e.run("pk1", "pk")
    e2e.run("pk2", "pk", "-p", "80:80")  # a privileged port, which the driver holds
    assert w.netns.bind_tcp(80) == "Address already in use"
    pk2 = e2e.container_net("pk2", "pk")["IPAddress"]
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    assert e2e.ping("pk1", pk2), w.logs()
    assert e2e.ping("pk2", gateway), w.logs()
    return e2e
