"""Health rules for ``ovsdriver status``: what OVSDB, the kernel, the firewall
and the engine say, judged network by network and endpoint by endpoint.

Everything here is pure: `observe` gathers `Facts` (blocking reads a CLI may
do), `assess` turns them into a `Report` of what each network and endpoint
looks like and what is wrong with it. A *problem* makes the driver's world
unhealthy (the CLI exits non-zero); a *warning* says something could not be
checked (no iptables, no access to the engine) and does not.
"""

import functools
import ipaddress

import attr

from ovsdriver import firewall
from ovsdriver.sandboxes import MISSING, MOUNTED
from ovsdriver.sandboxes import PLAIN as UNMOUNTED
from ovsdriver.vswitch import (
    gateway_ifname,
    gateway_port_name,
    host_clash,
    leftover_remedy,
    port_name,
    routed,
    veth_host_name,
)

#: An endpoint nobody joined this long after its creation is an orphan (the
#: reconciler's default grace, see ovsdriver.reconcile).
UNJOINED_GRACE = 20.0

# -- what is observed -------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class InterfaceFacts:
    """What OVSDB says about the interface of one port."""

    name = attr.ib()
    ofport = attr.ib(default=None)  # None: ovs-vswitchd has not handled it (yet)
    error = attr.ib(default=None)  # the Interface's error column


@attr.s(frozen=True, slots=True)
class NetworkFacts:
    """One ``ovsdriver-network-<id>`` record on a bridge, read or not."""

    network_id = attr.ib()
    bridge = attr.ib()  # the name of the bridge row holding the record
    network = attr.ib(default=None)  # a values.Network, None when unreadable
    unreadable = attr.ib(default=None)  # why the record cannot be read
    #: The bridge's ports the driver made that are not endpoints (its local
    #: port, gateway ports, uplinks): name -> InterfaceFacts.
    ports = attr.ib(factory=dict)


@attr.s(frozen=True, slots=True)
class EndpointFacts:
    """One endpoint port in OVSDB, read or not."""

    endpoint_id = attr.ib()
    network_id = attr.ib()
    bridge = attr.ib()
    interface = attr.ib()  # InterfaceFacts of the port
    endpoint = attr.ib(default=None)  # a values.Endpoint (None: nothing readable)
    unreadable = attr.ib(default=(), converter=tuple)  # a problem per value that cannot be read
    ids = attr.ib(factory=dict)  # the Interface's raw external_ids, to show what can be shown


@attr.s(frozen=True, slots=True)
class SandboxFacts:
    """What is at a sandbox's path (sandboxes.probe) and its links."""

    state = attr.ib()  # MOUNTED, UNMOUNTED, MISSING or INVISIBLE
    links = attr.ib(default=None)  # tuple of netlink.LinkInfo, None when not read
    error = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class EngineEndpoint:
    """An endpoint as the engine lists it under a network's containers."""

    endpoint_id = attr.ib()
    container = attr.ib()  # the container's name
    mac = attr.ib(default=None)
    ipv4 = attr.ib(default=None)
    ipv6 = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class EngineNetwork:
    network_id = attr.ib()
    name = attr.ib()
    driver = attr.ib()
    endpoints = attr.ib(default=(), converter=tuple)  # EngineEndpoint values


@attr.s(frozen=True, slots=True)
class Facts:
    """Everything `assess` judges."""

    networks = attr.ib(converter=tuple)  # NetworkFacts
    endpoints = attr.ib(converter=tuple)  # EndpointFacts
    now = attr.ib()  # seconds since the epoch
    links = attr.ib(default=None)  # name -> netlink.LinkInfo of this namespace, None: unread
    sandboxes = attr.ib(factory=dict)  # path -> SandboxFacts
    firewall = attr.ib(default=None)  # family -> iptables-save text; None: unread
    engine = attr.ib(default=None)  # network id -> EngineNetwork; None: not asked
    driver_name = attr.ib(default="ovs")  # whose engine networks are ours
    vswitchd_behind = attr.ib(default=False)  # cur_cfg < next_cfg
    warnings = attr.ib(default=(), converter=tuple)  # what could not be read


