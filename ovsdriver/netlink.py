"""Kernel network links for the driver: veth pairs, addresses, MTU, MAC.

A thin port: each method is one kernel operation; what they add up to (such
as repairing an endpoint, see `ovsdriver.reconcile`) is the driver's logic.

pyroute2 talks to the kernel synchronously (0.9 even runs its own asyncio loop
inside each thread that uses it), so calling it on the reactor thread would
stall every request and break under Twisted's asyncio reactor. `Netlink` runs
all of it on one dedicated worker thread that keeps one ``IPRoute`` and hands
the reactor Deferreds (making a veth pair and deleting a link, on every veth
endpoint's path, go through `ovsdriver.rtnl`'s requests packed by hand
instead; deletions, which wait for the kernel, run on threads of their own).
Every operation is idempotent, so the driver can repeat
a request Docker retried. Only the ``IPRoute`` calls that pyroute2 0.7.2
(Debian 12) shares with 0.9 are used: ``link_lookup``, ``link``, ``addr``,
``route``, ``get_links``, ``get_addr`` and ``get_routes``.

Work inside a container's network namespace (a sandbox: `Netlink.sandbox_links`,
`Netlink.move_link_to_netns` and the ``..._in`` methods) is done by the same
worker thread: it enters the sandbox with ``setns`` (which moves only the
calling thread), talks to the kernel there through a fresh ``IPRoute``, and
goes back to its own namespace, whose file descriptor it keeps open for that.
"""

import array
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading

import attr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ovsdriver import values
from ovsdriver.deferreds import follow
from ovsdriver.rtnl import Rtnl

#: How often `Netlink.wait_for_link` looks for the link, in seconds.
POLL_INTERVAL = 0.02
#: Threads that delete links. A deletion waits ~16 ms for the kernel (an RCU
#: grace period) without holding its rtnl lock: on threads of their own,
#: deletions hold up no other request and overlap each other (8 veth pairs:
#: 22-41 ms on 8 threads, 130-150 ms on one).
DELETING_THREADS = 8

CLONE_NEWNET = 0x40000000
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux

IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTPROT_KERNEL = 2  # routes the kernel makes itself (e.g. for an address's prefix)
RTPROT_RA = 9  # routes learnt from IPv6 router advertisements
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255  # the kernel's own table of local and broadcast addresses
RTN_UNICAST = 1


@attr.s(frozen=True, slots=True)
class Route:
    """A route through one link, as `LinkInfo.routes` lists it and
    `Netlink.add_route_in` takes it back."""

    family = attr.ib()  # 4 or 6
    dst = attr.ib()  # "default" or a CIDR
    gateway = attr.ib(default=None)
    details = attr.ib(default=(), converter=tuple)  # more (key, value) for IPRoute.route


@attr.s(frozen=True, slots=True)
class LinkInfo:
    """A snapshot of one link, as `Netlink.sandbox_links` reports it."""

    name = attr.ib()
    mac = attr.ib()  # lower case; None for links without one
    mtu = attr.ib()
    up = attr.ib()  # administratively up
    carrier = attr.ib()  # False: nothing drives it, e.g. a tap nobody holds open
    addresses = attr.ib(default=(), converter=tuple)  # CIDR strings
    index = attr.ib(default=None)  # the kernel's index of the link in its namespace
    routes = attr.ib(default=(), converter=tuple)  # `Route`s through it its owner added


class LinkError(Exception):
    """A kernel link operation failed.

    ``str()`` is a sentence a user understands: it names the interface and
    what failed.
    """


def check_ifname(ifname):
    """Refuse a name the kernel cannot hold, before asking the kernel."""
    try:
        values.check_ifname("interface name", ifname)
    except values.InvalidValue as e:
        raise LinkError(str(e)) from None


def check_mac(ifname, mac):
    """Refuse a malformed MAC address with a sentence naming the interface."""
    try:
        values.check_mac(f"MAC address for {ifname}", mac)
    except values.InvalidValue as e:
        raise LinkError(f"cannot set {e}") from None


