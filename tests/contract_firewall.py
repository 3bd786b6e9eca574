"""The behaviour every implementation of the firewall port must have.

`FirewallContract` is mixed into one test class per implementation: the real
`ovsdriver.firewall.Firewall` on iptables in a throwaway network namespace
(``tests/integration/test_firewall_real.py``), which reads the result back from
``iptables-save``, and `ovsdriver.testing.FakeFirewall`, which answers from
memory. Both describe what they do as a `FirewallView`, so the fake cannot
drift from the real thing.
"""

import attr
import pytest

from ovsdriver.firewall import FirewallError
from ovsdriver.values import NetworkRules, PublishedPort

#: Modes of a network in `FirewallView.networks`.
NAT = "nat"  # out through the host (masqueraded); in: replies and published ports
ROUTED = "routed"  # out and in through the host, not masqueraded (ovs.nat=false)
INTERNAL = "internal"  # nothing in or out through the host


@attr.s(frozen=True, slots=True)
class FirewallView:
    """What a test can see of the firewall, independent of how it is made."""

    #: {(family, ifname, mode)}: every network the firewall isolates from the
    #: driver's other networks, and how traffic crosses the host.
    networks = attr.ib(factory=frozenset)
    #: {(pool, ifname)}: traffic from pool leaving through another interface
    #: is masqueraded (IPv4 and IPv6 pools).
    masqueraded = attr.ib(factory=frozenset)
    #: {pool}: pools of internal networks no traffic may be routed to or from.
    blocked = attr.ib(factory=frozenset)
    #: {(proto, host_ip or None, host_port, container_ip, container_port)}:
    #: DNAT to the container, forwarding allowed (also from the driver's
    #: other networks, through the host's address), hairpin masqueraded.
    published = attr.ib(factory=frozenset)
    #: {4, 6}: families whose IP forwarding is on.
    forwarding = attr.ib(factory=frozenset)
    #: Whether anything of the firewall's is there at all (chains, jumps).
    owned = attr.ib(default=False)
    #: {ifname}: interfaces that route 127.0.0.0/8 (ports published on the
    #: host's loopback reach the network), guarded against containers
    #: reaching the host's loopback.
    localnet = attr.ib(factory=frozenset)
    #: {(family, ifname)}: networks isolated from Docker's bridge networks too.
    docker_isolated = attr.ib(factory=frozenset)


def network(n, nat=True, internal=False, ipv6=(), published=(), ipv4=None):
    """`NetworkRules` for test network number *n*: 10.9n.0.0/24 on fwc-n."""
    return NetworkRules(
        network_id=f"{n:x}" * 12,
        ifname=f"fwc-{n}",
        ipv4=[f"10.9{n}.0.0/24"] if ipv4 is None else ipv4,
        ipv6=ipv6,
        nat=nat,
        internal=internal,
        published=published,
    )


def tcp(host_port, container_ip, container_port, host_ip=None):
    return PublishedPort("tcp", host_port, container_ip, container_port, host_ip)


def udp(host_port, container_ip, container_port, host_ip=None):
    return PublishedPort("udp", host_port, container_ip, container_port, host_ip)


