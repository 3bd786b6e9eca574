"""Verified fakes for the driver's ports, for tests of the code that uses them.

Each fake here is held to its real implementation by one shared contract test
suite (``tests/contract_*.py``) that runs against both, so a test that passes
with a fake says something true about the real thing. The fakes keep their
state in memory and return Deferreds that have already fired: no reactor, no
threads, no root.
"""

import ipaddress
import itertools
import os
import time

import attr
from twisted.internet import defer

from ovsdriver import hostports
from ovsdriver.firewall import (
    FirewallError,
    check_networks,
    family_of,
    forwarding_families,
    localnet_interfaces,
    needs,
)
from ovsdriver.netlink import (
    LinkError,
    LinkInfo,
    Route,
    check_ifname,
    check_mac,
    parse_addresses,
)
from ovsdriver.sandboxes import INVISIBLE, MISSING, MOUNTED, PLAIN, Observation, Probe, Sighting
from ovsdriver.vswitch import VSwitchError, check_shareable, gateway_port_name, is_kernel_datapath

#: The addresses of ``lo`` once it is up.
LOOPBACK = ("127.0.0.1/8", "::1/128")

# ---------------------------------------------------------------------------
# Answers that come later, like the real ports' do.
# ---------------------------------------------------------------------------


class _Answers:
    """How a fake hands out results: at once, or (given a clock, such as
    ``twisted.internet.task.Clock``) on the clock's next turn, as the real
    ports do. With a clock, the operation itself also happens only then, so
    tests can start concurrent requests and let them interleave."""

    def __init__(self, clock=None):
        self.clock = clock

    def answer(self, operation, *args, **kwargs):
        """Deferred result of ``operation(*args, **kwargs)``; its exceptions fail it."""
        if self.clock is None:
            return defer.maybeDeferred(operation, *args, **kwargs)
        result = defer.Deferred()

        def run():
            defer.maybeDeferred(operation, *args, **kwargs).chainDeferred(result)

        self.clock.callLater(0, run)
        return result

    def defer_methods(self, fake, names):
        """With a clock, make *fake*'s port methods answer on its next turn.
        A method called by another one while that one runs (the fake reading
        itself) answers at once, as a method of the real port would."""
        if self.clock is None:
            return
        running = []
        for name in names:
            method = getattr(fake, name)

            def later(*args, _method=method, **kwargs):
                if running:
                    return _method(*args, **kwargs)

                def run():
                    running.append(True)
                    try:
                        return _method(*args, **kwargs)
                    finally:
                        running.pop()

                return self.answer(run)

            setattr(fake, name, later)


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
    index = attr.ib(default=None)


@attr.s(slots=True)
class _Link:
    index = attr.ib()
    mtu = attr.ib(default=1500)
    mac = attr.ib(default=None)
    up = attr.ib(default=False)
    addresses = attr.ib(factory=set)
    peer = attr.ib(default=None)
    tx_checksum = attr.ib(default=True)
    carrier = attr.ib(default=True)
    pair = attr.ib(default=None)  # the same for both ends of a veth


@attr.s(slots=True)
class _Sandbox:
    """A fake container network namespace: its links (by name) and routes."""

    links = attr.ib(factory=dict)
    routes = attr.ib(factory=set)  # (Route, index of the link it goes through)


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
        index=link.index,
    )


def _route(dst, gateway):
    """A `Route` to *dst* ("default" or a CIDR) via *gateway*."""
    if dst == "default":
        family = ipaddress.ip_address(gateway).version if gateway else 4
    else:
        dst = str(ipaddress.ip_network(dst))
        family = ipaddress.ip_network(dst).version
    return Route(family=family, dst=dst, gateway=gateway)


def _infos(links, routes):
    """`LinkInfo` of each of *links* (name -> `_Link`), with their *routes*
    ([(`Route`, index)])."""
    return tuple(
        LinkInfo(
            name=name,
            mac=link.mac,
            mtu=link.mtu,
            up=link.up,
            carrier=link.carrier,
            addresses=[str(a) for a in link.addresses],
            index=link.index,
            routes=sorted(
                (r for r, index in routes if index == link.index),
                key=lambda r: (r.gateway is not None, r.family, r.dst),
            ),
        )
        for name, link in links.items()
    )


