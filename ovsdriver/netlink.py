"""Kernel network links for the driver: veth pairs, addresses, MTU, MAC.

pyroute2 talks to the kernel synchronously (0.9 even runs its own asyncio loop
inside each thread that uses it), so calling it on the reactor thread would
stall every request and break under Twisted's asyncio reactor. `Netlink` runs
all of it on one dedicated worker thread that keeps one ``IPRoute`` and hands
the reactor Deferreds. Every operation is idempotent, so the driver can repeat
a request Docker retried. Only the ``IPRoute`` calls that pyroute2 0.7.2
(Debian 12) shares with 0.9 are used: ``link_lookup``, ``link``, ``addr``,
``route``, ``get_links``, ``get_addr`` and ``get_routes``.

Work inside a container's network namespace (a sandbox, see
`Netlink.sandbox_links` and `Netlink.repair_endpoint`) is done by the same
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

#: How often `Netlink.wait_for_link` looks for the link, in seconds.
POLL_INTERVAL = 0.02

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
class LinkInfo:
    """A snapshot of one link, as `Netlink.sandbox_links` reports it."""

    name = attr.ib()
    mac = attr.ib()  # lower case; None for links without one
    mtu = attr.ib()
    up = attr.ib()  # administratively up
    carrier = attr.ib()  # False: nothing drives it, e.g. a tap nobody holds open
    addresses = attr.ib(default=(), converter=tuple)  # CIDR strings


@attr.s(frozen=True, slots=True)
class _DeadCopy:
    """What a repair takes over from the dead copy of an endpoint's link."""

    index = attr.ib()
    name = attr.ib()
    mtu = attr.ib()
    addresses = attr.ib()  # ipaddress interfaces
    routes = attr.ib()  # keyword arguments of IPRoute.route("add"), without oif


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


def _describe_settings(mtu, mac, up):
    """'MTU 1400, MAC address 02:..., state up' for error sentences."""
    parts = []
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

    def _enter_netns(self):
        """Move this thread (only this one) into the configured namespace."""
        what = f"cannot enter network namespace {self._netns}"
        fd = _open_namespace(self._netns, what)
        try:
            _setns(fd, what)
        finally:
            os.close(fd)

    def _ipr(self):
        local = self._local
        if getattr(local, "astray", False):
            # A visit to a sandbox could not return: go home before anything.
            _setns(local.home, "cannot return to the driver's network namespace")
            local.astray = False
        if not getattr(local, "in_netns", False):
            if self._netns is not None:
                self._enter_netns()
            local.in_netns = True
        if getattr(local, "ipr", None) is None:
            local.ipr = IPRoute()
        return local.ipr

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
        """Close this thread's IPRoute; the next call opens a fresh one."""
        ipr = getattr(self._local, "ipr", None)
        self._local.ipr = None
        if ipr is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                ipr.close()

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

    def links(self):
        def operation(ipr):
            return frozenset(msg.get_attr("IFLA_IFNAME") for msg in ipr.link("dump"))

        return self.call("cannot list the network interfaces", operation)

    def add_addresses(self, ifname, addresses):
        def operation(ipr):
            index = self._index(ipr, ifname)
            if index is None:
                raise LinkError(f"cannot add addresses to {ifname}: no such interface")
            for address in addresses:
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(address.ip),
                        prefixlen=address.network.prefixlen,
                    )
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise LinkError(
                            f"cannot add address {address} to {ifname}: {_reason(e)}"
                        ) from e
            try:
                ipr.link("set", index=index, state="up")
            except NetlinkError as e:
                raise LinkError(f"cannot set {ifname} up: {_reason(e)}") from e

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
                    if e.code != errno.EADDRNOTAVAIL:
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

    def create_veth(self, host_name, peer_name, mtu, peer_mac):
        what = f"cannot create veth pair {host_name}/{peer_name}"

        def operation(ipr):
            host = self._index(ipr, host_name)
            peer = self._index(ipr, peer_name)
            created = False
            if host is None and peer is None:
                try:
                    ipr.link("add", ifname=host_name, kind="veth", peer=peer_name)
                    created = True
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise LinkError(f"{what}: {_reason(e)}") from e
                host = self._index(ipr, host_name)
                peer = self._index(ipr, peer_name)
            if host is None or peer is None:
                present, absent = (host_name, peer_name) if peer is None else (peer_name, host_name)
                raise LinkError(
                    f"{what}: {present} already exists but {absent} does not;"
                    f" delete {present} first"
                )
            try:
                self._set(ipr, peer_name, peer, mtu=mtu, mac=peer_mac)
                self._set(ipr, host_name, host, mtu=mtu, up=True)
                disable_tx_checksum(peer_name)
            except LinkError:
                if created:  # leave nothing half-made behind
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=host)
                raise

        return self.call(what, operation)

    def delete_link(self, ifname):
        def operation(ipr):
            index = self._index(ipr, ifname)
            if index is None:
                return
            try:
                ipr.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise LinkError(f"cannot delete {ifname}: {_reason(e)}") from e

        return self.call(f"cannot delete {ifname}", operation)

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

    def sandbox_links(self, sandbox):
        what = f"cannot list the links of sandbox {sandbox}"
        fd = _open_namespace(sandbox, f"cannot enter sandbox {sandbox}")
        try:
            with self._guard(what), self._inside(fd, sandbox) as ipr:
                return _link_infos(ipr)
        finally:
            os.close(fd)

    def repair_endpoint(self, sandbox, fresh_name, mac, mtu, addresses):
        what = f"cannot repair {fresh_name} in sandbox {sandbox}"
        with self._guard(what):
            home = self._ipr()
            fresh = self._index(home, fresh_name)
            if fresh is None:
                return None
            fd = _open_namespace(sandbox, f"cannot enter sandbox {sandbox}")
            try:
                with self._inside(fd, sandbox) as ipr:
                    dead = _dead_copy(ipr, mac, fresh_name)
                if dead is None:
                    return None
                try:
                    home.link("set", index=fresh, net_ns_fd=fd)
                except NetlinkError as e:
                    raise LinkError(f"{what}: cannot move it into the sandbox: {_reason(e)}") from e
                with self._inside(fd, sandbox) as ipr:
                    _take_over(ipr, dead, fresh_name, mac, mtu, addresses, what)
                return dead.name
            finally:
                os.close(fd)


