"""The reconciler on fakes and a fake clock: which endpoints it collects, which
it repairs after an ovs-vswitchd restart, and which it must never touch.

Sandboxes are files under ``tmp_path`` (an existing file stands for a mounted
namespace unless the scene unmounted it) and, for what is inside them,
sandboxes of the `FakeNetlink`.
"""

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from ovsdriver.reconcile import (
    INVISIBLE,
    MISSING,
    MOUNTED,
    UNMOUNTED,
    Reconciler,
    probe_sandbox,
)
from ovsdriver.testing import FakeNetlink, FakeVSwitch
from ovsdriver.values import Endpoint, Network, PublishedPort, Subnet

NET = "a1" * 32
EP_1 = "e1" * 32
EP_2 = "f2" * 32
MAC = "02:00:5e:00:00:01"
INTERVAL = 2.0
GRACE = 20.0


class Scene:
    """A driver's world in memory: OVSDB, kernel, sandboxes, clock, reconciler."""

    def __init__(self, tmp_path, port_type="internal"):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # seconds since the epoch, like time.time()
        self.kernel = FakeNetlink()
        self.vswitch = FakeVSwitch(kernel=self.kernel)
        self.netns_dir = tmp_path / "netns"
        self.netns_dir.mkdir()
        self.network = Network(
            network_id=NET,
            bridge="obr-" + NET[:11],
            port_type=port_type,
            ipv4=[Subnet("10.9.0.0/24", "10.9.0.1/24")],
        )
        self.vswitch.add_network(self.network)
        self.collected_firewall = []
        self.unmounted = set()
        self.reconciler = Reconciler(
            self.clock,
            self.vswitch,
            self.kernel,
            interval=INTERVAL,
            unjoined_grace=GRACE,
            clock=self.clock.seconds,
            probe_sandbox=self.probe,
            after_collect=lambda: self.collected_firewall.append(True),
        )

    def probe(self, path):
        if os.path.exists(path):
            return UNMOUNTED if path in self.unmounted else MOUNTED
        return MISSING if os.path.isdir(os.path.dirname(path)) else INVISIBLE

    # -- building the world ----------------------------------------------------

    def endpoint(self, endpoint_id=EP_1, age=0.0, mac=MAC, **fields):
        """CreateEndpoint, *age* seconds ago."""
        port = ("oep-" if self.network.port_type == "internal" else "ove-") + endpoint_id[:11]
        ep = Endpoint(
            endpoint_id=endpoint_id,
            network_id=NET,
            bridge=self.network.bridge,
            port=port,
            ifname="oep-" + endpoint_id[:11],
            mac=mac,
            port_type=self.network.port_type,
            ipv4="10.9.0.2/24",
            created=self.clock.seconds() - age,
            **fields,
        )
        if ep.port_type == "veth":
            self.kernel.create_veth(ep.port, ep.ifname, ep.mtu, mac)
        self.vswitch.add_endpoint(ep)
        if ep.port_type == "internal":
            self.kernel.set_link(ep.port, mac=mac)  # OVS gives the tap its MAC
        return ep

    def sandbox(self, name="sb1"):
        """A sandbox that exists: its file and its (fake) namespace."""
        path = self.netns_dir / name
        path.touch()
        self.kernel.add_sandbox(str(path))
        return str(path)

    def join(self, ep, sandbox, move=True):
        """Join; with *move*, the engine also moves the link in as eth0."""
        self.vswitch.set_sandbox(ep.endpoint_id, sandbox)
        if move:
            self.kernel.move_to_sandbox(ep.ifname, sandbox, "eth0")

    def remove_sandbox(self, sandbox):
        """The engine tears the container's sandbox down (no call reaches us)
        and, at its next garbage collection, deletes the file."""
        self.unmount_sandbox(sandbox)
        os.unlink(sandbox)

    def unmount_sandbox(self, sandbox):
        """The engine tears the container's sandbox down: the file stays a while."""
        self.unmounted.add(sandbox)
        self.kernel.remove_sandbox(sandbox)

    def restart_vswitchd(self, ep, sandbox):
        """What an ovs-vswitchd restart does with the userspace datapath: the
        container keeps a dead copy, a fresh tap appears in the host."""
        self.kernel.remove_sandbox(sandbox)
        self.kernel.add_sandbox(sandbox)
        self.kernel.add_sandbox_link(sandbox, "eth0", ep.mac, addresses=[ep.ipv4], carrier=False)
        self.kernel.add_sandbox_route(sandbox, "default", "10.9.0.1", "eth0")
        self.kernel.add_link(ep.ifname, mac=ep.mac)

    # -- running ---------------------------------------------------------------

    def start(self):
        self.reconciler.startService()
        self.clock.advance(0)  # the first pass

    def run_for(self, seconds):
        """Let *seconds* pass, one interval at a time (a pass each)."""
        for _ in range(int(seconds / INTERVAL)):
            self.clock.advance(INTERVAL)

    def ports(self):
        return {ep.port for ep in self.vswitch.endpoints().result}


