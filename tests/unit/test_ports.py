"""Publishing ports: the engine's portmap, host port ranges, IPv6, and one
host port for one endpoint even when two ask at the same moment; the driver
on verified fakes."""

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from ovsdriver.driver import Driver
from ovsdriver.hostports import SPARE_FILES
from ovsdriver.options import OptionError, PortRequest, parse_portmap
from ovsdriver.ports import PortUnavailable, publish
from ovsdriver.testing import FakeFirewall, FakeHostPorts, FakeNetlink, FakeVSwitch
from ovsdriver.values import PublishedPort

NET = "4e" * 32
EP1, EP2, EP3 = "e1" * 32, "e2" * 32, "e3" * 32
V4 = [{"Pool": "10.30.0.0/24", "Gateway": "10.30.0.1/24"}]
V6 = [{"Pool": "fd00:30::/64", "Gateway": "fd00:30::1/64"}]


def result_of(deferred):
    box = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def portmap(*entries):
    return {"com.docker.network.portmap": list(entries)}


def tcp(port, host_port, end=0, host_ip=""):
    return {"Proto": 6, "Port": port, "HostPort": host_port, "HostPortEnd": end, "HostIP": host_ip}


# -- the portmap --------------------------------------------------------------------


def test_parse_portmap_keeps_ranges_and_addresses():
    requests = parse_portmap(portmap(tcp(80, 8000, 8010), tcp(80, 8080, 8080, "127.0.0.1")))
    assert requests == [
        PortRequest("tcp", 80, 8000, 8010, None),
        PortRequest("tcp", 80, 8080, 8080, "127.0.0.1"),
    ]
    assert requests[0].describe() == "-p 8000-8010:80/tcp"


@pytest.mark.parametrize(
    "entry, words",
    [
        (tcp(80, 0), ["-p 8080:80/tcp", "-p 8000-8100:80/tcp", "cannot report"]),
        (tcp(80, 9000, 8000), ["9000-8000", "ends before it starts"]),
        (tcp(0, 80), ["container port 0"]),
        (tcp(80, 70000), ["host port 70000"]),
        ({"Proto": 1, "Port": 1, "HostPort": 1}, ["protocol 1", "tcp, udp or sctp"]),
        (tcp(80, 80, 0, "nonsense"), ["'nonsense'"]),
    ],
)
def test_parse_portmap_refuses_with_what_to_use_instead(entry, words):
    with pytest.raises(OptionError) as caught:
        parse_portmap(portmap(entry))
    for word in words:
        assert word in str(caught.value)


# -- choosing host ports -----------------------------------------------------------


def test_every_address_is_both_families_when_the_container_has_both():
    [request] = parse_portmap(portmap(tcp(80, 8080)))
    assert publish([request], "10.30.0.2", "fd00:30::2", []) == (
        PublishedPort("tcp", 8080, "10.30.0.2", 80),
        PublishedPort("tcp", 8080, "fd00:30::2", 80),
    )
    assert publish([request], "10.30.0.2", None, []) == (
        PublishedPort("tcp", 8080, "10.30.0.2", 80),
    )


def test_ipv6_host_addresses_need_an_ipv6_container():
    requests = parse_portmap(portmap(tcp(80, 8080, 0, "2001:db8::1")))
    assert publish(requests, "10.30.0.2", "fd00:30::2", []) == (
        PublishedPort("tcp", 8080, "fd00:30::2", 80, "2001:db8::1"),
    )
    with pytest.raises(PortUnavailable, match=r"no IPv6 address .* --ipv6"):
        publish(requests, "10.30.0.2", None, [])
    with pytest.raises(PortUnavailable, match="publish on 127.0.0.1"):
        publish(parse_portmap(portmap(tcp(80, 8080, 0, "::1"))), "10.30.0.2", "fd00:30::2", [])