def parse_addresses(ifname, addresses, doing):
    """CIDR strings as ``ipaddress`` interfaces; a bad one is a LinkError.

    *doing* completes the sentence, e.g. "add" or "remove".
    """
    if isinstance(addresses, str):
        addresses = [addresses]
    parsed = []
    for address in addresses:
        try:
            parsed.append(ipaddress.ip_interface(address))
        except ValueError:
            raise LinkError(
                f"cannot {doing} address {address!r} on {ifname}: an address"
                " is written in CIDR form, like 10.0.0.1/24 or fd00::1/64"
            ) from None
    return parsed


def _reason(error):
    """The kernel's words for a failed netlink or ioctl call."""
    code = getattr(error, "code", None) or getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(error) or type(error).__name__


def _describe_settings(mtu, mac, up, name=None):
    """'name eth0, MTU 1400, MAC address 02:..., state up' for error sentences."""
    parts = [f"name {name}"] if name is not None else []
    if mtu is not None:
        parts.append(f"MTU {mtu}")
    if mac is not None:
        parts.append(f"MAC address {mac}")
    if up is not None:
        parts.append("state up" if up else "state down")
    return ", ".join(parts)


class _Worker:
    """What runs on the worker thread: one IPRoute, kept per thread.

    Nothing here may be called on the reactor thread.
    """

    def __init__(self, netns):
        self._netns = netns
        self._local = threading.local()

    # -- the IPRoute of this thread ------------------------------------------

    def _enter(self):
        """Put this thread in the configured namespace (once)."""
        local = self._local
        if getattr(local, "astray", False):
            # A visit to a sandbox could not return: go home before anything.
            _setns(local.home, "cannot return to the driver's network namespace")
            local.astray = False
        if not getattr(local, "in_netns", False):
            if self._netns is not None:
                enter_namespace(self._netns, f"cannot enter network namespace {self._netns}")
            local.in_netns = True

    def _ipr(self):
        self._enter()
        local = self._local
        if getattr(local, "ipr", None) is None:
            local.ipr = IPRoute()
        return local.ipr

    def _rtnl(self):
        """This thread's `Rtnl`, in the configured namespace."""
        self._ipr()  # enters the configured namespace first
        local = self._local
        if getattr(local, "rtnl", None) is None:
            local.rtnl = Rtnl()
        return local.rtnl

    def _home(self):
        """A descriptor of this thread's own namespace, to come back from sandboxes."""
        self._ipr()  # enters the configured namespace first
        local = self._local
        if getattr(local, "home", None) is None:
            local.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        return local.home

    def shutdown(self):
        """Close everything this thread holds: its IPRoute and namespace descriptor."""
        self.close()
        home = getattr(self._local, "home", None)
        self._local.home = None
        if home is not None:
            os.close(home)

    def close(self):
        """Close this thread's IPRoute and Rtnl; the next call opens fresh ones."""
        for name in ("ipr", "rtnl"):
            held = getattr(self._local, name, None)
            setattr(self._local, name, None)
            if held is not None:
                with contextlib.suppress(Exception):  # it is being thrown away
                    held.close()

    def call(self, what, operation):
        """Run ``operation(ipr)``; a broken IPRoute is replaced and retried once.

        Netlink errors are the kernel's answers: the operation words the ones
        it expects, the rest become a LinkError saying *what* failed. Anything
        else (a closed socket, a dead event loop) means the IPRoute broke.
        Every operation is idempotent, so one retry is safe.
        """
        for attempt in range(2):
            try:
                return operation(self._ipr())
            except LinkError:
                raise
            except NetlinkError as e:  # a refusal the operation did not expect
                raise LinkError(f"{what}: {_reason(e)}") from e
            except Exception as e:
                self.close()
                if attempt:
                    raise LinkError(f"{what}: {_reason(e)}") from e
        raise AssertionError("unreachable")

    # -- operations -----------------------------------------------------------

    @staticmethod
    def _index(ipr, ifname):
        found = ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def link_exists(self, ifname):
        return self.call(
            f"cannot look up {ifname}",
            lambda ipr: self._index(ipr, ifname) is not None,
        )

    def link_mac(self, ifname):
        def operation(ipr):
            try:
                (msg,) = ipr.link("get", ifname=ifname)
            except NetlinkError as e:
                if e.code == errno.ENODEV:
                    return None
                raise
            return _mac_of(msg)

        return self.call(f"cannot look up {ifname}", operation)

    def links(self):
        def operation(ipr):
            # libc decodes the dump: pyroute2 takes ~1 ms a link in Python, and
            # with 1000 endpoints that held the interpreter lock long enough to
            # stall the reactor thread for most of a second.
            return {name: index for index, name in socket.if_nameindex()}

        return self.call("cannot list the network interfaces", operation)

    def add_addresses(self, ifname, addresses):
        def operation(ipr):
            index = self._index(ipr, ifname)
            if index is None:
                raise LinkError(f"cannot add addresses to {ifname}: no such interface")
            added = []
            for address in addresses:
                try:
                    if _add_address(ipr, index, address):
                        added.append(str(address))
                except NetlinkError as e:
                    reason = _reason(e)
                    if e.code == errno.EACCES and address.version == 6:
                        reason = (
                            "IPv6 is disabled on it (net.ipv6.conf.default.disable_ipv6=1 "
                            "on this host?): enable IPv6, or leave --ipv6 out"
                        )
                    raise LinkError(f"cannot add address {address} to {ifname}: {reason}") from e
            try:
                ipr.link("set", index=index, state="up")
            except NetlinkError as e:
                raise LinkError(f"cannot set {ifname} up: {_reason(e)}") from e
            return added

        return self.call(f"cannot add addresses to {ifname}", operation)

    def remove_addresses(self, ifname, addresses):
        def operation(ipr):
            index = self._index(ipr, ifname)
            if index is None:
                return
            for address in addresses:
                try:
                    ipr.addr(
                        "del",
                        index=index,
                        address=str(address.ip),
                        prefixlen=address.network.prefixlen,
                    )
                except NetlinkError as e:
                    if e.code == errno.ENODEV:
                        return  # the link went away meanwhile: nothing to remove
                    # ENXIO: the link has no IPv6 (its MTU is below 1280).
                    if e.code not in (errno.EADDRNOTAVAIL, errno.ENXIO):
                        raise LinkError(
                            f"cannot remove address {address} from {ifname}: {_reason(e)}"
                        ) from e

        return self.call(f"cannot remove addresses from {ifname}", operation)

    def _set(self, ipr, ifname, index, mtu=None, mac=None, up=None):
        settings = {}
        if mtu is not None:
            settings["mtu"] = int(mtu)
        if mac is not None:
            settings["address"] = mac
        if up is not None:
            settings["state"] = "up" if up else "down"
        if not settings:
            return
        try:
            ipr.link("set", index=index, **settings)
        except NetlinkError as e:
            raise LinkError(
                f"cannot set {_describe_settings(mtu, mac, up)} on {ifname}: {_reason(e)}"
            ) from e

    def set_link(self, ifname, mtu, mac, up):
        def operation(ipr):
            index = self._index(ipr, ifname)
            if index is None:
                raise LinkError(f"cannot configure {ifname}: no such interface")
            self._set(ipr, ifname, index, mtu=mtu, mac=mac, up=up)

        return self.call(f"cannot configure {ifname}", operation)

    def create_veth(self, host_name, peer_name, mtu, peer_mac, tx_checksum):
        what = f"cannot create veth pair {host_name}/{peer_name}"

        def operation(ipr):
            # One request makes the whole pair (MTUs, MAC, host end up): it is
            # on the path of every container start.
            try:
                self._rtnl().create_veth(host_name, peer_name, mtu, peer_mac)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    settings = _describe_settings(mtu, peer_mac, None)
                    raise LinkError(f"{what} ({settings}): {_reason(e)}") from e
                self._reuse_veth(ipr, what, host_name, peer_name, mtu, peer_mac, tx_checksum)
                return
            if tx_checksum:
                return
            try:
                set_tx_checksum(peer_name, False)
            except LinkError:
                with contextlib.suppress(NetlinkError):  # leave nothing half-made behind
                    ipr.link("del", ifname=host_name)
                raise

        return self.call(what, operation)

    def _reuse_veth(self, ipr, what, host_name, peer_name, mtu, peer_mac, tx_checksum):
        """Bring a pair an earlier attempt made to what `create_veth` makes."""
        host = self._index(ipr, host_name)
        peer = self._index(ipr, peer_name)
        if host is None or peer is None:
            present, absent = (host_name, peer_name) if peer is None else (peer_name, host_name)
            raise LinkError(
                f"{what}: {present} already exists but {absent} does not; delete {present} first"
            )
        self._set(ipr, peer_name, peer, mtu=mtu, mac=peer_mac)
        self._set(ipr, host_name, host, mtu=mtu, up=True)
        set_tx_checksum(peer_name, tx_checksum)

    def delete_link(self, ifname):
        """On a deleting thread, which keeps no socket: one per deletion."""
        self._enter()
        try:
            with contextlib.closing(Rtnl()) as rtnl:
                rtnl.delete_link(ifname)  # by name: a lookup first would double its cost
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise LinkError(f"cannot delete {ifname}: {_reason(e)}") from e
        except OSError as e:
            raise LinkError(f"cannot delete {ifname}: {_reason(e)}") from e

    # -- inside sandboxes -------------------------------------------------------

    @contextlib.contextmanager
    def _inside(self, sandbox_fd, sandbox):
        """Run the block in the sandbox with a fresh IPRoute, then come home.

        Only this thread moves. If it cannot come back, the next operation
        tries again before it does anything (see `_ipr`).
        """
        home = self._home()
        _setns(sandbox_fd, f"cannot enter sandbox {sandbox}")
        try:
            ipr = IPRoute()
            try:
                yield ipr
            finally:
                with contextlib.suppress(Exception):
                    ipr.close()
        finally:
            try:
                _setns(home, "cannot return to the driver's network namespace")
            except LinkError:
                self._local.astray = True
                raise

    @contextlib.contextmanager
    def _guard(self, what):
        """Word a refusal of the kernel, or a broken IPRoute, as a LinkError.

        Unlike `call` it does not retry: a repair half done must not be redone
        blindly. A broken IPRoute is replaced by the next operation.
        """
        try:
            yield
        except LinkError:
            raise
        except NetlinkError as e:
            raise LinkError(f"{what}: {_reason(e)}") from e
        except Exception as e:
            self.close()
            raise LinkError(f"{what}: {_reason(e)}") from e

    def host_links(self):
        return self.call("cannot list the network interfaces", _link_infos)

    def sandbox_links(self, sandbox):
        what = f"cannot list the links of sandbox {sandbox}"
        return self._in_sandbox(sandbox, what, _link_infos)

    def _in_sandbox(self, sandbox, what, operation):
        """Run ``operation(ipr)`` inside the sandbox at path *sandbox*."""
        fd = _open_namespace(sandbox, f"cannot enter sandbox {sandbox}")
        try:
            with self._guard(what), self._inside(fd, sandbox) as ipr:
                return operation(ipr)
        finally:
            os.close(fd)

    def move_link_to_netns(self, ifname, sandbox):
        what = f"cannot move {ifname} into sandbox {sandbox}"
        fd = _open_namespace(sandbox, f"cannot enter sandbox {sandbox}")
        try:
            with self._guard(what):
                home = self._ipr()
                index = self._index(home, ifname)
                if index is None:
                    with self._inside(fd, sandbox) as ipr:
                        if ipr.link_lookup(ifname=ifname):
                            return  # moved already
                    raise LinkError(f"{what}: no such interface")
                home.link("set", index=index, net_ns_fd=fd)
        finally:
            os.close(fd)

    def delete_link_in(self, sandbox, index):
        def operation(ipr):
            try:
                ipr.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

        what = f"cannot delete link {index} in sandbox {sandbox}"
        return self._in_sandbox(sandbox, what, operation)

    def set_link_in(self, sandbox, index, name, mtu, mac, up):
        def operation(ipr):
            settings = {}
            if name is not None:
                settings["ifname"] = name
            if mtu is not None:
                settings["mtu"] = int(mtu)
            if mac is not None:
                settings["address"] = mac
            if settings:
                ipr.link("set", index=index, **settings)
            if up is not None:
                ipr.link("set", index=index, state="up" if up else "down")

        settings = _describe_settings(mtu, mac, up, name)
        what = f"cannot set {settings} on link {index} in sandbox {sandbox}"
        return self._in_sandbox(sandbox, what, operation)

    def add_address_in(self, sandbox, index, address):
        def operation(ipr):
            settings = {}
            if address.version == 6:
                settings["flags"] = IFA_F_NODAD  # usable at once: it was in use already
            elif address.network.prefixlen < 31:
                settings["broadcast"] = str(address.network.broadcast_address)
            _add_address(ipr, index, address, **settings)

        what = f"cannot add address {address} to link {index} in sandbox {sandbox}"
        return self._in_sandbox(sandbox, what, operation)

    def add_route_in(self, sandbox, index, route):
        def operation(ipr):
            try:
                ipr.route("add", oif=index, **_route_arguments(route))
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise

        what = f"cannot add route {_describe_route(route)} in sandbox {sandbox}"
        return self._in_sandbox(sandbox, what, operation)


