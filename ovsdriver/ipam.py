"""Docker's remote IPAM driver (``--ipam-driver ovs``), for OVN networks.

The engine shows IPAM only ``--ipam-opt`` and calls it before the network
driver, so the user names the switch here, once: ``--ipam-opt
ovs.ovn.switch=NAME``. The pool id carries the switch (``ovn/NAME/SUBNET``),
the pools are in the address space `ADDRESS_SPACE`, and CreateNetwork then
knows from the address space that the network is an OVN one and finds the
switch this host requested that subnet of. Addresses are claimed in the OVN
Northbound database (see `ovsdriver.northbound`), so no two hosts hand out
the same one. Local networks keep Docker's default IPAM: a request without
``ovs.ovn.switch`` is refused with a message saying so.
"""

import ipaddress
import random
import uuid

from twisted.internet import task
from twisted.logger import Logger

from ovsdriver.northbound import CONFLICT, NorthboundError, check_switch_name
from ovsdriver.ovn import ADDRESS_SPACE, disabled
from ovsdriver.ovsdb import OVSDBUnavailable
from ovsdriver.vswitch import leftover_remedy

log = Logger()

SWITCH_OPTION = "ovs.ovn.switch"
GATEWAY_TYPE = "com.docker.network.gateway"
REQUEST_TYPE = "RequestAddressType"
GATEWAY_DATA = "com.docker.network.gateway"
POOL_PREFIX = "ovn/"
#: Claims lost to another host allocating at the same moment, before giving up.
ATTEMPTS = 20


class IpamError(NorthboundError):
    """An IPAM request cannot be served; the message says why."""


def _check_range(ip_range, subnet):
    """`ip_range` (``--ip-range``) as a CIDR inside `subnet`, or IpamError."""
    try:
        net = ipaddress.ip_network(ip_range, strict=False)
    except ValueError:
        raise IpamError(f"--ip-range {ip_range!r} is not a subnet (e.g. 10.0.0.128/25)") from None
    if net.version != subnet.version or not net.subnet_of(subnet):
        raise IpamError(f"--ip-range {ip_range} is not inside --subnet {subnet}")
    return str(net)


def pool_id(switch, subnet, ip_range=None):
    """The engine keeps only this id of a pool: the switch, the subnet and
    the network's ``--ip-range`` (which is this host's alone)."""
    return f"{POOL_PREFIX}{switch}/{subnet}" + (f"@{ip_range}" if ip_range else "")


def parse_pool_id(value):
    """(switch, subnet, ip range or None) of a pool id made by `pool_id`."""
    if isinstance(value, str) and value.startswith(POOL_PREFIX):
        switch, _, rest = value[len(POOL_PREFIX) :].partition("/")
        subnet, _, ip_range = rest.partition("@")
        try:
            subnet = ipaddress.ip_network(subnet)
            if ip_range and not ipaddress.ip_network(ip_range).subnet_of(subnet):
                raise ValueError(ip_range)
            return check_switch_name(switch), str(subnet), ip_range or None
        except (ValueError, TypeError, NorthboundError):
            pass
    raise IpamError(f"pool {value!r} was not made by the ovs IPAM driver")


async def allocate(reactor, northbound, switch, address, system_id, version=4, within=None):
    """Claim `address` (or the first free one of IP `version`, in the range
    `within` if given) on `switch`; when another host claimed the same
    address at the same moment, look again. Deferred[str]."""
    token = uuid.uuid4().hex
    spread = None
    for attempt in range(ATTEMPTS):
        try:
            return await northbound.claim_address(
                switch, address or None, token, system_id, spread, version, within
            )
        except OVSDBUnavailable as e:
            if CONFLICT not in str(e) or attempt == ATTEMPTS - 1:
                raise
        # Let the winner's claim reach the replica, then choose again, at
        # random so as not to collide with the other host's next choice.
        spread = random.Random(token)
        await task.deferLater(reactor, 0.01 * (attempt + 1), lambda: None)
    raise AssertionError("unreachable")


