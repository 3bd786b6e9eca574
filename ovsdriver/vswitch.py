"""Bridges and ports as idempotent OVSDB transaction builders.

Every builder looks its rows up by name before it writes, so it can run again
after a TRY_AGAIN (which may hide a commit that went through) and give the same
result. Reads hand out immutable snapshots (`Network`, `Endpoint`), never live
IDL rows. Everything the driver knows is in external_ids, so a restarted driver
finds it all again.
"""

import functools
import ipaddress
import time

import attr
from twisted.logger import Logger

from ovsdriver.northbound import gateway_mac as ovn_gateway_mac
from ovsdriver.northbound import gateway_port_name as ovn_gateway_port
from ovsdriver.ovsdb import by_name, column
from ovsdriver.values import Endpoint, InvalidValue, Network, PublishedPort, check_mac

log = Logger()

OWNER = "owner"
OWNER_VALUE = "ovsdriver"
NETWORK_ID = "docker-network-id"
ENDPOINT_ID = "docker-endpoint-id"
NETWORK_RECORD = "ovsdriver-network-"  # + network id, on the bridge
SANDBOX = "ovsdriver-sandbox"
SANDBOX_SEEN = "ovsdriver-sandbox-seen"  # where the reconciler saw the sandbox mounted
IPV4 = "ovsdriver-ipv4"
IPV6 = "ovsdriver-ipv6"
PEER = "ovsdriver-peer"  # the container end of a veth port
CREATED = "ovsdriver-created"  # when CreateEndpoint made it (seconds since the epoch)
PORTMAP = "ovsdriver-portmap"  # published ports (JSON) while connectivity is programmed
UPLINK = "ovsdriver-uplink"  # on an uplink port the driver added
#: On the Port of an endpoint that DeleteEndpoint removed and whose port is not
#: yet deleted (when it was marked, seconds since the epoch). ovs-vswitchd does
#: not replicate Port external_ids, so marking costs it nothing.
REMOVING = "ovsdriver-removing"


class VSwitchError(Exception):
    """Open vSwitch refused or failed an operation; the message says which."""


class UnreadableRecord(VSwitchError):
    """A network's record in OVSDB cannot be read (edited by hand?)."""


def port_name(endpoint_id):
    """The OVS port of an endpoint: 'oep-' + 11 hex digits (IFNAMSIZ)."""
    return "oep-" + endpoint_id[:11]


def veth_host_name(endpoint_id):
    """The host end of a veth endpoint: 'ove-' + 11 hex digits."""
    return "ove-" + endpoint_id[:11]


def is_kernel_datapath(datapath_type):
    """Whether a bridge's ``datapath_type`` is the kernel's (``system``, or
    OVS's default: empty)."""
    return datapath_type in ("", "system")


def gateway_port_name(network_id):
    """The host's gateway port of a network on a shared bridge."""
    return "ogw-" + network_id[:11]


def gateway_ifname(network):
    """Where a network's gateway addresses live on the host."""
    return gateway_port_name(network.network_id) if network.shared_bridge else network.bridge


def leftover_remedy(network):
    """The ``ovs-vsctl`` command that removes what is left of *network*."""
    if not network.shared_bridge:
        return f"ovs-vsctl del-br {network.bridge}"
    return (
        f"ovs-vsctl del-port {gateway_port_name(network.network_id)} -- remove Bridge "
        f"{network.bridge} external_ids {NETWORK_RECORD}{network.network_id}"
    )


def routed(network):
    """The subnets the host routes to *network* (it is their gateway)."""
    if not network.gateways:
        return []
    return [ipaddress.ip_network(s.pool) for s in network.ipv4 + network.ipv6 if s.gateway]