def test_unspecified_ipv6_listed_next_to_ipv4_is_skipped_without_ipv6():
    requests = parse_portmap(portmap(tcp(80, 8080, 0, "0.0.0.0"), tcp(80, 8080, 0, "::")))
    assert publish(requests, "10.30.0.2", None, []) == (
        PublishedPort("tcp", 8080, "10.30.0.2", 80),
    )
    with pytest.raises(PortUnavailable, match="no IPv6 address"):
        publish(parse_portmap(portmap(tcp(80, 8080, 0, "::"))), "10.30.0.2", None, [])


def test_a_host_range_takes_the_first_free_port():
    taken = [
        (EP2, PublishedPort("tcp", 8000, "10.30.0.9", 80)),
        (EP3, PublishedPort("udp", 8001, "10.30.0.8", 80)),
    ]
    requests = parse_portmap(portmap(tcp(80, 8000, 8002)))
    assert publish(requests, "10.30.0.2", None, taken) == (
        PublishedPort("tcp", 8001, "10.30.0.2", 80),
    )
    taken.append((EP3, PublishedPort("tcp", 8001, "10.30.0.8", 80, "192.0.2.1")))
    taken.append((EP3, PublishedPort("tcp", 8002, "10.30.0.8", 80)))
    with pytest.raises(PortUnavailable, match="every host port from 8000 to 8002"):
        publish(requests, "10.30.0.2", None, taken)


def test_clashes_are_per_family_and_address():
    theirs = [(EP2, PublishedPort("tcp", 8080, "10.30.0.9", 80, "192.0.2.1"))]
    ok = parse_portmap(portmap(tcp(80, 8080, 0, "192.0.2.2"), tcp(81, 8080, 0, "2001:db8::1")))
    assert len(publish(ok, "10.30.0.2", "fd00:30::2", theirs)) == 2
    for clash in (tcp(80, 8080), tcp(80, 8080, 0, "192.0.2.1"), tcp(80, 8080, 0, "0.0.0.0")):
        with pytest.raises(PortUnavailable, match=f"already published by endpoint {EP2[:12]}"):
            publish(parse_portmap(portmap(clash)), "10.30.0.2", None, theirs)
    with pytest.raises(PortUnavailable, match="already published by this container"):
        publish(parse_portmap(portmap(tcp(80, 8080), tcp(81, 8080))), "10.30.0.2", None, [])


# -- through the driver ---------------------------------------------------------------


