"""OVN networks: the network kind whose switch lives in the OVN Northbound
database and whose ports sit on this host's integration bridge.

A local network is a bridge of its own; an OVN network is a Logical_Switch
shared by every host (see `ovsdriver.northbound`). On this host it is:

- its endpoints: internal ports on the integration bridge (Open_vSwitch
  ``external_ids:ovn-bridge``, default ``br-int``) whose ``iface-id`` names the
  endpoint's logical port (bound to this chassis with requested-chassis); Join
  returns once ovn-controller marked the Interface ``ovn-installed``;
- its gateway: an internal port ``ogw-*`` on the integration bridge bound to
  the switch's ``localport`` (same MAC and address on every host, never
  tunnelled), holding the gateway address, so that NAT, isolation and ``-p``
  work on each host as for a local network;
- its MTU: the encapsulation interface's (the one holding ``ovn-encap-ip``)
  less Geneve's 58 bytes (78 over IPv6), unless the user gave one.
"""

import ipaddress

import attr
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from ovsdriver.northbound import SYSTEM_ID, NorthboundError, claim_name
from ovsdriver.ovsdb import by_name

log = Logger()

GENEVE_OVERHEAD = {4: 58, 6: 78}
DEFAULT_BRIDGE = "br-int"
#: The address space the ovs IPAM reports: CreateNetwork's IPv4Data says
#: through it that a network's pool came from OVN.
ADDRESS_SPACE = "OVN"
INSTALL_TIMEOUT = 20.0
POLL_INTERVAL = 0.02


class OVNDisabled(NorthboundError):
    """An OVN network was asked of a driver started without --ovn-nb."""


def disabled():
    return OVNDisabled(
        "OVN networks are off: start the driver with --ovn-nb REMOTE (the OVN Northbound "
        "database, e.g. tcp:CENTRAL:6641 or unix:/var/run/ovn/ovnnb_db.sock)"
    )


@attr.s(frozen=True, slots=True)
class ChassisSettings:
    """This host as ovn-controller is configured in the local Open_vSwitch row."""

    system_id = attr.ib()
    bridge = attr.ib()
    encap_ip = attr.ib()


def _settings(idl):
    root = next(iter(idl.tables["Open_vSwitch"].rows.values()), None)
    ids = dict(root.external_ids) if root is not None else {}
    encap = ids.get("ovn-encap-ip", "").split(",")[0].strip() or None
    return ChassisSettings(ids.get("system-id"), ids.get("ovn-bridge") or DEFAULT_BRIDGE, encap)


def encap_mtu(links, encap_ip):
    """The MTU containers get across Geneve tunnels from `encap_ip`, or None
    when no link holds that address."""
    ip = ipaddress.ip_address(encap_ip)
    for link in links:
        if any(ipaddress.ip_interface(a).ip == ip for a in link.addresses):
            return link.mtu - GENEVE_OVERHEAD[ip.version]
    return None


