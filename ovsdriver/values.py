"""The values that cross module lines, and the one set of checks for them.

Networks, endpoints, published ports and the firewall's input are small
immutable `attrs` classes: the driver reads them from OVSDB, hands them to
the firewall and the fakes, and never passes live IDL rows or dicts around.
The checks every module shares (Docker ids, interface names, MAC addresses,
protocols) live here once.
"""

import ipaddress
import json
import re

import attr

#: The longest interface name the kernel holds (IFNAMSIZ less the NUL).
IFNAME_MAX = 15
IFNAME = re.compile(r"^[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}$")
HEX_ID = re.compile(r"^[0-9a-f]{12,64}$")
MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
#: IP protocol numbers (as the engine's portmap gives them) and their names.
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}


class InvalidValue(ValueError):
    """A value is malformed; the message names it and says what is allowed."""


def check_ifname(what, value):
    """An interface name the kernel (and iptables) accepts."""
    if not isinstance(value, str) or not IFNAME.fullmatch(value):
        raise InvalidValue(
            f"{what} {value!r} is not a valid interface name: use 1 to {IFNAME_MAX} "
            "letters, digits or '_.@-' (not starting with '-')"
        )
    return value


def check_mac(what, value):
    """A unicast MAC address, in lower case."""
    if not isinstance(value, str) or not MAC.fullmatch(value):
        raise InvalidValue(f"{what} {value!r} is not a MAC address like 02:42:ac:11:00:02")
    if int(value[:2], 16) & 1:
        raise InvalidValue(f"{what} {value!r} is a multicast address")
    return value.lower()


@attr.s(frozen=True, slots=True)
class Subnet:
    """One IP pool of a network and the gateway the host owns in it."""

    pool = attr.ib()  # "10.20.0.0/24"
    gateway = attr.ib(default=None)  # "10.20.0.1/24" (CIDR) or None

    @property
    def gateway_ip(self):
        """The gateway as a plain IP, as Join must return it."""
        return self.gateway.split("/")[0] if self.gateway else None


