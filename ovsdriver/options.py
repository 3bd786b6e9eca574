"""Docker's CreateNetwork options turned into a typed, validated network config.

The engine hands options over as strings (under ``com.docker.network.generic``)
and never replays CreateNetwork, so everything a network needs later is parsed
here once, checked, and recorded in OVSDB as a `Network`.
"""

import ipaddress

import attr

from ovsdriver.values import (
    HEX_ID,
    PROTOCOLS,
    InvalidValue,
    Network,
    Subnet,
    check_ifname,
)

GENERIC = "com.docker.network.generic"
MTU_KEY = "com.docker.network.driver.mtu"
IPV6_MIN_MTU = 1280  # RFC 8200
#: Options of Docker's bridge driver the ovs driver has too; it refuses the
#: others of that prefix rather than ignore them.
BRIDGE_PREFIX = "com.docker.network.bridge."
ICC_KEY = BRIDGE_PREFIX + "enable_icc"
MASQUERADE_KEY = BRIDGE_PREFIX + "enable_ip_masquerade"
HOST_BINDING_KEY = BRIDGE_PREFIX + "host_binding_ipv4"
PORT_TYPES = ("internal", "veth")
DATAPATH_TYPES = ("system", "netdev")
#: There while Open vSwitch's kernel module (the ``system`` datapath) is loaded.
KERNEL_MODULE = "/sys/module/openvswitch"


class OptionError(InvalidValue):
    """A network or endpoint option is invalid; the message names it."""


def bridge_name(network_id):
    """The bridge of a network that did not name one: 'obr-' + 11 hex digits."""
    return "obr-" + network_id[:11]


def check_endpoint_options(options):
    """The ovs driver has no per-container options: refuse an ``ovs.`` one
    (``docker network connect --driver-opt``) instead of ignoring it."""
    ours = sorted(k for k in options or {} if isinstance(k, str) and k.startswith("ovs."))
    if ours:
        raise OptionError(
            f"unknown endpoint option {ours[0]!r} (--driver-opt): the ovs driver's "
            "options are per network (docker network create -o)"
        )


def check_id(kind, value):
    """Docker ids are hex; anything else never reaches OVSDB or the kernel."""
    if not isinstance(value, str) or not HEX_ID.fullmatch(value):
        raise OptionError(f"{kind} must be a hexadecimal Docker id, got {value!r}")
    return value


def _int_option(key, value, low, high):
    try:
        number = int(str(value).strip(), 10)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise OptionError(f"{key}={value!r} is invalid: use a number from {low} to {high}")
    return number


def _bool_option(key, value):
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise OptionError(f"{key}={value!r} is invalid: use true or false")


def _ipv4_option(key, value):
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise OptionError(f"{key}={value!r} is invalid: use an IPv4 address") from None


def _choice_option(key, value, choices):
    if value not in choices:
        raise OptionError(f"{key}={value!r} is invalid: use one of {', '.join(choices)}")
    return value


def _subnets(name, data, version):
    subnets = []
    if data is None:
        return subnets
    if not isinstance(data, list):
        raise OptionError(f"{name} must be a list of pools")
    for entry in data:
        if not isinstance(entry, dict):
            raise OptionError(f"{name} entries must be objects")
        pool, gateway = entry.get("Pool"), entry.get("Gateway") or None
        if not isinstance(pool, str) or not isinstance(gateway, (str, type(None))):
            raise OptionError(f"{name} Pool and Gateway must be strings")
        try:
            net = ipaddress.ip_network(pool, strict=False)
            if gateway is not None:
                iface = ipaddress.ip_interface(gateway)
                if iface.ip not in net:
                    raise ValueError(f"gateway {gateway} is outside pool {pool}")
        except (TypeError, ValueError) as e:
            raise OptionError(f"{name} has an invalid pool or gateway: {e}") from None
        if net.version != version:
            raise OptionError(f"{name} pool {pool} is not IPv{version}")
        subnets.append(Subnet(str(net), str(iface) if gateway else None))
    return subnets


def _address_space(*data):
    """The IPAM address space all the pools came from, or None."""
    spaces = {entry.get("AddressSpace") for pools in data for entry in pools or ()}
    space = spaces.pop() if len(spaces) == 1 else None
    return space if isinstance(space, str) and space else None