class OVN:
    """OVN networks on this host: the Northbound database and the local chassis."""

    def __init__(self, reactor, northbound, vswitch, netlink):
        self.reactor = reactor
        self.northbound = northbound
        self.vswitch = vswitch
        self.netlink = netlink

    async def chassis(self):
        settings = await self.vswitch.ovsdb.query(_settings)
        if not settings.system_id:
            raise NorthboundError(
                "Open vSwitch has no external_ids:system-id: configure this host as an "
                "OVN chassis (ovs-vsctl set open . external_ids:system-id=NAME ...)"
            )
        return settings

    async def default_mtu(self, settings):
        if settings.encap_ip:
            try:
                mtu = encap_mtu(await self.netlink.host_links(), settings.encap_ip)
            except Exception as e:
                log.warn("cannot read the MTU of the OVN encap interface: {e}", e=e)
                mtu = None
            if mtu is not None:
                return mtu
        log.warn(
            "no interface holds ovn-encap-ip {ip}; assuming a 1500-byte underlay",
            ip=settings.encap_ip,
        )
        return 1500 - GENEVE_OVERHEAD[4]

    async def switch_for(self, settings, pool):
        """The switch this host requested the pool `pool` of (RequestPool)."""
        for switch in await self.northbound.switches():
            if switch.subnet == pool and switch.host(settings.system_id) is not None:
                return switch
        raise NorthboundError(
            f"no OVN switch of this host has subnet {pool}: create the network with "
            "--ipam-driver ovs --ipam-opt ovs.ovn.switch=NAME"
        )

    # -- networks ----------------------------------------------------------------

    async def prepare_network(self, network, switch_option, mtu_given):
        """The OVN network `network` as this host plugs it in."""
        settings = await self.chassis()
        if not network.ipv4:
            raise NorthboundError("an OVN network needs an IPv4 pool from --ipam-driver ovs")
        switch = await self.switch_for(settings, network.ipv4[0].pool)
        if switch_option and switch_option != switch.name:
            raise NorthboundError(
                f"-o ovs.ovn.switch={switch_option} does not match --ipam-opt "
                f"ovs.ovn.switch={switch.name}; name the switch once, with --ipam-opt"
            )
        pool6 = network.ipv6[0].pool if network.ipv6 else None
        if pool6 != switch.subnet6:
            raise NorthboundError(
                f"OVN switch {switch.name} has IPv6 subnet {switch.subnet6}: create the "
                "network with --ipv6 (its IPv6 subnet comes from the switch)"
                if switch.subnet6
                else f"OVN switch {switch.name} is IPv4 only: leave --ipv6 out"
            )
        held = switch.host(settings.system_id)
        # A network this host no longer has (its record removed by hand after
        # a `docker network rm` the driver missed) holds the switch no more.
        if held not in (None, "pending", network.network_id) and held in (
            await self.vswitch.networks()
        ):
            raise NorthboundError(
                f"OVN switch {switch.name} is already Docker network {held[:12]} on this host"
            )
        fields = {
            "bridge": settings.bridge,
            "shared_bridge": True,
            "ovn_switch": switch.name,
        }
        if not mtu_given:
            fields["mtu"] = await self.default_mtu(settings)
        return attr.evolve(network, **fields)

    async def network_created(self, network):
        settings = await self.chassis()
        await self.northbound.attach_network(
            network.ovn_switch, settings.system_id, network.network_id
        )

    # -- endpoints ---------------------------------------------------------------

    async def bind_endpoint(self, network, endpoint):
        """Make the endpoint's logical port; the endpoint with its iface-id."""
        if not endpoint.ipv4:
            raise NorthboundError(
                "an endpoint of an OVN network needs an address from --ipam-driver ovs"
            )
        settings = await self.chassis()
        port = await self.northbound.bind_port(
            network.ovn_switch,
            endpoint.ipv4,
            endpoint.mac,
            network.network_id,
            endpoint.endpoint_id,
            settings.system_id,
            endpoint.ipv6,
        )
        return attr.evolve(endpoint, iface_id=port)

    async def unbind_endpoint(self, endpoint):
        if endpoint.iface_id:
            await self.northbound.unbind_port(endpoint.iface_id, endpoint.endpoint_id)

    async def claims_in_use(self):
        """The names of the claims (logical ports) this host's endpoints use:
        each one's IPv4 claim, its port, and its IPv6 claim, a bare one."""
        networks = await self.vswitch.networks()
        used = set()
        for ep in await self.vswitch.endpoints():
            switch = getattr(networks.get(ep.network_id), "ovn_switch", None)
            if ep.iface_id:
                used.add(ep.iface_id)
            if ep.ipv6 and switch:
                used.add(claim_name(switch, ipaddress.ip_interface(ep.ipv6).ip))
        return used

    async def wait_installed(self, endpoint, timeout=INSTALL_TIMEOUT):
        """Return once ovn-controller has installed the endpoint's port."""
        deadline = self.reactor.seconds() + timeout
        while True:
            installed = await self.vswitch.ovsdb.query(lambda idl: _installed(idl, endpoint.port))
            if installed:
                return
            if self.reactor.seconds() >= deadline:
                raise NorthboundError(
                    f"ovn-controller did not install port {endpoint.port} (logical port "
                    f"{endpoint.iface_id}) within {timeout:g} s; is ovn-controller running "
                    "and connected to the OVN Southbound database?"
                )
            await task.deferLater(self.reactor, POLL_INTERVAL, lambda: None)


def _installed(idl, port):
    iface = by_name(idl, "Interface", port)
    return iface is not None and dict(iface.external_ids).get("ovn-installed") == "true"


class ClaimCollector(service.Service):
    """Give back this host's orphaned addresses in the Northbound database.

    The engine does not always release an address: after a crash of its own
    it drops stale endpoints without any call, and the reconciler then removes
    their ports here. A claim (logical port) made by this host (its
    ``system-id``) that no local endpoint uses for `grace` seconds, as seen by
    this process, is such an orphan: the engine uses a claim within
    milliseconds of making it (RequestAddress, then CreateEndpoint). Other
    hosts' claims are theirs to collect.

    Likewise this host's mark on a switch that no local Docker network uses
    for `grace` seconds (its ReleasePool was lost, as when the Northbound
    database was down during ``docker network rm``) is removed, and with it
    the switch when no host uses it any more.
    """

    def __init__(self, reactor, ovn, interval=10.0, grace=60.0, clock=None):
        self.reactor = reactor
        self.ovn = ovn
        self.interval = interval
        self.grace = grace
        self.clock = clock or reactor.seconds
        self._unused_since = {}  # claim name -> when first seen unused
        self._loop = None
        self._last_error = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self._pass)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def _safe_pass(self):
        try:
            await self.collect()
            self._last_error = None
        except Exception as e:
            if str(e) != self._last_error:  # say it once, not every pass
                log.warn("cannot collect orphaned OVN addresses: {e}", e=e)
            self._last_error = str(e)

    def _pass(self):
        return defer.ensureDeferred(self._safe_pass())

    async def collect(self):
        """One pass; returns the names of the claims it gave back."""
        chassis = await self.ovn.chassis()
        claims = await self.ovn.northbound.ports()
        used = await self.ovn.claims_in_use()
        now = self.clock()
        unused = {
            claim["name"]
            for claim in claims
            if claim.get(SYSTEM_ID) == chassis.system_id and claim["name"] not in used
        }
        local = {n.ovn_switch for n in (await self.ovn.vswitch.networks()).values()}
        for switch in await self.ovn.northbound.switches():
            if switch.host(chassis.system_id) is not None and switch.name not in local:
                unused.add(("switch", switch.name))
        self._unused_since = {key: self._unused_since.get(key, now) for key in unused}
        old = sorted(
            (k for k, since in self._unused_since.items() if now - since >= self.grace), key=str
        )
        claims = [k for k in old if isinstance(k, str)]
        if claims:
            await self.ovn.northbound.forget_claims(claims)
            log.info("gave back orphaned OVN addresses {names}", names=", ".join(claims))
        for _, name in (k for k in old if not isinstance(k, str)):
            await self.ovn.northbound.release_pool(name, chassis.system_id)
            log.info("this host no longer uses OVN switch {name}", name=name)
        for key in old:
            self._unused_since.pop(key, None)
        return old