# -- what is reported ------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class EndpointReport:
    endpoint_id = attr.ib()
    container = attr.ib(default=None)
    port = attr.ib(default=None)
    ofport = attr.ib(default=None)
    mac = attr.ib(default=None)
    addresses = attr.ib(default=(), converter=tuple)
    sandbox = attr.ib(default=None)
    sandbox_state = attr.ib(default=None)
    link = attr.ib(default=None)  # e.g. "eth0 up" (in the container) or "oep-... down"
    published = attr.ib(default=(), converter=tuple)  # "8080->10.1.0.2:80/tcp"
    problems = attr.ib(default=(), converter=tuple)

    @property
    def healthy(self):
        return not self.problems


@attr.s(frozen=True, slots=True)
class NetworkReport:
    network_id = attr.ib()
    name = attr.ib(default=None)  # the engine's name for it
    bridge = attr.ib(default=None)
    vlan = attr.ib(default=None)
    uplink = attr.ib(default=None)
    port_type = attr.ib(default=None)
    subnets = attr.ib(default=(), converter=tuple)  # "10.1.0.0/24 gateway 10.1.0.1"
    flags = attr.ib(default=(), converter=tuple)  # "nat", "internal", "shared bridge"
    problems = attr.ib(default=(), converter=tuple)
    endpoints = attr.ib(default=(), converter=tuple)  # EndpointReport values

    @property
    def healthy(self):
        return not self.problems and all(e.healthy for e in self.endpoints)


@attr.s(frozen=True, slots=True)
class Report:
    networks = attr.ib(converter=tuple)
    problems = attr.ib(default=(), converter=tuple)  # not tied to one network
    warnings = attr.ib(default=(), converter=tuple)

    @property
    def healthy(self):
        return not self.problems and all(n.healthy for n in self.networks)

    def count_problems(self):
        return (
            len(self.problems)
            + sum(len(n.problems) for n in self.networks)
            + sum(len(e.problems) for n in self.networks for e in n.endpoints)
        )

    def to_json(self):
        """A plain dict for ``--json``: the report plus ``healthy`` flags."""

        def network(n):
            record = attr.asdict(n, recurse=False)
            record["endpoints"] = [dict(attr.asdict(e), healthy=e.healthy) for e in n.endpoints]
            record["healthy"] = n.healthy
            return record

        return {
            "healthy": self.healthy,
            "networks": [network(n) for n in self.networks],
            "problems": list(self.problems),
            "warnings": list(self.warnings),
        }


# -- the rules -------------------------------------------------------------------


def assess(facts):
    """Judge `facts`: a `Report` with every problem found."""
    engine = facts.engine or {}
    networks = {n.network_id: n for n in facts.networks}
    by_network = {}
    for ep in facts.endpoints:
        by_network.setdefault(ep.network_id, []).append(ep)
    ids = set(networks) | set(by_network)
    ids |= {i for i, n in engine.items() if n.driver == facts.driver_name}
    reports = [
        _network_report(facts, network_id, networks.get(network_id), by_network.get(network_id))
        for network_id in ids
    ]
    reports.sort(key=lambda r: (r.name is None, r.name or "", r.network_id or ""))
    warnings = list(facts.warnings)
    if facts.vswitchd_behind:
        warnings.append(
            "ovs-vswitchd has not applied OVSDB's latest configuration yet "
            "(cur_cfg < next_cfg); is ovs-vswitchd running?"
        )
    return Report(reports, _firewall_problems(facts), warnings)