def host_clash(subnets, links, networks):
    """Which of *subnets* cannot be routed to a network beside the host's
    *links* (`LinkInfo`; the gateway interfaces of *networks* aside), said
    in words, or None. One that holds the subnet or the address of a host
    interface (its LAN, docker0) would give the host two routes, and the one
    made first would take all the traffic: the network's, or the LAN's (ssh
    to the host included). Docker's bridge driver lets that happen; its
    default IPAM only avoids it when it picks the subnet. A subnet inside a
    broader one of the host's, without its address, gets the more specific
    route: that can be meant."""
    ours = {gateway_ifname(network) for network in networks}
    for link in (link for link in links if link.name not in ours):
        for address in map(ipaddress.ip_interface, link.addresses):
            for subnet in subnets:
                if address.is_link_local or subnet.version != address.version:
                    continue
                if address.ip in subnet or address.network.subnet_of(subnet):
                    return (
                        f"subnet {subnet} overlaps {address.network}, the subnet of the "
                        f"host's interface {link.name} (address {address})"
                    )
    return None


def _one(column):
    """An optional OVSDB column (a list of zero or one value) as a value."""
    return column[0] if column else None


def _ids(row):
    return column(row, "external_ids")


def _endpoint_from_rows(bridge_name, port, iface):
    ids = _ids(iface)
    endpoint_id = ids[ENDPOINT_ID]
    unreadable = {}

    def read(key, parse, default=None):
        if key not in ids:
            return default
        try:
            return parse(ids[key])
        except (InvalidValue, ValueError) as e:
            unreadable[key] = str(e)
            _warn_unreadable(f"Interface {iface.name}", key, ids[key], e)
            return default

    return Endpoint(
        endpoint_id=endpoint_id,
        network_id=ids.get(NETWORK_ID),
        bridge=bridge_name,
        port=column(port, "name"),
        ifname=ids[PEER] if PEER in ids else column(iface, "name"),
        mac=read("attached-mac", lambda v: check_mac("attached-mac", v)),
        mtu=_one(column(iface, "mtu_request")) or 1500,
        vlan=_one(column(port, "tag")),
        protected=bool(column(port, "protected")),
        port_type="veth" if PEER in ids else "internal",
        ipv4=read(IPV4, lambda v: _cidr(v, 4)),
        ipv6=read(IPV6, lambda v: _cidr(v, 6)),
        sandbox=ids.get(SANDBOX),
        sandbox_seen=ids.get(SANDBOX_SEEN),
        created=read(CREATED, float),
        published=read(PORTMAP, PublishedPort.list_from_json, ()),
        unreadable=unreadable,
        iface_id=_iface_id(ids),
        made=(_one(column(iface, "ofport")) or 0) > 0,
    )


@functools.lru_cache(maxsize=4096)
def _cidr(value, version):
    """`value`, checked (cached: every read of an endpoint checks its addresses)."""
    address = ipaddress.ip_interface(value)
    if address.version != version or "/" not in value:
        raise ValueError(f"not an IPv{version} address in CIDR form")
    return value


#: Unreadable values already logged, so each is logged once.
_warned = set()


def _warn_unreadable(where, key, value, error):
    """Log a value the driver cannot read, once, with how to fix it."""
    if (where, key, value) in _warned:
        return
    if len(_warned) > 1000:
        _warned.clear()
    _warned.add((where, key, value))
    table, _, name = where.partition(" ")
    log.warn(
        "cannot read external_ids:{key} of {where} in OVSDB ({error}); the driver ignores "
        "it and serves everything else. Restore it, or remove it with "
        "'ovs-vsctl remove {table} {name} external_ids {key}'",
        key=key,
        where=where,
        error=error,
        table=table,
        name=name,
    )


def _iface_id(ids):
    """An OVN endpoint's logical port; None where it is the endpoint id."""
    iface_id = ids.get("iface-id")
    return iface_id if iface_id not in (None, ids[ENDPOINT_ID]) else None


def _interface_failure(iface):
    """Why ovs-vswitchd could not bring up an interface, or None."""
    error = _one(iface.error)
    if error:
        return error
    if _one(iface.ofport) == -1:
        return "ovs-vswitchd could not add it (ofport -1)"
    return None