class SlowVSwitch(FakeVSwitch):
    """A FakeVSwitch whose reads of endpoints and published ports answer one
    reactor turn later (`turn`), so two requests can interleave."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.slow = False
        self.pending = []

    def _later(self, d):
        if not self.slow:
            return d
        later = defer.Deferred()
        self.pending.append(lambda: d.chainDeferred(later))
        return later

    def endpoints(self):
        return self._later(super().endpoints())

    def endpoint(self, endpoint_id):
        return self._later(super().endpoint(endpoint_id))

    def network_and_endpoint(self, network_id, endpoint_id):
        return self._later(super().network_and_endpoint(network_id, endpoint_id))

    def set_published(self, endpoint_id, published):
        return self._later(super().set_published(endpoint_id, published))

    def turn(self):
        while self.pending:
            self.pending.pop(0)()


class World:
    def __init__(self, ipv6=False, generic=None):
        self.kernel = FakeNetlink()
        self.vswitch = SlowVSwitch(kernel=self.kernel)
        self.firewall = FakeFirewall()
        self.host_ports = FakeHostPorts()
        self.driver = Driver(
            self.vswitch, self.kernel, self.firewall, "netdev", host_ports=self.host_ports
        )
        options = {"com.docker.network.generic": generic or {}}
        result_of(
            defer.ensureDeferred(self.driver.create_network(NET, options, V4, V6 if ipv6 else []))
        )
        for n, ep in enumerate((EP1, EP2, EP3), start=2):
            interface = {"Address": f"10.30.0.{n}/24"}
            if ipv6:
                interface["AddressIPv6"] = f"fd00:30::{n}/64"
            result_of(defer.ensureDeferred(self.driver.create_endpoint(NET, ep, interface)))

    def program(self, endpoint_id, *entries):
        return defer.ensureDeferred(
            self.driver.program_external_connectivity(NET, endpoint_id, portmap(*entries))
        )

    def published(self):
        return {(p.host_port, p.container_ip) for n in self.firewall.networks for p in n.published}


def test_two_endpoints_asking_for_one_port_at_once_one_wins():
    world = World()
    world.vswitch.slow = True
    first = world.program(EP1, tcp(80, 8080))
    second = world.program(EP2, tcp(80, 8080))
    for _ in range(20):
        world.vswitch.turn()
    assert result_of(first) is None
    with pytest.raises(PortUnavailable, match=f"already published by endpoint {EP1[:12]}"):
        result_of(second)
    assert world.published() == {(8080, "10.30.0.2")}


def test_two_endpoints_asking_for_one_range_at_once_get_different_ports():
    world = World()
    world.vswitch.slow = True
    asks = [world.program(ep, tcp(80, 8000, 8010)) for ep in (EP1, EP2, EP3)]
    for _ in range(30):
        world.vswitch.turn()
    for d in asks:
        result_of(d)
    assert world.published() == {(8000, "10.30.0.2"), (8001, "10.30.0.3"), (8002, "10.30.0.4")}


def test_a_whole_range_is_published():
    world = World()
    # docker run -p 8000-8002:80-82: the engine lists one entry per port.
    result_of(world.program(EP1, *(tcp(80 + n, 8000 + n, 8000 + n) for n in range(3))))
    assert world.published() == {(8000, "10.30.0.2"), (8001, "10.30.0.2"), (8002, "10.30.0.2")}


def test_ports_that_would_leave_the_driver_too_few_files_are_refused_whole():
    world = World()
    world.host_ports.open_files_limit = FakeHostPorts.OTHER_FILES + SPARE_FILES + 100
    wide = [tcp(20000 + n, 20000 + n, 20000 + n) for n in range(101)]
    with pytest.raises(PortUnavailable, match="cannot publish 101 more host ports"):
        result_of(world.program(EP1, *wide))
    assert world.published() == set()
    assert not world.host_ports.holds(PublishedPort("tcp", 20000, "10.30.0.2", 20000, None))
    result_of(world.program(EP1, *wide[:100]))
    assert len(world.published()) == 100
    # Held ports need no more files: the same ports again are fine.
    result_of(world.program(EP1, *wide[:100]))
    with pytest.raises(PortUnavailable, match="cannot publish 1 more host ports"):
        result_of(world.program(EP2, tcp(80, 8080)))


def test_dual_stack_publishes_on_both_families():
    world = World(ipv6=True)
    result_of(world.program(EP1, tcp(80, 8080)))
    assert world.published() == {(8080, "10.30.0.2"), (8080, "fd00:30::2")}


def test_nothing_to_publish_touches_neither_ovsdb_nor_the_firewall():
    world = World()
    applied = world.firewall.applied
    writes = []
    world.vswitch.set_published = lambda *a: writes.append(a) or defer.succeed(None)
    result_of(world.program(EP1))
    result_of(defer.ensureDeferred(world.driver.revoke_external_connectivity(NET, EP1)))
    assert world.firewall.applied == applied and writes == []


def test_republishing_the_same_ports_writes_nothing_to_ovsdb():
    world = World()
    result_of(world.program(EP1, tcp(80, 8080)))
    writes = []
    world.vswitch.set_published = lambda *a: writes.append(a) or defer.succeed(None)
    result_of(world.program(EP1, tcp(80, 8080)))
    assert writes == []


def test_a_hand_edited_published_port_the_firewall_refuses_concerns_its_endpoint_only():
    world = World()
    bad = PublishedPort("tcp", 9000, "10.30.0.2", 80, "::1")  # valid JSON, impossible rule
    result_of(world.vswitch.set_published(EP1, [bad]))
    result_of(world.program(EP2, tcp(80, 8080)))
    assert world.published() == {(8080, "10.30.0.3")}


def host(host_port, host_ip=None):
    """A published port as a program on the host would bind it."""
    return PublishedPort("tcp", host_port, "10.30.0.9", 80, host_ip)


def recorded(world, endpoint_id):
    return result_of(world.vswitch.endpoint(endpoint_id)).published


def test_a_port_a_program_uses_is_refused_and_nothing_is_left():
    world = World()
    assert world.host_ports.program_binds(host(22))
    with pytest.raises(PortUnavailable, match="host port 22/tcp is in use by another program"):
        result_of(world.program(EP1, tcp(80, 22)))
    assert world.published() == set() and recorded(world, EP1) == ()


def test_a_host_range_skips_the_ports_programs_use():
    world = World()
    assert world.host_ports.program_binds(host(8000))
    result_of(world.program(EP1, tcp(80, 8000, 8002)))
    assert world.published() == {(8001, "10.30.0.2")}


def test_published_ports_are_held_until_revoked():
    world = World()
    result_of(world.program(EP1, tcp(80, 8080)))
    assert not world.host_ports.program_binds(host(8080))
    result_of(defer.ensureDeferred(world.driver.revoke_external_connectivity(NET, EP1)))
    assert world.host_ports.program_binds(host(8080))


def test_a_restarted_driver_holds_the_recorded_ports_again():
    world = World()
    result_of(world.program(EP1, tcp(80, 8080)))
    result_of(world.program(EP2, tcp(80, 8081)))
    # The driver is down: its sockets are gone, and a program takes 8081.
    ports = FakeHostPorts()
    assert ports.program_binds(host(8081))
    restarted = Driver(world.vswitch, world.kernel, world.firewall, host_ports=ports)
    result_of(defer.ensureDeferred(restarted.sync_firewall()))
    assert not ports.program_binds(host(8080))
    # 8081 stays published as the engine believes: the container keeps it.
    assert world.published() == {(8080, "10.30.0.2"), (8081, "10.30.0.3")}


def test_a_port_a_program_takes_between_check_and_hold_fails_the_publication():
    world = World()
    world.host_ports.check = lambda port: world.host_ports.program_binds(host(8080)) and None
    with pytest.raises(PortUnavailable, match="host port 8080/tcp is in use by another program"):
        result_of(world.program(EP1, tcp(80, 8080)))
    assert world.published() == set() and recorded(world, EP1) == ()


def test_an_address_the_host_does_not_have_is_refused_by_name():
    world = World()
    with pytest.raises(PortUnavailable, match="198.51.100.1 is not an address of this host"):
        result_of(world.program(EP1, tcp(80, 8080, host_ip="198.51.100.1")))
    assert recorded(world, EP1) == ()


def test_a_port_a_program_uses_is_refused_without_a_recheck():
    world = World()
    rechecks = []
    world.driver.recheck = lambda: defer.succeed(rechecks.append(True))
    assert world.host_ports.program_binds(host(8080))
    with pytest.raises(PortUnavailable, match="in use by another program"):
        result_of(world.program(EP1, tcp(80, 8080)))
    assert rechecks == []  # no endpoint holds it: the reconciler cannot free it


def test_a_networks_host_binding_is_where_a_port_without_an_address_is_published():
    world = World(ipv6=True, generic={"com.docker.network.bridge.host_binding_ipv4": "127.0.0.1"})
    result_of(world.program(EP1, tcp(80, 8080), tcp(81, 8081, host_ip="0.0.0.0")))
    published = {(p.host_ip, p.host_port, p.container_ip) for p in recorded(world, EP1)}
    # As with Docker's bridge driver: only where -p gives no address, and
    # then IPv4 only; an explicit 0.0.0.0 stays every address.
    assert published == {("127.0.0.1", 8080, "10.30.0.2"), (None, 8081, "10.30.0.2")}
