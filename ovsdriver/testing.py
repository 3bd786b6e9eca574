"""Verified fakes for the driver's ports, for tests of the code that uses them.

Each fake here is held to its real implementation by one shared contract test
suite (``tests/contract_*.py``) that runs against both, so a test that passes
with a fake says something true about the real thing. The fakes keep their
state in memory and return Deferreds that have already fired: no reactor, no
threads, no root.
"""

import time

import attr
from twisted.internet import defer

from ovsdriver.firewall import (
    FirewallError,
    check_networks,
    family_of,
    forwarding_families,
    localnet_interfaces,
    needs,
)
from ovsdriver.netlink import LinkError, LinkInfo, check_ifname, check_mac, parse_addresses
from ovsdriver.vswitch import VSwitchError, check_shareable, gateway_port_name

# ---------------------------------------------------------------------------
# FakeNetlink: the kernel-link port (ovsdriver.netlink.Netlink) in memory.
# ---------------------------------------------------------------------------

#: The kernel refuses smaller MTUs on Ethernet-like links.
_MIN_MTU = 68
_MAX_MTU = 65535


@attr.s(frozen=True, slots=True)
class FakeLinkState:
    """A snapshot of one fake link, for tests to check what the code did."""

    name = attr.ib()
    mtu = attr.ib()
    mac = attr.ib()
    up = attr.ib()
    addresses = attr.ib()  # frozenset of normalized CIDR strings
    peer = attr.ib()  # the other end's name for a veth, else None
    tx_checksum = attr.ib()  # TX checksum offload on?


@attr.s(slots=True)
class _Link:
    mtu = attr.ib(default=1500)
    mac = attr.ib(default=None)
    up = attr.ib(default=False)
    addresses = attr.ib(factory=set)
    peer = attr.ib(default=None)
    tx_checksum = attr.ib(default=True)
    carrier = attr.ib(default=True)


@attr.s(slots=True)
class _Sandbox:
    """A fake container network namespace: its links and routes."""

    links = attr.ib(factory=lambda: {"lo": _Link(mtu=65536, mac="00:00:00:00:00:00", up=True)})
    routes = attr.ib(factory=set)  # FakeRoute values


@attr.s(frozen=True, slots=True)
class FakeRoute:
    """A route in a fake sandbox: *dst* is a CIDR or "default"."""

    dst = attr.ib()
    gateway = attr.ib()
    dev = attr.ib()


def _snapshot(name, link):
    if link is None:
        return None
    return FakeLinkState(
        name=name,
        mtu=link.mtu,
        mac=link.mac,
        up=link.up,
        addresses=frozenset(str(a) for a in link.addresses),
        peer=link.peer,
        tx_checksum=link.tx_checksum,
    )