class VSwitch:
    """Bridge and port operations of the driver, over one `OVSDB`."""

    def __init__(self, ovsdb):
        self.ovsdb = ovsdb
        self._version = None  # of the replica the memo below was read from
        self._memo = {}
        self._adding = {}  # port name -> the next_cfg that makes it
        self._snapshots = {}  # port uuid -> _Snapshot, while its rows are unchanged

    # -- reads ---------------------------------------------------------------

    def _memoized(self, idl, key, read):
        """`read(idl)`, computed once per version of the replica: the engine
        asks about one endpoint several times while a container starts."""
        version = (id(idl), idl.change_seqno)
        if version != self._version:
            self._version, self._memo = version, {}
        if key not in self._memo:
            self._memo[key] = read(idl)
        return self._memo[key]

    def _records(self, idl):
        return self._memoized(idl, "records", _records)

    def _endpoint(self, idl, endpoint_id):
        def read(idl):
            records = self._records(idl)
            networks = {k: v for k, v in records.items() if isinstance(v, Network)}
            return _endpoint(idl, endpoint_id, networks)

        return self._memoized(idl, ("endpoint", endpoint_id), read)

    def networks(self):
        """All networks recorded in OVSDB, by network id."""
        return self.ovsdb.query(_networks)

    def network(self, network_id):
        """The network, None if unknown; fails with UnreadableRecord when its
        record in OVSDB cannot be read."""

        def read(idl):
            network = self._records(idl).get(network_id)
            if isinstance(network, UnreadableRecord):
                raise network
            return network

        return self.ovsdb.query(read)

    def endpoint(self, endpoint_id):
        return self.ovsdb.query(lambda idl: self._endpoint(idl, endpoint_id))

    def endpoints(self):
        return self.ovsdb.query(self._endpoints)

    def _endpoints(self, idl):
        """`_endpoints`, reading again only the ports whose rows changed: the
        reconciler asks for all of them every 2 s, and reading 1000 from the
        replica costs ~110 ms of the reactor's time."""
        versions = getattr(idl, "row_versions", None)
        if versions is None:
            return _endpoints(idl)
        found, snapshots = [], {}
        for bridge in idl.tables["Bridge"].rows.values():
            for port in column(bridge, "ports"):
                snapshot = self._snapshots.get(port.uuid)
                if snapshot is None or not snapshot.current(port, bridge.name, versions):
                    snapshot = _Snapshot.of(port, bridge.name, versions)
                snapshots[port.uuid] = snapshot
                if snapshot.endpoint is not None:
                    found.append(snapshot.endpoint)
        self._snapshots = snapshots
        return found

    def kernel_datapath(self, bridge):
        """Whether `bridge` is on the kernel datapath; False when it is missing."""

        def read(idl):
            row = by_name(idl, "Bridge", bridge)
            return row is not None and is_kernel_datapath(column(row, "datapath_type"))

        return self.ovsdb.query(read)

    def network_and_endpoint(self, network_id, endpoint_id):
        """(network or None, endpoint or None), read together in one query;
        fails like `network` when the network's record cannot be read."""

        def read(idl):
            network = self._records(idl).get(network_id)
            if isinstance(network, UnreadableRecord):
                raise network
            return network, self._endpoint(idl, endpoint_id)

        return self.ovsdb.query(read)

    # -- writes --------------------------------------------------------------

    def add_network(self, network):
        """Record `network`, creating its bridge (and gateway port) if missing."""

        def build(ctx):
            bridge = ctx.find("Bridge", network.bridge)
            if bridge is None and network.ovn_switch:
                raise VSwitchError(
                    f"the OVN integration bridge {network.bridge} is missing: start "
                    "ovn-controller (or set external_ids:ovn-bridge to the right bridge)"
                )
            if bridge is None:
                bridge = _add_bridge(ctx, network)
            elif not network.ovn_switch:  # OVN keeps its switches apart itself
                _check_bridge_shareable(bridge, network)
            key = NETWORK_RECORD + network.network_id
            if _ids(bridge).get(key) != network.to_json():
                bridge.setkey("external_ids", key, network.to_json())
            if network.shared_bridge and network.gateways:
                name = gateway_port_name(network.network_id)
                if ctx.find("Port", name) is None:
                    ids = {NETWORK_ID: network.network_id, OWNER: OWNER_VALUE}
                    iface_ids = dict(ids)
                    if network.ovn_switch:
                        iface_ids["iface-id"] = ovn_gateway_port(network.ovn_switch)
                    gateway = _add_port(ctx, bridge, name, "internal", network.vlan, ids, iface_ids)
                    gateway.mtu_request = [network.mtu]
                    if network.ovn_switch:
                        gateway.mac = [ovn_gateway_mac(network.ovn_switch)]
            if network.uplink:
                _add_uplink(ctx, bridge, network.uplink)
            return lambda idl: _check_interfaces(idl, network.bridge)

        return self.ovsdb.transact(build)

    def remove_network(self, network_id):
        """Forget a network; delete what the driver made for it alone. Fires
        with the (name, is the host end of a veth) of each endpoint port
        deleted with its bridge, as `finish_removals` does: one the engine
        removed just before may still have been waiting for its deletion."""

        def build(ctx):
            removed = []
            key = NETWORK_RECORD + network_id
            for bridge in list(ctx.rows("Bridge")):
                ids = _ids(bridge)
                if key not in ids:
                    continue
                others = _bridge_records(bridge)
                mine = others.pop(network_id)
                bridge.delkey("external_ids", key)
                gateway = ctx.find("Port", gateway_port_name(network_id))
                if gateway is not None:
                    _delete_port(ctx, bridge, gateway)
                if ids.get(OWNER) == OWNER_VALUE and not others:
                    ports = [port for port in bridge.ports if ENDPOINT_ID in _ids(port)]
                    removed += [(port.name, _is_veth(port)) for port in ports]
                    _delete_bridge(ctx, bridge)
                    continue
                # Unreadable records might use the uplink: then it stays.
                uplink = getattr(mine, "uplink", None)
                if uplink and all(getattr(o, "uplink", uplink) != uplink for o in others.values()):
                    _remove_uplink(ctx, bridge, uplink)
            return lambda idl: removed

        return self.ovsdb.transact(build)

    def add_endpoint(self, endpoint):
        """Plug an endpoint's port into its bridge: fire (with the endpoint)
        once OVSDB has it; `port_ready` waits for ovs-vswitchd to make it."""

        def build(ctx):
            existing = ctx.find("Port", endpoint.port)
            if existing is not None and REMOVING in _ids(existing):
                # Removed by the engine, not deleted yet: replace it.
                _delete_port(ctx, _bridge_of(ctx, existing), existing)
                existing = None
            if existing is not None:
                owner = _ids(existing).get(ENDPOINT_ID)
                if owner != endpoint.endpoint_id:
                    raise VSwitchError(
                        f"port {endpoint.port} already exists and belongs to "
                        f"{'endpoint ' + owner[:12] if owner else 'something else'}"
                    )
                return lambda idl: endpoint
            bridge = ctx.find("Bridge", endpoint.bridge)
            if bridge is None:
                raise VSwitchError(
                    f"bridge {endpoint.bridge} of network "
                    f"{endpoint.network_id[:12]} is missing from Open vSwitch"
                )
            port_ids = {
                NETWORK_ID: endpoint.network_id,
                ENDPOINT_ID: endpoint.endpoint_id,
                OWNER: OWNER_VALUE,
            }
            iface_ids = dict(port_ids)
            iface_id = endpoint.iface_id or endpoint.endpoint_id
            iface_ids.update({"attached-mac": endpoint.mac, "iface-id": iface_id})
            iface_ids[CREATED] = f"{endpoint.created or time.time():.0f}"
            if endpoint.ipv4:
                iface_ids[IPV4] = endpoint.ipv4
            if endpoint.ipv6:
                iface_ids[IPV6] = endpoint.ipv6
            kind = "internal"
            if endpoint.port_type == "veth":
                kind = ""
                iface_ids[PEER] = endpoint.ifname
            iface = _add_port(
                ctx,
                bridge,
                endpoint.port,
                kind,
                endpoint.vlan,
                port_ids,
                iface_ids,
                endpoint.protected,
            )
            iface.mtu_request = [endpoint.mtu]
            # No Interface mac: the engine sets the MAC (the one CreateEndpoint
            # answers or the user gave) as it moves the port in. Given to OVS,
            # ovs-vswitchd would set it again at every reconfiguration, failing
            # with an error line per moved port each time (the port has left
            # its namespace).
            return lambda idl: endpoint

        def added(result):
            self._adding[endpoint.port] = self.ovsdb.committed_cfg  # this commit's
            return result

        return self.ovsdb.transact(build, applied=False).addCallback(added)

    def port_ready(self, endpoint):
        """Fire with the endpoint once ovs-vswitchd has made its port (for a
        port another run of the driver added: once it has applied everything
        in OVSDB); fail, naming the port, if ovs-vswitchd could not."""
        cfg = self._adding.pop(endpoint.port, None)
        return self.ovsdb.applied(lambda idl: _checked_endpoint(idl, endpoint), cfg)

    def remove_endpoint(self, endpoint_id):
        """Unplug an endpoint's port; an unknown endpoint is already gone."""
        self._forget_addition(endpoint_id)

        def build(ctx):
            port = _endpoint_port(ctx.find, endpoint_id)
            if port is not None:
                _delete_port(ctx, _bridge_of(ctx, port), port)
                # Nothing waits for the port to be gone from the datapath (and
                # ovs-vswitchd takes its time closing a tap): don't wait either.
                ctx.wait_for_vswitchd = False

        return self.ovsdb.transact(build)

    def mark_removed(self, endpoint_id):
        """Mark an endpoint's port for deletion: from then on the endpoint is
        gone for the driver, and `finish_removals` (at the latest the
        reconciler's next pass, also after a restart) deletes the port. Costs
        ovs-vswitchd nothing. Fires with the endpoint (None if unknown)."""
        self._forget_addition(endpoint_id)

        def build(ctx):
            port = _endpoint_port(ctx.find, endpoint_id, removing=True)
            if port is None:
                return None
            if REMOVING not in _ids(port):
                port.setkey("external_ids", REMOVING, f"{time.time():.0f}")
            return lambda idl: _endpoint(idl, endpoint_id, removing=True)

        return self.ovsdb.transact(build)

    def _forget_addition(self, endpoint_id):
        for name in (port_name(endpoint_id), veth_host_name(endpoint_id)):
            self._adding.pop(name, None)

    def finish_removals(self, ports=None):
        """Delete the ports marked for deletion (those named in `ports`, or
        all), in a background transaction (after any addition that waits).
        Fires with the (name, is the host end of a veth) of each port deleted."""
        if ports is None:
            d = self.ovsdb.query(_marked_ports)
            return d.addCallback(lambda names: self.finish_removals(names) if names else [])

        def build(ctx):
            removed = []
            for name in ports:
                port = ctx.find("Port", name)
                if port is None or REMOVING not in _ids(port):
                    continue
                removed.append((name, _is_veth(port)))
                _delete_port(ctx, _bridge_of(ctx, port), port)
            # Nothing waits for the port to be gone from the datapath (and
            # ovs-vswitchd takes its time closing a tap): don't wait either.
            ctx.wait_for_vswitchd = False
            return lambda idl: removed

        return self.ovsdb.transact(build, background=True)

    def forget_port_macs(self):
        """Clear the Interface mac that drivers before 2026-12 gave endpoint
        ports: ovs-vswitchd sets it again at every reconfiguration and logs an
        error for each port inside a container. Fires with how many were."""

        def build(ctx):
            ifaces = [
                iface
                for iface in ctx.rows("Interface")
                if ENDPOINT_ID in _ids(iface) and OWNER in _ids(iface) and column(iface, "mac")
            ]
            for iface in ifaces:
                iface.mac = []
            return lambda idl: len(ifaces)

        return self.ovsdb.transact(build)

    def set_sandbox(self, endpoint_id, sandbox):
        """Remember (or forget, with None) the sandbox an endpoint joined."""
        return self._set_endpoint_key(endpoint_id, SANDBOX, sandbox)

    def set_sandbox_seen(self, endpoint_id, sandbox, seen):
        """Record *seen* (text, see `ovsdriver.reconcile`) for the endpoint while
        it is still joined to *sandbox*; nothing changes otherwise."""

        def build(ctx):
            port = _endpoint_port(ctx.find, endpoint_id)
            if port is None:
                return
            iface = port.interfaces[0]
            ids = _ids(iface)
            if ids.get(SANDBOX) == sandbox and ids.get(SANDBOX_SEEN) != seen:
                iface.setkey("external_ids", SANDBOX_SEEN, seen)

        return self.ovsdb.transact(build)

    def set_published(self, endpoint_id, published):
        """Remember (or forget, with an empty list) an endpoint's published ports."""
        value = PublishedPort.list_to_json(published) if published else None
        return self._set_endpoint_key(endpoint_id, PORTMAP, value)

    def _set_endpoint_key(self, endpoint_id, key, value):
        def build(ctx):
            port = _endpoint_port(ctx.find, endpoint_id)
            if port is None:
                return None
            iface = port.interfaces[0]
            if value is None:
                if key in _ids(iface):
                    iface.delkey("external_ids", key)
            elif _ids(iface).get(key) != value:
                iface.setkey("external_ids", key, value)

        return self.ovsdb.transact(build)