class Ipam:
    """The IpamDriver methods, over the OVN glue (None without --ovn-nb)."""

    def __init__(self, reactor, ovn):
        self.reactor = reactor
        self.ovn = ovn

    def _ovn(self):
        if self.ovn is None:
            raise disabled()
        return self.ovn

    def capabilities(self):
        # No MAC needed; no replay: the claims live in the Northbound database.
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def address_spaces(self):
        return {
            "LocalDefaultAddressSpace": ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ADDRESS_SPACE,
        }

    async def request_pool(self, space, pool, sub_pool, options, v6):
        options = options or {}
        switch = options.get(SWITCH_OPTION)
        unknown = sorted(k for k in options if k.startswith("ovs.") and k != SWITCH_OPTION)
        if unknown:
            raise IpamError(
                f"unknown IPAM option {unknown[0]!r}: the ovs IPAM driver knows {SWITCH_OPTION}"
            )
        if switch is None:
            raise IpamError(
                "the ovs IPAM driver allocates addresses of OVN networks: give --ipam-opt "
                f"{SWITCH_OPTION}=NAME, or leave --ipam-driver out for a local network"
            )
        check_switch_name(switch)
        version = 6 if v6 else 4
        subnet = None
        if pool:
            try:
                net = ipaddress.ip_network(pool, strict=False)
            except ValueError:
                raise IpamError(f"--subnet {pool!r} is not a subnet") from None
            if net.version != version or net.num_addresses < 4:
                kind = "an IPv6 subnet of at most /126" if v6 else "an IPv4 subnet of at most /30"
                raise IpamError(f"--subnet {pool} must be {kind}")
            subnet = str(net)
            if sub_pool:
                sub_pool = _check_range(sub_pool, net)
        ovn = self._ovn()
        chassis = await ovn.chassis()
        for network in (await ovn.vswitch.networks()).values():
            if network.ovn_switch == switch:
                raise IpamError(
                    f"OVN switch {switch} is already Docker network "
                    f"{network.network_id[:12]} on this host; if the engine no longer has "
                    "that network ('ovsdriver status' says so), remove what is left of it: "
                    + leftover_remedy(network)
                )
        info = await ovn.northbound.request_pool(switch, subnet, chassis.system_id, version)
        subnet, gateway = (info.subnet6, info.gateway6) if v6 else (info.subnet, info.gateway)
        data = {GATEWAY_DATA: gateway} if gateway else {}
        return {"PoolID": pool_id(switch, subnet, sub_pool), "Pool": subnet, "Data": data}

    async def release_pool(self, pool):
        switch, *_ = parse_pool_id(pool)
        ovn = self._ovn()
        chassis = await ovn.chassis()
        # The network's endpoints are gone (the engine refuses to remove it
        # before): give back whatever address of this host's it did not.
        in_use = await ovn.claims_in_use()
        if await ovn.northbound.release_pool(switch, chassis.system_id, in_use):
            log.info("deleted OVN switch {switch}: no host uses it", switch=switch)

    async def request_address(self, pool, address, options):
        switch, subnet, ip_range = parse_pool_id(pool)
        version = ipaddress.ip_network(subnet).version
        ovn = self._ovn()
        if (options or {}).get(REQUEST_TYPE) == GATEWAY_TYPE:
            return await ovn.northbound.set_gateway(switch, address or None, version)
        chassis = await ovn.chassis()
        return await allocate(
            self.reactor, ovn.northbound, switch, address, chassis.system_id, version, ip_range
        )

    async def release_address(self, pool, address):
        switch, *_ = parse_pool_id(pool)
        ovn = self._ovn()
        info = await ovn.northbound.switch(switch)
        ip = ipaddress.ip_interface(address).ip
        gateways = (info.gateway, info.gateway6) if info is not None else ()
        if any(g and ipaddress.ip_interface(g).ip == ip for g in gateways):
            return  # the switch's gateways stay as long as the switch
        await ovn.northbound.release_address(switch, address)