#: The driver's own option keys and how each is checked.
NETWORK_OPTIONS = {
    "ovs.bridge": "bridge name (at most 15 characters)",
    "ovs.vlan": "1-4094",
    "ovs.uplink": "host interface name",
    "ovs.port_type": "internal or veth",
    MTU_KEY: "68-65535",
    "ovs.nat": "true or false",
    "ovs.datapath_type": "system or netdev",
    "ovs.ovn.switch": "the OVN logical switch (given with --ipam-opt)",
    ICC_KEY: "true or false",
    MASQUERADE_KEY: "true or false (as ovs.nat)",
    HOST_BINDING_KEY: "an IPv4 address of the host",
}
OVN_SWITCH = "ovs.ovn.switch"
#: Options of a bridge of the network's own, which an OVN network has not.
LOCAL_ONLY = (
    "ovs.bridge",
    "ovs.vlan",
    "ovs.uplink",
    "ovs.port_type",
    "ovs.datapath_type",
    ICC_KEY,
)


def ovn_request(options, ipv4_data, address_space):
    """Whether CreateNetwork asks for an OVN network (its pool came from the ovs
    IPAM, in `address_space`), and the ``-o ovs.ovn.switch`` given if any;
    refuse what an OVN network cannot do."""
    generic = (options or {}).get(GENERIC) or {}
    switch = generic.get(OVN_SWITCH) if isinstance(generic, dict) else None
    pools = [d for d in ipv4_data or () if isinstance(d, dict)]
    ovn = any(d.get("AddressSpace") == address_space for d in pools)
    if switch is not None and not ovn:
        raise OptionError(
            f"{OVN_SWITCH} needs the ovs IPAM, which allocates the addresses in OVN: "
            f"create the network with --ipam-driver ovs --ipam-opt {OVN_SWITCH}={switch}"
        )
    if ovn:
        for key in LOCAL_ONLY:
            if key in generic:
                raise OptionError(
                    f"{key} cannot be used on an OVN network: its ports are on the "
                    "OVN integration bridge"
                )
    return ovn, switch, MTU_KEY in generic


def parse_network(network_id, options, ipv4_data, ipv6_data, default_datapath):
    """Validate CreateNetwork's fields into a `Network`; raise OptionError."""
    check_id("NetworkID", network_id)
    options = options or {}
    if not isinstance(options, dict):
        raise OptionError("Options must be an object")
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise OptionError(f"{GENERIC} must be an object of strings")
    for key, value in generic.items():
        if key.startswith("ovs.") and key not in NETWORK_OPTIONS:
            known = ", ".join(k for k in NETWORK_OPTIONS if k.startswith("ovs."))
            raise OptionError(f"unknown option {key!r}: the ovs driver knows {known}")
        if key.startswith(BRIDGE_PREFIX) and key not in NETWORK_OPTIONS:
            raise OptionError(
                f"{key} is an option of Docker's bridge driver that the ovs driver does "
                f"not have (it has {ICC_KEY}, {MASQUERADE_KEY} and {HOST_BINDING_KEY}, and "
                "its own ovs.* options: see its README)"
            )
        if key in NETWORK_OPTIONS and not isinstance(value, str):
            raise OptionError(f"{key} must be given as a string, got {value!r}")

    fields = {"network_id": network_id, "datapath_type": default_datapath}
    if "ovs.bridge" in generic:
        fields["bridge"] = check_ifname("ovs.bridge", generic["ovs.bridge"])
        fields["shared_bridge"] = True
    else:
        fields["bridge"] = bridge_name(network_id)
    if "ovs.vlan" in generic:
        fields["vlan"] = _int_option("ovs.vlan", generic["ovs.vlan"], 1, 4094)
    if "ovs.uplink" in generic:
        fields["uplink"] = check_ifname("ovs.uplink", generic["ovs.uplink"])
    if "ovs.port_type" in generic:
        fields["port_type"] = _choice_option("ovs.port_type", generic["ovs.port_type"], PORT_TYPES)
    if MTU_KEY in generic:
        fields["mtu"] = _int_option(MTU_KEY, generic[MTU_KEY], 68, 65535)
    for key in ("ovs.nat", MASQUERADE_KEY):
        if key in generic:
            nat = _bool_option(key, generic[key])
            if fields.setdefault("nat", nat) != nat:
                raise OptionError(f"ovs.nat and {MASQUERADE_KEY} disagree: give one of them")
    if ICC_KEY in generic:
        fields["icc"] = _bool_option(ICC_KEY, generic[ICC_KEY])
    if HOST_BINDING_KEY in generic:
        fields["host_binding"] = _ipv4_option(HOST_BINDING_KEY, generic[HOST_BINDING_KEY])
    if "ovs.datapath_type" in generic:
        fields["datapath_type"] = _choice_option(
            "ovs.datapath_type", generic["ovs.datapath_type"], DATAPATH_TYPES
        )
    fields["internal"] = options.get("com.docker.network.internal") in (True, "true")
    fields["ipv4"] = _subnets("IPv4Data", ipv4_data, 4)
    fields["ipv6"] = _subnets("IPv6Data", ipv6_data, 6)
    fields["address_space"] = _address_space(ipv4_data, ipv6_data)
    if fields["ipv6"] and fields.get("mtu", IPV6_MIN_MTU) < IPV6_MIN_MTU:
        # The kernel turns IPv6 off on a link below it: the gateway's
        # address would be refused with a bare "Invalid argument".
        raise OptionError(
            f"{MTU_KEY}={generic[MTU_KEY]!r} is below {IPV6_MIN_MTU}, the least IPv6 "
            f"allows: give {IPV6_MIN_MTU} or more, or leave --ipv6 out"
        )
    if fields["internal"]:
        fields["nat"] = False
    return Network(**fields)