# -- builders' helpers (run inside a transaction) ------------------------------


def _add_bridge(ctx, network):
    ids = {OWNER: OWNER_VALUE}
    if not network.shared_bridge:
        ids[NETWORK_ID] = network.network_id
    bridge = ctx.insert("Bridge", network.bridge)
    bridge.datapath_type = network.datapath_type
    bridge.external_ids = ids
    local = _add_port(ctx, bridge, network.bridge, "internal", None, ids, ids)
    if not network.shared_bridge:
        local.mtu_request = [network.mtu]
    root = next(iter(ctx.rows("Open_vSwitch")))
    root.addvalue("bridges", bridge.uuid)
    return bridge


def _check_bridge_shareable(bridge, network):
    ids = _ids(bridge)
    if NETWORK_RECORD + network.network_id in ids:
        return
    others = list(_bridge_records(bridge).values())
    for other in others:
        if isinstance(other, UnreadableRecord):
            raise VSwitchError(f"cannot share bridge {bridge.name}: {other}")
    check_shareable(bridge.name, others, network)


def check_shareable(bridge, others, network):
    """Refuse to put `network` on an existing `bridge` that carries the networks
    `others` where it would leak into them (shared by the fake vswitch)."""
    if not network.shared_bridge:
        raise VSwitchError(f"bridge {bridge} already exists and does not belong to this network")
    if others and network.vlan is None:
        raise VSwitchError(
            f"bridge {bridge} already carries other networks: give this "
            "network its own VLAN with -o ovs.vlan=N"
        )
    for other in others:
        if other.vlan is None:
            raise VSwitchError(
                f"bridge {bridge} carries the untagged network "
                f"{other.network_id[:12]}, which sees every VLAN; use another bridge"
            )
        if other.vlan == network.vlan:
            raise VSwitchError(
                f"VLAN {network.vlan} is already used on bridge {bridge} by "
                f"network {other.network_id[:12]}"
            )