def _add_address(ipr, index, address, **settings):
    """Add the CIDR *address* to link *index*; whether it was not there yet."""
    try:
        ipr.addr(
            "add",
            index=index,
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
            **settings,
        )
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
        return False
    return True


def _setns(fd, what):
    """Move the calling thread into the network namespace *fd* refers to."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise LinkError(f"{what}: {os.strerror(ctypes.get_errno())}")


def enter_namespace(path, what):
    """Move the calling thread (only this one) into the network namespace
    mounted at *path*; LinkError saying *what* failed otherwise."""
    fd = _open_namespace(path, what)
    try:
        _setns(fd, what)
    finally:
        os.close(fd)


def _open_namespace(path, what):
    """A descriptor of the network namespace mounted at *path*."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise LinkError(f"{what}: {_reason(e)}") from e


def _mac_of(msg):
    mac = msg.get_attr("IFLA_ADDRESS")
    return mac.lower() if mac else None


def _addresses_by_index(ipr):
    """index -> [ipaddress interface] of every address in the namespace."""
    found = {}
    for msg in ipr.get_addr():
        ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if ip:
            address = ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}")
            found.setdefault(msg["index"], []).append(address)
    return found


def _link_infos(ipr):
    addresses = _addresses_by_index(ipr)
    routes = _restorable_routes(ipr)
    return tuple(
        LinkInfo(
            name=msg.get_attr("IFLA_IFNAME"),
            mac=_mac_of(msg),
            mtu=msg.get_attr("IFLA_MTU"),
            up=bool(msg["flags"] & IFF_UP),
            carrier=bool(msg.get_attr("IFLA_CARRIER")),
            addresses=[str(a) for a in addresses.get(msg["index"], ())],
            index=msg["index"],
            routes=routes.get(msg["index"], ()),
        )
        for msg in ipr.get_links()
    )


