"""Know when the host's firewall rules change, without reading them.

iptables-nft (Debian's ``iptables``) keeps its rules in nftables, and the
kernel announces every nftables write (a table, chain, rule or set added,
changed or removed; never a read such as ``iptables-save``) to the netlink
group NFNLGRP_NFTABLES of the network namespace it happens in.
`ovsdriver.firewall.FirewallHealer` reads the rules only after such an
announcement instead of every few seconds: no child process while the rules
stay as they are, on a host where reading them all can take a tenth of a
second. x_tables (``iptables-legacy``) announces nothing (see
`ovsdriver.firewall.Firewall.announced`).
"""

import errno
import socket
import struct
import threading

from twisted.internet import defer

from ovsdriver.netlink import enter_namespace
from ovsdriver.rtnl import messages

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
#: The message that ends each announced change (NFNL_SUBSYS_NFTABLES,
#: NFT_MSG_NEWGEN), and its attribute naming the process that made it.
NEWGEN = 10 << 8 | 15
NFTA_GEN_PROC_PID = 2
NLA_TYPE_MASK = 0x3FFF
#: Datagrams read per wake-up; the reactor calls again while more wait.
BATCH = 64
#: Seconds before the writers of changes are judged: the driver records a
#: command's PID once ``Popen`` returns in its worker thread, and a quick
#: command may have committed by then.
JUDGE_AFTER = 0.1


def writers(datagram):
    """The PID that made each change *datagram* announces (None where the
    kernel does not say)."""
    for kind, _, payload in messages(datagram):
        if kind == NEWGEN:
            yield _pid(payload[4:])  # after the nfgenmsg


def _pid(attributes):
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if length < 4:
            break
        if kind & NLA_TYPE_MASK == NFTA_GEN_PROC_PID and length == 8:
            return struct.unpack_from(">I", attributes, offset + 4)[0]
        offset += (length + 3) & ~3
    return None


def subscribe():
    """A non-blocking netlink socket that receives nftables' announcements."""
    flags = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    sock = socket.socket(socket.AF_NETLINK, flags, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except OSError:
        sock.close()
        raise
    return sock


def _subscribe_in(reactor, netns):
    """Deferred `subscribe()` made inside the network namespace at *netns*,
    on a thread of its own (entering a namespace moves the whole thread)."""
    done = defer.Deferred()

    def make():
        try:
            enter_namespace(netns, f"cannot enter network namespace {netns}")
            sock = subscribe()
        except Exception as e:
            reactor.callFromThread(done.errback, e)
        else:
            reactor.callFromThread(done.callback, sock)

    threading.Thread(target=make, name="ovsdriver-nftwatch", daemon=True).start()
    return done


class NftablesWatch:
    """Calls ``changed()`` in the reactor thread after nftables changed in the
    driver's network namespace (or in *netns*, a path), once per batch of
    announcements, unless every change was made by a process in *own* (PIDs:
    the driver's own commands); a lost announcement (the socket's buffer
    overflowed) counts as a change."""

    def __init__(self, reactor, netns=None, own=()):
        self.reactor = reactor
        self.netns = netns
        self.own = own
        self._sock = None
        self._changed = self._lost = None
        self._stopped = False
        self._writers = set()  # of the changes read and not yet judged
        self._judging = None

    def start(self, changed, lost):
        """Deferred: fires once watching, fails (OSError, LinkError) when the
        kernel cannot tell. ``lost(error)`` is called if watching stops
        working later."""
        self._changed, self._lost, self._stopped = changed, lost, False
        if self.netns is not None:
            made = _subscribe_in(self.reactor, self.netns)
        else:
            made = defer.maybeDeferred(subscribe)
        return made.addCallback(self._watch)

    def _watch(self, sock):
        if self._stopped:  # stopped while the socket was being made
            sock.close()
            return
        self._sock = sock
        self.reactor.addReader(self)

    def stop(self):
        self._stopped = True
        if self._judging is not None and self._judging.active():
            self._judging.cancel()
        if self._sock is not None:
            self.reactor.removeReader(self)
            self._sock.close()
            self._sock = None

    # -- IReadDescriptor -------------------------------------------------------

    def fileno(self):
        return self._sock.fileno() if self._sock is not None else -1

    def doRead(self):
        for _ in range(BATCH):
            try:
                datagram = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    self.stop()
                    self._lost(e)
                    return
                self._writers.add(None)  # announcements were lost: changes all the same
                continue
            self._writers.update(writers(datagram))
        if self._writers and (self._judging is None or not self._judging.active()):
            self._judging = self.reactor.callLater(JUDGE_AFTER, self._judge)

    def _judge(self):
        foreign = any(pid not in self.own for pid in self._writers)
        self._writers.clear()
        if foreign:
            self._changed()

    def connectionLost(self, reason):
        if not self._stopped:  # the reactor dropped it: say so
            self.stop()
            self._lost(reason.value)

    def logPrefix(self):
        return "nftwatch"
