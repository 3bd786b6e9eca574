"""CreateEndpoint answers at once and the port is made while the engine
prepares Join, which waits for it but not for its record of the sandbox (the
driver over verified fakes)."""

import pytest
from twisted.internet import defer
from twisted.logger import Logger, LogLevel, formatEvent

from ovsdriver.driver import Driver
from ovsdriver.testing import FakeFirewall, FakeNetlink, FakeVSwitch
from ovsdriver.values import Network
from ovsdriver.vswitch import VSwitch, VSwitchError
from tests.scripted_idl import Txn, scripted_engine

NET = "4e" * 32
EP = "e9" * 32
V4 = [{"AddressSpace": "LocalDefault", "Pool": "10.30.0.0/24", "Gateway": "10.30.0.1/24"}]
INTERFACE = {"Address": "10.30.0.2/24"}


class GatedVSwitch(FakeVSwitch):
    """A FakeVSwitch whose port additions wait until the test opens the gate,
    as ovs-vswitchd takes its time making a port."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate = defer.Deferred()

    def add_endpoint(self, endpoint):
        return self.gate.addCallback(lambda _: super(GatedVSwitch, self).add_endpoint(endpoint))


def result(d):
    box = []
    d.addBoth(box.append)
    return box


@pytest.fixture
def driver():
    kernel = FakeNetlink()
    driver = Driver(GatedVSwitch(kernel=kernel), kernel, FakeFirewall())
    options = {"com.docker.network.generic": {}}
    (created,) = result(defer.ensureDeferred(driver.create_network(NET, options, V4, [])))
    assert created is None
    return driver


def create(driver, endpoint_id=EP):
    return result(defer.ensureDeferred(driver.create_endpoint(NET, endpoint_id, INTERFACE)))


def join(driver, endpoint_id=EP):
    return result(defer.ensureDeferred(driver.join(NET, endpoint_id, "/var/run/docker/netns/x")))


def test_create_endpoint_answers_before_the_port_exists_and_join_waits_for_it(driver):
    (answer,) = create(driver)
    assert "MacAddress" in answer
    assert not driver.vswitch.port_exists("oep-" + EP[:11])
    joined = join(driver)
    assert joined == []
    driver.vswitch.gate.callback(None)
    assert joined[0]["InterfaceName"]["SrcName"] == "oep-" + EP[:11]
    assert driver.netlink.state("oep-" + EP[:11]) is not None


def test_a_repeated_create_endpoint_gives_the_same_mac(driver):
    (first,) = create(driver)
    second = create(driver)
    assert second == []  # it waits for the first one's port
    driver.vswitch.gate.callback(None)
    assert second == [first]


def test_a_port_ovs_cannot_make_fails_join_and_goes_with_the_endpoint(driver):
    driver.vswitch.break_port("oep-" + EP[:11])
    (answer,) = create(driver)
    assert "MacAddress" in answer
    joined = join(driver)
    driver.vswitch.gate.callback(None)
    assert joined[0].check(VSwitchError)
    assert "could not add port oep-" + EP[:11] in joined[0].getErrorMessage()
    # The engine deletes the endpoint of a failed Join.
    assert result(defer.ensureDeferred(driver.delete_endpoint(NET, EP))) == [None]
    assert not driver.vswitch.port_exists("oep-" + EP[:11])


def test_a_port_ovsdb_refuses_fails_join(driver):
    other = EP[:11] + "0" * 53  # its port has the same name
    create(driver, other)
    driver.vswitch.gate.callback(None)
    create(driver)
    joined = join(driver)
    assert joined[0].check(VSwitchError)
    assert "port oep-" + EP[:11] + " already exists" in joined[0].getErrorMessage()
    (kept,) = join(driver, other)
    assert kept["InterfaceName"]["SrcName"] == "oep-" + EP[:11]


def test_delete_endpoint_waits_for_the_port_being_made(driver):
    create(driver)
    deleted = result(defer.ensureDeferred(driver.delete_endpoint(NET, EP)))
    assert deleted == []
    driver.vswitch.gate.callback(None)
    assert deleted == [None]
    assert not driver.vswitch.port_exists("oep-" + EP[:11])


def test_a_restarted_driver_joins_a_port_an_earlier_run_made(driver):
    create(driver)
    driver.vswitch.gate.callback(None)
    restarted = Driver(driver.vswitch, driver.netlink, driver.firewall)
    (joined,) = join(restarted)
    assert joined["InterfaceName"]["SrcName"] == "oep-" + EP[:11]


def test_other_requests_about_the_endpoint_wait_for_its_port(driver):
    create(driver)
    info = result(defer.ensureDeferred(driver.endpoint_info(NET, EP)))
    programmed = result(defer.ensureDeferred(driver.program_external_connectivity(NET, EP, {})))
    assert info == programmed == []
    driver.vswitch.gate.callback(None)
    assert info[0]["port"] == "oep-" + EP[:11]
    assert programmed == [None]
    (joined,) = join(driver)  # the outcome is still there for Join
    assert joined["InterfaceName"]["SrcName"] == "oep-" + EP[:11]


def test_an_engine_that_never_joins_leaves_little_in_memory(driver, monkeypatch):
    monkeypatch.setattr("ovsdriver.driver.MAX_FAILED_PLUGS", 3)
    driver.vswitch.gate.callback(None)
    made = [f"{n:02x}" * 32 for n in range(1, 6)]
    for endpoint_id in made:
        create(driver, endpoint_id)
    assert driver._plugging == driver._failed == {}  # Join reads OVSDB
    refused = [endpoint_id[:11] + "f" * 53 for endpoint_id in made]  # names taken
    for endpoint_id in refused:
        create(driver, endpoint_id)
    assert list(driver._failed) == refused[2:]  # the oldest failures went
    (joined,) = join(driver, refused[-1])
    assert "already exists" in joined.getErrorMessage()
    (joined,) = join(driver, refused[0])
    assert "is not known to the ovs driver" in joined.getErrorMessage()
    assert list(driver._failed) == refused[2:4]
    (joined,) = join(driver, made[0])
    assert joined["InterfaceName"]["SrcName"] == "oep-" + made[0][:11]


class GatedNetlink(FakeNetlink):
    """A FakeNetlink whose veth pairs wait until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = defer.Deferred()

    def create_veth(self, *args):
        return self.gate.addCallback(lambda _: FakeNetlink.create_veth(self, *args))


