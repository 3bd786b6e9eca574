"""Which host ports an endpoint publishes.

The engine's portmap (`ovsdriver.options.PortRequest` values) becomes the
`PublishedPort` values the firewall DNATs, per address family: a port
published on every address (``-p 8080:80``) is published on IPv4 and, when
the container has an IPv6 address, on IPv6; a host port range with one
container port (``-p 8000-8010:80``) takes the first port of the range that
no other endpoint publishes and no program uses, as Docker does. A port
another endpoint already publishes on an overlapping address is refused:
its DNAT rule would win silently. So is one a program on the host uses
(`ovsdriver.hostports`). The caller serialises `publish` with recording the
result, so two endpoints asking at the same moment cannot both get one port.
"""

import collections
import ipaddress

from ovsdriver.values import InvalidValue, PublishedPort


class PortUnavailable(InvalidValue):
    """A port cannot be published; the message says why and what to do."""


class PortTaken(PortUnavailable):
    """Other endpoints publish the port (orphans, perhaps, not collected yet)."""


def _family(address):
    return ipaddress.ip_address(address).version


def overlaps(mine, theirs):
    """Whether two published ports would catch the same packets."""
    return (
        (mine.proto, mine.host_port) == (theirs.proto, theirs.host_port)
        and _family(mine.container_ip) == _family(theirs.container_ip)
        and (None in (mine.host_ip, theirs.host_ip) or mine.host_ip == theirs.host_ip)
    )


def _targets(request, ipv4, ipv6, requests):
    """[(host_ip or None, container_ip)] of one request, per family."""
    if request.host_ip is None:
        targets = [(None, ip) for ip in (ipv4, ipv6) if ip]
        if not targets:
            raise PortUnavailable(
                f"cannot publish {request.describe()}: the container has no IP address "
                "on this network"
            )
        return targets
    host = ipaddress.ip_address(request.host_ip)
    host_ip = None if host.is_unspecified else str(host)
    if host.version == 4:
        if not ipv4:
            raise PortUnavailable(
                f"cannot publish {request.describe()}: the container has no IPv4 address "
                "on this network; publish on an IPv6 address of the host instead"
            )
        return [(host_ip, ipv4)]
    if host == ipaddress.ip_address("::1"):
        raise PortUnavailable(
            f"cannot publish {request.describe()}: the kernel cannot forward ::1 to a "
            "container; publish on 127.0.0.1 or on an IPv6 address of the host"
        )
    if not ipv6:
        if host.is_unspecified and any(
            (r.proto, r.port, r.host_port, r.host_port_end)
            == (request.proto, request.port, request.host_port, request.host_port_end)
            and (r.host_ip is None or ipaddress.ip_address(r.host_ip).version == 4)
            for r in requests
        ):
            return []  # the same binding listed for IPv4 too: that one serves
        raise PortUnavailable(
            f"cannot publish {request.describe()}: the container has no IPv6 address on "
            "this network; create the network with --ipv6, or publish on an IPv4 address"
        )
    return [(host_ip, ipv6)]


def publish(requests, ipv4, ipv6, taken, in_use=lambda port: None):
    """The `PublishedPort` values of an endpoint with addresses *ipv4* and
    *ipv6* (plain IPs or None) asking for *requests*; *taken* lists
    ``(endpoint_id, PublishedPort)`` of every other endpoint; *in_use* says
    why a port cannot be had though no endpoint publishes it (or None).
    Raises PortUnavailable. Ports are compared within their (protocol, host
    port) only, so a range of thousands costs thousands of steps, not
    millions."""
    theirs = collections.defaultdict(list)  # (proto, host port) -> [(owner, port)]
    for owner, port in taken:
        theirs[port.proto, port.host_port].append((owner, port))
    mine = collections.defaultdict(list)  # the same, of *published*
    published = []
    for request in requests:
        targets = _targets(request, ipv4, ipv6, requests)
        if not targets:
            continue
        chosen, holder, busy = None, None, None
        for host_port in range(request.host_port, request.host_port_end + 1):
            candidates = [
                PublishedPort(request.proto, host_port, cip, request.port, host_ip)
                for host_ip, cip in targets
            ]
            near = (request.proto, host_port)
            holder = next(
                (
                    owner
                    for owner, port in theirs[near]
                    for candidate in candidates
                    if overlaps(candidate, port)
                ),
                None,
            )
            clash = any(overlaps(c, p) and c != p for c in candidates for p in mine[near])
            if holder is None and not clash:
                busy = next(filter(None, map(in_use, candidates)), None)
                if busy is None:
                    chosen = candidates
                    break
        if chosen is None:
            if request.host_port == request.host_port_end and busy:
                raise PortUnavailable(f"cannot publish {request.describe()}: {busy}")
            if request.host_port == request.host_port_end:
                who = f"endpoint {holder[:12]}" if holder else "this container"
                raise PortTaken(
                    f"cannot publish {request.describe()}: host port "
                    f"{request.host_port}/{request.proto} is already published by {who}; "
                    "choose another host port"
                )
            raise PortTaken(
                f"cannot publish {request.describe()}: every host port from "
                f"{request.host_port} to {request.host_port_end} is already published "
                "or in use by another program; "
                "choose a wider or another range"
            )
        for port in chosen:
            if port not in mine[port.proto, port.host_port]:
                mine[port.proto, port.host_port].append(port)
                published.append(port)
    return tuple(published)
