"""The firewall contract, run against the in-memory FakeFirewall."""

import pytest
from twisted.python.failure import Failure

from ovsdriver.firewall import FirewallError
from ovsdriver.testing import FakeFirewall
from tests.contract_firewall import FirewallContract, FirewallView, network


def result_of(deferred):
    """The result of an already-fired Deferred; raises its failure."""
    box = []
    deferred.addBoth(box.append)
    assert box, "FakeFirewall returned a Deferred that has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class TestFakeFirewall(FirewallContract):
    @pytest.fixture(autouse=True)
    def _fake(self):
        self.firewall = FakeFirewall()
        self.foreign = None

    def call(self, method, *args):
        return result_of(method(*args))

    def view(self):
        fake = self.firewall
        return FirewallView(
            networks=frozenset(fake.isolated()),
            masqueraded=frozenset(fake.masqueraded()),
            blocked=frozenset(fake.blocked()),
            published=frozenset(fake.published()),
            forwarding=frozenset(fake.forwarding),
            owned=fake.owned,
            localnet=frozenset(fake.localnet()),
            docker_isolated=frozenset(fake.docker_isolated()),
        )

    def plant_foreign_rules(self):
        self.foreign = "planted"  # the fake holds no rules but its own

    def foreign_rules_intact(self):
        return self.foreign == "planted"

    def snapshot(self):
        return (self.firewall.networks, frozenset(self.firewall.forwarding))

    def plant_docker_chains(self):
        self.firewall.docker_appears()

    def flush_from_outside(self):
        self.firewall.flush()


def test_fail_next_fails_one_apply_and_changes_nothing():
    fake = FakeFirewall()
    result_of(fake.apply([network(1)]))
    fake.fail_next("iptables-restore failed: boom")
    with pytest.raises(FirewallError, match="boom"):
        result_of(fake.apply([network(2)]))
    assert [n.ifname for n in fake.networks] == ["fwc-1"]
    result_of(fake.apply([network(2)]))
    assert fake.network(network(2).network_id).ifname == "fwc-2"
    assert fake.applied == 2
