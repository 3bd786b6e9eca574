"""Address allocation over a scripted Northbound database: a claim lost to
another host is chosen again elsewhere, a commit hidden by a reconnect is not
claimed twice, claims sharing a transaction get distinct addresses, and a
switch goes only when nobody uses it. (The same against a real ovsdb-server,
with two engines racing, is in tests/integration/test_northbound.py.)"""

import pytest
from twisted.internet import defer

from ovsdriver.ipam import allocate
from ovsdriver.northbound import NB_TABLES, Northbound, NorthboundError
from ovsdriver.ovsdb import OVSDBUnavailable
from tests.scripted_idl import Txn, scripted_engine

CONFLICT_ERROR = (
    'constraint violation: Transaction causes multiple rows in "Logical_Switch_Port" table '
    'to have identical values ("blue/10.0.0.2") for index on column "name".'
)


@pytest.fixture
def northbound(clock, idl):
    engine = scripted_engine(
        clock,
        idl,
        "unix:/scripted/nb.sock",
        tables=NB_TABLES,
        database="OVN_Northbound",
        name="the OVN Northbound database",
        wait_for_vswitchd=False,
    )
    yield Northbound(engine)
    engine.running = False


def serve(clock, idl, rounds=50):
    """Play a healthy server until nothing is outstanding."""
    for _ in range(rounds):
        clock.advance(0)
        while len(idl.answers) < len(idl.outstanding):
            idl.answer(Txn.SUCCESS)
        clock.advance(0.1)
        if not idl.outstanding:
            return
    raise AssertionError("the engine kept committing")


def result(clock, idl, d):
    box = []
    defer.ensureDeferred(d).addBoth(box.append)
    serve(clock, idl)
    assert box, "no result"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def claims(idl):
    return sorted(row.name for row in idl.rows("Logical_Switch_Port") if row.name != "blue/gateway")


@pytest.fixture
def blue(clock, idl, northbound):
    result(clock, idl, northbound.request_pool("blue", "10.0.0.0/24", "host-a"))
    assert result(clock, idl, northbound.set_gateway("blue", None)) == "10.0.0.1/24"
    return northbound


def test_a_claim_lost_to_another_host_is_chosen_again_elsewhere(clock, idl, blue):
    box = []
    defer.ensureDeferred(allocate(clock, blue, "blue", None, "host-a")).addBoth(box.append)
    clock.advance(0)  # the claim of 10.0.0.2 is committing...
    (txn,) = idl.outstanding
    inserted = [data["name"] for _, data in txn.writes["inserted"].values()]
    assert inserted == ["blue/10.0.0.2"]
    # ...while another host's claim of the same address commits first.
    switch = next(row for row in idl.rows("Logical_Switch") if row.name == "blue")
    theirs = idl._load("Logical_Switch_Port", {"name": "blue/10.0.0.2"})
    switch._data["ports"] = [*switch._data["ports"], theirs.uuid]
    idl.answer(Txn.ERROR, error=CONFLICT_ERROR)
    clock.advance(0.1)
    assert box == []  # not failed: it looks again
    serve(clock, idl)
    (address,) = box
    assert address != "10.0.0.2/24" and address.endswith("/24")
    assert claims(idl) == sorted(["blue/10.0.0.2", "blue/" + address.split("/")[0]])


def test_other_refusals_are_not_retried(clock, idl, blue):
    box = []
    defer.ensureDeferred(allocate(clock, blue, "blue", None, "host-a")).addBoth(box.append)
    clock.advance(0)
    idl.answer(Txn.ERROR, error="referential integrity violation")
    clock.advance(0.1)
    assert box[0].check(OVSDBUnavailable)
    assert "referential integrity violation" in str(box[0].value)
    assert len(idl.committed) == 2  # the switch and its gateway only


def test_a_claim_a_reconnect_hid_is_not_made_twice(clock, idl, blue):
    box = []
    defer.ensureDeferred(allocate(clock, blue, "blue", None, "host-a")).addBoth(box.append)
    clock.advance(0)
    idl.answer(Txn.TRY_AGAIN, applied=True)  # it went through after all
    clock.advance(0.1)
    serve(clock, idl)
    assert box == ["10.0.0.2/24"]
    assert claims(idl) == ["blue/10.0.0.2"]


def test_claims_sharing_a_transaction_get_distinct_addresses(clock, idl, blue):
    before = len(idl.committed)
    work = [defer.ensureDeferred(allocate(clock, blue, "blue", None, "host-a")) for _ in range(5)]
    box = []
    defer.gatherResults(work).addBoth(box.append)
    serve(clock, idl)
    (addresses,) = box
    assert addresses == [f"10.0.0.{n}/24" for n in range(2, 7)]
    assert len(idl.committed) == before + 1  # one transaction for the five
    # The next one goes on after the last, not back to the first free one.
    result(clock, idl, blue.release_address("blue", "10.0.0.3"))
    assert result(clock, idl, allocate(clock, blue, "blue", None, "host-a")) == "10.0.0.7/24"


def test_given_addresses_are_checked_against_the_switch(clock, idl, blue):
    assert result(clock, idl, allocate(clock, blue, "blue", "10.0.0.9", "host-a")) == (
        "10.0.0.9/24"
    )
    for address, message in (
        ("10.0.0.9", "10.0.0.9 is already in use on OVN switch blue"),
        ("10.0.0.1", "is the gateway of OVN switch blue"),
        ("10.0.1.9", "not a host address of subnet 10.0.0.0/24"),
    ):
        with pytest.raises(NorthboundError, match=message):
            result(clock, idl, allocate(clock, blue, "blue", address, "host-b"))


def test_the_switch_goes_only_when_nobody_uses_it(clock, idl, blue):
    result(clock, idl, blue.request_pool("blue", None, "host-b"))
    address = result(clock, idl, allocate(clock, blue, "blue", None, "host-b"))
    assert result(clock, idl, blue.release_pool("blue", "host-a")) is False
    assert result(clock, idl, blue.release_pool("blue", "host-b")) is False  # a claim is left
    result(clock, idl, blue.release_address("blue", address))
    assert result(clock, idl, blue.release_pool("blue", "host-b")) is True
    assert idl.rows("Logical_Switch") == [] and idl.rows("Logical_Switch_Port") == []