#: Route attributes a restored route keeps, with IPRoute.route's names.
_ROUTE_DETAILS = (("RTA_PRIORITY", "priority"), ("RTA_PREFSRC", "prefsrc"))


def _restorable_routes(ipr):
    """index -> [`Route`] through that link that its owner added (not the
    kernel, not router advertisements), routes without a gateway first, so
    that the gateways of the others are reachable when they are added back."""
    found = {}
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        for msg in ipr.get_routes(family=family):
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            index = msg.get_attr("RTA_OIF")
            if (
                index is None
                or table == RT_TABLE_LOCAL
                or msg["type"] != RTN_UNICAST
                or msg["proto"] in (RTPROT_KERNEL, RTPROT_RA)
                or msg.get_attr("RTA_MULTIPATH") is not None
            ):
                continue
            details = [
                ("table", table),
                ("proto", msg["proto"]),
                ("scope", msg["scope"]),
                ("type", msg["type"]),
            ]
            for attribute, key in _ROUTE_DETAILS:
                value = msg.get_attr(attribute)
                if value is not None:
                    details.append((key, value))
            dst = msg.get_attr("RTA_DST")
            found.setdefault(index, []).append(
                Route(
                    family=version,
                    dst=str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")) if dst else "default",
                    gateway=msg.get_attr("RTA_GATEWAY"),
                    details=details,
                )
            )
    for routes in found.values():
        routes.sort(key=lambda r: r.gateway is not None)
    return found