class FakeNetlink:
    """`ovsdriver.netlink.Netlink` in memory: a dict of links.

    Like a fresh network namespace it starts with ``lo``. Tests make links
    appear with `add_link` (as OVS creating a tap would) or `appear_on_wait`,
    and read them back with `state`. Containers' namespaces (sandboxes, by
    path) are made with `add_sandbox`, filled with `add_sandbox_link` and
    `add_sandbox_route` or by `move_to_sandbox` (as the engine moves a link
    at Join), and read back with `sandbox_state` and `sandbox_routes`.
    Given a *clock*, answers come on its next turn (see `_Answers`).
    """

    def __init__(self, clock=None):
        self._answers = _Answers(clock)
        self._indexes = itertools.count(1)
        self._links = {"lo": self._new_link(mtu=65536, mac="00:00:00:00:00:00", up=True)}
        self._links["lo"].addresses.update(parse_addresses("lo", LOOPBACK, "add"))
        self._sandboxes = {}  # path -> _Sandbox
        self._appearing = set()
        self._next_mac = 1
        self.started = False

    def _new_link(self, **fields):
        return _Link(index=next(self._indexes), **fields)

    # -- helpers for tests ---------------------------------------------------

    def add_link(self, name, mtu=1500, mac=None):
        """Make a link exist, down and without addresses (e.g. an OVS tap)."""
        check_ifname(name)
        self._links[name] = self._new_link(mtu=mtu, mac=(mac or self._new_mac()).lower())

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
        if str(path) not in self._sandboxes:
            sandbox = self._sandboxes[str(path)] = _Sandbox()
            sandbox.links["lo"] = self._new_link(mtu=65536, mac="00:00:00:00:00:00", up=True)

    def remove_sandbox(self, path):
        """Make the sandbox at *path* go away with everything in it: as in the
        kernel, a veth inside takes its other end along."""
        gone = self._sandboxes.pop(str(path), None)
        for link in gone.links.values() if gone else ():
            if link.pair is not None:
                self._delete_pair(link.pair)

    def add_sandbox_link(self, sandbox, name, mac, mtu=1500, addresses=(), up=True, carrier=True):
        """Put a link in a sandbox; ``carrier=False`` makes it a dead tap."""
        check_ifname(name)
        link = self._new_link(mtu=mtu, mac=mac.lower(), up=up, carrier=carrier)
        link.addresses.update(parse_addresses(name, addresses, "add"))
        self._sandboxes[str(sandbox)].links[name] = link

    def add_sandbox_route(self, sandbox, dst, gateway, dev):
        """Add a route through *dev* (*dst*: a CIDR or "default")."""
        target = self._sandboxes[str(sandbox)]
        target.routes.add((_route(dst, gateway), target.links[dev].index))

    def move_to_sandbox(self, name, sandbox, new_name=None):
        """Move a link into a sandbox (renamed), as the engine does at Join."""
        link = self._links.pop(name)
        self._sandboxes[str(sandbox)].links[new_name or name] = link

    def move_from_sandbox(self, sandbox, name, new_name):
        """Move a link out of a sandbox (renamed back), as the engine does at Leave."""
        self._links[new_name] = self._sandboxes[str(sandbox)].links.pop(name)

    def sandbox_state(self, sandbox, name):
        """A `FakeLinkState` of link *name* in a sandbox, or None."""
        return _snapshot(name, self._sandboxes[str(sandbox)].links.get(name))

    def sandbox_routes(self, sandbox):
        """The routes of a sandbox, a frozenset of `FakeRoute`."""
        target = self._sandboxes[str(sandbox)]
        names = {link.index: name for name, link in target.links.items()}
        return frozenset(
            FakeRoute(route.dst, route.gateway, names[index]) for route, index in target.routes
        )

    # -- the port --------------------------------------------------------------

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def link_exists(self, ifname):
        return self._answers.answer(lambda: ifname in self._links)

    def link_mac(self, ifname):
        return self._answers.answer(
            lambda: self._links[ifname].mac if ifname in self._links else None
        )

    def links(self):
        return self._answers.answer(
            lambda: {name: link.index for name, link in self._links.items()}
        )

    def wait_for_link(self, ifname, timeout=5.0):
        def wait():
            if ifname in self._appearing:
                self._appearing.discard(ifname)
                self.add_link(ifname)
            if ifname not in self._links:
                raise LinkError(f"interface {ifname} did not appear within {timeout:g} seconds")

        return self._answers.answer(wait)

    def add_addresses(self, ifname, addresses):
        def add():
            parsed = parse_addresses(ifname, addresses, "add")
            link = self._links.get(ifname)
            if link is None:
                raise LinkError(f"cannot add addresses to {ifname}: no such interface")
            added = [str(address) for address in parsed if address not in link.addresses]
            link.addresses.update(parsed)
            link.up = True
            return added

        return self._answers.answer(add)

    def remove_addresses(self, ifname, addresses):
        def remove():
            parsed = parse_addresses(ifname, addresses, "remove")
            link = self._links.get(ifname)
            if link is not None:
                link.addresses.difference_update(parsed)

        return self._answers.answer(remove)

    def set_link(self, ifname, mtu=None, mac=None, up=None):
        def set_():
            if mac is not None:
                check_mac(ifname, mac)
            link = self._links.get(ifname)
            if link is None:
                raise LinkError(f"cannot configure {ifname}: no such interface")
            self._set(ifname, link, mtu=mtu, mac=mac, up=up)

        return self._answers.answer(set_)

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

    def create_veth(self, host_name, peer_name, mtu, peer_mac=None, tx_checksum=False):
        def create():
            what = f"cannot create veth pair {host_name}/{peer_name}"
            check_ifname(host_name)
            check_ifname(peer_name)
            if peer_mac is not None:
                check_mac(peer_name, peer_mac)
            host = self._links.get(host_name)
            peer = self._links.get(peer_name)
            if host is None and peer is None:
                # Check first, as the real one deletes a pair it cannot set up.
                self._set(peer_name, _Link(index=0), mtu=mtu, mac=peer_mac)
                host = self._new_link(mac=self._new_mac(), peer=peer_name)
                peer = self._new_link(mac=self._new_mac(), peer=host_name, pair=host.index)
                host.pair = host.index
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
            peer.tx_checksum = tx_checksum

        return self._answers.answer(create)

    def delete_link(self, ifname):
        def delete():
            link = self._links.pop(ifname, None)
            if link is not None and link.pair is not None:
                self._delete_pair(link.pair)

        return self._answers.answer(delete)

    def _delete_pair(self, pair):
        """A veth's other end goes with it, wherever it is (and however renamed)."""
        for links in [self._links] + [sandbox.links for sandbox in self._sandboxes.values()]:
            for name, link in list(links.items()):
                if link.pair == pair:
                    del links[name]

    # -- inside sandboxes -----------------------------------------------------

    def _sandbox(self, sandbox):
        found = self._sandboxes.get(str(sandbox))
        if found is None:
            raise LinkError(f"cannot enter sandbox {sandbox}: No such file or directory")
        return found

    def _link_in(self, target, sandbox, index, what):
        for name, link in target.links.items():
            if link.index == index:
                return name, link
        raise LinkError(f"{what} in sandbox {sandbox}: No such device")

    def host_links(self):
        return self._answers.answer(lambda: _infos(self._links, ()))

    def sandbox_links(self, sandbox):
        def list_():
            target = self._sandbox(sandbox)
            return _infos(target.links, target.routes)

        return self._answers.answer(list_)

    def move_link_to_netns(self, ifname, sandbox):
        def move():
            target = self._sandbox(sandbox)
            if ifname not in self._links:
                if ifname in target.links:
                    return
                raise LinkError(f"cannot move {ifname} into sandbox {sandbox}: no such interface")
            if ifname in target.links:
                raise LinkError(f"cannot move {ifname} into sandbox {sandbox}: File exists")
            target.links[ifname] = self._links.pop(ifname)

        return self._answers.answer(move)

    def delete_link_in(self, sandbox, index):
        def delete():
            target = self._sandbox(sandbox)
            for name, link in list(target.links.items()):
                if link.index == index:
                    del target.links[name]
                    target.routes = {r for r in target.routes if r[1] != index}

        return self._answers.answer(delete)

    def set_link_in(self, sandbox, index, name=None, mtu=None, mac=None, up=None):
        def set_():
            if name is not None:
                check_ifname(name)
            if mac is not None:
                check_mac(name or f"link {index}", mac)
            target = self._sandbox(sandbox)
            current, link = self._link_in(target, sandbox, index, f"cannot set link {index}")
            if name is not None and name != current and name in target.links:
                raise LinkError(f"cannot set name {name} on link {index}: File exists")
            self._set(name or current, link, mtu=mtu, mac=mac, up=up)
            if name is not None:
                target.links[name] = target.links.pop(current)

        return self._answers.answer(set_)

    def add_address_in(self, sandbox, index, address):
        def add():
            (parsed,) = parse_addresses(f"link {index}", [address], "add")
            target = self._sandbox(sandbox)
            _, link = self._link_in(target, sandbox, index, f"cannot add address {address}")
            link.addresses.add(parsed)

        return self._answers.answer(add)

    def add_route_in(self, sandbox, index, route):
        def add():
            target = self._sandbox(sandbox)
            self._link_in(target, sandbox, index, f"cannot add route {route.dst}")
            target.routes.add((_route(route.dst, route.gateway), index))

        return self._answers.answer(add)