def _add_port(ctx, bridge, name, kind, vlan, port_ids, iface_ids, protected=False):
    iface = ctx.insert("Interface", name)
    iface.type = kind
    iface.external_ids = iface_ids
    port = ctx.insert("Port", name)
    port.interfaces = [iface.uuid]
    port.external_ids = port_ids
    if vlan is not None:
        port.tag = [vlan]
    if protected:  # no traffic to the other protected ports (NORMAL switching)
        port.protected = True
    bridge.addvalue("ports", port.uuid)
    return iface


def _add_uplink(ctx, bridge, name):
    """Make host interface `name` a trunk port of `bridge` (once)."""
    port = ctx.find("Port", name)
    if port is None:
        ids = {OWNER: OWNER_VALUE, UPLINK: "true"}
        _add_port(ctx, bridge, name, "", None, ids, ids)
    elif not any(p.uuid == port.uuid for p in bridge.ports):
        raise VSwitchError(f"uplink {name} is already a port of another bridge")


def _remove_uplink(ctx, bridge, name):
    """Take an uplink the driver added off `bridge`; the interface stays."""
    port = ctx.find("Port", name)
    if port is not None and _ids(port).get(UPLINK) == "true":
        _delete_port(ctx, bridge, port)


def _delete_port(ctx, bridge, port):
    if bridge is not None:
        bridge.delvalue("ports", port.uuid)
    for iface in port.interfaces:
        ctx.delete(iface)
    ctx.delete(port)