def _route_arguments(route):
    """Keyword arguments of ``IPRoute.route("add", ...)`` for a `Route`."""
    arguments = dict(route.details)
    arguments["family"] = socket.AF_INET if route.family == 4 else socket.AF_INET6
    if route.dst == "default":
        arguments["dst_len"] = 0
    else:
        network = ipaddress.ip_network(route.dst)
        arguments["dst"] = str(network.network_address)
        arguments["dst_len"] = network.prefixlen
    if route.gateway is not None:
        arguments["gateway"] = route.gateway
    return arguments


def _describe_route(route):
    return f"{route.dst} via {route.gateway}" if route.gateway else route.dst


def set_tx_checksum(ifname, on):
    """Turn TX checksum offload on or off (``ethtool -K IFNAME tx on|off``).

    A veth leaves checksums to the receiver, but OVS's userspace datapath
    never fills them in, so TCP through it breaks unless the sender computes
    them; the kernel datapath does, and there the offload (and with it TSO)
    stays on. Uses the SIOCETHTOOL ioctl (struct ethtool_value), which works
    on every kernel and pyroute2 version; it acts in the calling thread's
    network namespace, so it must run on the worker thread.
    """
    value = array.array("B", struct.pack("=II", ETHTOOL_STXCSUM, int(on)))
    pointer, _ = value.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode(), pointer).ljust(_IFREQ_SIZE, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    except OSError as e:
        state = "on" if on else "off"
        raise LinkError(f"cannot turn {state} TX checksum offload on {ifname}: {_reason(e)}") from e


class Netlink:
    """Kernel link work (pyroute2) on one dedicated thread, never the reactor's.

    Every method returns a Deferred that fires on the reactor thread, fails
    with `LinkError`, and is idempotent.
    """

    def __init__(self, reactor, netns=None):
        """*netns*: a namespace path like /run/netns/X for the worker to enter.

        Only the worker thread enters it (setns is per thread), so tests can
        drive a throwaway namespace from a process that stays in its own.
        """
        self._reactor = reactor
        self._worker = _Worker(netns)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ovsdriver-netlink")
        self._deleters = ThreadPool(
            minthreads=0, maxthreads=DELETING_THREADS, name="ovsdriver-netlink-delete"
        )
        self._turns = {}  # link name -> the latest pair making or deletion under it
        self._started = False

    def start(self):
        """Start the worker thread; calls made before this wait for it."""
        if not self._started:
            self._started = True
            self._pool.start()
            self._deleters.start()

    def stop(self):
        """Finish queued work, close the IPRoute and join the worker threads."""
        if self._started:
            self._started = False
            self._pool.callInThread(self._worker.shutdown)
            self._pool.stop()
            self._deleters.stop()

    def _run(self, function, *args):
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def link_exists(self, ifname):
        """Deferred[bool]: whether a link of that name exists."""
        return self._run(self._worker.link_exists, ifname)

    def link_mac(self, ifname):
        """Deferred[str or None]: the MAC address of link *ifname* (lower
        case), None if there is no such link."""
        return self._run(self._worker.link_mac, ifname)

    def links(self):
        """Deferred[dict[str, int]]: every link's name and index, ``lo``
        included (a link made anew gets another index)."""
        return self._run(self._worker.links)

    def wait_for_link(self, ifname, timeout=5.0):
        """Deferred[None] once *ifname* exists (e.g. a tap OVS is creating).

        Polls every `POLL_INTERVAL` seconds with reactor timers, so the worker
        thread stays free for other requests meanwhile; fails with LinkError
        when the link has not appeared after *timeout* seconds.
        """
        reactor = self._reactor
        deadline = reactor.seconds() + timeout
        timer = []

        def cancel(_):
            if timer and timer[0].active():
                timer[0].cancel()

        result = defer.Deferred(cancel)

        def check():
            del timer[:]
            self.link_exists(ifname).addCallbacks(checked, failed)

        def checked(exists):
            if result.called:
                return
            if exists:
                result.callback(None)
                return
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                result.errback(
                    LinkError(f"interface {ifname} did not appear within {timeout:g} seconds")
                )
                return
            timer.append(reactor.callLater(min(POLL_INTERVAL, remaining), check))

        def failed(failure):
            if not result.called:
                result.errback(failure)

        check()
        return result

    def add_addresses(self, ifname, addresses):
        """Add each CIDR address (present already is fine), then set the link
        up. Deferred[list[str]]: the addresses that were not there yet."""
        try:
            parsed = parse_addresses(ifname, addresses, "add")
        except LinkError:
            return defer.fail()
        return self._run(self._worker.add_addresses, ifname, parsed)

    def remove_addresses(self, ifname, addresses):
        """Remove each CIDR address; a missing link or address is fine."""
        try:
            parsed = parse_addresses(ifname, addresses, "remove")
        except LinkError:
            return defer.fail()
        return self._run(self._worker.remove_addresses, ifname, parsed)

    def set_link(self, ifname, mtu=None, mac=None, up=None):
        """Set whichever of MTU, MAC address and up/down state is given."""
        if mac is not None:
            try:
                check_mac(ifname, mac)
            except LinkError:
                return defer.fail()
        return self._run(self._worker.set_link, ifname, mtu, mac, up)

    def create_veth(self, host_name, peer_name, mtu, peer_mac=None, tx_checksum=False):
        """Create a veth pair (or reuse one): both ends *mtu*, host end up.

        The peer (the container's end) gets *peer_mac* if given, and TX
        checksum offload off unless *tx_checksum*: TCP over OVS's userspace
        datapath needs it off, the kernel datapath does not.
        """
        try:
            check_ifname(host_name)
            check_ifname(peer_name)
            if peer_mac is not None:
                check_mac(peer_name, peer_mac)
        except LinkError:
            return defer.fail()
        create = (self._worker.create_veth, host_name, peer_name, mtu, peer_mac, tx_checksum)
        return self._in_turn((host_name, peer_name), lambda: self._run(*create))

    def delete_link(self, ifname):
        """Delete a link (both ends, for a veth); a missing link is fine.
        Deletions run beside the other requests (`DELETING_THREADS`)."""
        delete = (self._reactor, self._deleters, self._worker.delete_link, ifname)
        return self._in_turn((ifname,), lambda: deferToThreadPool(*delete))

    def _in_turn(self, names, start):
        """`start()` once the pairs made and links deleted before under any of
        *names* are: deletions run on threads of their own, and a name must
        not be deleted before it is made, nor made before it is deleted."""
        earlier = [follow(self._turns[name]) for name in names if name in self._turns]
        if earlier:
            d = defer.DeferredList(earlier, consumeErrors=True).addCallback(lambda _: start())
        else:
            d = start()
        for name in names:
            self._turns[name] = d
        return d.addBoth(self._turn_ended, names, d)

    def _turn_ended(self, outcome, names, d):
        for name in names:
            if self._turns.get(name) is d:
                del self._turns[name]
        return outcome

    def host_links(self):
        """Deferred[tuple[LinkInfo]]: the links of the driver's own namespace
        (read through netlink: /sys shows another namespace under nsenter)."""
        return self._run(self._worker.host_links)

    def sandbox_links(self, sandbox):
        """Deferred[tuple[LinkInfo]]: the links inside the network namespace
        at path *sandbox* (a container's, as Join's SandboxKey names it).

        Fails with LinkError naming the sandbox when it cannot be entered.
        """
        return self._run(self._worker.sandbox_links, sandbox)

    def move_link_to_netns(self, ifname, sandbox):
        """Move link *ifname* from the driver's namespace into the sandbox
        at path *sandbox*; one that is there already is fine."""
        return self._run(self._worker.move_link_to_netns, ifname, sandbox)

    def delete_link_in(self, sandbox, index):
        """Delete the link with *index* in *sandbox*; a missing one is fine."""
        return self._run(self._worker.delete_link_in, sandbox, index)

    def set_link_in(self, sandbox, index, name=None, mtu=None, mac=None, up=None):
        """Set whichever of name, MTU, MAC address and up/down state is given
        on the link with *index* in *sandbox*."""
        try:
            if name is not None:
                check_ifname(name)
            if mac is not None:
                check_mac(name or f"link {index}", mac)
        except LinkError:
            return defer.fail()
        return self._run(self._worker.set_link_in, sandbox, index, name, mtu, mac, up)

    def add_address_in(self, sandbox, index, address):
        """Add the CIDR *address* to the link with *index* in *sandbox*
        (present already is fine). An IPv6 one skips duplicate address
        detection: it is being given back, not newly claimed."""
        try:
            (parsed,) = parse_addresses(f"link {index}", [address], "add")
        except LinkError:
            return defer.fail()
        return self._run(self._worker.add_address_in, sandbox, index, parsed)

    def add_route_in(self, sandbox, index, route):
        """Add the `Route` through the link with *index* in *sandbox*
        (present already is fine)."""
        return self._run(self._worker.add_route_in, sandbox, index, route)