# ---------------------------------------------------------------------------
# FakeMountViews: what the kernel shows of sandboxes (ovsdriver.sandboxes).
# ---------------------------------------------------------------------------


class FakeMountViews:
    """`ovsdriver.sandboxes.MountViews` in memory: mount views holding files.

    The driver's own view is ``"driver"``; tests add others (``add_view``,
    e.g. the engine's), make directories (``add_dir``), plain files
    (``create``), mount namespaces on them (``mount``), unmount and delete
    them, in one view or several, and say which network namespaces live
    processes are in (``hold``, ``release``). Given a *clock*, answers come
    on its next turn.
    """

    OWN = "driver"

    def __init__(self, clock=None):
        self._answers = _Answers(clock)
        self._views = {self.OWN: ({}, set())}  # view -> (path -> Probe, directories)
        self._ages = {self.OWN: 0.0}  # view -> when its oldest process started
        self._clock = clock
        self._held = {}
        self.boot = "fake-boot"
        self.looks = 0  # how many observations were made

    # -- helpers for tests ---------------------------------------------------

    def add_view(self, view, started=None):
        """A view whose oldest process started *started* seconds after boot (now)."""
        self._views.setdefault(view, ({}, set()))
        self._ages.setdefault(view, self._now() if started is None else started)

    def copy_view(self, view, source=OWN):
        """A process makes a mount namespace of its own: a private copy of
        *source* as it is now."""
        files, directories = self._views[source]
        self._views[view] = (dict(files), set(directories))
        self._ages[view] = self._now()

    def remove_view(self, view):
        """The last process with that view ends."""
        self._views.pop(view, None)
        self._ages.pop(view, None)

    def _each(self, views):
        return [self._views[view] for view in (self._views if views is None else views)]

    def add_dir(self, directory, views=None):
        for _, directories in self._each(views):
            directories.add(str(directory))

    def create(self, path, views=None):
        """A plain file at *path* (its directory made too)."""
        self.add_dir(os.path.dirname(str(path)), views)
        for files, _ in self._each(views):
            files.setdefault(str(path), Probe(PLAIN))

    def mount(self, path, netns, views=None):
        self.create(path, views)
        for files, _ in self._each(views):
            files[str(path)] = Probe(MOUNTED, netns)

    def unmount(self, path, views=None):
        for files, _ in self._each(views):
            if str(path) in files:
                files[str(path)] = Probe(PLAIN)

    def delete(self, path, views=None):
        for files, _ in self._each(views):
            files.pop(str(path), None)

    def hold(self, netns, started=None):
        """A process (started *started* seconds after boot, now by default)
        is in the network namespace *netns*."""
        self._held.setdefault(netns, self._now() if started is None else started)

    def release(self, netns):
        self._held.pop(netns, None)

    def _now(self):
        return self._clock.seconds() if self._clock is not None else 0.0

    def _probe(self, view, path):
        files, directories = self._views[view]
        if path in files:
            return files[path]
        return Probe(MISSING if os.path.dirname(path) in directories else INVISIBLE)

    # -- the port --------------------------------------------------------------

    def observe(self, paths, own_only=False):
        def look():
            self.looks += 1
            sightings = {}
            for path in sorted(set(paths)):
                probes = {self.OWN: self._probe(self.OWN, path)}
                if probes[self.OWN].kind != MOUNTED and not own_only:
                    for view in self._views:
                        probes[view] = self._probe(view, path)
                sightings[path] = Sighting(path, probes)  # the fake kernel knows paths
            return Observation(
                self.OWN, sightings, dict(self._ages), self._held, self._now(), self.boot
            )

        return self._answers.answer(look)

    def mounted_in(self, directories):
        files, _ = self._views[self.OWN]
        wanted = set(map(str, directories))
        return self._answers.answer(
            lambda: sorted(
                path
                for path, found in files.items()
                if found.kind == MOUNTED and os.path.dirname(path) in wanted
            )
        )