def _is_veth(port):
    """Whether `port` is the host end of a veth pair the driver made."""
    return bool(port.interfaces) and PEER in _ids(port.interfaces[0])


def _delete_bridge(ctx, bridge):
    root = next(iter(ctx.rows("Open_vSwitch")))
    root.delvalue("bridges", bridge.uuid)
    for port in bridge.ports:
        for iface in port.interfaces:
            ctx.delete(iface)
        ctx.delete(port)
    ctx.delete(bridge)


def _bridge_of(ctx, port):
    """The bridge holding `port`: the one its network names, else a search."""
    network = _networks(ctx.idl).get(_ids(port).get(NETWORK_ID))
    bridge = ctx.find("Bridge", network.bridge) if network else None
    if bridge is not None:
        return bridge
    return next((b for b in ctx.rows("Bridge") if port.uuid in {p.uuid for p in b.ports}), None)


# -- reads of the replica ----------------------------------------------------------


def _networks(idl):
    """The readable networks, by id (unreadable records are logged once)."""
    return {
        network_id: network
        for network_id, network in _records(idl).items()
        if isinstance(network, Network)
    }


def _records(idl):
    """Every network record, by id: a `Network`, or an `UnreadableRecord`."""
    records = {}
    for bridge in idl.tables["Bridge"].rows.values():
        records.update(_bridge_records(bridge))
    return records


