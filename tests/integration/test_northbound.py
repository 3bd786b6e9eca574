"""Address allocation in a real OVN Northbound database: two drivers' engines
allocating at once never hand out one address twice; switches come and go
with the hosts using them."""

import ipaddress

import pytest
from twisted.internet import defer, task

from ovsdriver.ipam import allocate
from ovsdriver.northbound import NB_TABLES, Northbound, NorthboundError
from ovsdriver.ovn import OVN, ChassisSettings, ClaimCollector
from ovsdriver.ovsdb import OVSDB
from ovsdriver.values import Endpoint, Network
from tests import world
from tests.reactor_thread import get_reactor, run_in_reactor

SUBNET = "10.70.0.0/24"


@pytest.fixture
def central():
    world.require()
    directory = world.make_world_dir()
    try:
        with world.OVNCentral(directory / "c") as c:
            yield c
    finally:
        world.remove_tree(directory)


def _replica(nb):
    idl = nb.ovsdb.idl
    if idl is None:
        return None  # not connected yet
    return {
        (name, str(uuid)): {column: datum.to_json() for column, datum in row._data.items()}
        for name, table in idl.tables.items()
        for uuid, row in table.rows.items()
    }


async def _agreed(engines, timeout=5.0):
    """Once every engine's replica is the same (within `timeout` seconds)."""
    reactor = get_reactor()
    deadline = reactor.seconds() + timeout
    first, *others = engines
    while any(_replica(nb) != _replica(first) for nb in others):
        if reactor.seconds() > deadline:
            raise AssertionError(f"the replicas still differ after {timeout:g} s")
        await task.deferLater(reactor, 0.005, lambda: None)


class Synced:
    """A Northbound engine whose operations end once every engine's replica
    has their effect. Two hosts are two processes, and one acts on what the
    other did long after its update arrived; two engines in one reactor
    would race each other's updates instead."""

    def __init__(self, northbound, engines):
        self._northbound = northbound
        self._engines = engines

    def __getattr__(self, name):
        method = getattr(self._northbound, name)

        def call(*args, **kwargs):
            done = method(*args, **kwargs)
            return done.addBoth(
                lambda result: defer.ensureDeferred(_agreed(self._engines)).addCallback(
                    lambda _: result
                )
            )

        return call


@pytest.fixture
def engines(central):
    """Two Northbound engines, as two hosts' drivers have them."""
    started = []
    for _ in range(2):
        nb = OVSDB(
            get_reactor(),
            central.nb_remote,
            tables=NB_TABLES,
            database="OVN_Northbound",
            name="the OVN Northbound database",
            wait_for_vswitchd=False,
        )
        run_in_reactor(nb.startService)
        started.append(nb)
    northbound = [Northbound(nb) for nb in started]
    yield [Synced(nb, northbound) for nb in northbound]
    for nb in started:
        run_in_reactor(nb.stopService)


def claims(central, switch="blue"):
    names = central.nbctl("--bare", "--columns=name", "list", "Logical_Switch_Port").split()
    return sorted(n for n in names if n.startswith(switch + "/") and n != switch + "/gateway")