def test_a_join_during_a_veth_pairs_making_shares_the_ports_transaction(clock, idl):
    engine = scripted_engine(clock, idl)
    vswitch = VSwitch(engine)
    driver = Driver(vswitch, GatedNetlink(), FakeFirewall())
    network = Network(network_id=NET, bridge="obr-" + NET[:11], port_type="veth")
    added = result(vswitch.add_network(network))
    clock.advance(0)
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    idl.catch_up()
    clock.advance(0.1)
    assert added == [None]
    (answer,) = create(driver)
    joined = join(driver)
    assert joined == [] and idl.outstanding == []
    driver.netlink.gate.callback(None)  # the pair is made: the port is queued
    clock.advance(0)
    (txn,) = idl.outstanding  # in one transaction with the sandbox
    (iface,) = [
        data for table, data in txn.writes["inserted"].values() if table.name == "Interface"
    ]
    assert iface["external_ids"]["ovsdriver-sandbox"] == "/var/run/docker/netns/x"
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert joined == []  # ovs-vswitchd has not made the port yet
    idl.catch_up()
    clock.advance(0.1)
    assert joined[0]["InterfaceName"]["SrcName"] == "oep-" + EP[:11]
    engine.running = False


def made_port(clock, idl, driver, vswitch):
    """An internal network and an endpoint whose port ovs-vswitchd has made."""
    network = Network(network_id=NET, bridge="obr-" + NET[:11])
    for step in (lambda: vswitch.add_network(network), lambda: create(driver)):
        step()
        clock.advance(0)
        idl.answer(Txn.SUCCESS)
        clock.advance(0.1)
        idl.catch_up()
        clock.advance(0.1)


def test_join_answers_before_its_record_of_the_sandbox_is_committed(clock, idl):
    engine = scripted_engine(clock, idl)
    vswitch = VSwitch(engine)
    driver = Driver(vswitch, FakeNetlink(), FakeFirewall())
    made_port(clock, idl, driver, vswitch)
    joined = join(driver)
    assert joined[0]["InterfaceName"]["SrcName"] == "oep-" + EP[:11]
    clock.advance(0)
    (txn,) = idl.outstanding  # the record, sent after the answer
    (change,) = txn.writes["changed"].values()
    assert change["external_ids"]["ovsdriver-sandbox"] == "/var/run/docker/netns/x"
    engine.running = False


def test_a_record_of_the_sandbox_that_fails_is_logged(clock, idl, monkeypatch):
    events = []
    monkeypatch.setattr("ovsdriver.driver.log", Logger(observer=events.append))
    engine = scripted_engine(clock, idl)
    vswitch = VSwitch(engine)
    driver = Driver(vswitch, FakeNetlink(), FakeFirewall())
    made_port(clock, idl, driver, vswitch)
    (joined,) = join(driver)
    assert joined["InterfaceName"]["SrcName"] == "oep-" + EP[:11]
    clock.advance(0)
    idl.answer(Txn.ERROR, error="the server said no")
    clock.advance(0.1)
    (warning,) = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert warning.startswith("cannot record sandbox /var/run/docker/netns/x of endpoint e9e9")
    assert "the reconciler finds it again once the container runs" in warning
    engine.running = False
