"""The netlink contract, run against the in-memory FakeNetlink."""

import itertools

import pytest
from twisted.python.failure import Failure

from ovsdriver.testing import FakeNetlink
from tests.contract_netlink import LinkView, NetlinkContract, cidr

_sandbox_numbers = itertools.count()


def result_of(deferred):
    """The result of an already-fired Deferred; raises its failure."""
    box = []
    deferred.addBoth(box.append)
    assert box, "FakeNetlink returned a Deferred that has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class TestFakeNetlink(NetlinkContract):
    @pytest.fixture(autouse=True)
    def _fake(self):
        self.netlink = FakeNetlink()
        self.netlink.start()
        yield
        self.netlink.stop()

    def call(self, method, *args, **kwargs):
        return result_of(method(*args, **kwargs))

    def make_link(self, name):
        self.netlink.add_link(name)

    def make_link_while_waiting(self, name):
        self.netlink.appear_on_wait(name)

    def observe(self, name):
        return _view(self.netlink.state(name))

    def make_sandbox(self):
        path = f"/fake/netns/sandbox-{next(_sandbox_numbers)}"
        self.netlink.add_sandbox(path)
        return path

    def make_tap(self, name, mac):
        self.netlink.add_link(name, mac=mac)

    def make_sandbox_link(self, sandbox, name, mac, addresses=(), live=False):
        self.netlink.add_sandbox_link(sandbox, name, mac, addresses=addresses, carrier=live)

    def add_sandbox_route(self, sandbox, dst, gateway, dev):
        self.netlink.add_sandbox_route(sandbox, dst, gateway, dev)

    def observe_in_sandbox(self, sandbox, name):
        return _view(self.netlink.sandbox_state(sandbox, name))

    def sandbox_routes(self, sandbox):
        return frozenset(
            (r.dst if r.dst == "default" else cidr(r.dst), r.gateway, r.dev)
            for r in self.netlink.sandbox_routes(sandbox)
        )


def _view(state):
    if state is None:
        return None
    return LinkView(
        mtu=state.mtu,
        mac=state.mac,
        up=state.up,
        addresses=state.addresses,
        tx_checksum=state.tx_checksum,
    )


def test_fake_state_remembers_the_veth_peer():
    fake = FakeNetlink()
    result_of(fake.create_veth("h", "p", 1500))
    assert fake.state("h").peer == "p"
    assert fake.state("p").peer == "h"
    assert fake.state("p").tx_checksum is False