def test_two_hosts_allocating_at_once_get_distinct_addresses(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(b.request_pool, "blue", None, "host-b")
    gateway = run_in_reactor(a.set_gateway, "blue", None)
    assert gateway == "10.70.0.1/24"

    def both():
        work = [allocate(reactor, nb, "blue", None, host) for _ in range(25)
                for nb, host in ((a, "host-a"), (b, "host-b"))]  # fmt: skip
        return defer.gatherResults([defer.ensureDeferred(w) for w in work], consumeErrors=True)

    addresses = run_in_reactor(both, timeout=120)
    assert len(addresses) == 50
    assert len(set(addresses)) == 50, sorted(addresses)
    assert gateway not in addresses
    assert all(ipaddress.ip_interface(x).ip in ipaddress.ip_network(SUBNET) for x in addresses)
    # Every address handed out is one claim in the database, and only those.
    assert claims(central) == sorted(f"blue/{x.split('/')[0]}" for x in addresses)


def test_an_address_given_on_one_host_is_refused_on_the_other(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(b.request_pool, "blue", SUBNET, "host-b")
    run_in_reactor(a.set_gateway, "blue", "10.70.0.254")
    got = run_in_reactor(
        lambda: defer.ensureDeferred(allocate(reactor, a, "blue", "10.70.0.9", "host-a"))
    )
    assert got == "10.70.0.9/24"
    with pytest.raises(NorthboundError, match="10.70.0.9 is already in use on OVN switch blue"):
        run_in_reactor(
            lambda: defer.ensureDeferred(allocate(reactor, b, "blue", "10.70.0.9", "host-b"))
        )
    with pytest.raises(NorthboundError, match="is the gateway of OVN switch blue"):
        run_in_reactor(
            lambda: defer.ensureDeferred(allocate(reactor, b, "blue", "10.70.0.254", "host-b"))
        )
    # Host b never gets the given address (nor the gateway) automatically.
    auto = [
        run_in_reactor(lambda: defer.ensureDeferred(allocate(reactor, b, "blue", None, "host-b")))
        for _ in range(10)
    ]
    assert "10.70.0.9/24" not in auto and "10.70.0.254/24" not in auto
    # Released, it can be given again.
    run_in_reactor(a.release_address, "blue", "10.70.0.9")
    again = run_in_reactor(
        lambda: defer.ensureDeferred(allocate(reactor, b, "blue", "10.70.0.9", "host-b"))
    )
    assert again == "10.70.0.9/24"


def test_the_subnet_lives_on_the_switch(central, engines):
    a, b = engines
    info = run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    assert info.subnet == SUBNET
    assert run_in_reactor(b.request_pool, "blue", None, "host-b").subnet == SUBNET
    with pytest.raises(NorthboundError, match=r"has subnet 10.70.0.0/24, not 10.71.0.0/24"):
        run_in_reactor(b.request_pool, "blue", "10.71.0.0/24", "host-b")
    with pytest.raises(NorthboundError, match="does not exist yet: create the first network"):
        run_in_reactor(b.request_pool, "green", None, "host-b")
    run_in_reactor(a.set_gateway, "blue", None)
    with pytest.raises(NorthboundError, match="has gateway 10.70.0.1: leave --gateway out"):
        run_in_reactor(b.set_gateway, "blue", "10.70.0.7")


def test_two_hosts_creating_one_switch_at_once_make_one(central, engines):
    a, b = engines

    def both():
        return defer.gatherResults(
            [a.request_pool("blue", SUBNET, "host-a"), b.request_pool("blue", SUBNET, "host-b")],
            consumeErrors=True,
        )

    for attempt in range(2):  # whichever loses the race retries the lookup
        try:
            run_in_reactor(both)
            break
        except Exception:
            if attempt:
                raise
    assert central.switches() == ["blue"]


def test_the_switch_goes_when_no_host_uses_it_and_no_address_is_claimed(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(b.request_pool, "blue", None, "host-b")
    run_in_reactor(a.set_gateway, "blue", None)
    got = run_in_reactor(lambda: defer.ensureDeferred(allocate(reactor, b, "blue", None, "host-b")))
    assert run_in_reactor(a.release_pool, "blue", "host-a") is False
    assert central.switches() == ["blue"]  # host b still uses it
    assert run_in_reactor(b.release_pool, "blue", "host-b") is False  # an address is claimed
    run_in_reactor(b.release_address, "blue", got)
    assert run_in_reactor(b.release_pool, "blue", "host-b") is True
    assert central.switches() == []
    assert central.ports() == []


class _Host(OVN):
    """One host's OVN glue, with its chassis, endpoints and networks given."""

    def __init__(self, northbound, system_id, endpoints=(), switches=()):
        super().__init__(get_reactor(), northbound, self, None)
        self.system_id = system_id
        self.vswitch = self
        self.in_use = list(endpoints)
        self.local = {
            f"{n:064x}": Network(network_id=f"{n:064x}", bridge="br-int", ovn_switch=switch)
            for n, switch in enumerate(switches)
        }

    async def chassis(self):
        return ChassisSettings(self.system_id, "br-int", None)

    def endpoints(self):
        return defer.succeed(self.in_use)

    def networks(self):
        return defer.succeed(self.local)


def test_a_host_gives_back_only_its_own_orphaned_addresses(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(b.request_pool, "blue", None, "host-b")
    run_in_reactor(a.set_gateway, "blue", None)

    def claim(nb, host):
        return run_in_reactor(
            lambda: defer.ensureDeferred(allocate(reactor, nb, "blue", None, host))
        )

    used, orphan = claim(a, "host-a"), claim(a, "host-a")
    others = claim(b, "host-b")
    in_use = Endpoint(
        endpoint_id="ab" * 32, network_id="cd" * 32, bridge="br-int", port="oep-x",
        ifname="oep-x", mac="02:00:00:00:00:01", iface_id=f"blue/{used.split('/')[0]}",
    )  # fmt: skip
    now = [1000.0]
    collector = ClaimCollector(
        reactor, _Host(a, "host-a", [in_use], ["blue"]), grace=60, clock=lambda: now[0]
    )
    assert run_in_reactor(lambda: defer.ensureDeferred(collector.collect())) == []
    now[0] += 59
    assert run_in_reactor(lambda: defer.ensureDeferred(collector.collect())) == []
    now[0] += 2
    gone = run_in_reactor(lambda: defer.ensureDeferred(collector.collect()))
    assert gone == [f"blue/{orphan.split('/')[0]}"]
    left = claims(central)
    assert f"blue/{used.split('/')[0]}" in left and f"blue/{others.split('/')[0]}" in left
    assert len(left) == 2


def test_a_host_forgets_a_switch_it_no_longer_has_a_network_on(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(a.request_pool, "green", "10.71.0.0/24", "host-a")  # its rm was lost
    run_in_reactor(b.request_pool, "blue", None, "host-b")
    now = [1000.0]
    collector = ClaimCollector(reactor, _Host(a, "host-a", [], ["blue"]), clock=lambda: now[0])
    assert run_in_reactor(lambda: defer.ensureDeferred(collector.collect())) == []
    now[0] += 61
    assert run_in_reactor(lambda: defer.ensureDeferred(collector.collect())) == [
        ("switch", "green")
    ]
    assert central.switches() == ["blue"]
    # Host b's mark on blue is host b's business.
    assert "ovsdriver-host-host-b" in central.nbctl("get", "Logical_Switch", "blue", "external_ids")


SUBNET6 = "fd00:70::/64"


def test_a_dual_stack_switch_takes_its_ipv6_subnet_from_the_network_making_it(central, engines):
    a, b = engines
    reactor = get_reactor()

    def claim(nb, host, version, address=None):
        return run_in_reactor(
            lambda: defer.ensureDeferred(allocate(reactor, nb, "blue", address, host, version))
        )

    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    info = run_in_reactor(a.request_pool, "blue", SUBNET6, "host-a", 6)
    assert (info.subnet, info.subnet6) == (SUBNET, SUBNET6)
    assert run_in_reactor(a.set_gateway, "blue", None) == "10.70.0.1/24"
    assert run_in_reactor(a.set_gateway, "blue", None, 6) == "fd00:70::1/64"
    mac = central.nbctl("get", "Logical_Switch_Port", "blue/gateway", "addresses")
    assert mac.endswith(' 10.70.0.1 fd00:70::1"]'), mac
    # A later host gets the IPv6 subnet and gateway from the switch; another is refused.
    run_in_reactor(b.request_pool, "blue", None, "host-b")
    assert run_in_reactor(b.request_pool, "blue", None, "host-b", 6).subnet6 == SUBNET6
    with pytest.raises(NorthboundError, match="has IPv6 subnet fd00:70::/64, not fd00:71::/64"):
        run_in_reactor(b.request_pool, "blue", "fd00:71::/64", "host-b", 6)
    assert run_in_reactor(b.set_gateway, "blue", None, 6) == "fd00:70::1/64"
    # Addresses of both versions never collide across hosts.
    v4, v6 = claim(a, "host-a", 4), claim(a, "host-a", 6)
    assert (v4, v6) == ("10.70.0.2/24", "fd00:70::2/64")
    assert claim(b, "host-b", 6) == "fd00:70::3/64"
    with pytest.raises(NorthboundError, match="fd00:70::3 is already in use"):
        claim(a, "host-a", 6, "fd00:70::3")
    # The endpoint's logical port (its IPv4 claim) carries both addresses.
    endpoint_id = "ab" * 32
    port = run_in_reactor(
        a.bind_port, "blue", v4, "02:42:0a:46:00:02", "cd" * 32, endpoint_id, "host-a", v6
    )
    assert port == "blue/10.70.0.2"
    want = '["02:42:0a:46:00:02 10.70.0.2 fd00:70::2"]'
    assert central.nbctl("get", "Logical_Switch_Port", port, "addresses") == want
    assert central.nbctl("get", "Logical_Switch_Port", port, "port_security") == want
    # The claim collector keeps the endpoint's bare IPv6 claim.
    orphan = claim(a, "host-a", 6)
    in_use = Endpoint(
        endpoint_id=endpoint_id, network_id=f"{0:064x}", bridge="br-int", port="oep-x",
        ifname="oep-x", mac="02:42:0a:46:00:02", ipv4=v4, ipv6=v6, iface_id=port,
    )  # fmt: skip
    now = [1000.0]
    collector = ClaimCollector(
        reactor, _Host(a, "host-a", [in_use], ["blue"]), grace=60, clock=lambda: now[0]
    )
    run_in_reactor(lambda: defer.ensureDeferred(collector.collect()))
    now[0] += 61
    gone = run_in_reactor(lambda: defer.ensureDeferred(collector.collect()))
    assert gone == [f"blue/{orphan.split('/')[0]}"]
    assert claims(central) == ["blue/10.70.0.2", "blue/fd00:70::2", "blue/fd00:70::3"]


def test_a_switch_made_without_ipv6_stays_ipv4_only(central, engines):
    a, b = engines
    run_in_reactor(a.request_pool, "green", "10.71.0.0/24", "host-a")
    with pytest.raises(NorthboundError, match="give its IPv6 subnet with a second --subnet"):
        run_in_reactor(a.request_pool, "green", None, "host-a", 6)
    run_in_reactor(b.request_pool, "green", None, "host-b")
    with pytest.raises(NorthboundError, match="green is IPv4 only .*: leave --ipv6 out"):
        run_in_reactor(b.request_pool, "green", "fd00:71::/64", "host-b", 6)
    with pytest.raises(NorthboundError, match="green is IPv4 only"):
        run_in_reactor(a.set_gateway, "green", None, 6)
    # A host cannot join two switches with one IPv6 subnet.
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(a.request_pool, "blue", SUBNET6, "host-a", 6)
    run_in_reactor(a.request_pool, "red", "10.72.0.0/24", "host-a")
    with pytest.raises(NorthboundError, match=f"already uses subnet {SUBNET6} on OVN switch blue"):
        run_in_reactor(a.request_pool, "red", SUBNET6, "host-a", 6)


def test_a_switch_nobody_uses_goes_with_its_last_orphaned_claim(central, engines):
    a, _ = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(a.set_gateway, "blue", None)
    run_in_reactor(lambda: defer.ensureDeferred(allocate(reactor, a, "blue", None, "host-a")))
    assert run_in_reactor(a.release_pool, "blue", "host-a") is False  # Docker leaked the address
    now = [1000.0]
    collector = ClaimCollector(reactor, _Host(a, "host-a"), clock=lambda: now[0])
    run_in_reactor(lambda: defer.ensureDeferred(collector.collect()))
    now[0] += 61
    assert run_in_reactor(lambda: defer.ensureDeferred(collector.collect())) == ["blue/10.70.0.2"]
    assert central.switches() == []
    assert central.ports() == []


def test_a_host_leaving_a_switch_gives_back_the_addresses_docker_leaked(central, engines):
    a, b = engines
    reactor = get_reactor()
    run_in_reactor(a.request_pool, "blue", SUBNET, "host-a")
    run_in_reactor(b.request_pool, "blue", None, "host-b")

    def claim(nb, host):
        return run_in_reactor(
            lambda: defer.ensureDeferred(allocate(reactor, nb, "blue", None, host))
        )

    used, leaked = claim(a, "host-a"), claim(a, "host-a")
    theirs = claim(b, "host-b")
    in_use = {f"blue/{used.split('/')[0]}"}
    assert run_in_reactor(a.release_pool, "blue", "host-a", in_use) is False  # b uses it
    assert claims(central) == sorted([*in_use, f"blue/{theirs.split('/')[0]}"])
    assert f"blue/{leaked.split('/')[0]}" not in claims(central)
    run_in_reactor(a.forget_claims, sorted(in_use))
    claim(b, "host-b")
    assert run_in_reactor(b.release_pool, "blue", "host-b", set()) is True
    assert central.switches() == [] and central.ports() == []