class FirewallContract:
    """Contract tests; a subclass provides ``self.firewall`` and the hooks."""

    firewall = None

    def call(self, method, *args):
        """Call ``method(*args)`` and return its Deferred's result (or raise)."""
        raise NotImplementedError

    def view(self):
        """The `FirewallView` of what is in place now."""
        raise NotImplementedError

    def plant_foreign_rules(self):
        """Add rules the firewall does not own (FORWARD, POSTROUTING...)."""
        raise NotImplementedError

    def foreign_rules_intact(self):
        """Whether the rules `plant_foreign_rules` added are all still there."""
        raise NotImplementedError

    def snapshot(self):
        """An exact, comparable record of everything in place."""
        raise NotImplementedError

    def plant_docker_chains(self):
        """Make the chains dockerd makes when it manages iptables."""
        raise NotImplementedError

    def flush_from_outside(self):
        """Do what ``iptables -F; iptables -t nat -F`` (both families) does."""
        raise NotImplementedError

    def apply(self, *networks):
        return self.call(self.firewall.apply, list(networks))

    # -- nothing ---------------------------------------------------------------

    def test_nothing_applied_owns_nothing(self):
        assert self.view() == FirewallView()

    def test_apply_nothing_leaves_nothing(self):
        self.apply()
        assert self.view() == FirewallView()

    # -- networks ----------------------------------------------------------------

    def test_nat_network_is_masqueraded_isolated_and_forwarded(self):
        self.apply(network(1))
        view = self.view()
        assert view.networks == {(4, "fwc-1", NAT)}
        assert view.masqueraded == {("10.91.0.0/24", "fwc-1")}
        assert view.blocked == set() and view.published == set()
        assert view.forwarding == {4}
        assert view.owned

    def test_routed_network_is_not_masqueraded(self):
        self.apply(network(1, nat=False))
        view = self.view()
        assert view.networks == {(4, "fwc-1", ROUTED)}
        assert view.masqueraded == set()
        assert view.forwarding == {4}

    def test_internal_network_is_blocked_and_needs_no_forwarding(self):
        self.apply(network(1, internal=True, nat=False))
        view = self.view()
        assert view.networks == {(4, "fwc-1", INTERNAL)}
        assert view.blocked == {"10.91.0.0/24"}
        assert view.masqueraded == set()
        assert view.forwarding == set()

    def test_internal_network_is_never_masqueraded_nor_published(self):
        self.apply(network(1, internal=True, nat=True, published=[tcp(8080, "10.91.0.2", 80)]))
        view = self.view()
        assert view.networks == {(4, "fwc-1", INTERNAL)}
        assert view.masqueraded == set() and view.published == set()

    def test_several_networks_are_each_isolated(self):
        self.apply(network(1), network(2, nat=False), network(3, internal=True, nat=False))
        view = self.view()
        assert view.networks == {
            (4, "fwc-1", NAT),
            (4, "fwc-2", ROUTED),
            (4, "fwc-3", INTERNAL),
        }
        assert view.masqueraded == {("10.91.0.0/24", "fwc-1")}
        assert view.blocked == {"10.93.0.0/24"}

    def test_ipv6_pools_get_the_same_treatment(self):
        self.apply(
            network(1, ipv6=["fd00:91::/64"]), network(2, internal=True, ipv6=["fd00:92::/64"])
        )
        view = self.view()
        assert view.networks == {
            (4, "fwc-1", NAT),
            (6, "fwc-1", NAT),
            (4, "fwc-2", INTERNAL),
            (6, "fwc-2", INTERNAL),
        }
        assert view.masqueraded == {("10.91.0.0/24", "fwc-1"), ("fd00:91::/64", "fwc-1")}
        assert view.blocked == {"10.92.0.0/24", "fd00:92::/64"}
        assert view.forwarding == {4, 6}

    def test_ipv6_only_network(self):
        self.apply(network(1, ipv4=[], ipv6=["fd00:91::/64"]))
        view = self.view()
        assert view.networks == {(6, "fwc-1", NAT)}
        assert view.masqueraded == {("fd00:91::/64", "fwc-1")}
        assert view.forwarding == {6}

    def test_pools_are_normalized(self):
        self.apply(network(1, ipv4=["10.91.0.7/24"]))
        assert self.view().masqueraded == {("10.91.0.0/24", "fwc-1")}

    # -- published ports -------------------------------------------------------

    def test_published_ports_tcp_and_udp(self):
        ports = [tcp(8080, "10.91.0.2", 80), udp(5353, "10.91.0.3", 53, "192.0.2.1")]
        self.apply(network(1, published=ports))
        assert self.view().published == {
            ("tcp", None, 8080, "10.91.0.2", 80),
            ("udp", "192.0.2.1", 5353, "10.91.0.3", 53),
        }

    def test_published_on_every_address_when_host_ip_is_unspecified(self):
        self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80, "0.0.0.0")]))
        assert self.view().published == {("tcp", None, 8080, "10.91.0.2", 80)}

    def test_duplicate_published_ports_count_once(self):
        port = tcp(8080, "10.91.0.2", 80)
        twice = [port, port, tcp(8080, "10.91.0.2", 80, "0.0.0.0")]
        duplicated = self._after_apply(network(1, published=twice))
        assert self.view().published == {("tcp", None, 8080, "10.91.0.2", 80)}
        assert self._after_apply(network(1, published=[port])) == duplicated

    def _after_apply(self, *networks):
        self.apply(*networks)
        return self.snapshot()

    def test_revoked_published_port_is_gone(self):
        self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80), udp(53, "10.91.0.2", 53)]))
        self.apply(network(1, published=[udp(53, "10.91.0.2", 53)]))
        assert self.view().published == {("udp", None, 53, "10.91.0.2", 53)}
        self.apply(network(1))
        assert self.view().published == set()

    def test_published_on_the_hosts_loopback(self):
        self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80, "127.0.0.1")]))
        view = self.view()
        assert view.published == {("tcp", "127.0.0.1", 8080, "10.91.0.2", 80)}
        assert view.localnet == {"fwc-1"}

    def test_published_on_every_address_includes_loopback(self):
        self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80)]), network(2))
        assert self.view().localnet == {"fwc-1"}

    def test_published_on_ipv6(self):
        ports = [
            tcp(8080, "10.91.0.2", 80),
            tcp(8080, "fd00:91::2", 80),
            udp(5353, "fd00:91::3", 53, "2001:db8::1"),
        ]
        self.apply(network(1, ipv6=["fd00:91::/64"], published=ports))
        assert self.view().published == {
            ("tcp", None, 8080, "10.91.0.2", 80),
            ("tcp", None, 8080, "fd00:91::2", 80),
            ("udp", "2001:db8::1", 5353, "fd00:91::3", 53),
        }

    # -- Docker's own networks ---------------------------------------------------

    def test_no_isolation_from_docker_without_dockers_chains(self):
        self.apply(network(1))
        assert self.view().docker_isolated == set()

    def test_isolated_from_dockers_bridge_networks(self):
        self.plant_docker_chains()
        self.apply(
            network(1, ipv6=["fd00:91::/64"]), network(2, nat=False), network(3, internal=True)
        )
        assert self.view().docker_isolated == {(4, "fwc-1"), (6, "fwc-1"), (4, "fwc-2")}
        self.apply()
        assert self.view() == FirewallView(forwarding=frozenset({4, 6}))

    # -- healing -------------------------------------------------------------------

    def test_check_with_everything_in_place_changes_nothing(self):
        before = self._after_apply(network(1, published=[tcp(8080, "10.91.0.2", 80)]))
        assert self.call(self.firewall.check) == []
        assert self.snapshot() == before

    def test_check_puts_flushed_rules_back_once(self):
        networks = [network(1, ipv6=["fd00:91::/64"], published=[tcp(8080, "10.91.0.2", 80)])]
        before, view = self._after_apply(*networks), self.view()
        self.flush_from_outside()
        assert self.view().published == set()
        assert self.call(self.firewall.check)
        assert self.view() == view
        assert self.snapshot() == before
        assert self.call(self.firewall.check) == []

    def test_check_notices_dockers_chains_appearing(self):
        self.apply(network(1))
        self.plant_docker_chains()
        assert self.call(self.firewall.check)
        assert self.view().docker_isolated == {(4, "fwc-1")}

    # -- changes -----------------------------------------------------------------

    def test_apply_replaces_everything_of_a_removed_network(self):
        self.apply(
            network(1, published=[tcp(8080, "10.91.0.2", 80)], ipv6=["fd00:91::/64"]),
            network(2),
            network(3, internal=True),
        )
        self.apply(network(2))
        view = self.view()
        assert view.networks == {(4, "fwc-2", NAT)}
        assert view.masqueraded == {("10.92.0.0/24", "fwc-2")}
        assert view.blocked == set() and view.published == set()

    def test_a_network_can_change_mode(self):
        self.apply(network(1))
        self.apply(network(1, nat=False))
        assert self.view().networks == {(4, "fwc-1", ROUTED)}
        self.apply(network(1, internal=True, nat=False))
        assert self.view().networks == {(4, "fwc-1", INTERNAL)}

    def test_apply_is_idempotent(self):
        networks = [network(1, published=[tcp(8080, "10.91.0.2", 80)]), network(2, internal=True)]
        first = self._after_apply(*networks)
        assert self._after_apply(*networks) == first
        assert self._after_apply(*networks) == first

    def test_removing_every_network_leaves_nothing_and_can_start_again(self):
        self.apply(network(1, ipv6=["fd00:91::/64"], published=[tcp(8080, "10.91.0.2", 80)]))
        self.apply()
        view = self.view()
        assert not view.owned
        assert (view.networks, view.masqueraded, view.published) == (set(), set(), set())
        self.apply(network(2))
        assert self.view().networks == {(4, "fwc-2", NAT)}

    def test_forwarding_stays_on_once_turned_on(self):
        # Turning it off could cut off someone else (the engine's bridges).
        self.apply(network(1))
        self.apply()
        assert self.view().forwarding == {4}

    def test_foreign_rules_are_never_touched(self):
        self.plant_foreign_rules()
        self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80)]), network(2, internal=True))
        assert self.foreign_rules_intact()
        self.apply(network(2, ipv6=["fd00:92::/64"]))
        assert self.foreign_rules_intact()
        self.apply()
        assert self.foreign_rules_intact()

    # -- refusals ------------------------------------------------------------------

    def refused(self, *networks):
        """Apply *networks*; return the FirewallError's message it must fail with."""
        with pytest.raises(FirewallError) as caught:
            self.apply(*networks)
        return str(caught.value)

    @pytest.mark.parametrize(
        "bad, words",
        [
            (attr.evolve(network(1), ifname="bad name"), ["'bad name'", "interface"]),
            (attr.evolve(network(1), ifname="-j"), ["'-j'", "interface"]),
            (attr.evolve(network(1), ifname="x" * 16), ["interface"]),
            (attr.evolve(network(1), network_id="zz"), ["'zz'"]),
            (network(1, ipv4=["10.91.0.0/24 -j ACCEPT"]), ["not a subnet"]),
            (network(1, ipv4=["fd00::/64"]), ["fd00::/64", "IPv4"]),
            (network(1, published=[PublishedPort("icmp", 1, "10.91.0.2", 1)]), ["'icmp'"]),
            (network(1, published=[tcp(0, "10.91.0.2", 80)]), ["host port", "0"]),
            (network(1, published=[tcp(80, "10.91.0.2", 65536)]), ["container port", "65536"]),
            (network(1, published=[tcp(80, "10.91.0.2\n-A", 80)]), ["container address"]),
            (network(1, published=[tcp(80, "10.91.0.2", 80, "::1")]), ["::1", "IPv6", "10.91.0.2"]),
            (
                network(1, ipv6=["fd00:91::/64"], published=[tcp(80, "fd00:91::2", 80, "::1")]),
                ["::1", "127.0.0.1"],
            ),
        ],
    )
    def test_invalid_state_is_refused_by_name_and_changes_nothing(self, bad, words):
        before = self._after_apply(network(2))
        message = self.refused(network(2), bad)
        for word in words:
            assert word in message
        assert self.snapshot() == before
