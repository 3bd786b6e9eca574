"""The host ports the driver publishes, held as Docker holds them.

A DNAT rule takes a host port's packets from whatever program on the host
listens there: without a guard, ``-p 22:80`` would silently take the host's
ssh. Docker's bridge driver binds every port it publishes, so a port in use
is refused and no program can take a published one. The driver does the
same: one socket per published port, address family and host address,
bound for as long as the port is published. A program that binds it gets
"Address already in use".

An IPv4 TCP socket also listens (never accepting), as Docker's placeholder
without its userland proxy does: every local IPv4 destination is DNATed,
so it never gets a connection, and a listener shows in ``ss -tlnp`` and
lets the port be held with SO_REUSEADDR (a gone server's connections in
TIME_WAIT do not stand in the way) yet still excludes every other socket.
Not an IPv6 one: ``::1`` is not DNATed (the kernel cannot), and a listener
there would leave ``curl localhost:PORT`` hanging instead of refused. Nor
UDP, where SO_REUSEADDR would let two sockets share the port.
"""

import errno
import os
import resource
import socket

from ovsdriver.ports import PortUnavailable

_KINDS = {
    "tcp": (socket.SOCK_STREAM, 0),
    "udp": (socket.SOCK_DGRAM, 0),
    "sctp": (socket.SOCK_STREAM, socket.IPPROTO_SCTP),
}
#: A host without the protocol (no sctp module) has no program using it either.
_UNSUPPORTED = {errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT}
#: File descriptors kept free of held ports for everything else: OVSDB and
#: HTTP connections, child processes' pipes, netlink sockets.
SPARE_FILES = 256


def raise_open_files_limit():
    """Raise the soft limit of open files to the hard one, as Go programs
    (dockerd among them) do at start: every published port holds a socket,
    and systemd's default soft limit (1024) would end at ~750 ports.
    Returns (old soft limit, new soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling, then
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


def open_files():
    """(files this process has open, the most it may have)."""
    return len(os.listdir("/proc/self/fd")), resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def key(port):
    """(family, proto, host address, host port): what one socket holds."""
    family = 6 if ":" in port.container_ip else 4  # a checked address
    address = port.host_ip or ("::" if family == 6 else "0.0.0.0")
    return family, port.proto, address, port.host_port


def describe(port):
    where = f" on {port.host_ip}" if port.host_ip else ""
    return f"host port {port.host_port}/{port.proto}{where}"


def not_local(port):
    """The refusal of a port published on an address the host does not have."""
    return PortUnavailable(
        f"cannot publish {describe(port)}: {port.host_ip} is not an address of this host; "
        f"publish on one of its addresses, or on all of them (-p {port.host_port}:"
        f"{port.container_port}/{port.proto})"
    )


def address_gone(port):
    """Why a published port cannot be held once its address is gone."""
    return f"{describe(port)} cannot be held: {port.host_ip} is not an address of this host"


def no_room(count, used, limit):
    """The refusal of *count* more ports by a driver with *used* of its
    *limit* files open."""
    return PortUnavailable(
        f"cannot publish {count} more host ports: the driver holds a socket for each, "
        f"and with {used} of its {limit} files open that would leave fewer than "
        f"{SPARE_FILES} for the rest of its work; publish fewer ports, or raise its "
        "limit of open files (LimitNOFILE= in its systemd unit, ulimit -n)"
    )


def in_use(port):
    """Why another program's use of *port* keeps it from being published."""
    return (
        f"{describe(port)} is in use by another program on this host (ss -tulpn shows "
        "which); choose another host port, or stop that program"
    )


class HostPorts:
    """The sockets holding published host ports.

    *make_socket* is `socket.socket` (tests pass one that makes sockets in
    their network namespace). Every method runs at once on the reactor:
    binding a socket does not block.
    """

    def __init__(self, make_socket=socket.socket):
        self._make_socket = make_socket
        self._held = {}  # key -> bound socket (None: the host lacks the protocol)

    def room(self, ports):
        """Raise PortUnavailable unless holding *ports* too leaves
        `SPARE_FILES` file descriptors free: the driver must not run out of
        them for everything else."""
        new = {key(port) for port in ports} - set(self._held)
        if not new:
            return
        used, limit = open_files()
        if used + len(new) + SPARE_FILES > limit:
            raise no_room(len(new), used, limit)

    def _bind(self, port, hold=False):
        """A socket bound where *port* says, or None; raises OSError."""
        family, proto, address, host_port = key(port)
        kind, number = _KINDS[proto]
        listener = kind == socket.SOCK_STREAM and family == 4
        try:
            sock = self._make_socket(
                socket.AF_INET6 if family == 6 else socket.AF_INET, kind, number
            )
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return None
            raise
        try:
            if family == 6:  # the IPv4 port is held by a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if listener:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, host_port))
            if listener and hold:
                sock.listen()
        except BaseException:
            sock.close()
            raise
        return sock

    def check(self, port):
        """Why *port* cannot be published (another program uses it), or
        None when it is free or already held. Raises PortUnavailable when
        its host address is not one of this host's."""
        if key(port) in self._held:
            return None
        try:
            sock = self._bind(port)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise not_local(port) from None
            return _reason(port, e)
        if sock is not None:
            sock.close()
        return None

    def hold(self, ports):
        """Hold exactly *ports* (`PublishedPort` values): release the others.

        The result: {port: why it cannot be held} (another program took it
        first, or its address is gone).
        """
        wanted = {key(port): port for port in ports}
        for gone in set(self._held) - set(wanted):
            sock = self._held.pop(gone)
            if sock is not None:
                sock.close()
        failed = {}
        for k, port in wanted.items():
            if k in self._held:
                continue
            try:
                self._held[k] = self._bind(port, hold=True)
            except OSError as e:
                failed[port] = _reason(port, e)
        return failed

    def holds(self, port):
        return key(port) in self._held


def _reason(port, error):
    """Why *error* keeps *port* from being held."""
    if error.errno == errno.EADDRINUSE:
        return in_use(port)
    if error.errno == errno.EADDRNOTAVAIL:
        return address_gone(port)
    return f"{describe(port)} cannot be held: {error.strerror}"
