"""libnetwork semantics: networks, endpoints, join and leave.

The driver owns no state of its own: everything is in OVSDB (through the
`VSwitch` port) and the kernel (through the `Netlink` port), so it can be killed
and restarted at any time. (It only remembers, for Join, the ports
CreateEndpoint is still making; a restarted driver asks OVSDB instead.) Every
method is idempotent, and whatever an operation made is undone again when a
later step of it fails.
"""

import contextlib
import ipaddress
import os

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ovsdriver.deferreds import follow
from ovsdriver.firewall import FirewallError, check_published
from ovsdriver.metrics import NO_METRICS
from ovsdriver.options import (
    GENERIC,
    KERNEL_MODULE,
    check_address,
    check_id,
    ovn_request,
    parse_network,
    parse_portmap,
)
from ovsdriver.ovn import ADDRESS_SPACE, disabled
from ovsdriver.ports import PortTaken, PortUnavailable, publish
from ovsdriver.values import Endpoint, Network, NetworkRules, check_mac
from ovsdriver.vswitch import (
    IPV4,
    IPV6,
    UnreadableRecord,
    gateway_ifname,
    host_clash,
    leftover_remedy,
    port_name,
    routed,
    veth_host_name,
)

log = Logger()

#: A network whose record cannot be read: what is known of it is its id.
UNKNOWN = Network(network_id="", bridge="")
#: Ports CreateEndpoint could not make, kept for Join or DeleteEndpoint to
#: report; beyond this many (an engine that never sent them) the oldest go.
MAX_FAILED_PLUGS = 256
#: The address space of Docker's default IPAM, in CreateNetwork's IPv4Data.
DEFAULT_ADDRESS_SPACE = "LocalDefault"


class DriverError(Exception):
    """An operation cannot be done; the message tells the user why."""


def endpoint_mac(ipv4, random_bytes=os.urandom):
    """The MAC of an endpoint the engine gives none: 02:42 and its IPv4
    address, as Docker's bridge driver does, so that a container restarted
    with its address keeps its MAC and its peers' ARP caches stay right (with
    a new MAC they send to the old one for about 30 s). Without an IPv4
    address: random, unicast and locally administered."""
    if ipv4:
        octets = b"\x02\x42" + ipaddress.IPv4Interface(ipv4).ip.packed
    else:
        octets = bytearray(random_bytes(6))
        octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _publishable(endpoint, port):
    """Whether the firewall takes *port* (recorded in OVSDB, where a hand
    edit can make it anything): one bad record must not stop every update."""
    try:
        check_published(endpoint.network_id, port)
    except FirewallError as e:
        log.warn(
            "not publishing {port} of endpoint {endpoint}: {e} (fix or remove "
            "external_ids:ovsdriver-portmap of Interface {ifname})",
            port=port,
            endpoint=endpoint.endpoint_id[:12],
            e=e,
            ifname=endpoint.port,
        )
        return False
    return True


def _unknown_network(network_id):
    return DriverError(
        f"network {network_id[:12]} is not known to the ovs driver: its record is on its "
        "bridge in Open vSwitch, which may have been deleted (ovs-vsctl del-br, a new "
        "conf.db); remove the network and create it again"
    )


def _unknown_endpoint(endpoint_id):
    return DriverError(f"endpoint {endpoint_id[:12]} is not known to the ovs driver")


@attr.s(frozen=True)
class _Making:
    """A port CreateEndpoint is making: `queued` fires once its OVSDB
    transaction is queued (or its making failed), `done` when it is made
    (with None) or could not be (with `_Failed`)."""

    queued = attr.ib()
    done = attr.ib()


@attr.s(frozen=True)
class _Failed:
    """A failure kept as a value until Join or DeleteEndpoint picks it up
    (a failed Deferred nobody waits for would be logged as unhandled)."""

    failure = attr.ib()


