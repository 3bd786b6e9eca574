"""ovsdriver as a managed (v2) Docker plugin, made by scripts/build-plugin
from Debian's packages and the .deb, created on a private dockerd through
DOCKER_HOST, pointed at the world's Open vSwitch by setting its
``openvswitch`` mount's source, enabled, used by a real scenario, disabled
and removed.

The plugin runs in the host network namespace of its engine, which is the
world's namespace here; it reaches the world's OVSDB only through the mount,
and sees the engine's sandboxes through the ``sandboxes`` mount (propagated,
as a host service sees them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import world
from tests.packaging.conftest import scenario
from tests.tls import CA, SecureOVSDB


def plugin_processes(w: world.DockerWorld) -> list[int]:
    """PIDs of the plugin's driver: twistd3 living in the world's namespace."""
    found = []
    for pid in w.netns.pids():
        cmdline = world._cmdline(pid)
        if "twistd3" in cmdline and "ovsdriver" in cmdline:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def plugin(deb: Path, docker_world: world.DockerWorld):
    """The plugin, created on the world's engine by scripts/build-plugin."""
    dockerd = docker_world.dockerd
    # Sandboxes are mounted below EXEC_ROOT/netns. On a systemd host every
    # mount is shared; here the directory is made a shared mount so that the
    # plugin's rshared bind receives the engine's later sandbox mounts.
    sandboxes = dockerd.exec_root / "netns"
    sandboxes.mkdir(parents=True, exist_ok=True)
    world.run(["mount", "--bind", sandboxes, sandboxes])
    world.run(["mount", "--make-shared", sandboxes])
    name = world.unique_driver_name()
    env = dockerd._cli_env()
    env["DOCKER_HOST"] = dockerd.host  # the engine the CLI talks to
    result = world.run(
        [
            "bash",
            world.REPO_ROOT / "scripts" / "build-plugin",
            "--name",
            name,
            "--deb",
            deb,
            "--sandbox-dir",
            sandboxes,
        ],
        env=env,
        timeout=1800,
    )
    assert result.stdout.strip().splitlines()[-1] == name
    try:
        yield name
    finally:
        # Leave nothing behind even when a test failed half-way.
        if dockerd.ready():
            dockerd.reset()
            dockerd.docker("plugin", "disable", "--force", name, check=False, timeout=120)
            dockerd.docker("plugin", "rm", "--force", name, check=False, timeout=120)


def inspect(docker_world, name):
    out = docker_world.dockerd.docker("plugin", "inspect", name).stdout
    return json.loads(out)[0]


def test_the_plugin_asks_for_host_networking_and_few_capabilities(docker_world, plugin):
    config = inspect(docker_world, plugin)["Config"]
    assert config["Network"]["Type"] == "host"
    # Beyond Docker's defaults: links and iptables; setns into sandboxes.
    assert sorted(config["Linux"]["Capabilities"]) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    # Its IPAM serves OVN networks (with args="--ovn-nb REMOTE").
    assert config["Interface"]["Types"] == ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]
    mounts = {m["Name"]: m for m in config["Mounts"]}
    assert any("openvswitch" in mount for mount in mounts)
    assert mounts["openvswitch"]["Settable"] == ["source"]
    assert mounts["sandboxes"]["Settable"] == ["source"]
    assert mounts["pki"]["Settable"] == ["source"] and "ro" in mounts["pki"]["Options"]
    assert "rshared" in mounts["sandboxes"]["Options"]


