"""The vswitch contract, run against the real VSwitch over a private OVSDB and
userspace ovs-vswitchd (the fake must behave like this)."""

import pytest

from ovsdriver.ovsdb import OVSDB
from ovsdriver.vswitch import VSwitch, VSwitchError
from tests.contract_vswitch import *  # noqa: F403
from tests.contract_vswitch import endpoint, network
from tests.reactor_thread import get_reactor, run_in_reactor
from tests.world import wait_until


class RealHarness:
    def __init__(self, world, ovsdb):
        self.world = world
        self.vswitch = VSwitch(ovsdb)

    def call(self, method, *args):
        return run_in_reactor(method, *args)

    def bridge_exists(self, name):
        return name in self.world.ovs.bridges()

    def port_exists(self, name):
        return bool(
            self.world.ovs.vsctl("--bare", "--columns=name", "find", "Port", f"name={name}")
        )

    def link_exists(self, name):
        return name in self.world.netns.links()

    def break_port(self, name):
        """Nothing to do: a veth port whose host end is missing fails for real."""

    def add_foreign_bridge(self, name, datapath_type="netdev"):
        self.world.ovs.vsctl(
            "add-br", name, "--", "set", "bridge", name, f"datapath_type={datapath_type}"
        )

    def add_host_link(self, name):
        """A host interface (a veth end) to use as an uplink."""
        if name not in self.world.netns.links():
            self.world.netns.run(
                ["ip", "link", "add", name, "type", "veth", "peer", "name", "p" + name]
            )


@pytest.fixture(scope="module")
def ovsdb(ovs_world_module):
    service = OVSDB(get_reactor(), ovs_world_module.ovs.remote)
    run_in_reactor(service.startService)
    wait_until(lambda: service.connected, timeout=10)
    yield service
    run_in_reactor(service.stopService)


@pytest.fixture
def harness(ovs_world_module, ovsdb):
    yield RealHarness(ovs_world_module, ovsdb)
    ovs_world_module.ovs.reset()


def test_endpoints_follow_changes_made_outside_the_driver(harness):
    """Endpoint snapshots are kept while their rows are unchanged (the
    reconciler reads them all every 2 s): an edit must still show at once."""
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net)
    harness.call(harness.vswitch.add_endpoint, ep)
    assert [e.sandbox for e in harness.call(harness.vswitch.endpoints)] == [None]
    harness.world.ovs.vsctl("set", "Interface", ep.port, "external_ids:ovsdriver-sandbox=/x")
    wait_until(
        lambda: [e.sandbox for e in harness.call(harness.vswitch.endpoints)] == ["/x"],
        timeout=10,
    )
    harness.world.ovs.vsctl("set", "Port", ep.port, "external_ids:ovsdriver-removing=1")
    wait_until(lambda: harness.call(harness.vswitch.endpoints) == [], timeout=10)


def test_a_bridge_named_like_a_host_interface_is_refused_with_what_to_do(harness):
    harness.add_host_link("hostif0")
    clash = network(bridge="hostif0", shared_bridge=True, vlan=5)
    with pytest.raises(VSwitchError, match="is hostif0 a host interface.*ovs.uplink=hostif0"):
        harness.call(harness.vswitch.add_network, clash)
    harness.call(harness.vswitch.remove_network, clash.network_id)  # the driver's undo
    assert not harness.bridge_exists("hostif0")
    assert harness.link_exists("hostif0")