class Driver:
    """The network driver, over a vswitch and a netlink port."""

    metrics = NO_METRICS
    kernel_module = KERNEL_MODULE

    def __init__(
        self, vswitch, netlink, firewall, datapath_type="netdev", ovn=None, host_ports=None
    ):
        self.vswitch = vswitch
        self.netlink = netlink
        self.firewall = firewall
        #: `ovsdriver.hostports.HostPorts`, or None to hold no host port
        self.host_ports = host_ports
        self._unheld = {}  # published ports last found unholdable -> why
        self.datapath_type = datapath_type
        self.ovn = ovn  # ovsdriver.ovn.OVN when --ovn-nb is given
        self._firewall_lock = defer.DeferredLock()
        self._publish_lock = defer.DeferredLock()
        #: Called with each endpoint Join answered (the reconciler watches
        #: for its sandbox from then on).
        self.on_join = lambda endpoint: None
        #: Called (returning a Deferred) before refusing a host port that
        #: another endpoint holds: that one may be an orphan the reconciler
        #: has not collected yet.
        self.recheck = lambda: defer.succeed(None)
        #: endpoint id -> `_Making`: the port CreateEndpoint is making, which
        #: any request about the endpoint waits for
        self._plugging = {}
        #: endpoint id -> `_Failed`: a port CreateEndpoint could not make
        self._failed = {}

    async def _network_and_endpoint(self, network_id, endpoint_id):
        """The network (which must exist) and the endpoint (or None), in one read."""
        check_id("NetworkID", network_id)
        await self._plug_done(check_id("EndpointID", endpoint_id))
        network, endpoint = await self.vswitch.network_and_endpoint(network_id, endpoint_id)
        if network is None:
            raise _unknown_network(network_id)
        return network, endpoint

    # -- networks --------------------------------------------------------------

    async def create_network(self, network_id, options, ipv4_data, ipv6_data):
        network = parse_network(network_id, options, ipv4_data, ipv6_data, self.datapath_type)
        ovn, switch, mtu_given = ovn_request(options, ipv4_data, ADDRESS_SPACE)
        existing = await self.vswitch.network(network_id)
        if existing is not None:
            return
        if ovn:
            if self.ovn is None:
                raise disabled()
            network = await self.ovn.prepare_network(network, switch, mtu_given)
        else:
            self._refuse_missing_datapath(network, options)
        await self._refuse_overlaps(network)
        try:
            await self.vswitch.add_network(network)
            if network.ovn_switch:
                await self.ovn.network_created(network)
            if network.gateways:
                ifname = gateway_ifname(network)
                await self.netlink.wait_for_link(ifname)
                await self.netlink.add_addresses(ifname, list(network.gateways))
            await self.sync_firewall()
        except Exception:
            await self._undo(self.delete_network(network_id))
            raise

    def _refuse_missing_datapath(self, network, options):
        """Without its kernel module ovs-vswitchd cannot make a ``system``
        bridge, and would only say so in its log."""
        if network.datapath_type != "system" or os.path.isdir(self.kernel_module):
            return
        generic = (options or {}).get(GENERIC) or {}
        asked = (
            "ovs.datapath_type=system"
            if "ovs.datapath_type" in generic
            else "the driver's --datapath-type system"
        )
        raise DriverError(
            f"{asked} needs Open vSwitch's kernel module, which is not loaded on this "
            "host: load it (modprobe openvswitch) or use -o ovs.datapath_type=netdev"
        )

    async def _refuse_overlaps(self, network):
        """Two networks routing overlapping subnets through the host would
        share its routes, and the newer one would not work. The older one may
        be left over (`_left_over`): then it goes. Nor may it overlap the
        host's own interfaces (`host_clash`)."""
        mine = routed(network)
        if not mine:
            return
        networks = (await self.vswitch.networks()).values()
        for other in networks:
            theirs = routed(other) if other.network_id != network.network_id else []
            pairs = ((a, b) for a in mine for b in theirs if a.version == b.version)
            a, b = next(((a, b) for a, b in pairs if a.overlaps(b)), (None, None))
            if a is None:
                continue
            if await self._left_over(network, other):
                log.info(
                    "removing network {other} (bridge {bridge}, subnet {b}), left over in "
                    "Open vSwitch: the engine has no such network any more, as its IPAM "
                    "gave the overlapping subnet {a} to network {network}",
                    other=other.network_id[:12],
                    bridge=other.bridge,
                    a=a,
                    b=b,
                    network=network.network_id[:12],
                )
                await self.delete_network(other.network_id)
                continue
            raise DriverError(
                f"subnet {a} overlaps subnet {b} of network {other.network_id[:12]} "
                f"(bridge {other.bridge}), and the host would be the gateway of both; "
                "if the engine no longer has that network ('ovsdriver status' says "
                f"so), remove what is left of it: {leftover_remedy(other)}"
            )
        clash = host_clash(mine, await self.netlink.host_links(), (network, *networks))
        if clash:
            raise DriverError(
                f"{clash}: the host would route it to one of them only; choose a subnet "
                "the host does not use"
            )

    async def delete_network(self, network_id):
        try:
            network = await self.vswitch.network(check_id("NetworkID", network_id))
        except UnreadableRecord as e:
            # Its gateway addresses go with its bridge or gateway port.
            log.warn("removing network {id} anyway: {e}", id=network_id[:12], e=e)
            network = attr.evolve(UNKNOWN, network_id=network_id)
        if network is None:
            return
        if network.gateways:
            # The bridge or gateway port may outlive this network (shared or
            # not ours): take the addresses off explicitly.
            await self.netlink.remove_addresses(gateway_ifname(network), list(network.gateways))
        removed = await self.vswitch.remove_network(network_id)
        await self.sync_firewall()
        # The engine may delete the network right after its last endpoint,
        # whose port (and veth host end) then went with the bridge.
        await self._delete_veths(removed)

    async def _left_over(self, network, other):
        """Whether *other*, whose subnet overlaps *network*'s, is left over:
        removed while the driver was down, or made by a CreateNetwork whose
        answer a crash lost. Docker's default IPAM never gives two of the
        engine's networks overlapping pools (its restarts included), so when
        it gave both theirs, the engine no longer has *other*. One with
        endpoints stays all the same: their ports may be in containers."""
        if not network.address_space == other.address_space == DEFAULT_ADDRESS_SPACE:
            return False
        endpoints = await self.vswitch.endpoints()
        return all(endpoint.network_id != other.network_id for endpoint in endpoints)

    # -- endpoints -------------------------------------------------------------

    async def create_endpoint(self, network_id, endpoint_id, interface):
        await self._plugged(check_id("EndpointID", endpoint_id))  # a repeated call
        network, existing = await self._network_and_endpoint(network_id, endpoint_id)
        ipv4 = check_address("Interface.Address", interface.get("Address"), 4)
        given_mac = interface.get("MacAddress") or ""
        mac = check_mac("Interface.MacAddress", given_mac) if given_mac else endpoint_mac(ipv4)
        name = port_name(endpoint_id)
        endpoint = Endpoint(
            endpoint_id=endpoint_id,
            network_id=network_id,
            bridge=network.bridge,
            port=name if network.port_type == "internal" else veth_host_name(endpoint_id),
            ifname=name,
            mac=mac,
            mtu=network.mtu,
            vlan=network.vlan,
            protected=not network.icc,
            port_type=network.port_type,
            ipv4=ipv4,
            ipv6=check_address("Interface.AddressIPv6", interface.get("AddressIPv6"), 6),
        )
        if existing is not None:  # a repeated CreateEndpoint: same answer
            endpoint = existing
        elif network.ovn_switch:  # OVN may change the MAC address it answers
            endpoint = await self._plug(network, endpoint)
        else:
            # The engine sends Join a few milliseconds later, and only then
            # needs the port: it is added (a veth pair, OVSDB) meanwhile, and
            # Join, which waits for ovs-vswitchd, reports whatever failed.
            queued = defer.Deferred()
            done = defer.ensureDeferred(self._plug(network, endpoint, queued))
            self._plugging[endpoint_id] = _Making(queued, done)
            done.addBoth(self._plug_ended, endpoint_id)
        return {} if given_mac else {"MacAddress": endpoint.mac}

    async def _plug(self, network, endpoint, queued=None):
        """Make the endpoint's port; undo what was made if a step fails. Fire
        *queued* once the port's transaction is queued."""
        try:
            if network.ovn_switch:
                endpoint = await self._ovn().bind_endpoint(network, endpoint)
            if endpoint.port_type == "veth":
                # The userspace datapath needs the container's end to checksum
                # what it sends; on the kernel's, offloads (and TSO) stay on.
                # The engine gives it its MAC as it moves it in (as for an
                # internal port): until then it has another one, so that the
                # reconciler can tell a container's end the engine moved back.
                kernel = await self.vswitch.kernel_datapath(network.bridge)
                await self.netlink.create_veth(
                    endpoint.port, endpoint.ifname, endpoint.mtu, None, kernel
                )
            added = self.vswitch.add_endpoint(endpoint)
            if queued is not None:
                queued.callback(None)
            await added
        except Exception:
            if queued is not None and not queued.called:
                queued.callback(None)
            await self._undo(self._remove_endpoint(endpoint.endpoint_id))
            raise
        return endpoint

    def _plug_ended(self, outcome, endpoint_id):
        """A made port is in OVSDB, where Join finds it: forget it. A failure
        is kept until Join or DeleteEndpoint reports it."""
        self._plugging.pop(endpoint_id, None)
        if not isinstance(outcome, Failure):
            return None
        self._failed[endpoint_id] = failed = _Failed(outcome)
        while len(self._failed) > MAX_FAILED_PLUGS:
            del self._failed[next(iter(self._failed))]
        return failed

    def _plug_done(self, endpoint_id):
        """Deferred: None once the port CreateEndpoint is making for the
        endpoint (if it is) is made, or `_Failed`. Any request about the
        endpoint waits for it."""
        making = self._plugging.get(endpoint_id)
        if making is None:
            return defer.succeed(self._failed.get(endpoint_id))
        return follow(making.done)

    def _port_queued(self, endpoint_id):
        """Deferred: fires once the port CreateEndpoint is making (if it is)
        has its OVSDB transaction queued, or its making failed."""
        making = self._plugging.get(endpoint_id)
        return defer.succeed(None) if making is None else follow(making.queued)

    async def _plugged(self, endpoint_id):
        """Wait for the port CreateEndpoint is making, if it is, and raise (once)
        what failed."""
        outcome = await self._plug_done(endpoint_id)
        if isinstance(outcome, _Failed):
            self._failed.pop(endpoint_id, None)
            outcome.failure.raiseException()

    async def delete_endpoint(self, network_id, endpoint_id):
        """Mark the endpoint's port for deletion (one OVSDB transaction, which
        ovs-vswitchd ignores) and return; the port and a veth's host end go in
        the background, once no addition waits for ovs-vswitchd. A driver killed
        in between finishes the deletion when it is back (the reconciler)."""
        check_id("EndpointID", endpoint_id)
        with contextlib.suppress(Exception):  # undone already
            await self._plugged(endpoint_id)
        await self._remove_endpoint(endpoint_id)  # whatever an undo could not

    async def _remove_endpoint(self, endpoint_id):
        endpoint = await self.vswitch.mark_removed(endpoint_id)
        if endpoint is not None and endpoint.iface_id and self.ovn is not None:
            await self.ovn.unbind_endpoint(endpoint)
        if endpoint is None:
            # A veth host end a half-done CreateEndpoint left.
            await self.netlink.delete_link(veth_host_name(endpoint_id))
            return
        d = self.vswitch.finish_removals([endpoint.port])
        d.addCallback(self._delete_veths)
        d.addErrback(
            lambda f: log.warn(
                "cannot delete the port of endpoint {endpoint} yet (the reconciler retries): "
                "{error}",
                endpoint=endpoint_id[:12],
                error=f.getErrorMessage(),
            )
        )

    def _delete_veths(self, removed):
        """Delete the host ends of the veth ports just removed from OVS; one
        that cannot be is the reconciler's (a veth no endpoint owns)."""

        def left(failure, name):
            log.warn("cannot delete veth {name} yet: {e}", name=name, e=failure.getErrorMessage())

        hosts = [name for name, veth in removed if veth]
        return defer.gatherResults([self.netlink.delete_link(h).addErrback(left, h) for h in hosts])

    async def _endpoint(self, network_id, endpoint_id):
        await self._plug_done(check_id("EndpointID", endpoint_id))
        endpoint = await self.vswitch.endpoint(endpoint_id)
        if endpoint is None:
            raise _unknown_endpoint(endpoint_id)
        return endpoint

    async def endpoint_info(self, network_id, endpoint_id):
        endpoint = await self._endpoint(network_id, endpoint_id)
        info = {
            "bridge": endpoint.bridge,
            "port": endpoint.port,
            "interface": endpoint.ifname,
            "port_type": endpoint.port_type,
            "mac": endpoint.mac,
            "mtu": endpoint.mtu,
        }
        if endpoint.vlan is not None:
            info["vlan"] = endpoint.vlan
        if endpoint.iface_id:
            info["ovn_logical_port"] = endpoint.iface_id
        return info

    async def join(self, network_id, endpoint_id, sandbox_key):
        # The engine moves the port into the sandbox as soon as Join answers.
        # The sandbox is recorded in the port's own transaction if that is not
        # sent yet (a veth pair takes a few ms), else right after it. Join does
        # not wait for that commit: a record lost to a crash or an outage is
        # found again by the reconciler, from the port inside the sandbox.
        await self._port_queued(check_id("EndpointID", endpoint_id))
        recorded = self.vswitch.set_sandbox(endpoint_id, sandbox_key)
        recorded.addErrback(self._record_failed, endpoint_id, sandbox_key)
        await self._plugged(endpoint_id)
        network, endpoint = await self._network_and_endpoint(network_id, endpoint_id)
        if endpoint is None:
            raise _unknown_endpoint(endpoint_id)
        self.on_join(attr.evolve(endpoint, sandbox=sandbox_key))
        # The port's transaction is committed; ovs-vswitchd may still be making
        # it (it did so while the sandbox was recorded).
        await self.vswitch.port_ready(endpoint)
        if network.ovn_switch:
            # The container's first packet must find its port installed.
            await self._ovn().wait_installed(endpoint)
        gateway4 = next((s.gateway_ip for s in network.ipv4 if s.gateway), None)
        gateway6 = next((s.gateway_ip for s in network.ipv6 if s.gateway), None)
        response = {
            "InterfaceName": {"SrcName": endpoint.ifname, "DstPrefix": "eth"},
            # Never a docker_gwbridge leg: the host is the gateway (or, on an
            # internal network, there is none).
            "DisableGatewayService": True,
        }
        if not network.internal:
            if gateway4:
                response["Gateway"] = gateway4
            if gateway6:
                response["GatewayIPv6"] = gateway6
        return response

    def _record_failed(self, failure, endpoint_id, sandbox_key):
        log.warn(
            "cannot record sandbox {sandbox} of endpoint {endpoint} (the reconciler "
            "finds it again once the container runs): {error}",
            sandbox=sandbox_key,
            endpoint=endpoint_id[:12],
            error=failure.getErrorMessage(),
        )

    async def leave(self, network_id, endpoint_id):
        await self._plug_done(check_id("EndpointID", endpoint_id))
        await self.vswitch.set_sandbox(endpoint_id, None)

    async def program_external_connectivity(self, network_id, endpoint_id, options):
        network, endpoint = await self._network_and_endpoint(network_id, endpoint_id)
        if endpoint is None:
            raise _unknown_endpoint(endpoint_id)
        if network.internal:
            return
        requests = [
            attr.evolve(r, host_ip=network.host_binding) if r.host_ip is None else r
            for r in parse_portmap(options)
        ]
        if not requests and not endpoint.published:
            return  # nothing to publish: no OVSDB write, no firewall work
        for key in (IPV4, IPV6):
            if key in endpoint.unreadable:
                raise DriverError(
                    f"cannot publish ports of endpoint {endpoint_id[:12]}: its address in "
                    f"OVSDB (Interface {endpoint.port} external_ids:{key}) cannot be read: "
                    f"{endpoint.unreadable[key]}"
                )
        # Check and record under one lock: two endpoints asking for one host
        # port at the same moment must not both get it.
        published = await self._publish_lock.run(
            lambda: defer.ensureDeferred(self._record_published(endpoint, requests))
        )
        try:
            await self.sync_firewall()
            # A program may have taken a port between the check and the hold.
            for port in published:
                if port in self._unheld:
                    raise PortUnavailable(f"cannot publish: {self._unheld[port]}")
        except Exception:
            await self._undo(self.revoke_external_connectivity(network_id, endpoint_id))
            raise

    async def _record_published(self, endpoint, requests):
        try:
            published = await self._choose_ports(endpoint, requests)
        except PortTaken:
            # After a crash (a reboot...) the engine starts its containers
            # again before the reconciler has collected their old endpoints,
            # which still hold the same host ports.
            await self.recheck()
            published = await self._choose_ports(endpoint, requests)
        for port in published:
            log.info(
                "endpoint {endpoint} publishes {proto} port {port} on host port {host_port}",
                endpoint=endpoint.endpoint_id[:12],
                proto=port.proto,
                port=port.container_port,
                host_port=port.host_port,
            )
        if published != endpoint.published:
            await self.vswitch.set_published(endpoint.endpoint_id, published)
        return published

    async def _choose_ports(self, endpoint, requests):
        """The `PublishedPort` values *endpoint* gets for *requests*."""
        taken = [
            (other.endpoint_id, port)
            for other in await self.vswitch.endpoints()
            if other.endpoint_id != endpoint.endpoint_id
            for port in other.published
        ]
        address = {
            v: ip.split("/")[0] if ip else None
            for v, ip in ((4, endpoint.ipv4), (6, endpoint.ipv6))
        }
        if self.host_ports is None:
            return publish(requests, address[4], address[6], taken)
        published = publish(requests, address[4], address[6], taken, self.host_ports.check)
        self.host_ports.room(published)
        return published

    async def revoke_external_connectivity(self, network_id, endpoint_id):
        await self._plug_done(check_id("EndpointID", endpoint_id))
        endpoint = await self.vswitch.endpoint(endpoint_id)
        if endpoint is not None and endpoint.published:
            await self.vswitch.set_published(endpoint_id, [])
            await self.sync_firewall()

    async def sync_firewall(self):
        """Make the firewall match the networks and published ports in OVSDB."""
        await self._firewall_lock.acquire()
        try:
            networks = await self.vswitch.networks()
            endpoints = await self.vswitch.endpoints()
            rules = [
                NetworkRules(
                    network_id=network.network_id,
                    ifname=gateway_ifname(network),
                    ipv4=[s.pool for s in network.ipv4],
                    ipv6=[s.pool for s in network.ipv6],
                    nat=network.nat,
                    internal=network.internal,
                    published=[
                        p
                        for ep in endpoints
                        if ep.network_id == network.network_id
                        for p in ep.published
                        if _publishable(ep, p)
                    ],
                )
                for network in sorted(networks.values(), key=lambda n: n.network_id)
            ]
            if self.host_ports is not None:
                # Held before the DNAT rules exist: they would take the
                # packets of a program that uses the port.
                self._hold([p for network in rules for p in network.published])
            await self.firewall.apply(rules)
        finally:
            self._firewall_lock.release()

    def _hold(self, published):
        unheld = self.host_ports.hold(published)
        self.metrics.published_unheld(len(unheld))
        for port, why in unheld.items():
            if self._unheld.get(port) != why:
                log.warn("a published port is not held: {why}", why=why)
        self._unheld = unheld

    def _ovn(self):
        if self.ovn is None:
            raise disabled()
        return self.ovn

    async def _undo(self, d):
        """Run a clean-up step of a failed operation, keeping the first error."""
        try:
            await d
        except Exception as e:
            log.warn("cleaning up after a failed operation also failed: {e}", e=e)