@pytest.fixture
def scene(tmp_path):
    scene = Scene(tmp_path)
    yield scene
    scene.reconciler.stopService()


# -- orphans ---------------------------------------------------------------------


def test_an_endpoint_whose_sandbox_is_gone_is_collected_within_two_passes(scene):
    ep = scene.endpoint(age=600)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.remove_sandbox(sandbox)
    scene.run_for(INTERVAL)
    assert ep.port in scene.ports(), "collected on the evidence of one pass"
    scene.run_for(INTERVAL)
    assert ep.port not in scene.ports()


def test_a_young_endpoint_whose_sandbox_vanished_is_collected_at_once(scene):
    """Seen alive, then gone: no grace needed, the sandbox is gone for good."""
    ep = scene.endpoint(age=0)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.remove_sandbox(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_torn_down_sandbox_counts_as_gone_before_its_file_is_deleted(scene):
    ep = scene.endpoint(age=600)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.unmount_sandbox(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_torn_down_sandbox_seen_first_after_a_restart_counts_as_gone(scene):
    """Another sandbox mounted now shows that the driver sees the engine's mounts."""
    live = scene.endpoint(EP_1, age=600)
    scene.join(live, scene.sandbox("live"))
    orphan = scene.endpoint(EP_2, age=600, mac="02:00:5e:00:00:02")
    sandbox = scene.sandbox("old")
    scene.join(orphan, sandbox, move=False)
    scene.unmount_sandbox(sandbox)
    scene.start()
    scene.run_for(INTERVAL)
    assert scene.ports() == {live.port}


def test_an_unmounted_sandbox_is_trusted_only_with_evidence_that_mounts_are_visible(scene):
    """Without a mounted sandbox in sight the driver may be in a mount namespace
    that never sees the engine's mounts: it waits for the file to go."""
    ep = scene.endpoint(age=600)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    scene.unmount_sandbox(sandbox)
    scene.start()
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()
    os.unlink(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_probe_sandbox_tells_a_mounted_namespace_from_a_plain_file(tmp_path):
    assert probe_sandbox("/proc/self/ns/net") == MOUNTED
    (tmp_path / "plain").touch()
    assert probe_sandbox(str(tmp_path / "plain")) == UNMOUNTED
    assert probe_sandbox(str(tmp_path / "missing")) == MISSING
    assert probe_sandbox(str(tmp_path / "no-dir" / "missing")) == INVISIBLE


def test_a_missing_sandbox_is_given_the_grace_to_appear(scene):
    """At Join the engine has not made the sandbox yet; after a driver restart
    the driver cannot know whether it ever existed."""
    ep = scene.endpoint(age=0)
    scene.join(ep, str(scene.netns_dir / "not-yet"), move=False)
    scene.start()
    scene.run_for(GRACE - INTERVAL)
    assert ep.port in scene.ports()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_an_old_endpoint_whose_sandbox_is_missing_after_a_restart_is_collected(scene):
    ep = scene.endpoint(age=600)
    scene.join(ep, str(scene.netns_dir / "gone"), move=False)
    scene.start()
    scene.run_for(INTERVAL)
    assert ep.port not in scene.ports()


def test_an_unjoined_endpoint_is_collected_after_the_grace(scene):
    ep = scene.endpoint(age=0)
    scene.start()
    scene.run_for(GRACE - INTERVAL)
    assert ep.port in scene.ports()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()
    assert scene.kernel.state(ep.port) is None


def test_a_young_unjoined_endpoint_is_left_alone(scene):
    ep = scene.endpoint(age=GRACE - 3 * INTERVAL)
    scene.start()
    scene.run_for(INTERVAL)
    assert ep.port in scene.ports()


def test_an_endpoint_with_a_live_sandbox_is_never_touched(scene):
    ep = scene.endpoint(age=6000)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.run_for(10 * GRACE)
    assert ep.port in scene.ports()
    assert scene.kernel.sandbox_state(sandbox, "eth0").mac == MAC
    assert scene.kernel.repairs == []


def test_only_the_orphan_goes(scene):
    live = scene.endpoint(EP_1, age=600)
    scene.endpoint(EP_2, age=600, mac="02:00:5e:00:00:02")
    scene.join(live, scene.sandbox("live"))
    scene.start()
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == {live.port}


def test_nothing_is_collected_when_the_sandboxes_directory_is_invisible(scene):
    """A driver in another mount namespace sees no sandbox at all: it must not
    take that for every container being gone."""
    ep = scene.endpoint(age=600)
    scene.join(ep, "/nonexistent/docker/netns/abc", move=False)
    scene.start()
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()


def test_a_veth_orphan_takes_its_veth_along(tmp_path):
    scene = Scene(tmp_path, port_type="veth")
    ep = scene.endpoint(age=600)
    assert scene.kernel.state(ep.port) is not None
    scene.start()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()
    assert scene.kernel.state(ep.port) is None
    assert scene.kernel.state(ep.ifname) is None
    scene.reconciler.stopService()


def test_a_veth_no_endpoint_owns_is_deleted_after_the_grace(scene):
    """CreateEndpoint makes the veth before the port: a crash between leaves it."""
    scene.kernel.create_veth("ove-0123456789a", "oep-0123456789a", 1500)
    scene.start()
    scene.run_for(GRACE - INTERVAL)
    assert scene.kernel.state("ove-0123456789a") is not None
    scene.run_for(2 * INTERVAL)
    assert scene.kernel.state("ove-0123456789a") is None


def test_collecting_an_endpoint_with_published_ports_updates_the_firewall(scene):
    scene.endpoint(age=600)
    scene.vswitch.set_published(EP_1, [PublishedPort("tcp", 8080, "10.9.0.2", 80)])
    scene.start()
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == set()
    assert scene.collected_firewall == [True]


# -- repair after an ovs-vswitchd restart ------------------------------------------


def test_an_endpoint_whose_tap_was_recreated_is_repaired(scene):
    ep = scene.endpoint(age=600)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.restart_vswitchd(ep, sandbox)
    scene.run_for(INTERVAL)
    assert scene.kernel.repairs == [(sandbox, ep.ifname)]
    assert scene.kernel.state(ep.ifname) is None
    eth0 = scene.kernel.sandbox_state(sandbox, "eth0")
    assert (eth0.mac, eth0.up) == (MAC, True)
    assert "10.9.0.2/24" in eth0.addresses
    assert [
        link.name for link in scene.kernel.sandbox_links(sandbox).result if link.mac == MAC
    ] == ["eth0"]
    assert {r.dst for r in scene.kernel.sandbox_routes(sandbox)} == {"default"}
    assert ep.port in scene.ports()


def test_a_link_the_engine_has_not_moved_yet_is_left_alone(scene):
    ep = scene.endpoint(age=0)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.repairs == []
    assert scene.kernel.state(ep.ifname) is not None
    assert ep.port in scene.ports()


def test_a_live_link_with_the_same_mac_is_not_taken_for_a_dead_copy(scene):
    ep = scene.endpoint(age=0)
    sandbox = scene.sandbox()
    scene.kernel.add_sandbox_link(sandbox, "eth0", MAC, carrier=True)
    scene.join(ep, sandbox, move=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.repairs == []


def test_veth_endpoints_are_never_repaired(tmp_path):
    scene = Scene(tmp_path, port_type="veth")
    ep = scene.endpoint(age=600)
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    scene.kernel.add_sandbox_link(sandbox, "eth0", MAC, carrier=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.repairs == []
    scene.reconciler.stopService()


# -- the service -----------------------------------------------------------------


class Flaky:
    """Wraps a port so that chosen methods fail or hang on demand."""

    def __init__(self, port):
        self._port = port
        self.failures = {}  # method -> exceptions to raise, in order
        self.hanging = {}  # method -> Deferred to return instead
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self._port, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            if self.failures.get(name):
                return defer.fail(self.failures[name].pop(0))
            if name in self.hanging:
                return self.hanging.pop(name)
            return method(*args, **kwargs)

        return call


def test_a_failing_pass_is_logged_and_the_next_pass_runs(scene):
    vswitch = Flaky(scene.vswitch)
    vswitch.failures["endpoints"] = [RuntimeError("OVSDB is down")]
    scene.reconciler.vswitch = vswitch
    ep = scene.endpoint(age=600)
    scene.start()
    assert vswitch.calls == ["endpoints"]
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_failing_removal_does_not_stop_the_others(scene):
    vswitch = Flaky(scene.vswitch)
    vswitch.failures["remove_endpoint"] = [RuntimeError("refused")]
    scene.reconciler.vswitch = vswitch
    first = scene.endpoint(EP_1, age=600)
    second = scene.endpoint(EP_2, age=600, mac="02:00:5e:00:00:02")
    scene.start()
    scene.run_for(INTERVAL)
    assert len(scene.ports()) == 1
    scene.run_for(2 * INTERVAL)
    assert not {first.port, second.port} & scene.ports()


def test_passes_never_overlap(scene):
    netlink = Flaky(scene.kernel)
    slow = netlink.hanging["links"] = defer.Deferred()
    scene.reconciler.netlink = netlink
    scene.start()
    scene.run_for(10 * INTERVAL)
    assert netlink.calls == ["links"]
    slow.callback(frozenset())
    scene.clock.advance(INTERVAL - 0.1)
    assert netlink.calls == ["links"], "the next pass must wait a whole interval"
    scene.clock.advance(0.1)
    assert netlink.calls == ["links", "links"]


def test_stopping_waits_for_the_pass_in_progress_and_ends_the_passes(scene):
    netlink = Flaky(scene.kernel)
    slow = netlink.hanging["links"] = defer.Deferred()
    scene.reconciler.netlink = netlink
    scene.start()
    stopped = scene.reconciler.stopService()
    assert not stopped.called
    slow.callback(frozenset())
    assert stopped.called
    scene.run_for(10 * INTERVAL)
    assert netlink.calls == ["links"]
    assert scene.clock.getDelayedCalls() == []
