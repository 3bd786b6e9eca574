"""The netlink contract, run against the in-memory FakeNetlink."""

import itertools

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ovsdriver.testing import FakeNetlink
from tests.contract_netlink import LinkView, NetlinkContract, cidr

_sandbox_numbers = itertools.count()


def result_of(deferred, clock=None):
    """The result of a Deferred that fires on the *clock*'s next turn (at
    once without a clock); raises its failure."""
    box = []
    deferred.addBoth(box.append)
    if clock is not None:
        assert not box, "FakeNetlink answered at once, not later as the real one does"
        clock.advance(0)
    assert box, "FakeNetlink returned a Deferred that has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class TestFakeNetlink(NetlinkContract):
    @pytest.fixture(autouse=True)
    def _fake(self):
        self.clock = Clock()
        self.netlink = FakeNetlink(clock=self.clock)
        self.netlink.start()
        yield
        self.netlink.stop()

    def call(self, method, *args, **kwargs):
        return result_of(method(*args, **kwargs), self.clock)

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

    def remove_sandbox(self, sandbox):
        self.netlink.remove_sandbox(sandbox)

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


def test_concurrent_calls_interleave_in_the_order_they_were_made():
    clock = Clock()
    fake = FakeNetlink(clock=clock)
    fake.add_link("a")
    done = []
    fake.set_link("a", mtu=1400).addCallback(lambda _: done.append("set"))
    fake.delete_link("a").addCallback(lambda _: done.append("deleted"))
    assert done == [] and fake.state("a") is not None
    clock.advance(0)
    assert done == ["set", "deleted"]
    assert fake.state("a") is None


def test_a_sandboxs_veth_takes_its_host_end_along_when_the_sandbox_goes():
    """Without a host end, OVS reports the veth port as missing."""
    fake = FakeNetlink()
    result_of(fake.create_veth("ove-h", "oep-p", 1500))
    fake.add_sandbox("/fake/netns/x")
    fake.move_to_sandbox("oep-p", "/fake/netns/x", "eth0")
    fake.remove_sandbox("/fake/netns/x")
    assert fake.state("ove-h") is None