class FakeNetlink:
    """`ovsdriver.netlink.Netlink` in memory: a dict of links.

    Like a fresh network namespace it starts with ``lo``. Tests make links
    appear with `add_link` (as OVS creating a tap would) or `appear_on_wait`,
    and read them back with `state`. Containers' namespaces (sandboxes, by
    path) are made with `add_sandbox`, filled with `add_sandbox_link` and
    `add_sandbox_route` or by `move_to_sandbox` (as the engine moves a link
    at Join), and read back with `sandbox_state` and `sandbox_routes`.
    """

    def __init__(self):
        self._links = {"lo": _Link(mtu=65536, mac="00:00:00:00:00:00")}
        self._sandboxes = {}  # path -> _Sandbox
        self._appearing = set()
        self._next_mac = 1
        self.started = False
        self.repairs = []  # (sandbox, fresh name) of each repair that was done

    # -- helpers for tests ---------------------------------------------------

    def add_link(self, name, mtu=1500, mac=None):
        """Make a link exist, down and without addresses (e.g. an OVS tap)."""
        check_ifname(name)
        self._links[name] = _Link(mtu=mtu, mac=mac or self._new_mac())

    def appear_on_wait(self, name):
        """Make *name* appear while something waits for it with wait_for_link."""
        self._appearing.add(name)

    def state(self, name):
        """A `FakeLinkState` snapshot of *name*, or None if it does not exist."""
        return _snapshot(name, self._links.get(name))

    def _new_mac(self):
        n = self._next_mac
        self._next_mac += 1
        return "02:00:00:" + ":".join(f"{b:02x}" for b in n.to_bytes(3, "big"))

    def add_sandbox(self, path):
        """Make a sandbox (a container's namespace) exist at *path*, with ``lo``."""
        self._sandboxes.setdefault(str(path), _Sandbox())

    def remove_sandbox(self, path):
        """Make the sandbox at *path* go away with everything in it."""
        self._sandboxes.pop(str(path), None)

    def add_sandbox_link(self, sandbox, name, mac, mtu=1500, addresses=(), up=True, carrier=True):
        """Put a link in a sandbox; ``carrier=False`` makes it a dead tap."""
        check_ifname(name)
        link = _Link(mtu=mtu, mac=mac.lower(), up=up, carrier=carrier)
        link.addresses.update(parse_addresses(name, addresses, "add"))
        self._sandboxes[str(sandbox)].links[name] = link

    def add_sandbox_route(self, sandbox, dst, gateway, dev):
        """Add a route through *dev* (*dst*: a CIDR or "default")."""
        self._sandboxes[str(sandbox)].routes.add(FakeRoute(dst, gateway, dev))

    def move_to_sandbox(self, name, sandbox, new_name=None):
        """Move a link into a sandbox (renamed), as the engine does at Join."""
        link = self._links.pop(name)
        self._sandboxes[str(sandbox)].links[new_name or name] = link

    def sandbox_state(self, sandbox, name):
        """A `FakeLinkState` of link *name* in a sandbox, or None."""
        return _snapshot(name, self._sandboxes[str(sandbox)].links.get(name))

    def sandbox_routes(self, sandbox):
        """The routes of a sandbox, a frozenset of `FakeRoute`."""
        return frozenset(self._sandboxes[str(sandbox)].routes)

    # -- the port --------------------------------------------------------------

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def link_exists(self, ifname):
        return defer.succeed(ifname in self._links)

    def links(self):
        return defer.succeed(frozenset(self._links))

    def wait_for_link(self, ifname, timeout=5.0):
        if ifname in self._appearing:
            self._appearing.discard(ifname)
            self.add_link(ifname)
        if ifname in self._links:
            return defer.succeed(None)
        return defer.fail(
            LinkError(f"interface {ifname} did not appear within {timeout:g} seconds")
        )

    def add_addresses(self, ifname, addresses):
        try:
            parsed = parse_addresses(ifname, addresses, "add")
            link = self._links.get(ifname)
            if link is None:
                raise LinkError(f"cannot add addresses to {ifname}: no such interface")
        except LinkError:
            return defer.fail()
        link.addresses.update(parsed)
        link.up = True
        return defer.succeed(None)

    def remove_addresses(self, ifname, addresses):
        try:
            parsed = parse_addresses(ifname, addresses, "remove")
        except LinkError:
            return defer.fail()
        link = self._links.get(ifname)
        if link is not None:
            link.addresses.difference_update(parsed)
        return defer.succeed(None)

    def set_link(self, ifname, mtu=None, mac=None, up=None):
        try:
            if mac is not None:
                check_mac(ifname, mac)
            link = self._links.get(ifname)
            if link is None:
                raise LinkError(f"cannot configure {ifname}: no such interface")
            self._set(ifname, link, mtu=mtu, mac=mac, up=up)
        except LinkError:
            return defer.fail()
        return defer.succeed(None)

    def _set(self, ifname, link, mtu=None, mac=None, up=None):
        if mtu is not None and not _MIN_MTU <= mtu <= _MAX_MTU:
            raise LinkError(f"cannot set MTU {mtu} on {ifname}: Invalid argument")
        if mac is not None and int(mac.split(":")[0], 16) & 1:
            raise LinkError(
                f"cannot set MAC address {mac} on {ifname}: Cannot assign requested address"
            )
        if mtu is not None:
            link.mtu = mtu
        if mac is not None:
            link.mac = mac.lower()
        if up is not None:
            link.up = up

    def create_veth(self, host_name, peer_name, mtu, peer_mac=None):
        what = f"cannot create veth pair {host_name}/{peer_name}"
        try:
            check_ifname(host_name)
            check_ifname(peer_name)
            if peer_mac is not None:
                check_mac(peer_name, peer_mac)
            host = self._links.get(host_name)
            peer = self._links.get(peer_name)
            if host is None and peer is None:
                # Check first, as the real one deletes a pair it cannot set up.
                self._set(peer_name, _Link(), mtu=mtu, mac=peer_mac)
                host = _Link(mac=self._new_mac(), peer=peer_name)
                peer = _Link(mac=self._new_mac(), peer=host_name)
                self._links[host_name] = host
                self._links[peer_name] = peer
            elif host is None or peer is None:
                present, absent = (host_name, peer_name) if peer is None else (peer_name, host_name)
                raise LinkError(
                    f"{what}: {present} already exists but {absent} does not;"
                    f" delete {present} first"
                )
            self._set(peer_name, peer, mtu=mtu, mac=peer_mac)
            self._set(host_name, host, mtu=mtu, up=True)
        except LinkError:
            return defer.fail()
        peer.tx_checksum = False
        return defer.succeed(None)

    def delete_link(self, ifname):
        link = self._links.pop(ifname, None)
        if link is not None and link.peer is not None:
            self._links.pop(link.peer, None)
        return defer.succeed(None)

    def _sandbox(self, sandbox):
        found = self._sandboxes.get(str(sandbox))
        if found is None:
            raise LinkError(f"cannot enter sandbox {sandbox}: No such file or directory")
        return found

    def sandbox_links(self, sandbox):
        try:
            links = self._sandbox(sandbox).links
        except LinkError:
            return defer.fail()
        return defer.succeed(
            tuple(
                LinkInfo(
                    name=name,
                    mac=link.mac,
                    mtu=link.mtu,
                    up=link.up,
                    carrier=link.carrier,
                    addresses=[str(a) for a in link.addresses],
                )
                for name, link in links.items()
            )
        )

    def repair_endpoint(self, sandbox, fresh_name, mac, mtu, addresses=()):
        try:
            check_mac(fresh_name, mac)
            parsed = parse_addresses(fresh_name, addresses, "restore")
            fresh = self._links.get(fresh_name)
            if fresh is None:
                return defer.succeed(None)
            target = self._sandbox(sandbox)
        except LinkError:
            return defer.fail()
        mac = mac.lower()
        dead_name = next(
            (
                name
                for name, link in target.links.items()
                if link.mac == mac and name != fresh_name and not link.carrier
            ),
            None,
        )
        if dead_name is None:
            return defer.succeed(None)
        dead = target.links.pop(dead_name)
        routes = {r for r in target.routes if r.dev == dead_name}
        del self._links[fresh_name]
        target.links[dead_name] = fresh
        fresh.mac, fresh.mtu, fresh.up = mac, int(mtu or dead.mtu), True
        fresh.addresses = {a for a in dead.addresses if not (a.version == 6 and a.is_link_local)}
        fresh.addresses.update(parsed)
        self.repairs.append((str(sandbox), fresh_name))
        target.routes |= routes
        return defer.succeed(dead_name)