def test_enabled_on_the_worlds_ovs_it_serves_docker(docker_world, plugin):
    dockerd = docker_world.dockerd
    dockerd.docker("plugin", "set", plugin, f"openvswitch.source={docker_world.ovs.directory}")
    dockerd.docker("plugin", "set", plugin, "args=--datapath-type netdev")
    dockerd.docker("plugin", "enable", plugin, timeout=120)
    assert inspect(docker_world, plugin)["Enabled"] is True
    pids = world.wait_until(lambda: plugin_processes(docker_world), 30)
    forwarding = ["sysctl", "-n", "net.ipv4.ip_forward"]
    docker_world.netns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
    e2e = scenario(docker_world, f"{plugin}:latest", "10.62.0.0/24")
    # A NAT network needs forwarding: the plugin can turn it on from its container.
    assert docker_world.netns.run(forwarding).stdout.strip() == "1", dockerd.log()[-3000:]
    # The network is on the world's OVS: the plugin reached it through the mount.
    assert "obr-" + e2e.network_id("pk")[:11] in docker_world.ovs.bridges()
    # The plugin sees the sandboxes mounted, those made after it started too.
    nsfs = os.stat("/proc/self/ns/net").st_dev
    for container in ("pk1", "pk2"):
        key = json.loads(dockerd.docker("inspect", container).stdout)[0]["NetworkSettings"][
            "SandboxKey"
        ]
        assert os.stat(f"/proc/{pids[0]}/root{key}").st_dev == nsfs, key
    # Each published port holds a socket: the plugin raised its soft limit
    # of open files to the hard one its container got.
    with open(f"/proc/{pids[0]}/limits") as f:
        limits = next(line for line in f if line.startswith("Max open files")).split()[3:5]
    print(f"\nthe plugin's limit of open files (soft, hard): {limits}")
    assert limits[0] == limits[1], limits
    dockerd.docker("rm", "-f", "pk1", "pk2", timeout=120)
    dockerd.docker("network", "rm", "pk", timeout=120)
    assert not [b for b in docker_world.ovs.bridges() if b.startswith("obr-")]
    # The engine asks the plugin's IPAM too; without --ovn-nb it says what to do.
    refused = dockerd.docker(
        "network",
        "create",
        "-d",
        f"{plugin}:latest",
        "--ipam-driver",
        f"{plugin}:latest",
        "--ipam-opt",
        "ovs.ovn.switch=pkipam",
        "pkipam",
        check=False,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "start the driver with --ovn-nb" in refused.stderr, refused.stderr


def test_it_reaches_an_ovn_northbound_database_over_tls(docker_world, plugin, tmp_path):
    """With its certificates in the ``pki`` mount, the plugin's IPAM claims
    the network's switch in a Northbound database it reaches over TLS."""
    dockerd, ovs = docker_world.dockerd, docker_world.ovs
    pki = CA(tmp_path / "pki")
    key, cert = pki.issue("driver")
    (tmp_path / "nb").mkdir()
    northbound = SecureOVSDB(docker_world.netns, tmp_path / "nb", pki)
    # An OVN chassis as far as a network needs one: no ovn-controller.
    ovs.vsctl("set", "Open_vSwitch", ".", "external_ids:system-id=pk")
    ovs.vsctl("add-br", "br-int", "--", "set", "Bridge", "br-int", "datapath_type=netdev")
    try:
        dockerd.docker("plugin", "disable", plugin, timeout=120)
        dockerd.docker("plugin", "set", plugin, f"pki.source={pki.directory}")
        files = {"private-key": key, "certificate": cert, "ca-cert": pki.cert}
        args = "--datapath-type netdev --ovn-nb ssl:127.0.0.1:6641"
        args += "".join(
            f" --{option} /etc/openvswitch/{path.name}" for option, path in files.items()
        )
        dockerd.docker("plugin", "set", plugin, f"args={args}")
        dockerd.docker("plugin", "enable", plugin, timeout=120)
        plugin_ref = f"{plugin}:latest"
        dockerd.docker(
            "network", "create", "-d", plugin_ref, "--ipam-driver", plugin_ref,
            "--ipam-opt", "ovs.ovn.switch=pkssl", "--subnet", "10.63.0.0/24", "pkssl",
            timeout=120,
        )  # fmt: skip
        switches = ["--bare", "--columns=name", "list", "Logical_Switch"]
        assert northbound.nbctl(*switches) == "pkssl", dockerd.log()[-3000:]
        dockerd.docker("network", "rm", "pkssl", timeout=120)
        assert northbound.nbctl(*switches) == ""
    finally:
        northbound.stop()
        ovs.vsctl("--if-exists", "del-br", "br-int")


def test_disabled_and_removed_it_leaves_nothing_running(docker_world, plugin):
    dockerd = docker_world.dockerd
    dockerd.docker("plugin", "disable", plugin, timeout=120)
    world.wait_until(lambda: not plugin_processes(docker_world), 30)
    dockerd.docker("plugin", "rm", plugin, timeout=120)
    assert plugin not in dockerd.docker("plugin", "ls", "--format", "{{.Name}}").stdout