def _network_report(facts, network_id, found, endpoint_facts):
    engine = (facts.engine or {}).get(network_id)
    problems = []
    fields = {"network_id": network_id, "name": engine.name if engine else None}
    network = found.network if found else None
    if found is None:
        if endpoint_facts:
            problems.append(
                "no bridge records this network, yet Open vSwitch has endpoint ports of it"
            )
        else:
            problems.append(
                "the engine has this network but no bridge in Open vSwitch records it "
                "(was its bridge deleted?); remove it with 'docker network rm' and create it again"
            )
    elif network is None:
        fields["bridge"] = found.bridge
        problems.append(found.unreadable)
    else:
        fields.update(
            bridge=found.bridge,
            vlan=network.vlan,
            uplink=network.uplink,
            port_type=network.port_type,
            subnets=[_subnet(s) for s in tuple(network.ipv4) + tuple(network.ipv6)],
            flags=_flags(network),
        )
        problems += _check_network(facts, found, network)
    if facts.engine is not None and engine is None and found is not None:
        problems.append(
            "the engine has no such network: it is left over in Open vSwitch "
            "(the driver may have missed its DeleteNetwork)"
            + (f"; remove what is left of it: {leftover_remedy(network)}" if network else "")
        )
    endpoints = [_endpoint_report(facts, ep, network) for ep in endpoint_facts or ()]
    known = {ep.endpoint_id for ep in endpoint_facts or ()}
    container_of = {e.endpoint_id: e.container for e in (engine.endpoints if engine else ())}
    endpoints = [attr.evolve(e, container=container_of.get(e.endpoint_id)) for e in endpoints]
    for missing in engine.endpoints if engine else ():
        if missing.endpoint_id not in known:
            endpoints.append(_missing_endpoint(missing, network))
    endpoints.sort(key=lambda e: (e.container is None, e.container or "", e.endpoint_id))
    return NetworkReport(problems=problems, endpoints=endpoints, **fields)


def _subnet(subnet):
    if subnet.gateway:
        return f"{subnet.pool} gateway {subnet.gateway_ip}"
    return subnet.pool


def _flags(network):
    flags = []
    if network.internal:
        flags.append("internal")
    elif network.nat:
        flags.append("nat")
    else:
        flags.append("routed")
    if network.shared_bridge:
        flags.append("shared bridge")
    if not network.icc:
        flags.append("no traffic between its containers")
    if network.host_binding:
        flags.append(f"ports published on {network.host_binding} by default")
    return flags


def _check_network(facts, found, network):
    # vswitch's reader has checked every value; only where it sits is left.
    if network.bridge != found.bridge:
        return [f"its record is on bridge {found.bridge} but names bridge {network.bridge}"]
    problems = []
    for _, iface in sorted(found.ports.items()):
        problems += _interface_problems(iface)
    if network.shared_bridge and network.gateways:
        name = gateway_port_name(network.network_id)
        if name not in found.ports:
            problems.append(f"its gateway port {name} is missing from bridge {found.bridge}")
    if network.uplink and network.uplink not in found.ports:
        problems.append(f"its uplink {network.uplink} is not a port of bridge {found.bridge}")
    if network.gateways and facts.links is not None:
        problems += _gateway_problems(facts.links, gateway_ifname(network), network.gateways)
        # A host interface that came up later with an overlapping subnet.
        networks = [n.network for n in facts.networks if n.network]
        clash = host_clash(routed(network), facts.links.values(), networks)
        if clash:
            problems.append(f"its {clash}: the host routes it to one of them only")
    problems += _network_firewall_problems(facts.firewall, network)
    return problems


def _interface_problems(iface):
    if iface.error:
        return [f"Open vSwitch reports an error on port {iface.name}: {iface.error}"]
    if iface.ofport == -1:
        return [f"ovs-vswitchd could not add port {iface.name} (ofport -1)"]
    if iface.ofport is None:
        return [f"ovs-vswitchd has not set up port {iface.name} (no ofport); is it running?"]
    return []


def _gateway_problems(links, ifname, gateways):
    link = links.get(ifname)
    if link is None:
        return [f"its gateway interface {ifname} is missing from the kernel"]
    problems = []
    if not link.up:
        problems.append(f"its gateway interface {ifname} is down")
    have = {str(ipaddress.ip_interface(a)) for a in link.addresses}
    for gateway in gateways:
        if str(ipaddress.ip_interface(gateway)) not in have:
            problems.append(f"its gateway interface {ifname} lacks the address {gateway}")
    return problems