# ---------------------------------------------------------------------------
# FakeVSwitch: the OVSDB port (ovsdriver.vswitch.VSwitch) in memory.
# ---------------------------------------------------------------------------


@attr.s(slots=True)
class _FakeBridge:
    owned = attr.ib()
    networks = attr.ib(factory=dict)  # network id -> Network
    ports = attr.ib(factory=dict)  # port name -> Endpoint or None (other ports)


class FakeVSwitch:
    """`ovsdriver.vswitch.VSwitch` in memory: bridges holding networks and ports.

    Tests can add a bridge the driver does not own (`add_foreign_bridge`) and make
    ovs-vswitchd fail to create a port (`break_port`), as a missing veth does
    for real. Given a `FakeNetlink` as ``kernel``, it makes and removes the links
    of internal ports there, as ovs-vswitchd does.
    """

    def __init__(self, kernel=None):
        self.bridges = {}
        self.kernel = kernel
        self._broken = set()

    def _plug(self, name, mtu=1500):
        if self.kernel is not None and self.kernel.state(name) is None:
            self.kernel.add_link(name, mtu=mtu)

    def _unplug(self, name, endpoint=None):
        if self.kernel is not None and (endpoint is None or endpoint.port_type == "internal"):
            self.kernel.delete_link(name)

    # -- helpers for tests ---------------------------------------------------

    def add_foreign_bridge(self, name):
        self.bridges[name] = _FakeBridge(owned=False, ports={name: None})

    def break_port(self, name):
        self._broken.add(name)

    def bridge_exists(self, name):
        return name in self.bridges

    def port_exists(self, name):
        return any(name in b.ports for b in self.bridges.values())

    # -- the port --------------------------------------------------------------

    def networks(self):
        return defer.succeed(
            {nid: n for b in self.bridges.values() for nid, n in b.networks.items()}
        )

    def network(self, network_id):
        return self.networks().addCallback(lambda nets: nets.get(network_id))

    def endpoints(self):
        return defer.succeed(
            [ep for b in self.bridges.values() for ep in b.ports.values() if ep is not None]
        )

    def endpoint(self, endpoint_id):
        found = [ep for ep in self.endpoints().result if ep.endpoint_id == endpoint_id]
        return defer.succeed(found[0] if found else None)

    def add_network(self, network):
        bridge = self.bridges.get(network.bridge)
        try:  # check everything first: a refused network leaves nothing
            if bridge is not None and network.network_id not in bridge.networks:
                check_shareable(network.bridge, list(bridge.networks.values()), network)
            holder = self._holder(network.uplink)
            if network.uplink and holder not in (None, network.bridge):
                raise VSwitchError(f"uplink {network.uplink} is already a port of another bridge")
        except VSwitchError as e:
            return defer.fail(e)
        if bridge is None:
            bridge = self.bridges[network.bridge] = _FakeBridge(owned=True)
            bridge.ports[network.bridge] = None
            self._plug(network.bridge, 1500 if network.shared_bridge else network.mtu)
        bridge.networks[network.network_id] = network
        if network.shared_bridge and network.gateways:
            bridge.ports.setdefault(gateway_port_name(network.network_id), None)
            self._plug(gateway_port_name(network.network_id))
        if network.uplink:
            bridge.ports.setdefault(network.uplink, None)
        return defer.succeed(None)

    def _holder(self, port):
        """The bridge holding a port, or None."""
        return next((name for name, b in self.bridges.items() if port in b.ports), None)

    def remove_network(self, network_id):
        for name, bridge in list(self.bridges.items()):
            network = bridge.networks.pop(network_id, None)
            if network is None:
                continue
            if gateway_port_name(network_id) in bridge.ports:
                del bridge.ports[gateway_port_name(network_id)]
                self._unplug(gateway_port_name(network_id))
            if bridge.owned and not bridge.networks:
                for port in bridge.ports:
                    if port != network.uplink:  # the interface itself stays
                        self._unplug(port, bridge.ports[port])
                del self.bridges[name]
            elif network.uplink and all(
                n.uplink != network.uplink for n in bridge.networks.values()
            ):
                bridge.ports.pop(network.uplink, None)
        return defer.succeed(None)

    def add_endpoint(self, endpoint):
        for bridge in self.bridges.values():
            held = bridge.ports.get(endpoint.port, endpoint)
            if held is None or held.endpoint_id != endpoint.endpoint_id:
                return defer.fail(VSwitchError(f"port {endpoint.port} already exists"))
            if endpoint.port in bridge.ports:
                return defer.succeed(endpoint)
        bridge = self.bridges.get(endpoint.bridge)
        if bridge is None:
            return defer.fail(VSwitchError(f"bridge {endpoint.bridge} is missing"))
        if endpoint.created is None:
            endpoint = attr.evolve(endpoint, created=float(round(time.time())))
        bridge.ports[endpoint.port] = endpoint
        if endpoint.port_type == "internal":
            self._plug(endpoint.port, endpoint.mtu)
        if endpoint.port in self._broken:
            return defer.fail(VSwitchError(f"Open vSwitch could not add port {endpoint.port}"))
        return defer.succeed(endpoint)

    def remove_endpoint(self, endpoint_id):
        for bridge in self.bridges.values():
            for name, ep in list(bridge.ports.items()):
                if ep is not None and ep.endpoint_id == endpoint_id:
                    del bridge.ports[name]
                    self._unplug(name, ep)
        return defer.succeed(None)

    def set_sandbox(self, endpoint_id, sandbox):
        return self._evolve(endpoint_id, sandbox=sandbox)

    def set_published(self, endpoint_id, published):
        return self._evolve(endpoint_id, published=tuple(published or ()))

    def _evolve(self, endpoint_id, **changes):
        for bridge in self.bridges.values():
            for name, ep in bridge.ports.items():
                if ep is not None and ep.endpoint_id == endpoint_id:
                    bridge.ports[name] = attr.evolve(ep, **changes)
        return defer.succeed(None)


