"""The OVN Northbound database: logical switches, address claims, ports.

A second `OVSDB` engine (database ``OVN_Northbound``, nothing to wait for
after a commit) replicates only `NB_TABLES`. Every host's driver writes here,
so this is where multi-host state and address allocation live:

- A Docker network with ``ovs.ovn.switch=NAME`` is the Logical_Switch NAME.
  Its subnet and gateway are in the switch's external_ids, so later hosts need
  no ``--subnet``. Each host using it has a key ``ovsdriver-host-<system-id>``
  there (``pending`` until its Docker network exists, then the network id).
- The switch is created together with its gateway port ``NAME/gateway`` (an
  OVN ``localport`` every host binds to its own gateway interface).
  Logical_Switch names are not a unique index, but Logical_Switch_Port names
  are: two hosts creating the switch at once cannot both commit.
- A dual-stack switch also has an IPv6 subnet and gateway, set by the network
  that creates the switch (one made without ``--ipv6`` stays IPv4 only).
- **Every address in use is a Logical_Switch_Port named ``NAME/IP``** (a
  claim). Allocating inserts it; a host allocating the same address at the
  same moment fails on the unique index and the allocator tries again with
  what it then sees. The gateway address is recorded once on the switch
  (under verify) and never handed out. A claim becomes the endpoint's logical
  port at CreateEndpoint (MAC, IP, port security, requested-chassis) and is
  deleted when Docker releases the address. An endpoint's IPv6 address is a
  claim of its own that stays bare: the IPv4 claim's port carries both.
"""

import hashlib
import ipaddress
import itertools
import re

import attr

from ovsdriver.ovsdb import by_name

NB_TABLES = {
    "Logical_Switch": ["name", "ports", "external_ids"],
    "Logical_Switch_Port": [
        "name",
        "type",
        "addresses",
        "port_security",
        "options",
        "external_ids",
    ],
}

OWNER = "owner"
OWNER_VALUE = "ovsdriver"
SUBNET = "ovsdriver-subnet"  # on the switch: the IPv4 subnet, CIDR
GATEWAY = "ovsdriver-gateway"  # on the switch: the gateway address, CIDR
SUBNET6 = "ovsdriver-subnet6"  # on a dual-stack switch: the IPv6 subnet, CIDR
GATEWAY6 = "ovsdriver-gateway6"  # on a dual-stack switch: the IPv6 gateway, CIDR
#: The switch's (subnet, gateway) keys of each IP version.
KEYS = {4: (SUBNET, GATEWAY), 6: (SUBNET6, GATEWAY6)}
HOST = "ovsdriver-host-"  # + system-id, on the switch: "pending" or a network id
PENDING = "pending"
SWITCH = "ovsdriver-switch"  # on a port: the switch it claims an address of
ADDRESS = "ovsdriver-address"  # on a port: the address it claims
CLAIM = "ovsdriver-claim"  # on a port: the allocation's token (idempotent retries)
SYSTEM_ID = "system-id"
NETWORK_ID = "docker-network-id"
ENDPOINT_ID = "docker-endpoint-id"
SWITCH_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: How a port whose insert lost against another host's shows up in the error.
CONFLICT = "constraint violation"


class NorthboundError(Exception):
    """The OVN Northbound database refuses an operation; the message says why."""


def check_switch_name(value):
    if not isinstance(value, str) or not SWITCH_NAME.fullmatch(value):
        raise NorthboundError(
            f"ovs.ovn.switch={value!r} is invalid: use 1 to 64 letters, digits or '_.-'"
        )
    return value


def claim_name(switch, ip):
    """The logical port that claims address `ip` on `switch`."""
    return f"{switch}/{ip}"


def gateway_port_name(switch):
    """The switch's gateway localport (bound on every host)."""
    return f"{switch}/gateway"