def _setns(fd, what):
    """Move the calling thread into the network namespace *fd* refers to."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise LinkError(f"{what}: {os.strerror(ctypes.get_errno())}")


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
    return tuple(
        LinkInfo(
            name=msg.get_attr("IFLA_IFNAME"),
            mac=_mac_of(msg),
            mtu=msg.get_attr("IFLA_MTU"),
            up=bool(msg["flags"] & IFF_UP),
            carrier=bool(msg.get_attr("IFLA_CARRIER")),
            addresses=[str(a) for a in addresses.get(msg["index"], ())],
        )
        for msg in ipr.get_links()
    )


def _restorable_routes(ipr, index):
    """The routes through link *index* that its owner added (not the kernel).

    Returned as keyword arguments for ``IPRoute.route("add", ..., oif=...)``,
    routes without a gateway first, so that the gateways of the others are
    reachable when they are added back.
    """
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            if (
                msg.get_attr("RTA_OIF") != index
                or table == RT_TABLE_LOCAL
                or msg["type"] != RTN_UNICAST
                or msg["proto"] in (RTPROT_KERNEL, RTPROT_RA)
                or msg.get_attr("RTA_MULTIPATH") is not None
            ):
                continue
            route = {
                "family": family,
                "dst_len": msg["dst_len"],
                "table": table,
                "proto": msg["proto"],
                "scope": msg["scope"],
                "type": msg["type"],
            }
            for attribute, key in (
                ("RTA_DST", "dst"),
                ("RTA_GATEWAY", "gateway"),
                ("RTA_PRIORITY", "priority"),
                ("RTA_PREFSRC", "prefsrc"),
            ):
                value = msg.get_attr(attribute)
                if value is not None:
                    route[key] = value
            routes.append(route)
    routes.sort(key=lambda r: "gateway" in r)
    return routes


def _dead_copy(ipr, mac, fresh_name):
    """The sandbox's dead copy of an endpoint's link, or None.

    That is a link with the endpoint's MAC address that has no carrier: a tap
    whose ovs-vswitchd is gone (a live one has carrier, and the engine's move
    of a new endpoint's link brings no second link with that MAC along).
    """
    mac = mac.lower()
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        if _mac_of(msg) == mac and name != fresh_name and not msg.get_attr("IFLA_CARRIER"):
            index = msg["index"]
            addresses = [
                a
                for a in _addresses_by_index(ipr).get(index, ())
                if not (a.version == 6 and a.ip.is_link_local)
            ]
            return _DeadCopy(
                index=index,
                name=name,
                mtu=msg.get_attr("IFLA_MTU"),
                addresses=addresses,
                routes=_restorable_routes(ipr, index),
            )
    return None


def _take_over(ipr, dead, fresh_name, mac, mtu, addresses, what):
    """Put the fresh link (already in the sandbox) in the dead copy's place."""
    try:
        ipr.link("del", index=dead.index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise LinkError(f"{what}: cannot delete the dead {dead.name}: {_reason(e)}") from e
    found = ipr.link_lookup(ifname=fresh_name)
    if not found:
        raise LinkError(f"{what}: it vanished after it was moved into the sandbox")
    index = found[0]
    try:
        ipr.link("set", index=index, ifname=dead.name, address=mac, mtu=int(mtu or dead.mtu))
        ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        raise LinkError(f"{what}: cannot set it up as {dead.name}: {_reason(e)}") from e
    failures = []
    wanted = list(dead.addresses)
    wanted += [a for a in addresses if a not in wanted]
    for address in wanted:
        settings = {}
        if address.version == 6:
            settings["flags"] = IFA_F_NODAD  # usable at once; it was in use already
        elif address.network.prefixlen < 31:
            settings["broadcast"] = str(address.network.broadcast_address)
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
                failures.append(f"address {address}: {_reason(e)}")
    for route in dead.routes:
        try:
            ipr.route("add", oif=index, **route)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                failures.append(f"route {_describe_route(route)}: {_reason(e)}")
    if failures:
        raise LinkError(
            f"{what}: it is back as {dead.name}, but these could not be restored: "
            + "; ".join(failures)
        )


def _describe_route(route):
    dst = f"{route['dst']}/{route['dst_len']}" if "dst" in route else "default"
    return f"{dst} via {route['gateway']}" if "gateway" in route else dst


def disable_tx_checksum(ifname):
    """Turn TX checksum offload off (``ethtool -K IFNAME tx off``).

    A veth leaves checksums to the receiver, but OVS's userspace datapath
    never fills them in, so TCP through it breaks unless the sender computes
    them. Uses the SIOCETHTOOL ioctl (struct ethtool_value), which works on
    every kernel and pyroute2 version; it acts in the calling thread's network
    namespace, so it must run on the worker thread.
    """
    value = array.array("B", struct.pack("=II", ETHTOOL_STXCSUM, 0))
    pointer, _ = value.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode(), pointer).ljust(_IFREQ_SIZE, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    except OSError as e:
        raise LinkError(f"cannot turn off TX checksum offload on {ifname}: {_reason(e)}") from e


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
        self._started = False

    def start(self):
        """Start the worker thread; calls made before this wait for it."""
        if not self._started:
            self._started = True
            self._pool.start()

    def stop(self):
        """Finish queued work, close the IPRoute and join the worker thread."""
        if self._started:
            self._started = False
            self._pool.callInThread(self._worker.shutdown)
            self._pool.stop()

    def _run(self, function, *args):
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def link_exists(self, ifname):
        """Deferred[bool]: whether a link of that name exists."""
        return self._run(self._worker.link_exists, ifname)

    def links(self):
        """Deferred[frozenset[str]]: the names of all links, ``lo`` included."""
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
        """Add each CIDR address (present already is fine), then set the link up."""
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

    def create_veth(self, host_name, peer_name, mtu, peer_mac=None):
        """Create a veth pair (or reuse one): both ends *mtu*, host end up.

        The peer (the container's end) gets *peer_mac* if given and TX checksum
        offload off, which TCP over OVS's userspace datapath needs.
        """
        try:
            check_ifname(host_name)
            check_ifname(peer_name)
            if peer_mac is not None:
                check_mac(peer_name, peer_mac)
        except LinkError:
            return defer.fail()
        return self._run(self._worker.create_veth, host_name, peer_name, mtu, peer_mac)

    def delete_link(self, ifname):
        """Delete a link (both ends, for a veth); a missing link is fine."""
        return self._run(self._worker.delete_link, ifname)

    def sandbox_links(self, sandbox):
        """Deferred[tuple[LinkInfo]]: the links inside the network namespace
        at path *sandbox* (a container's, as Join's SandboxKey names it).

        Fails with LinkError naming the sandbox when it cannot be entered.
        """
        return self._run(self._worker.sandbox_links, sandbox)

    def repair_endpoint(self, sandbox, fresh_name, mac, mtu, addresses=()):
        """Replace the dead copy of an endpoint's link in *sandbox* with the
        fresh link *fresh_name* from the driver's own namespace.

        This is what an ovs-vswitchd restart with the userspace datapath needs:
        it recreates every internal port as a new tap in its own namespace,
        while the container keeps the old tap, dead (no carrier). The dead copy
        is the sandbox's link with the endpoint's *mac* and no carrier; its
        name, addresses and routes are taken over: the dead copy is deleted,
        the fresh link moved in, renamed, given *mac* and *mtu*, set up, given
        the addresses (plus the CIDR *addresses* given; IPv6 ones without
        duplicate address detection) and the routes back.

        Deferred[str | None]: the name the fresh link now has in the sandbox,
        or None when there is nothing to repair: the fresh link is not in the
        driver's namespace, or the sandbox holds no dead copy (as when the
        engine has not moved a new endpoint's link yet). Fails with LinkError;
        one that names addresses or routes means the link itself is back.
        With the kernel datapath internal ports survive a restart, so this
        always finds nothing to do there.
        """
        try:
            check_mac(fresh_name, mac)
            parsed = parse_addresses(fresh_name, addresses, "restore")
        except LinkError:
            return defer.fail()
        return self._run(self._worker.repair_endpoint, sandbox, fresh_name, mac, mtu, parsed)