# ---------------------------------------------------------------------------
# FakeFirewall: the packet filter port (ovsdriver.firewall.Firewall) in memory.
# ---------------------------------------------------------------------------


class FakeFirewall:
    """`ovsdriver.firewall.Firewall` in memory: remembers the applied rules.

    It validates like the real one (the same `check_networks`) and answers
    what the real one's chains would do: `isolated`, `masqueraded`,
    `blocked`, `published`, `forwarding`, `localnet`, `docker_isolated`.
    Tests make the next applies fail with `fail_next`, as a failing
    iptables-restore would (nothing changes); `flush` and `docker_appears`
    change the "kernel" from outside, as `check` then notices.
    """

    def __init__(self):
        self.networks = ()  # the last applied state, validated and normalized
        self.forwarding = set()  # families whose IP forwarding was turned on
        self.route_localnet = set()  # interfaces with route_localnet=1
        self.applied = 0  # successful applies
        self.heals = 0
        self.docker = False  # whether dockerd's isolation chains exist
        self._docker_written = False
        self._flushed = False
        self._failures = []

    # -- helpers for tests ---------------------------------------------------

    def fail_next(self, message="iptables-restore failed: simulated failure"):
        """Make the next `apply` fail with FirewallError(*message*)."""
        self._failures.append(message)

    def flush(self):
        """As ``iptables -F`` and ``iptables -t nat -F``: every rule is gone."""
        self._flushed = True

    def docker_appears(self):
        """As dockerd starting with iptables: its isolation chains exist."""
        self.docker = True

    def network(self, network_id):
        """The applied `NetworkRules` of *network_id*, or None."""
        return next((n for n in self.networks if n.network_id == network_id), None)

    @property
    def _live(self):
        return () if self._flushed else self.networks

    @property
    def owned(self):
        """Whether the real firewall would have chains in place."""
        return any(needs(self._live, family) for family in (4, 6))

    def isolated(self):
        """{(family, ifname, "nat" | "routed" | "internal")} of every network."""
        return {
            (family, n.ifname, "internal" if n.internal else "nat" if n.nat else "routed")
            for n in self._live
            for family in (4, 6)
            if n.pools(family)
        }

    def masqueraded(self):
        """{(pool, ifname)} whose traffic leaving the network is masqueraded."""
        return {(pool, n.ifname) for n in self._live if n.nat for pool in n.ipv4 + n.ipv6}

    def blocked(self):
        """{pool} of internal networks: nothing is routed to or from them."""
        return {pool for n in self._live if n.internal for pool in n.ipv4 + n.ipv6}

    def published(self):
        """{(proto, host_ip, host_port, container_ip, container_port)} DNATed."""
        return {
            (p.proto, p.host_ip, p.host_port, p.container_ip, p.container_port)
            for n in self._live
            if not n.internal
            for p in n.published
            if n.pools(family_of(p))
        }

    def localnet(self):
        """{ifname} routing 127.0.0.0/8, with containers kept off the host's loopback."""
        guarded = {n.ifname for n in self._live if n.ipv4 and not n.internal}
        return self.route_localnet & guarded

    def docker_isolated(self):
        """{(family, ifname)} isolated from Docker's bridge networks."""
        if not (self.docker and self._docker_written):
            return set()
        return {
            (family, n.ifname)
            for n in self._live
            if not n.internal
            for family in (4, 6)
            if n.pools(family)
        }

    # -- the port --------------------------------------------------------------

    def apply(self, networks):
        try:
            checked = check_networks(networks)
            if self._failures:
                raise FirewallError(self._failures.pop(0))
        except FirewallError:
            return defer.fail()
        self.networks = tuple(checked)
        self.forwarding |= forwarding_families(checked)
        self.route_localnet |= localnet_interfaces(checked)
        self.applied += 1
        if not self._docker_written or not checked:
            self._docker_written = self.docker
        return defer.succeed(None)

    def check(self):
        """What the real one's check finds, and the rules put back."""
        problems = []
        if self._flushed and any(needs(self.networks, f) for f in (4, 6)):
            problems.append("the rules were flushed")
        if self.docker != self._docker_written and self.networks:
            problems.append("Docker's isolation chains appeared")
        self._flushed = False
        if problems:
            self.heals += 1
            self._docker_written = self.docker
        return defer.succeed(problems)