def gateway_mac(switch):
    """The gateway's MAC: the same on every host, derived from the switch name."""
    octets = bytearray(hashlib.sha256(b"ovsdriver-gateway:" + switch.encode()).digest()[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def choose_address(subnet, gateway, taken, after=None, spread=None, within=None):
    """The next host address of `subnet` (in its part `within`, if given)
    after `after` (from the first one when None), wrapping around, that is
    neither the gateway nor `taken(ip)`; None when they are all taken. Going
    on after the last address handed out (as Docker's own allocator does)
    keeps a choice from rescanning every address in use. With `spread` (a
    ``random.Random``), try a few random ones first: after losing an address
    to another host, both hosts taking the next free one would collide again."""
    net = ipaddress.ip_network(subnet)
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    if within is not None:
        part = ipaddress.ip_network(within)
        first = max(first, int(part.network_address))
        last = min(last, int(part.broadcast_address))
    gateway_ip = ipaddress.ip_interface(gateway).ip if gateway else None
    if last < first:
        return None

    def free(value):
        ip = ipaddress.ip_address(value)
        return ip if ip != gateway_ip and not taken(ip) else None

    if spread is not None and last - first > 2:
        for _ in range(32):
            ip = free(spread.randint(first, last))
            if ip is not None:
                return ip
    begin = first
    if after is not None and first <= int(ipaddress.ip_address(after)) < last:
        begin = int(ipaddress.ip_address(after)) + 1
    for value in itertools.chain(range(begin, last + 1), range(first, begin)):
        ip = free(value)
        if ip is not None:
            return ip
    return None


def check_address(switch, subnet, gateway, address):
    """`address` (plain or CIDR) as an ip_address a container may hold on
    `switch`, or NorthboundError naming what is wrong."""
    net = ipaddress.ip_network(subnet)
    try:
        ip = ipaddress.ip_interface(address).ip
    except ValueError:
        raise NorthboundError(f"{address!r} is not an IP address") from None
    if ip not in net or ip in (net.network_address, net.broadcast_address):
        raise NorthboundError(
            f"address {ip} is not a host address of subnet {subnet} of OVN switch {switch}"
        )
    if gateway and ip == ipaddress.ip_interface(gateway).ip:
        raise NorthboundError(f"address {ip} is the gateway of OVN switch {switch}")
    return ip


@attr.s(frozen=True, slots=True)
class SwitchInfo:
    """A snapshot of one logical switch the driver uses."""

    name = attr.ib()
    subnet = attr.ib()
    gateway = attr.ib()  # CIDR or None until the first network chose it
    hosts = attr.ib(converter=lambda d: tuple(sorted(d.items())))  # (system-id, value)
    claims = attr.ib()  # number of claimed addresses (ports besides the gateway)
    subnet6 = attr.ib(default=None)  # a dual-stack switch's IPv6 subnet
    gateway6 = attr.ib(default=None)

    def host(self, system_id):
        return dict(self.hosts).get(system_id)


def _ids(row):
    return dict(row.external_ids)


def switch_info(row):
    if row is None:
        return None
    ids = _ids(row)
    gateway = gateway_port_name(row.name)
    return SwitchInfo(
        name=row.name,
        subnet=ids.get(SUBNET),
        gateway=ids.get(GATEWAY),
        hosts={k[len(HOST) :]: v for k, v in ids.items() if k.startswith(HOST)},
        claims=sum(1 for port in row.ports if port.name != gateway),
        subnet6=ids.get(SUBNET6),
        gateway6=ids.get(GATEWAY6),
    )


def _switch(ctx, name):
    row = ctx.find("Logical_Switch", name)
    if row is None:
        raise NorthboundError(
            f"OVN logical switch {name} does not exist (any more); "
            "create the network again with --subnet"
        )
    if SUBNET not in _ids(row):
        raise NorthboundError(
            f"OVN logical switch {name} was not made by the ovs driver; name another switch"
        )
    return row


class Northbound:
    """The driver's operations on the OVN Northbound database (one `OVSDB`)."""

    def __init__(self, ovsdb):
        self.ovsdb = ovsdb
        self._last = {}  # (switch, IP version) -> the last address this host claimed

    @property
    def remote(self):
        return self.ovsdb.remote

    # -- reads -------------------------------------------------------------------

    def switch(self, name):
        """Deferred[SwitchInfo | None]."""
        return self.ovsdb.query(lambda idl: switch_info(by_name(idl, "Logical_Switch", name)))

    def switches(self):
        """Deferred[list[SwitchInfo]]: the switches the driver made."""

        def read(idl):
            rows = idl.tables["Logical_Switch"].rows.values()
            return [switch_info(row) for row in rows if SUBNET in row.external_ids]

        return self.ovsdb.query(read)

    def ports(self):
        """Deferred[list[dict]]: the driver's logical ports, each its
        external_ids plus ``name``."""

        def read(idl):
            return [
                dict(_ids(row), name=row.name)
                for row in idl.tables["Logical_Switch_Port"].rows.values()
                if _ids(row).get(OWNER) == OWNER_VALUE and CLAIM in row.external_ids
            ]

        return self.ovsdb.query(read)

    # -- switches ----------------------------------------------------------------

    def request_pool(self, name, subnet, system_id, version=4):
        """Find switch `name` (creating it with `subnet` if missing) and record
        that this host uses it; with `version` 6, the switch's IPv6 subnet
        (`subnet` becomes it when the network creating the switch asks).
        Deferred[SwitchInfo]."""

        def build(ctx):
            row = ctx.find("Logical_Switch", name)
            if version == 6:
                _request_subnet6(ctx, _switch(ctx, name), subnet, system_id)
            elif row is None:
                if subnet is None:
                    raise NorthboundError(
                        f"OVN logical switch {name} does not exist yet: create the first "
                        "network on it with --subnet"
                    )
                _check_subnet_free(ctx, name, SUBNET, subnet, system_id)
                row = ctx.insert("Logical_Switch", name)
                row.external_ids = {
                    OWNER: OWNER_VALUE,
                    SUBNET: subnet,
                    HOST + system_id: PENDING,
                    SYSTEM_ID: system_id,  # the host that made it
                }
                gateway = ctx.insert("Logical_Switch_Port", gateway_port_name(name))
                gateway.type = "localport"
                gateway.external_ids = {OWNER: OWNER_VALUE, SWITCH: name, SYSTEM_ID: system_id}
                row.ports = [gateway.uuid]
            else:
                have = _switch(ctx, name).external_ids[SUBNET]
                if subnet is not None and subnet != have:
                    raise NorthboundError(
                        f"OVN logical switch {name} has subnet {have}, not {subnet}: "
                        f"repeat --subnet {have} or leave --subnet out"
                    )
                _check_subnet_free(ctx, name, SUBNET, have, system_id)
                if HOST + system_id not in _ids(row):
                    row.setkey("external_ids", HOST + system_id, PENDING)
            return lambda idl: switch_info(by_name(idl, "Logical_Switch", name))

        return self.ovsdb.transact(build)

    def set_gateway(self, name, address, version=4):
        """The switch's gateway (CIDR) of IP `version`: `address` (or the first
        host address) the first time, the recorded one afterwards.
        Deferred[str]."""
        gateway_key = KEYS[version][1]

        def build(ctx):
            row = _switch(ctx, name)
            ids = _ids(row)
            subnet, have = _subnet_of(row, version), ids.get(gateway_key)
            prefix = ipaddress.ip_network(subnet).prefixlen
            if have:
                have_ip = ipaddress.ip_interface(have).ip
                if address and ipaddress.ip_interface(address).ip != have_ip:
                    raise NorthboundError(
                        f"OVN logical switch {name} has gateway {have_ip}: leave --gateway "
                        f"out or use --gateway {have_ip}"
                    )
                return lambda idl: have
            if address:
                ip = check_address(name, subnet, None, address)
                if ctx.find("Logical_Switch_Port", claim_name(name, ip)) is not None:
                    raise NorthboundError(f"address {ip} is already in use on OVN switch {name}")
            else:
                ip = choose_address(
                    subnet, None, lambda ip: ctx.find("Logical_Switch_Port", claim_name(name, ip))
                )
            gateway = f"{ip}/{prefix}"
            row.verify("external_ids")  # two hosts choosing at once: one wins
            row.setkey("external_ids", gateway_key, gateway)
            ids[gateway_key] = gateway
            port = ctx.find("Logical_Switch_Port", gateway_port_name(name))
            if port is not None:
                ips = [
                    str(ipaddress.ip_interface(ids[k]).ip) for k in (GATEWAY, GATEWAY6) if k in ids
                ]
                port.addresses = [" ".join([gateway_mac(name), *ips])]
            return lambda idl: gateway

        return self.ovsdb.transact(build)

    def attach_network(self, name, system_id, network_id):
        """Record which Docker network of this host uses the switch."""

        def build(ctx):
            row = _switch(ctx, name)
            if _ids(row).get(HOST + system_id) != network_id:
                row.setkey("external_ids", HOST + system_id, network_id)

        return self.ovsdb.transact(build)

    def release_pool(self, name, system_id, in_use=None):
        """This host no longer uses the switch, nor (given the claims `in_use`
        by its endpoints) any other address it claimed there, which Docker
        did not all give back; delete it when no host uses it and no address
        is claimed. Deferred[bool]: whether it was deleted."""

        def build(ctx):
            row = ctx.find("Logical_Switch", name)
            if row is None:
                return lambda idl: False
            if HOST + system_id in _ids(row):
                row.delkey("external_ids", HOST + system_id)
            mine = {}
            if in_use is not None:
                mine = {
                    port.name: port
                    for port in row.ports
                    if CLAIM in _ids(port)
                    and _ids(port).get(SYSTEM_ID) == system_id
                    and port.name not in in_use
                }
            deleted = _drop_claims(ctx, row, mine, leaving=system_id)
            return lambda idl: deleted

        return self.ovsdb.transact(build)

    # -- addresses ---------------------------------------------------------------

    def claim_address(self, name, address, token, system_id, spread=None, version=4, within=None):
        """Claim `address` (or the first free one of IP `version`; see
        `choose_address` for `spread` and `within`) on the switch for this host.
        Deferred[str]: the address, CIDR. Fails with OVSDBUnavailable naming a
        `CONFLICT` when another host claimed the same address at once."""

        tried = []  # what an earlier build of this claim chose

        def build(ctx):
            row = _switch(ctx, name)
            subnet, gateway = _subnet_of(row, version), _ids(row).get(KEYS[version][1])
            prefix = ipaddress.ip_network(subnet).prefixlen
            if tried:
                earlier = ctx.find("Logical_Switch_Port", claim_name(name, tried[-1]))
                if earlier is not None and _ids(earlier).get(CLAIM) == token:
                    # It committed before a reconnect hid the answer.
                    return lambda idl: f"{tried[-1]}/{prefix}"
            if address:
                ip = check_address(name, subnet, gateway, address)
                if ctx.find("Logical_Switch_Port", claim_name(name, ip)) is not None:
                    raise NorthboundError(
                        f"address {ip} is already in use on OVN switch {name} "
                        "(by a container on this or another host)"
                    )
            else:
                ip = choose_address(
                    subnet,
                    gateway,
                    lambda ip: ctx.find("Logical_Switch_Port", claim_name(name, ip)),
                    self._last.get((name, version)),
                    spread,
                    within,
                )
                if ip is None:
                    raise NorthboundError(
                        f"no free address left in {within or subnet} on OVN switch {name}"
                    )
            port = ctx.insert("Logical_Switch_Port", claim_name(name, ip))
            port.external_ids = {
                OWNER: OWNER_VALUE,
                SWITCH: name,
                ADDRESS: str(ip),
                CLAIM: token,
                SYSTEM_ID: system_id,
            }
            row.addvalue("ports", port.uuid)
            tried.append(ip)

            def claimed(idl):
                if not address:  # the next choice goes on from here
                    self._last[name, version] = ip
                return f"{ip}/{prefix}"

            return claimed

        return self.ovsdb.transact(build)

    def release_address(self, name, address):
        """Give an address back (its port goes with it)."""

        def build(ctx):
            ip = ipaddress.ip_interface(address).ip
            port = ctx.find("Logical_Switch_Port", claim_name(name, ip))
            if port is None or CLAIM not in _ids(port):
                return
            row = ctx.find("Logical_Switch", name)
            if row is not None:
                row.delvalue("ports", port.uuid)
            ctx.delete(port)

        return self.ovsdb.transact(build)

    def forget_claims(self, names):
        """Delete the claims (ports) named `names` (orphans of this host)."""

        def build(ctx):
            doomed = {}  # switch -> (its row, {claim name: port})
            for port_name in names:
                port = ctx.find("Logical_Switch_Port", port_name)
                if port is None or CLAIM not in _ids(port):
                    continue
                row = ctx.find("Logical_Switch", _ids(port).get(SWITCH))
                if row is None:
                    ctx.delete(port)
                    continue
                doomed.setdefault(row.name, (row, {}))[1][port_name] = port
            for row, ports in doomed.values():
                _drop_claims(ctx, row, ports)

        return self.ovsdb.transact(build)

    # -- endpoint ports ----------------------------------------------------------

    def bind_port(self, name, address, mac, network_id, endpoint_id, system_id, address6=None):
        """Make the claim of `address` the endpoint's logical port, bound to this
        host, with `address6` (claimed too) besides on a dual-stack switch.
        Deferred[str]: the logical port's name (the Interface's iface-id)."""
        ips = [ipaddress.ip_interface(a).ip for a in (address, address6) if a]
        port_name = claim_name(name, ips[0])

        def build(ctx):
            for ip in ips:
                claim = ctx.find("Logical_Switch_Port", claim_name(name, ip))
                if claim is None or _ids(claim).get(SWITCH) != name:
                    raise NorthboundError(
                        f"address {ip} was not allocated on OVN switch {name}: create the "
                        "network with --ipam-driver ovs"
                    )
            port = ctx.find("Logical_Switch_Port", port_name)
            ids = _ids(port)
            owner = ids.get(ENDPOINT_ID)
            if owner and owner != endpoint_id:
                raise NorthboundError(
                    f"address {ips[0]} on OVN switch {name} already belongs to endpoint "
                    f"{owner[:12]}"
                )
            addresses = [" ".join([mac, *map(str, ips)])]
            if list(port.addresses) != addresses:
                port.addresses = addresses
                port.port_security = addresses
            if dict(port.options) != {"requested-chassis": system_id}:
                port.options = {"requested-chassis": system_id}
            ids.update({NETWORK_ID: network_id, ENDPOINT_ID: endpoint_id, SYSTEM_ID: system_id})
            if ids != _ids(port):
                port.external_ids = ids
            return lambda idl: port_name

        return self.ovsdb.transact(build)

    def unbind_port(self, port_name, endpoint_id):
        """The endpoint is gone: its logical port is a bare claim again
        (Docker releases the address next)."""

        def build(ctx):
            port = ctx.find("Logical_Switch_Port", port_name)
            if port is None or _ids(port).get(ENDPOINT_ID) != endpoint_id:
                return
            ids = _ids(port)
            ids.pop(NETWORK_ID, None)
            ids.pop(ENDPOINT_ID, None)
            port.addresses = []
            port.port_security = []
            port.options = {}
            port.external_ids = ids

        return self.ovsdb.transact(build)


def _drop_claims(ctx, row, claims, leaving=None):
    """Delete the switch's `claims` (name -> port); a switch no host but
    `leaving` uses any more (whose last address Docker never gave back) goes
    with its last claim. Whether the switch was deleted."""
    if _delete_if_unused(ctx, row, claims, leaving):
        return True
    for port in claims.values():
        row.delvalue("ports", port.uuid)
        ctx.delete(port)
    return False


def _delete_if_unused(ctx, row, gone=(), leaving=None):
    """Delete the switch (with its gateway port) if no host but `leaving` uses
    it and no address is claimed on it but the claims `gone`; whether it did."""
    ids = _ids(row)
    hosts = [k for k in ids if k.startswith(HOST) and k != HOST + str(leaving)]
    claims = [p for p in row.ports if p.name not in (gateway_port_name(row.name), *gone)]
    if hosts or claims or ids.get(OWNER) != OWNER_VALUE:
        return False
    # A host joining or claiming at the same moment makes this retry.
    row.verify("external_ids")
    row.verify("ports")
    for port in row.ports:
        ctx.delete(port)
    ctx.delete(row)
    return True


def _ipv4_only(row):
    return NorthboundError(
        f"OVN logical switch {row.name} is IPv4 only (its first network was made "
        "without --ipv6): leave --ipv6 out"
    )


def _subnet_of(row, version):
    """The switch's subnet of IP `version`, or NorthboundError."""
    subnet = _ids(row).get(KEYS[version][0])
    if subnet is None:
        raise _ipv4_only(row)
    return subnet


def _request_subnet6(ctx, row, subnet, system_id):
    """Give the switch its IPv6 subnet while the network creating it asks (no
    other host uses it, no address is claimed yet), or check `subnet` against it."""
    ids, name = _ids(row), row.name
    have = ids.get(SUBNET6)
    if have is None:
        creating = ids.get(HOST + system_id) == PENDING and not any(
            k.startswith(HOST) and k != HOST + system_id for k in ids
        )
        if not creating or len(row.ports) > 1:
            raise _ipv4_only(row)
        if subnet is None:
            raise NorthboundError(
                f"OVN logical switch {name} is being made: give its IPv6 subnet with a "
                "second --subnet (e.g. --ipv6 --subnet fd00:60::/64)"
            )
        row.verify("external_ids")  # another host joining meanwhile: look again
        row.setkey("external_ids", SUBNET6, subnet)
    elif subnet is not None and subnet != have:
        raise NorthboundError(
            f"OVN logical switch {name} has IPv6 subnet {have}, not {subnet}: "
            f"repeat --subnet {have} or leave the IPv6 --subnet out"
        )
    _check_subnet_free(ctx, name, SUBNET6, have or subnet, system_id)


def _check_subnet_free(ctx, name, key, subnet, system_id):
    """A host joins one switch per subnet: the network driver finds a network's
    switch by this host's key and the subnet."""
    for row in ctx.rows("Logical_Switch"):
        ids = _ids(row)
        if row.name != name and HOST + system_id in ids and ids.get(key) == subnet:
            raise NorthboundError(
                f"this host already uses subnet {subnet} on OVN switch {row.name}; "
                "one host joins one switch per subnet"
            )