def _bridge_records(bridge):
    """The network records on one bridge: id -> `Network` or `UnreadableRecord`."""
    records = {}
    for key, value in column(bridge, "external_ids").items():
        if key.startswith(NETWORK_RECORD):
            network_id = key[len(NETWORK_RECORD) :]
            records[network_id] = _read_network(bridge.name, key, network_id, value)
    return records


@functools.lru_cache(maxsize=1024)
def _read_network(bridge, key, network_id, value):
    """The record `value` as a `Network` (or an `UnreadableRecord`); cached,
    as every request reads the records and they rarely change."""
    try:
        network = Network.from_json(value)
        if network.network_id != network_id:
            raise InvalidValue(f"it names another network, {network.network_id[:12]}")
    except InvalidValue as e:
        _warn_unreadable(f"Bridge {bridge}", key, value, e)
        return UnreadableRecord(
            f"the record of network {network_id[:12]} in OVSDB (Bridge {bridge} "
            f"external_ids:{key}) cannot be read: {e}; restore it, or remove the network "
            "with 'docker network rm'"
        )
    return network


def _endpoint_port(find, endpoint_id, removing=False):
    """The Port row of an endpoint, found by its derived name (one marked
    for deletion only with `removing`)."""
    for name in (port_name(endpoint_id), veth_host_name(endpoint_id)):
        port = find("Port", name)
        if port is None or _ids(port).get(ENDPOINT_ID) != endpoint_id:
            continue
        if removing or REMOVING not in _ids(port):
            return port
    return None


