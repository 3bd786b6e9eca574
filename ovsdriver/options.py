"""Docker's CreateNetwork options turned into a typed, validated network config.

The engine hands options over as strings (under ``com.docker.network.generic``)
and never replays CreateNetwork, so everything a network needs later is parsed
here once, checked, and recorded in OVSDB as a `Network`.
"""

import ipaddress

from ovsdriver.values import (
    HEX_ID,
    PROTOCOLS,
    InvalidValue,
    Network,
    PublishedPort,
    Subnet,
    check_ifname,
)

GENERIC = "com.docker.network.generic"
MTU_KEY = "com.docker.network.driver.mtu"
PORT_TYPES = ("internal", "veth")
DATAPATH_TYPES = ("system", "netdev")


class OptionError(InvalidValue):
    """A network or endpoint option is invalid; the message names it."""


def bridge_name(network_id):
    """The bridge of a network that did not name one: 'obr-' + 11 hex digits."""
    return "obr-" + network_id[:11]


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


#: The driver's own option keys and how each is checked.
NETWORK_OPTIONS = {
    "ovs.bridge": "bridge name (at most 15 characters)",
    "ovs.vlan": "1-4094",
    "ovs.uplink": "host interface name",
    "ovs.port_type": "internal or veth",
    MTU_KEY: "68-65535",
    "ovs.nat": "true or false",
    "ovs.datapath_type": "system or netdev",
}


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
    if "ovs.nat" in generic:
        fields["nat"] = _bool_option("ovs.nat", generic["ovs.nat"])
    if "ovs.datapath_type" in generic:
        fields["datapath_type"] = _choice_option(
            "ovs.datapath_type", generic["ovs.datapath_type"], DATAPATH_TYPES
        )
    fields["internal"] = options.get("com.docker.network.internal") in (True, "true")
    fields["ipv4"] = _subnets("IPv4Data", ipv4_data, 4)
    fields["ipv6"] = _subnets("IPv6Data", ipv6_data, 6)
    if fields["internal"]:
        fields["nat"] = False
    return Network(**fields)


PORTMAP_KEY = "com.docker.network.portmap"


def parse_portmap(options, container_ip):
    """The engine's portmap (ProgramExternalConnectivity's Options) as
    `PublishedPort` values; raise OptionError for what cannot be published."""
    entries = (options or {}).get(PORTMAP_KEY) or []
    if not isinstance(entries, list):
        raise OptionError(f"{PORTMAP_KEY} must be a list")
    published = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise OptionError(f"{PORTMAP_KEY} entries must be objects")
        proto = PROTOCOLS.get(entry.get("Proto"))
        port, host_port = entry.get("Port"), entry.get("HostPort")
        if proto is None:
            raise OptionError(
                f"cannot publish protocol {entry.get('Proto')!r}: use tcp, udp or sctp"
            )
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise OptionError(f"cannot publish container port {port!r}")
        if not host_port:
            raise OptionError(
                f"publish {port}/{proto} with an explicit host port (-p HOST_PORT:{port}): "
                "the ovs driver does not pick host ports"
            )
        if not isinstance(host_port, int) or not 1 <= host_port <= 65535:
            raise OptionError(f"cannot publish on host port {host_port!r}")
        host_ip = entry.get("HostIP") or None
        if host_ip is not None:
            try:
                host_ip = str(ipaddress.ip_address(host_ip))
            except ValueError:
                raise OptionError(f"HostIP {host_ip!r} is not an IP address") from None
            if ipaddress.ip_address(host_ip).is_unspecified:
                host_ip = None
            elif ipaddress.ip_address(host_ip).version == 6:
                raise OptionError(
                    f"cannot publish on the IPv6 address {host_ip}: the ovs driver "
                    "publishes ports on IPv4 addresses only"
                )
        published.append(PublishedPort(proto, host_port, container_ip, port, host_ip))
    return published


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
