"""The values that cross module lines, and the one set of checks for them.

Networks, endpoints, published ports and the firewall's input are small
immutable `attrs` classes: the driver reads them from OVSDB, hands them to
the firewall and the fakes, and never passes live IDL rows or dicts around.
The checks every module shares (Docker ids, interface names, MAC addresses,
protocols) live here once.
"""

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
    datapath_type = attr.ib(default="netdev")
    internal = attr.ib(default=False)
    ipv4 = attr.ib(default=(), converter=tuple)
    ipv6 = attr.ib(default=(), converter=tuple)

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
        """Read a record written by `to_json` (unknown keys are ignored)."""
        record = json.loads(text)
        fields = {f.name for f in attr.fields(cls)}
        record = {k: v for k, v in record.items() if k in fields}
        record["ipv4"] = [Subnet(*pair) for pair in record.get("ipv4", ())]
        record["ipv6"] = [Subnet(*pair) for pair in record.get("ipv6", ())]
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
        return tuple(cls(**entry) for entry in json.loads(text))


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
    port_type = attr.ib(default="internal")
    ipv4 = attr.ib(default=None)  # CIDR
    ipv6 = attr.ib(default=None)
    sandbox = attr.ib(default=None)  # Join's SandboxKey while joined
    created = attr.ib(default=None, eq=False)  # seconds since the epoch
    published = attr.ib(default=(), converter=tuple)  # PublishedPort values


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