def _endpoint(idl, endpoint_id, networks=None, removing=False):
    port = _endpoint_port(lambda table, name: by_name(idl, table, name), endpoint_id, removing)
    if port is None:
        return None
    network = (networks if networks is not None else _networks(idl)).get(_ids(port).get(NETWORK_ID))
    iface = column(port, "interfaces")[0]
    return _endpoint_from_rows(network.bridge if network else None, port, iface)


@attr.s(frozen=True, slots=True)
class _Snapshot:
    """What a port's rows said (its endpoint, or None for another port), and
    the versions of those rows then."""

    port = attr.ib()
    iface = attr.ib()
    bridge = attr.ib()
    versions = attr.ib()
    endpoint = attr.ib()

    @classmethod
    def of(cls, port, bridge, versions):
        iface = _interface(port)
        seen = _row_versions(port, iface, versions)
        return cls(port, iface, bridge, seen, _endpoint_of_port(bridge, port, iface))

    def current(self, port, bridge, versions):
        seen = _row_versions(port, self.iface, versions)
        return port is self.port and bridge == self.bridge and seen == self.versions


def _row_versions(port, iface, versions):
    return versions.get(port.uuid), iface and versions.get(iface.uuid)


def _interface(port):
    interfaces = column(port, "interfaces")
    return interfaces[0] if interfaces else None


def is_endpoint_port(port_ids):
    """Whether a Port (by its external_ids) is an endpoint's: the driver's,
    and not marked by DeleteEndpoint (it stays until deleted in the background)."""
    return ENDPOINT_ID in port_ids and OWNER in port_ids and REMOVING not in port_ids


def _endpoint_of_port(bridge_name, port, iface):
    """The endpoint a port is (not one being removed), or None."""
    if iface is None or not is_endpoint_port(column(port, "external_ids")):
        return None
    return _endpoint_from_rows(bridge_name, port, iface)


def _endpoints(idl):
    """Snapshots of all the driver's endpoints (not those being removed)."""
    found = []
    for bridge in idl.tables["Bridge"].rows.values():
        for port in column(bridge, "ports"):
            iface = _interface(port)
            endpoint = _endpoint_of_port(bridge.name, port, iface)
            if endpoint is not None:
                found.append(endpoint)
    return found


def _marked_ports(idl):
    """Names of the ports marked for deletion."""
    ports = idl.tables["Port"].rows.values()
    return [port.name for port in ports if REMOVING in column(port, "external_ids")]


def _checked_endpoint(idl, endpoint):
    iface = by_name(idl, "Interface", endpoint.port)
    if iface is None:
        raise VSwitchError(f"port {endpoint.port} vanished from OVSDB while being added")
    failure = _interface_failure(iface)
    if failure:
        raise VSwitchError(f"Open vSwitch could not add port {iface.name}: {failure}")
    return endpoint


def _check_interfaces(idl, bridge_name):
    """Fail if a port the driver made for the network (not an endpoint's) failed."""
    bridge = by_name(idl, "Bridge", bridge_name)
    for port in bridge.ports if bridge is not None else ():
        ids = _ids(port)
        if OWNER not in ids or ENDPOINT_ID in ids:
            continue
        failure = _interface_failure(port.interfaces[0])
        if failure and port.name == bridge_name:  # the bridge's own port
            failure += (
                f"; is {bridge_name} a host interface? ovs.bridge names an Open vSwitch "
                f"bridge (made if missing): give a host interface as -o ovs.uplink={bridge_name}"
            )
        if failure:
            raise VSwitchError(
                f"Open vSwitch could not set up {port.name} on bridge {bridge_name}: {failure}"
            )
