"""Packet filtering and NAT for the driver's networks (iptables).

STUB: being implemented. The driver calls `Firewall.apply` with the complete
desired state after every change; the firewall makes its own chains say exactly
that, atomically, and never touches rules it does not own.
"""

import attr
from twisted.internet import defer


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


class Firewall:
    """The driver's iptables chains."""

    def __init__(self, reactor):
        self.reactor = reactor

    def apply(self, networks):
        return defer.succeed(None)