def _endpoint_report(facts, ep, network):
    ids = ep.ids
    fields = {
        "endpoint_id": ep.endpoint_id,
        "port": ep.interface.name,
        "ofport": ep.interface.ofport,
    }
    problems = _interface_problems(ep.interface)
    if ep.unreadable or ep.endpoint is None:
        # Show the values as recorded; judge nothing that rests on them.
        fields.update(
            mac=ids.get("attached-mac"),
            addresses=[a for a in (ids.get("ovsdriver-ipv4"), ids.get("ovsdriver-ipv6")) if a],
            sandbox=ids.get("ovsdriver-sandbox"),
        )
        return EndpointReport(problems=[*ep.unreadable, *problems], **fields)
    endpoint = ep.endpoint
    fields.update(
        mac=endpoint.mac,
        addresses=[a for a in (endpoint.ipv4, endpoint.ipv6) if a],
        sandbox=endpoint.sandbox,
        published=[_published(p) for p in endpoint.published],
    )
    if endpoint.mac is None:  # vswitch's reader checked the values that are there
        problems.append(f"interface {ep.interface.name} has no external_ids:attached-mac")
        return EndpointReport(problems=problems, **fields)
    if network is not None and endpoint.bridge != network.bridge:
        problems.append(f"its port is on bridge {ep.bridge}, not on its network's {network.bridge}")
    if endpoint.published and not (network is not None and network.internal):
        problems += _published_firewall_problems(facts.firewall, endpoint)
    sandbox = facts.sandboxes.get(endpoint.sandbox) if endpoint.sandbox else None
    if sandbox is not None:
        fields["sandbox_state"] = sandbox.state
    link, link_problems = _link(facts, endpoint, sandbox)
    fields["link"] = link
    problems += link_problems
    return EndpointReport(problems=problems, **fields)


def _link(facts, endpoint, sandbox):
    """How the endpoint's kernel link looks, and the problems with it."""
    host = facts.links
    problems = []
    if endpoint.port_type == "veth" and host is not None:
        veth = host.get(endpoint.port)
        if veth is None:
            problems.append(f"the host end {endpoint.port} of its veth is missing")
        elif not veth.up:
            problems.append(f"the host end {endpoint.port} of its veth is down")
    if endpoint.sandbox is None:
        age = facts.now - endpoint.created if endpoint.created is not None else 0
        if age >= UNJOINED_GRACE:
            problems.append(
                f"not joined to any container {age:.0f} s after its creation "
                "(an orphan: the running driver removes it)"
            )
        if host is None:
            return None, problems
        link = host.get(endpoint.ifname)
        if link is None:
            problems.append(f"its link {endpoint.ifname} is missing from the kernel")
            return "missing", problems
        return f"{endpoint.ifname} {_state(link)}", problems
    if sandbox is None:
        return None, problems
    if sandbox.state in (UNMOUNTED, MISSING):
        problems.append(
            f"its sandbox {endpoint.sandbox} is gone: the container no longer exists "
            "(the running driver removes the endpoint)"
        )
        return None, problems
    if sandbox.state != MOUNTED or sandbox.links is None:
        return None, problems  # INVISIBLE or unreadable: a warning says so
    mac = (endpoint.mac or "").lower()
    link = next((link for link in sandbox.links if link.mac == mac), None)
    if link is None:
        if host is not None and endpoint.ifname in host:
            problems.append(
                f"its link {endpoint.ifname} is in the host, not in its container "
                "(after an ovs-vswitchd restart the running driver moves it back)"
            )
        else:
            problems.append(f"its container has no link with MAC {endpoint.mac}")
        return "missing", problems
    if not link.up or not link.carrier:
        problems.append(
            f"its link {link.name} in the container is {_state(link)}"
            + (" (a dead copy after an ovs-vswitchd restart?)" if link.up else "")
        )
    return f"{link.name} {_state(link)}", problems


