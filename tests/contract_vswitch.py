"""The behaviour every vswitch port must show: the real OVSDB-backed `VSwitch`
and `FakeVSwitch` both run these tests (see test_vswitch_*.py).

A module using this contract imports the tests with ``from ... import *`` and
provides a ``harness`` fixture with: ``vswitch``, ``call(method, *args)`` (run a
port method and return its result or raise), ``bridge_exists(name)``,
``port_exists(name)``, ``link_exists(name)`` (a kernel interface of that
name exists, as ovs-vswitchd makes them), ``break_port(name)``,
``add_foreign_bridge(name, datapath_type="netdev")`` and
``add_host_link(name)`` (a host interface to use as an uplink).
"""

import pytest

from ovsdriver.values import Endpoint, Network, Subnet
from ovsdriver.vswitch import VSwitchError, gateway_port_name

NET_A = "a1" * 32
NET_B = "b2" * 32
NET_C = "c3" * 32
EP_1 = "e1" * 32
EP_2 = "f2" * 32


def network(network_id=NET_A, **fields):
    fields.setdefault("bridge", "obr-" + network_id[:11])
    fields.setdefault("ipv4", [Subnet("10.9.0.0/24", "10.9.0.1/24")])
    return Network(network_id=network_id, **fields)


def endpoint(net, endpoint_id=EP_1, **fields):
    fields.setdefault("port", "oep-" + endpoint_id[:11])
    fields.setdefault("ifname", fields["port"])
    fields.setdefault("mac", "02:00:00:00:00:01")
    return Endpoint(
        endpoint_id=endpoint_id,
        network_id=net.network_id,
        bridge=net.bridge,
        vlan=net.vlan,
        mtu=net.mtu,
        **fields,
    )


def test_add_network_creates_its_bridge_and_records_it(harness):
    net = network(mtu=1400, address_space="LocalDefault")
    harness.call(harness.vswitch.add_network, net)
    assert harness.bridge_exists(net.bridge)
    assert harness.call(harness.vswitch.network, NET_A) == net
    assert harness.call(harness.vswitch.networks) == {NET_A: net}


def test_add_network_twice_is_harmless(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_network, net)
    assert harness.call(harness.vswitch.networks) == {NET_A: net}


def test_remove_network_deletes_the_bridge_it_made(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.remove_network, NET_A)
    assert not harness.bridge_exists(net.bridge)
    assert harness.call(harness.vswitch.network, NET_A) is None
    harness.call(harness.vswitch.remove_network, NET_A)  # unknown: fine


def test_remove_network_reports_the_endpoint_ports_deleted_with_its_bridge(harness):
    # The engine deletes a network right after its last endpoint, whose
    # port may still be waiting for its deletion: the caller deletes the
    # host ends of veth ports.
    net = network()
    harness.call(harness.vswitch.add_network, net)
    veth = endpoint(net, port="ove-" + EP_1[:11], ifname="oep-" + EP_1[:11], port_type="veth")
    internal = endpoint(net, endpoint_id=EP_2, mac="02:00:00:00:00:02")
    for ep in (veth, internal):
        harness.call(harness.vswitch.add_endpoint, ep)
    harness.call(harness.vswitch.mark_removed, EP_1)
    removed = harness.call(harness.vswitch.remove_network, NET_A)
    assert sorted(removed) == [(internal.port, False), (veth.port, True)]
    assert not harness.port_exists(veth.port) and not harness.port_exists(internal.port)
    assert harness.call(harness.vswitch.finish_removals) == []
    assert harness.call(harness.vswitch.remove_network, NET_A) == []


def test_endpoint_round_trip(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net, ipv4="10.9.0.2/24", ipv6="fd00::2/64")
    assert harness.call(harness.vswitch.add_endpoint, ep) == ep
    assert harness.call(harness.vswitch.add_endpoint, ep) == ep  # idempotent
    assert harness.port_exists(ep.port)
    assert harness.call(harness.vswitch.endpoint, EP_1) == ep
    assert harness.call(harness.vswitch.endpoints) == [ep]
    assert harness.call(harness.vswitch.endpoint, EP_2) is None