# ---------------------------------------------------------------------------
# FakeVSwitch: the OVSDB port (ovsdriver.vswitch.VSwitch) in memory.
# ---------------------------------------------------------------------------


@attr.s(slots=True)
class _FakeBridge:
    owned = attr.ib()
    datapath_type = attr.ib(default="netdev")
    networks = attr.ib(factory=dict)  # network id -> Network
    ports = attr.ib(factory=dict)  # port name -> Endpoint or None (other ports)


class FakeVSwitch:
    """`ovsdriver.vswitch.VSwitch` in memory: bridges holding networks and ports.

    Tests can add a bridge the driver does not own (`add_foreign_bridge`), make
    ovs-vswitchd fail to create a port (`break_port`), as a missing veth does
    for real, or hold back every port until `resume_vswitchd`
    (`stall_vswitchd`). Given a `FakeNetlink` as ``kernel``, it makes and
    removes the links of internal ports there, as ovs-vswitchd does.
    """

    #: What the driver calls: with a clock, these answer on its next turn.
    PORT_METHODS = (
        "networks",
        "network",
        "endpoints",
        "network_and_endpoint",
        "endpoint",
        "kernel_datapath",
        "add_network",
        "remove_network",
        "add_endpoint",
        "port_ready",
        "remove_endpoint",
        "mark_removed",
        "finish_removals",
        "set_sandbox",
        "set_sandbox_seen",
        "set_published",
    )

    def __init__(self, kernel=None, clock=None):
        self.bridges = {}
        self.kernel = kernel
        self._broken = set()
        self._removing = set()  # names of ports marked for deletion
        self._stalled = None  # while ovs-vswitchd makes no port: [(endpoint, Deferred)]
        _Answers(clock).defer_methods(self, self.PORT_METHODS)

    def _plug(self, name, mtu=1500):
        if self.kernel is not None and self.kernel.state(name) is None:
            self.kernel.add_link(name, mtu=mtu)

    def _unplug(self, name, endpoint=None):
        if self.kernel is not None and (endpoint is None or endpoint.port_type == "internal"):
            self.kernel.delete_link(name)

    # -- helpers for tests ---------------------------------------------------

    def add_foreign_bridge(self, name, datapath_type="netdev"):
        self.bridges[name] = _FakeBridge(
            owned=False, datapath_type=datapath_type, ports={name: None}
        )

    def break_port(self, name):
        self._broken.add(name)

    def stall_vswitchd(self):
        """ovs-vswitchd makes no port from now on (as while it reconnects)."""
        self._stalled = []

    def resume_vswitchd(self):
        """ovs-vswitchd makes the ports it held back."""
        waiting, self._stalled = self._stalled or [], None
        for bridge in self.bridges.values():
            for name, ep in bridge.ports.items():
                if ep is not None and not ep.made:
                    bridge.ports[name] = attr.evolve(ep, made=True)
                    if ep.port_type == "internal":
                        self._plug(name, ep.mtu)
        for endpoint, d in waiting:
            self.port_ready(endpoint).chainDeferred(d)

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

    def _endpoints(self):
        return [
            ep
            for b in self.bridges.values()
            for name, ep in b.ports.items()
            if ep is not None and name not in self._removing
        ]

    def _endpoint(self, endpoint_id):
        return next((ep for ep in self._endpoints() if ep.endpoint_id == endpoint_id), None)

    def endpoints(self):
        return defer.succeed(self._endpoints())

    def network_and_endpoint(self, network_id, endpoint_id):
        networks = {nid: n for b in self.bridges.values() for nid, n in b.networks.items()}
        return defer.succeed((networks.get(network_id), self._endpoint(endpoint_id)))

    def endpoint(self, endpoint_id):
        return defer.succeed(self._endpoint(endpoint_id))

    def kernel_datapath(self, bridge):
        found = self.bridges.get(bridge)
        return defer.succeed(found is not None and is_kernel_datapath(found.datapath_type))

    def add_network(self, network):
        bridge = self.bridges.get(network.bridge)
        try:  # check everything first: a refused network leaves nothing
            if bridge is None and network.ovn_switch:
                raise VSwitchError(
                    f"the OVN integration bridge {network.bridge} is missing: start "
                    "ovn-controller (or set external_ids:ovn-bridge to the right bridge)"
                )
            if bridge is not None and network.ovn_switch:
                pass  # OVN keeps its switches apart itself
            elif bridge is not None and network.network_id not in bridge.networks:
                check_shareable(network.bridge, list(bridge.networks.values()), network)
            holder = self._holder(network.uplink)
            if network.uplink and holder not in (None, network.bridge):
                raise VSwitchError(f"uplink {network.uplink} is already a port of another bridge")
        except VSwitchError as e:
            return defer.fail(e)
        if bridge is None:
            bridge = _FakeBridge(owned=True, datapath_type=network.datapath_type)
            self.bridges[network.bridge] = bridge
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
        removed = []
        for name, bridge in list(self.bridges.items()):
            network = bridge.networks.pop(network_id, None)
            if network is None:
                continue
            if gateway_port_name(network_id) in bridge.ports:
                del bridge.ports[gateway_port_name(network_id)]
                self._unplug(gateway_port_name(network_id))
            if bridge.owned and not bridge.networks:
                for port, ep in bridge.ports.items():
                    if port != network.uplink:  # the interface itself stays
                        self._unplug(port, ep)
                    if ep is not None:
                        self._removing.discard(port)
                        removed.append((port, ep.port_type == "veth"))
                del self.bridges[name]
            elif network.uplink and all(
                n.uplink != network.uplink for n in bridge.networks.values()
            ):
                bridge.ports.pop(network.uplink, None)
        return defer.succeed(removed)

    def add_endpoint(self, endpoint):
        if endpoint.port in self._removing:
            self.finish_removals([endpoint.port])
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
        made = self._stalled is None and endpoint.port not in self._broken
        endpoint = attr.evolve(endpoint, made=made)
        bridge.ports[endpoint.port] = endpoint
        if endpoint.port_type == "internal" and endpoint.made:
            self._plug(endpoint.port, endpoint.mtu)
        return defer.succeed(endpoint)

    def port_ready(self, endpoint):
        if self._stalled is not None:
            d = defer.Deferred()
            self._stalled.append((endpoint, d))
            return d
        if not self.port_exists(endpoint.port):
            error = f"port {endpoint.port} vanished from OVSDB while being added"
        elif endpoint.port in self._broken:
            error = f"Open vSwitch could not add port {endpoint.port}"
        else:
            return defer.succeed(endpoint)
        return defer.fail(VSwitchError(error))

    def remove_endpoint(self, endpoint_id):
        for bridge in self.bridges.values():
            for name, ep in list(bridge.ports.items()):
                if ep is not None and ep.endpoint_id == endpoint_id:
                    del bridge.ports[name]
                    self._unplug(name, ep)
        return defer.succeed(None)

    def mark_removed(self, endpoint_id):
        for bridge in self.bridges.values():
            for name, ep in bridge.ports.items():
                if ep is not None and ep.endpoint_id == endpoint_id:
                    self._removing.add(name)
                    return defer.succeed(ep)
        return defer.succeed(None)

    def finish_removals(self, ports=None):
        removed = []
        for bridge in self.bridges.values():
            for name, ep in list(bridge.ports.items()):
                if name in self._removing and (ports is None or name in ports):
                    del bridge.ports[name]
                    self._removing.discard(name)
                    self._unplug(name, ep)
                    removed.append((name, ep is not None and ep.port_type == "veth"))
        return defer.succeed(removed)

    def forget_port_macs(self):
        return defer.succeed(0)  # the fake keeps no Interface mac

    def set_sandbox(self, endpoint_id, sandbox):
        return self._evolve(endpoint_id, sandbox=sandbox)

    def set_sandbox_seen(self, endpoint_id, sandbox, seen):
        found = self._endpoint(endpoint_id)
        if found is None or found.sandbox != sandbox:
            return defer.succeed(None)
        return self._evolve(endpoint_id, sandbox_seen=seen)

    def set_published(self, endpoint_id, published):
        return self._evolve(endpoint_id, published=tuple(published or ()))

    def _evolve(self, endpoint_id, **changes):
        for bridge in self.bridges.values():
            for name, ep in bridge.ports.items():
                if ep is not None and ep.endpoint_id == endpoint_id and name not in self._removing:
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

    def __init__(self, clock=None):
        self.networks = ()  # the last applied state, validated and normalized
        self.forwarding = set()  # families whose IP forwarding was turned on
        self.route_localnet = set()  # interfaces with route_localnet=1
        self.applied = 0  # successful applies
        self.heals = 0
        self.docker = False  # whether dockerd's isolation chains exist
        self._docker_written = False
        self._flushed = False
        self._failures = []
        # With a clock, `apply` answers on its next turn, as iptables does.
        _Answers(clock).defer_methods(self, ("apply", "check"))

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