def _state(link):
    if not link.up:
        return "down"
    return "up" if link.carrier else "up, no carrier"


def _published(port):
    host = f"{port.host_ip}:" if port.host_ip else ""
    return f"{host}{port.host_port}->{port.container_ip}:{port.container_port}/{port.proto}"


def _missing_endpoint(engine_endpoint, network):
    port = None
    if network is not None:
        eid = engine_endpoint.endpoint_id
        port = veth_host_name(eid) if network.port_type == "veth" else port_name(eid)
    return EndpointReport(
        endpoint_id=engine_endpoint.endpoint_id,
        container=engine_endpoint.container,
        port=port,
        mac=engine_endpoint.mac,
        addresses=[a for a in (engine_endpoint.ipv4, engine_endpoint.ipv6) if a],
        problems=[
            f"its port{' ' + port if port else ''} is missing from Open vSwitch, but the engine "
            "still has the endpoint (deleted behind the driver's back?); restart the container "
            "to plug it in again"
        ],
    )


# -- the firewall ------------------------------------------------------------------


def _families(network):
    return [f for f, pools in ((4, network.ipv4), (6, network.ipv6)) if pools]


def _our_lines(text):
    """The ``-A`` lines of the driver's chains in an iptables-save text: (chain, tokens)."""
    ours = {c for names in firewall.CHAINS[4].values() for c in names}
    for line in text.splitlines():
        tokens = line.replace('"', "").split()
        if len(tokens) > 1 and tokens[0] == "-A" and tokens[1] in ours:
            yield tokens[1], tokens


def _network_firewall_problems(saved, network):
    if saved is None:
        return []
    tag = f"ovsdriver:{network.network_id[:12]}"
    problems = []
    for family in _families(network):
        text = saved.get(family)
        if text is None:
            continue
        if not any(tag in tokens for _, tokens in _our_lines(text)):
            problems.append(f"the firewall has no IPv{family} rules for it (iptables-save)")
    return problems


def _published_firewall_problems(saved, endpoint):
    problems = []
    for port in endpoint.published:
        family = firewall.family_of(port)
        text = (saved or {}).get(family)
        if text is None:
            continue
        address = port.container_ip if family == 4 else f"[{port.container_ip}]"
        if (str(port.host_port), f"{address}:{port.container_port}") not in _dnat_targets(text):
            problems.append(f"the firewall has no DNAT rule publishing {_published(port)}")
    return problems


@functools.lru_cache(maxsize=4)
def _dnat_targets(text):
    """{(host port, destination)} of the driver's DNAT rules in an
    iptables-save text, read once however many ports are published."""
    return frozenset(
        (_after(tokens, "--dport"), _after(tokens, "--to-destination"))
        for chain, tokens in _our_lines(text)
        if chain == firewall.DNAT
    )


def _after(tokens, flag):
    try:
        return tokens[tokens.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def _firewall_problems(facts):
    """Missing chains or jumps of the families some readable network needs."""
    if facts.firewall is None:
        return []
    needed = {f for n in facts.networks if n.network for f in _families(n.network)}
    problems = []
    for family in sorted(needed):
        text = facts.firewall.get(family)
        if text is None:
            continue
        present = firewall.parse_save(text, family)
        for table, names in firewall.CHAINS[family].items():
            for name in names:
                if (table, name) not in present.chains:
                    problems.append(f"the IPv{family} firewall chain {table} {name} is missing")
        jumps = {(t, c, line.split()[-1]) for t, c, line in present.jumps}
        for table, chain, spec in firewall.JUMPS[family]:
            if chain == firewall.DOCKER_STAGE_2 and not present.docker:
                continue  # only when dockerd manages iptables
            if (table, chain, spec[-1]) not in jumps:
                problems.append(
                    f"the IPv{family} firewall has no jump from {table} {chain} to {spec[-1]}"
                )
    return problems