def test_a_protected_endpoint_round_trips(harness):
    net = network(icc=False)
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net, protected=True)
    harness.call(harness.vswitch.add_endpoint, ep)
    assert harness.call(harness.vswitch.network, NET_A).icc is False
    assert harness.call(harness.vswitch.endpoint, EP_1) == ep


def test_where_a_sandbox_was_seen_is_recorded_only_while_joined_to_it(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    harness.call(harness.vswitch.set_sandbox, EP_1, "/var/run/docker/netns/0123")
    harness.call(harness.vswitch.set_sandbox_seen, EP_1, "/var/run/docker/netns/4567", "old")
    assert harness.call(harness.vswitch.endpoint, EP_1).sandbox_seen is None
    harness.call(harness.vswitch.set_sandbox_seen, EP_1, "/var/run/docker/netns/0123", "seen")
    assert harness.call(harness.vswitch.endpoint, EP_1).sandbox_seen == "seen"
    harness.call(harness.vswitch.set_sandbox_seen, EP_2, "/var/run/docker/netns/0123", "x")


def test_sandbox_is_remembered_and_forgotten(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    harness.call(harness.vswitch.set_sandbox, EP_1, "/var/run/docker/netns/0123")
    assert harness.call(harness.vswitch.endpoint, EP_1).sandbox == "/var/run/docker/netns/0123"
    harness.call(harness.vswitch.set_sandbox, EP_1, None)
    assert harness.call(harness.vswitch.endpoint, EP_1).sandbox is None
    harness.call(harness.vswitch.set_sandbox, EP_2, None)  # unknown: fine


def test_remove_endpoint_deletes_its_port(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net)
    harness.call(harness.vswitch.add_endpoint, ep)
    harness.call(harness.vswitch.remove_endpoint, EP_1)
    assert not harness.port_exists(ep.port)
    assert harness.call(harness.vswitch.endpoints) == []
    harness.call(harness.vswitch.remove_endpoint, EP_1)  # unknown: fine


def test_a_removed_endpoint_is_gone_at_once_and_its_port_later(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net)
    harness.call(harness.vswitch.add_endpoint, ep)
    assert harness.call(harness.vswitch.mark_removed, EP_1) == ep
    assert harness.call(harness.vswitch.mark_removed, EP_1) == ep  # repeated: same answer
    assert harness.call(harness.vswitch.endpoint, EP_1) is None
    assert harness.call(harness.vswitch.endpoints) == []
    assert harness.call(harness.vswitch.network_and_endpoint, NET_A, EP_1) == (net, None)
    harness.call(harness.vswitch.set_sandbox, EP_1, "/var/run/docker/netns/0123")  # no-op
    assert harness.port_exists(ep.port)  # until the removal is finished
    assert harness.call(harness.vswitch.finish_removals) == [(ep.port, False)]
    assert not harness.port_exists(ep.port)
    assert harness.call(harness.vswitch.finish_removals) == []
    assert harness.call(harness.vswitch.mark_removed, EP_1) is None


def test_finishing_named_removals_leaves_the_others(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    one, two = endpoint(net), endpoint(net, endpoint_id=EP_2, mac="02:00:00:00:00:02")
    for ep in (one, two):
        harness.call(harness.vswitch.add_endpoint, ep)
        harness.call(harness.vswitch.mark_removed, ep.endpoint_id)
    assert harness.call(harness.vswitch.finish_removals, [two.port]) == [(two.port, False)]
    assert harness.port_exists(one.port) and not harness.port_exists(two.port)


def test_an_endpoint_replaces_its_port_still_being_removed(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    harness.call(harness.vswitch.mark_removed, EP_1)
    again = endpoint(net, mac="02:00:00:00:00:09")
    assert harness.call(harness.vswitch.add_endpoint, again) == again
    assert harness.call(harness.vswitch.endpoint, EP_1) == again
    assert harness.call(harness.vswitch.finish_removals) == []
    assert harness.port_exists(again.port)


def test_network_and_endpoint_are_read_together(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net)
    harness.call(harness.vswitch.add_endpoint, ep)
    assert harness.call(harness.vswitch.network_and_endpoint, NET_A, EP_1) == (net, ep)
    assert harness.call(harness.vswitch.network_and_endpoint, NET_B, EP_2) == (None, None)


def test_endpoint_on_a_missing_bridge_fails(harness):
    with pytest.raises(VSwitchError, match="obr-a1a1a1a1a1a"):
        harness.call(harness.vswitch.add_endpoint, endpoint(network()))


def test_a_port_ovs_cannot_create_fails_with_its_name(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    # A veth port whose host end does not exist: ovs-vswitchd reports an error.
    ep = endpoint(net, port="ove-" + EP_1[:11], ifname="oep-" + EP_1[:11], port_type="veth")
    harness.break_port(ep.port)
    harness.call(harness.vswitch.add_endpoint, ep)  # OVSDB takes it
    with pytest.raises(VSwitchError, match=f"could not add port {ep.port}"):
        harness.call(harness.vswitch.port_ready, ep)
    assert not harness.call(harness.vswitch.endpoint, EP_1).made
    harness.call(harness.vswitch.remove_endpoint, EP_1)
    assert not harness.port_exists(ep.port)


def test_a_ready_port_exists(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    ep = endpoint(net)
    harness.call(harness.vswitch.add_endpoint, ep)
    assert harness.call(harness.vswitch.port_ready, ep) == ep
    assert harness.link_exists(ep.port)
    assert harness.call(harness.vswitch.endpoint, EP_1).made


def test_a_port_not_in_ovsdb_is_never_ready(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    with pytest.raises(VSwitchError, match="oep-e1e1e1e1e1e"):
        harness.call(harness.vswitch.port_ready, endpoint(net))


def test_vlan_networks_share_a_bridge(harness):
    blue = network(NET_A, bridge="shared0", shared_bridge=True, vlan=10)
    red = network(NET_B, bridge="shared0", shared_bridge=True, vlan=20)
    harness.call(harness.vswitch.add_network, blue)
    harness.call(harness.vswitch.add_network, red)
    assert harness.port_exists(gateway_port_name(NET_A))
    assert harness.port_exists(gateway_port_name(NET_B))
    harness.call(harness.vswitch.remove_network, NET_A)
    assert harness.bridge_exists("shared0")
    assert not harness.port_exists(gateway_port_name(NET_A))
    harness.call(harness.vswitch.remove_network, NET_B)
    assert not harness.bridge_exists("shared0")


@pytest.mark.parametrize(
    "second, message",
    [
        ({"vlan": 10}, "VLAN 10 is already used"),
        ({"vlan": None}, "give this network its own VLAN"),
    ],
)
def test_a_bridge_is_shared_only_between_distinct_vlans(harness, second, message):
    harness.call(
        harness.vswitch.add_network, network(NET_A, bridge="shared0", shared_bridge=True, vlan=10)
    )
    other = network(NET_B, bridge="shared0", shared_bridge=True, **second)
    with pytest.raises(VSwitchError, match=message):
        harness.call(harness.vswitch.add_network, other)
    assert harness.call(harness.vswitch.network, NET_B) is None


def test_no_network_joins_a_bridge_with_an_untagged_one(harness):
    harness.call(harness.vswitch.add_network, network(NET_A, bridge="shared0", shared_bridge=True))
    other = network(NET_B, bridge="shared0", shared_bridge=True, vlan=30)
    with pytest.raises(VSwitchError, match="untagged network"):
        harness.call(harness.vswitch.add_network, other)


def test_only_a_system_bridge_is_on_the_kernel_datapath(harness):
    net = network(datapath_type="netdev")
    harness.call(harness.vswitch.add_network, net)
    harness.add_foreign_bridge("theirs0", datapath_type="system")
    assert harness.call(harness.vswitch.kernel_datapath, net.bridge) is False
    assert harness.call(harness.vswitch.kernel_datapath, "theirs0") is True
    assert harness.call(harness.vswitch.kernel_datapath, "missing0") is False


def test_a_bridge_the_driver_did_not_make_is_never_removed(harness):
    harness.add_foreign_bridge("theirs0")
    net = network(NET_C, bridge="theirs0", shared_bridge=True, vlan=5)
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.remove_network, NET_C)
    assert harness.bridge_exists("theirs0")


def test_a_port_name_held_by_another_endpoint_is_refused(harness):
    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    # Same first 11 digits, so the same derived port name.
    twin = endpoint(net, endpoint_id=EP_1[:11] + "0" * 53)
    with pytest.raises(VSwitchError, match="already exists"):
        harness.call(harness.vswitch.add_endpoint, twin)
    assert harness.call(harness.vswitch.endpoint, EP_1) is not None


def test_published_ports_are_remembered_and_forgotten(harness):
    from ovsdriver.values import PublishedPort

    net = network()
    harness.call(harness.vswitch.add_network, net)
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    published = [
        PublishedPort("tcp", 8080, "10.9.0.2", 80),
        PublishedPort("udp", 53, "10.9.0.2", 53),
    ]
    harness.call(harness.vswitch.set_published, EP_1, published)
    assert harness.call(harness.vswitch.endpoint, EP_1).published == tuple(published)
    harness.call(harness.vswitch.set_published, EP_1, [])
    assert harness.call(harness.vswitch.endpoint, EP_1).published == ()


def test_an_uplink_joins_the_bridge_and_leaves_with_its_last_network(harness):
    harness.add_host_link("upl-a")
    harness.call(harness.vswitch.add_network, network(uplink="upl-a"))
    assert harness.port_exists("upl-a")
    harness.call(harness.vswitch.remove_network, NET_A)
    assert not harness.port_exists("upl-a")


def test_an_uplink_another_bridge_holds_is_refused_and_nothing_is_left(harness):
    harness.add_host_link("upl-b")
    harness.call(harness.vswitch.add_network, network(uplink="upl-b"))
    clash = network(NET_B, uplink="upl-b")
    with pytest.raises(VSwitchError, match="uplink upl-b is already a port of another bridge"):
        harness.call(harness.vswitch.add_network, clash)
    assert not harness.bridge_exists(clash.bridge)
    assert harness.call(harness.vswitch.network, NET_B) is None
    harness.call(harness.vswitch.remove_network, NET_A)


def test_an_endpoint_records_when_it_was_created(harness):
    import time

    net = network()
    harness.call(harness.vswitch.add_network, net)
    before = time.time()
    harness.call(harness.vswitch.add_endpoint, endpoint(net))
    created = harness.call(harness.vswitch.endpoint, EP_1).created
    assert before - 1 <= created <= time.time() + 1
    given = endpoint(net, endpoint_id=EP_2, mac="02:00:00:00:00:02", created=1700000000.0)
    harness.call(harness.vswitch.add_endpoint, given)
    assert harness.call(harness.vswitch.endpoint, EP_2).created == 1700000000.0


def ovn_network(network_id=NET_A, switch="blue", **fields):
    return network(network_id, bridge="br-int", shared_bridge=True, ovn_switch=switch, **fields)


def test_an_ovn_network_needs_the_integration_bridge(harness):
    with pytest.raises(VSwitchError, match="the OVN integration bridge br-int is missing"):
        harness.call(harness.vswitch.add_network, ovn_network())
    assert not harness.bridge_exists("br-int")


def test_ovn_networks_share_the_integration_bridge_without_vlans(harness):
    harness.add_foreign_bridge("br-int")
    blue, green = ovn_network(NET_A, "blue"), ovn_network(NET_B, "green")
    harness.call(harness.vswitch.add_network, blue)
    harness.call(harness.vswitch.add_network, green)
    assert harness.port_exists(gateway_port_name(NET_A))
    assert harness.call(harness.vswitch.networks) == {NET_A: blue, NET_B: green}
    ep = endpoint(blue, iface_id="blue/10.9.0.5", ipv4="10.9.0.5/24")
    harness.call(harness.vswitch.add_endpoint, ep)
    assert harness.call(harness.vswitch.endpoint, EP_1).iface_id == "blue/10.9.0.5"
    harness.call(harness.vswitch.remove_network, NET_A)
    assert harness.bridge_exists("br-int")  # not the driver's
    assert not harness.port_exists(gateway_port_name(NET_A))