PORTMAP_KEY = "com.docker.network.portmap"


@attr.s(frozen=True, slots=True)
class PortRequest:
    """One entry of the engine's portmap: publish container port `port` on a
    host port from `host_port` to `host_port_end` (one port when equal)."""

    proto = attr.ib()  # "tcp", "udp" or "sctp"
    port = attr.ib()
    host_port = attr.ib()
    host_port_end = attr.ib()
    host_ip = attr.ib(default=None)  # normalized; None: every address of both families

    def describe(self):
        """The request as the user wrote it with ``-p``."""
        host = f"{self.host_port}"
        if self.host_port_end != self.host_port:
            host += f"-{self.host_port_end}"
        if self.host_ip is not None:
            ip = ipaddress.ip_address(self.host_ip)
            host = (f"[{ip}]" if ip.version == 6 else str(ip)) + ":" + host
        return f"-p {host}:{self.port}/{self.proto}"


def _portmap_port(what, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise OptionError(f"cannot publish {what} {value!r}: use a port from {low} to 65535")
    return value


def parse_portmap(options):
    """The engine's portmap (ProgramExternalConnectivity's Options) as
    `PortRequest` values; raise OptionError, saying what to use instead, for
    what the ovs driver cannot publish."""
    entries = (options or {}).get(PORTMAP_KEY) or []
    if not isinstance(entries, list):
        raise OptionError(f"{PORTMAP_KEY} must be a list")
    requests = {}  # an ordered set: the engine may list one binding twice
    for entry in entries:
        if not isinstance(entry, dict):
            raise OptionError(f"{PORTMAP_KEY} entries must be objects")
        proto = PROTOCOLS.get(entry.get("Proto"))
        if proto is None:
            raise OptionError(
                f"cannot publish protocol {entry.get('Proto')!r}: use tcp, udp or sctp"
            )
        port = _portmap_port("container port", entry.get("Port"))
        host_port = _portmap_port("host port", entry.get("HostPort") or 0, 0)
        host_port_end = _portmap_port("host port", entry.get("HostPortEnd") or 0, 0)
        if not host_port:
            raise OptionError(
                f"publish {port}/{proto} on a host port of your choice, e.g. "
                f"-p 8080:{port}/{proto}, or a range, e.g. -p 8000-8100:{port}/{proto}: "
                f"with -p {port} or -P Docker asks the driver to pick one, and the ovs "
                "driver cannot report the port it picks back to the engine"
            )
        if host_port_end and host_port_end < host_port:
            raise OptionError(
                f"cannot publish {port}/{proto} on host ports {host_port}-{host_port_end}: "
                "the range ends before it starts"
            )
        host_ip = entry.get("HostIP") or None
        if host_ip is not None:
            try:
                host_ip = str(ipaddress.ip_address(host_ip))
            except ValueError:
                raise OptionError(f"HostIP {host_ip!r} is not an IP address") from None
        requests[PortRequest(proto, port, host_port, host_port_end or host_port, host_ip)] = None
    return list(requests)


def check_address(field, value, version):
    """An endpoint address from the engine: CIDR of the right family, or None."""
    if not value:
        return None
    try:
        address = ipaddress.ip_interface(value)
    except ValueError:
        address = None
    if address is None or address.version != version or "/" not in value:
        raise OptionError(f"{field} {value!r} is not an IPv{version} address in CIDR form")
    return str(address)
