"""How the OVSDB engine has a real epoll reactor watch the IDL's sockets: once
while they stay the same, and never a closed or reused descriptor."""

import os
import socket

import pytest
from ovs.poller import POLLIN
from twisted.internet.epollreactor import EPollReactor

from ovsdriver.ovsdb import OVSDB, _Watch


class _WaitingIdl:
    """Stands in for python-ovs's IDL where the engine asks what to wait on."""

    def __init__(self, sock):
        self.sock = sock

    def wait(self, poller):
        poller.fd_wait(self.sock, POLLIN)


@pytest.fixture
def reactor():
    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    for call in reactor.getDelayedCalls():
        call.cancel()
    reactor._poller.close()


@pytest.fixture
def pairs():
    made = []

    def pair():
        made.append(socket.socketpair())
        return made[-1]

    yield pair
    for a, b in made:
        a.close()
        b.close()


def engine_on(reactor, sock):
    engine = OVSDB(reactor, "unix:/nowhere/db.sock")
    engine.idl = _WaitingIdl(sock)
    engine.ticks = 0

    def tick():
        engine.ticks += 1

    engine._tick = tick
    return engine


def watches(reactor):
    """The engine's watches among the reactor's readers (it has a waker too)."""
    return [reader for reader in reactor.getReaders() if isinstance(reader, _Watch)]


def registrations(reactor):
    counted = {"add": 0, "remove": 0}
    add, remove = reactor.addReader, reactor.removeReader

    def counting(kind, call):
        def wrapper(reader):
            counted[kind] += 1
            return call(reader)

        return wrapper

    reactor.addReader, reactor.removeReader = counting("add", add), counting("remove", remove)
    return counted


def test_a_socket_stays_registered_across_ticks(reactor, pairs):
    ours, peer = pairs()
    engine = engine_on(reactor, ours)
    counted = registrations(reactor)
    for _ in range(5):
        engine._watch()
    assert counted == {"add": 1, "remove": 0}
    peer.send(b"x")
    reactor.doIteration(0)
    assert engine.ticks == 1


def test_a_closed_socket_whose_number_the_next_one_takes_is_not_confused(reactor, pairs):
    old, _ = pairs()
    engine = engine_on(reactor, old)
    engine._watch()
    number = old.fileno()
    old.close()  # python-ovs closes it without telling (a reconnect)
    new, peer = pairs()
    if number not in (new.fileno(), peer.fileno()):
        pytest.skip("the kernel did not reuse the closed number")
    if peer.fileno() == number:
        new, peer = peer, new
    engine.idl.sock = new
    engine._watch()
    peer.send(b"x")
    reactor.doIteration(0)
    assert engine.ticks == 1
    assert len(watches(reactor)) == 1


def test_stopping_unregisters_and_closes_the_duplicate(reactor, pairs):
    ours, _ = pairs()
    engine = engine_on(reactor, ours)
    engine._watch()
    (watch,) = watches(reactor)
    engine._unwatch()
    assert watches(reactor) == []
    with pytest.raises(OSError):
        os.fstat(watch.fileno())