@attr.s(frozen=True, slots=True)
class Network:
    """Everything the driver must remember about one Docker network."""

    network_id = attr.ib()
    bridge = attr.ib()
    shared_bridge = attr.ib(default=False)  # the user named it with ovs.bridge
    vlan = attr.ib(default=None)
    uplink = attr.ib(default=None)
    port_type = attr.ib(default="internal")
    mtu = attr.ib(default=1500)
    nat = attr.ib(default=True)
    icc = attr.ib(default=True)  # containers talk to each other (else protected ports)
    host_binding = attr.ib(default=None)  # the host IP of a -p that gives none
    datapath_type = attr.ib(default="netdev")
    internal = attr.ib(default=False)
    ipv4 = attr.ib(default=(), converter=tuple)
    ipv6 = attr.ib(default=(), converter=tuple)
    ovn_switch = attr.ib(default=None)  # an OVN network's Logical_Switch (see ovsdriver.ovn)
    #: The engine's IPAM address space its pools came from (``LocalDefault``:
    #: Docker's default IPAM); None when not known (records before 2026-12-03).
    address_space = attr.ib(default=None)

    @property
    def gateways(self):
        """Gateway addresses (CIDR) the host side of this network carries."""
        if self.internal:
            return ()
        return tuple(s.gateway for s in self.ipv4 + self.ipv6 if s.gateway)

    def to_json(self):
        """A compact record for OVSDB's external_ids."""
        record = attr.asdict(self, recurse=True)
        record["ipv4"] = [[s.pool, s.gateway] for s in self.ipv4]
        record["ipv6"] = [[s.pool, s.gateway] for s in self.ipv6]
        return json.dumps(record, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Read a record written by `to_json` (unknown keys are ignored).

        Operators can edit it with ovs-vsctl, so every field is checked:
        InvalidValue says what is wrong with it."""
        record = _load(text, dict, "a JSON object")
        fields = {f.name for f in attr.fields(cls)}
        record = {k: v for k, v in record.items() if k in fields}
        for name in ("network_id", "bridge"):
            if name not in record:
                raise InvalidValue(f"it has no {name}")
        _check_fields(record, _NETWORK_FIELDS)
        for family in ("ipv4", "ipv6"):
            record[family] = [_subnet(family, pair) for pair in record.get(family, ())]
        return cls(**record)


@attr.s(frozen=True, slots=True)
class PublishedPort:
    """One ``-p [HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTO]`` of an endpoint."""

    proto = attr.ib()  # "tcp", "udp" or "sctp"
    host_port = attr.ib()
    container_ip = attr.ib()  # plain IP
    container_port = attr.ib()
    host_ip = attr.ib(default=None)  # None: every address of the host

    @staticmethod
    def list_to_json(published):
        return json.dumps([attr.asdict(p) for p in published], separators=(",", ":"))

    @classmethod
    def list_from_json(cls, text):
        """Read what `list_to_json` wrote; InvalidValue says what is wrong."""
        published = []
        for entry in _load(text, list, "a JSON list"):
            if not isinstance(entry, dict):
                raise InvalidValue(f"{entry!r} is not a JSON object")
            _check_fields(entry, _PUBLISHED_FIELDS)
            try:
                published.append(cls(**entry))
            except TypeError as e:
                raise InvalidValue(f"{entry!r} is not a published port: {e}") from None
        return tuple(published)


@attr.s(frozen=True, slots=True)
class Endpoint:
    """A Docker endpoint as plugged into Open vSwitch."""

    endpoint_id = attr.ib()
    network_id = attr.ib()
    bridge = attr.ib()
    port = attr.ib()  # the OVS port's name
    ifname = attr.ib()  # the link the engine moves into the container
    mac = attr.ib()
    mtu = attr.ib(default=1500)
    vlan = attr.ib(default=None)
    protected = attr.ib(default=False)  # no traffic to other protected ports (icc off)
    port_type = attr.ib(default="internal")
    ipv4 = attr.ib(default=None)  # CIDR
    ipv6 = attr.ib(default=None)
    sandbox = attr.ib(default=None)  # Join's SandboxKey while joined
    sandbox_seen = attr.ib(default=None, eq=False)  # where it was seen mounted (reconcile)
    created = attr.ib(default=None, eq=False)  # seconds since the epoch
    published = attr.ib(default=(), converter=tuple)  # PublishedPort values
    #: Values in OVSDB that could not be read (hand-edited?): {key: why}.
    unreadable = attr.ib(factory=dict, eq=False, hash=False)
    iface_id = attr.ib(default=None)  # OVN's logical port when not the endpoint id
    #: Whether ovs-vswitchd has made the port (it has an ofport): until then
    #: an internal port's link exists nowhere.
    made = attr.ib(default=False, eq=False)


@attr.s(frozen=True, slots=True)
class NetworkRules:
    """What the firewall must do for one Docker network."""

    network_id = attr.ib()
    ifname = attr.ib()  # the host-side interface holding the gateway
    ipv4 = attr.ib(converter=tuple)  # pools, CIDR
    ipv6 = attr.ib(converter=tuple)
    nat = attr.ib()  # masquerade traffic leaving the subnet through the host
    internal = attr.ib()  # no traffic in or out of the subnet through the host
    published = attr.ib(default=(), converter=tuple)  # options.PublishedPort values

    def pools(self, family):
        """The pools of one address family (4 or 6)."""
        return self.ipv4 if family == 4 else self.ipv6


# -- reading records back from OVSDB, where operators can edit them ------------


def _load(text, kind, expected):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidValue(f"it is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise InvalidValue(f"it is not {expected}")
    return value


def _is_int(low, high):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_ip(value):
    try:
        ipaddress.ip_address(value)
    except (TypeError, ValueError):
        return False
    return True


def _optional(check):
    return lambda v: v is None or check(v)


def _is_ifname(value):
    return isinstance(value, str) and bool(IFNAME.fullmatch(value))


def _is_bool(value):
    return isinstance(value, bool)


_NETWORK_FIELDS = {
    "network_id": ("a Docker id", lambda v: isinstance(v, str) and bool(HEX_ID.fullmatch(v))),
    "bridge": ("an interface name", _is_ifname),
    "shared_bridge": ("true or false", _is_bool),
    "vlan": ("null or 1-4094", _optional(_is_int(1, 4094))),
    "uplink": ("null or an interface name", _optional(_is_ifname)),
    "port_type": ("internal or veth", lambda v: v in ("internal", "veth")),
    "mtu": ("68-65535", _is_int(68, 65535)),
    "nat": ("true or false", _is_bool),
    "icc": ("true or false", _is_bool),
    "host_binding": ("null or an IP address", _optional(_is_ip)),
    "datapath_type": ("system or netdev", lambda v: v in ("system", "netdev")),
    "internal": ("true or false", _is_bool),
    "ipv4": ("a list of [pool, gateway]", lambda v: isinstance(v, list)),
    "ipv6": ("a list of [pool, gateway]", lambda v: isinstance(v, list)),
    "address_space": ("null or a string", _optional(lambda v: isinstance(v, str))),
}
_PUBLISHED_FIELDS = {
    "proto": (", ".join(PROTOCOLS.values()), lambda v: v in PROTOCOLS.values()),
    "host_port": ("1-65535", _is_int(1, 65535)),
    "container_ip": ("an IP address", _is_ip),
    "container_port": ("1-65535", _is_int(1, 65535)),
    "host_ip": ("null or an IP address", _optional(_is_ip)),
}


def _check_fields(record, checks):
    for name, value in record.items():
        expected, check = checks.get(name, (None, None))
        if check is not None and not check(value):
            raise InvalidValue(f"{name}={json.dumps(value)} is invalid: expected {expected}")


def _subnet(family, pair):
    version = 4 if family == "ipv4" else 6
    try:
        pool, gateway = pair
        net = ipaddress.ip_network(pool)
        if gateway is not None and ipaddress.ip_interface(gateway).ip not in net:
            raise ValueError(f"gateway {gateway} is outside the pool")
        if net.version != version:
            raise ValueError(f"{pool} is not IPv{version}")
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"{family} entry {json.dumps(pair)} is invalid: {e}") from None
    return Subnet(pool, gateway)
