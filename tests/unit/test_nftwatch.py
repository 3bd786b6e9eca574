"""NftablesWatch's reading of the kernel's announcements (the real kernel's
are read in tests/integration/test_firewall_real.py)."""

import errno
import struct

from twisted.internet.task import Clock

from ovsdriver import nftwatch


def newgen(pid=None):
    """An NFT_MSG_NEWGEN message as the kernel sends it: nlmsghdr, nfgenmsg,
    NFTA_GEN_ID, then NFTA_GEN_PROC_PID (big-endian) and NFTA_GEN_PROC_NAME."""
    attributes = struct.pack("=HH", 8, 1) + struct.pack(">I", 7)
    if pid is not None:
        attributes += struct.pack("=HH", 8, nftwatch.NFTA_GEN_PROC_PID) + struct.pack(">I", pid)
        attributes += struct.pack("=HH", 13, 3) + b"iptables\0" + b"\0" * 3
    body = struct.pack("=BBH", 0, 0, 0) + attributes
    return struct.pack("=IHHII", 16 + len(body), nftwatch.NEWGEN, 0, 1, 0) + body


def newrule():
    body = struct.pack("=BBH", 2, 0, 0)
    return struct.pack("=IHHII", 16 + len(body), 10 << 8 | 6, 0, 1, 0) + body


class FakeSocket:
    def __init__(self, *received):
        self.received = list(received)
        self.closed = False

    def recv(self, size):
        if not self.received:
            raise BlockingIOError()
        item = self.received.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def fileno(self):
        return 99

    def close(self):
        self.closed = True


class Reactor(Clock):
    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass


def watching(*received, own=()):
    events = []
    watch = nftwatch.NftablesWatch(Reactor(), own=own)
    watch._changed, watch._lost = lambda: events.append("changed"), events.append
    watch._watch(FakeSocket(*received))  # what start() does with the subscribed socket
    watch.doRead()
    watch.reactor.advance(nftwatch.JUDGE_AFTER)
    return watch, events


def test_the_writers_of_a_datagram_are_read_from_each_change():
    datagram = newrule() + newgen(41) + newrule() + newgen(42) + newgen()
    assert list(nftwatch.writers(datagram)) == [41, 42, None]
    assert list(nftwatch.writers(b"\x03\x00")) == []  # truncated: nothing, no error


def test_changes_are_judged_once_the_drivers_commands_are_recorded():
    own = []
    events = []
    watch = nftwatch.NftablesWatch(Reactor(), own=own)
    watch._changed, watch._lost = lambda: events.append("changed"), events.append
    watch._watch(FakeSocket(newgen(41)))
    watch.doRead()  # the command committed before its PID was recorded
    own.append(41)
    watch.reactor.advance(nftwatch.JUDGE_AFTER)
    assert events == []


def test_changes_by_the_drivers_own_commands_are_no_news():
    assert watching(newrule() + newgen(41), newgen(42), own=[41, 42])[1] == []
    assert watching(newgen(41), newgen(43), own=[41, 42])[1] == ["changed"]
    assert watching(newgen(), own=[41])[1] == ["changed"]  # the writer unknown


def test_lost_announcements_are_a_change_and_a_broken_socket_ends_the_watch():
    assert watching(OSError(errno.ENOBUFS, "No buffer space"), own=[41])[1] == ["changed"]
    watch, events = watching(OSError(errno.EBADF, "Bad file descriptor"))
    assert [type(e) for e in events] == [OSError] and watch._sock is None


def test_a_watch_the_reactor_drops_says_so():
    from twisted.python.failure import Failure

    watch, events = watching()
    watch.connectionLost(Failure(OSError(errno.EBADF, "Bad file descriptor")))
    assert [type(e) for e in events] == [OSError] and watch._sock is None
    watch.stop()
    watch.connectionLost(Failure(OSError(errno.EBADF, "again")))  # stopped: nothing more
    assert len(events) == 1