# ---------------------------------------------------------------------------
# FakeHostPorts: the host's port table (ovsdriver.hostports.HostPorts) in memory.
# ---------------------------------------------------------------------------


class FakeHostPorts:
    """`ovsdriver.hostports.HostPorts` over an imagined host: `program_binds`
    and `program_exits` play a program binding a port and exiting; every
    address is the host's but those in `foreign`."""

    #: the files the imagined driver has open besides the held ports
    OTHER_FILES = 20

    def __init__(self, foreign=("198.51.100.1",), open_files_limit=1 << 20):
        self.foreign = set(foreign)
        self.open_files_limit = open_files_limit
        self._held = set()  # keys
        self._programs = set()  # keys

    def room(self, ports):
        new = {hostports.key(port) for port in ports} - self._held
        used = self.OTHER_FILES + len(self._held)
        if new and used + len(new) + hostports.SPARE_FILES > self.open_files_limit:
            raise hostports.no_room(len(new), used, self.open_files_limit)

    @staticmethod
    def _clash(a, b):
        """Whether binds on keys *a* and *b* exclude each other (as the
        kernel's: one port, one family, the same or a wildcard address)."""
        (family, proto, address, port), (family2, proto2, address2, port2) = a, b
        wildcard = {"0.0.0.0", "::"}
        return (family, proto, port) == (family2, proto2, port2) and (
            address == address2 or {address, address2} & wildcard
        )

    def _bindable(self, k):
        return not any(self._clash(k, other) for other in self._held | self._programs)

    def program_binds(self, port):
        """A program binds *port*'s address and port; whether it could."""
        k = hostports.key(port)
        if not self._bindable(k):
            return False
        self._programs.add(k)
        return True

    def program_exits(self, port):
        """The program that bound *port* exits."""
        self._programs.discard(hostports.key(port))

    def check(self, port):
        k = hostports.key(port)
        if k in self._held:
            return None
        if port.host_ip in self.foreign:
            raise hostports.not_local(port)
        return None if self._bindable(k) else hostports.in_use(port)

    def hold(self, ports):
        wanted = {hostports.key(port): port for port in ports}
        self._held &= set(wanted)
        failed = {}
        for k, port in wanted.items():
            if k in self._held:
                continue
            if port.host_ip in self.foreign:
                failed[port] = hostports.address_gone(port)
            elif self._bindable(k):
                self._held.add(k)
            else:
                failed[port] = hostports.in_use(port)
        return failed

    def holds(self, port):
        return hostports.key(port) in self._held
