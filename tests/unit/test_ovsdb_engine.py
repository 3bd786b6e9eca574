"""The OVSDB engine's paths over a scripted IDL: all or nothing per operation,
also inside a shared transaction; TRY_AGAIN; a failed shared transaction
retried one operation at a time; a reconnect while committing; each phase's
timeout. Deterministic: a `Clock` and a server played by the test."""

import pytest

from ovsdriver.ovsdb import OVSDBUnavailable
from ovsdriver.values import Network
from ovsdriver.vswitch import VSwitch, VSwitchError
from tests.contract_vswitch import endpoint
from tests.scripted_idl import Txn, scripted_engine

NET_A, NET_B, NET_C = ("a1" * 32), ("b2" * 32), ("c3" * 32)


@pytest.fixture
def ovsdb(clock, idl):
    engine = scripted_engine(clock, idl, unavailable_timeout=3.0, apply_timeout=15.0)
    yield engine
    engine.running = False


@pytest.fixture
def vswitch(ovsdb):
    return VSwitch(ovsdb)


def network(network_id, **fields):
    return Network(network_id=network_id, bridge="obr-" + network_id[:11], **fields)


def outcome(deferred):
    box = []
    deferred.addBoth(box.append)
    return box


def serve(clock, idl, rounds=20):
    """Play a healthy server and ovs-vswitchd until nothing is outstanding."""
    for _ in range(rounds):
        while len(idl.answers) < len(idl.outstanding):
            idl.answer(Txn.SUCCESS)
        clock.advance(0.1)
        idl.catch_up()
        clock.advance(0.1)
        if not idl.outstanding:
            return
    raise AssertionError("the engine kept committing")


def bridges(idl):
    return sorted(row.name for row in idl.rows("Bridge"))


def test_a_failing_builder_in_a_batch_leaves_none_of_its_writes(clock, idl, vswitch):
    first = outcome(vswitch.add_network(network(NET_A, uplink="eth9")))
    clock.advance(0)
    serve(clock, idl)
    assert first == [None]
    # One tick: B (same uplink, so its builder raises after it made a bridge)
    # and C share a transaction.
    second = outcome(vswitch.add_network(network(NET_B, uplink="eth9")))
    third = outcome(vswitch.add_network(network(NET_C)))
    clock.advance(0)
    serve(clock, idl)
    assert second[0].check(VSwitchError)
    assert "uplink eth9 is already a port of another bridge" in str(second[0].value)
    assert third == [None]
    assert bridges(idl) == ["obr-a1a1a1a1a1a", "obr-c3c3c3c3c3c"]
    names = {row.name for row in idl.rows("Port")}
    assert "obr-b2b2b2b2b2b" not in names
    for writes in idl.committed:
        inserted = {data.get("name") for _, data in writes["inserted"].values()}
        assert "obr-b2b2b2b2b2b" not in inserted


def test_a_lone_failing_builder_commits_nothing(clock, idl, vswitch):
    outcome(vswitch.add_network(network(NET_A, uplink="eth9")))
    clock.advance(0)
    serve(clock, idl)
    committed = len(idl.committed)
    failed = outcome(vswitch.add_network(network(NET_B, uplink="eth9")))
    clock.advance(0)
    serve(clock, idl)
    assert failed[0].check(VSwitchError)
    assert len(idl.committed) == committed
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]


def test_try_again_rebuilds_the_transaction(clock, idl, vswitch):
    done = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    idl.answer(Txn.TRY_AGAIN)
    clock.advance(0.1)
    assert done == []
    serve(clock, idl)
    assert done == [None]
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]
    assert len(idl.committed) == 1


def test_try_again_that_hid_a_commit_does_not_duplicate(clock, idl, vswitch):
    done = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    idl.answer(Txn.TRY_AGAIN, applied=True)  # it went through after all
    clock.advance(0.1)
    serve(clock, idl)
    assert done == [None]
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]
    assert len(idl.rows("Port")) == 1


def test_a_failed_shared_transaction_is_retried_one_by_one(clock, idl, ovsdb, vswitch):
    good = outcome(vswitch.add_network(network(NET_A)))
    bad = outcome(vswitch.add_network(network(NET_B)))
    clock.advance(0)
    assert len(idl.outstanding) == 1  # one shared transaction
    idl.answer(Txn.ERROR, error="constraint violation")
    clock.advance(0.1)
    assert len(idl.outstanding) == 1  # now the first alone
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    idl.answer(Txn.ERROR, error="constraint violation")  # the second alone
    clock.advance(0.1)
    serve(clock, idl)
    assert good == [None]
    assert bad[0].check(OVSDBUnavailable)
    assert "OVSDB refused the change: constraint violation" in str(bad[0].value)
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]


def test_a_reconnect_while_committing_rebuilds_once(clock, idl, vswitch):
    done = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    assert len(idl.outstanding) == 1
    idl.disconnect()
    clock.advance(1.0)
    idl.reconnect()  # the lost transaction ends as TRY_AGAIN
    clock.advance(0.1)
    serve(clock, idl)
    assert done == [None]
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]


def test_a_reconnect_after_a_hidden_commit_does_not_duplicate(clock, idl, vswitch):
    done = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    idl.answer(Txn.TRY_AGAIN, applied=True)
    idl.disconnect()
    clock.advance(1.0)
    idl.reconnect()
    clock.advance(0.1)
    serve(clock, idl)
    assert done == [None]
    assert bridges(idl) == ["obr-a1a1a1a1a1a"]
    assert len(idl.committed) == 1


def test_an_operation_queued_while_disconnected_fails_after_the_unavailable_timeout(
    clock, idl, vswitch
):
    idl.disconnect()
    clock.advance(0.1)
    failed = outcome(vswitch.add_network(network(NET_A)))
    clock.pump([0.1] * 28)
    assert failed == []
    clock.pump([0.1] * 3)
    assert failed[0].check(OVSDBUnavailable)
    assert "cannot reach OVSDB at unix:/scripted/db.sock" in str(failed[0].value)
    idl.reconnect()
    clock.advance(1.0)
    assert idl.committed == [] and bridges(idl) == []


def test_a_commit_never_confirmed_fails_after_the_apply_timeout(clock, idl, vswitch):
    failed = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    clock.pump([1.0] * 15)
    assert failed[0].check(OVSDBUnavailable)
    assert "did not confirm the change within 15 s" in str(failed[0].value)


def test_a_change_vswitchd_never_applies_fails_after_the_apply_timeout(clock, idl, vswitch):
    failed = outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    idl.answer(Txn.SUCCESS)
    clock.pump([1.0] * 15)
    assert failed[0].check(OVSDBUnavailable)
    assert "ovs-vswitchd did not apply the change within 15 s" in str(failed[0].value)


# -- waiting for ovs-vswitchd to have applied what was committed ---------------


def committed_endpoint(clock, idl, vswitch):
    """An endpoint whose port OVSDB has (the addition fired) and ovs-vswitchd
    has not made yet."""
    outcome(vswitch.add_network(network(NET_A)))
    clock.advance(0)
    serve(clock, idl)
    ep = endpoint(network(NET_A))
    added = outcome(vswitch.add_endpoint(ep))
    clock.advance(0)
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert added == [ep], "the addition waited for ovs-vswitchd"
    return ep


def test_an_endpoint_is_ready_only_once_vswitchd_applied_its_port(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    ready = outcome(vswitch.port_ready(ep))
    clock.pump([0.1] * 5)
    assert ready == []
    idl.catch_up()
    clock.advance(0.1)
    assert ready == [ep]
    assert outcome(vswitch.port_ready(ep)) == [ep]  # nothing left to wait for


def test_readiness_waits_for_its_own_port_not_for_later_ones(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    idl.catch_up()  # ovs-vswitchd made the first port
    later = endpoint(network(NET_A), endpoint_id="f2" * 32, port="oep-f2f2f2f2f2f")
    outcome(vswitch.add_endpoint(later))
    clock.advance(0)
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert outcome(vswitch.port_ready(ep)) == [ep]
    assert outcome(vswitch.port_ready(later)) == []


def test_after_a_reconnect_readiness_waits_for_what_ovsdb_holds(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    vswitch._adding.clear()  # as in a driver restarted since the addition
    idl.disconnect()
    clock.advance(1.0)
    idl.reconnect()
    clock.advance(0.1)
    ready = outcome(vswitch.port_ready(ep))
    clock.pump([0.1] * 5)
    assert ready == []
    idl.catch_up()
    clock.advance(0.1)
    assert ready == [ep]


def test_a_port_vswitchd_reports_broken_is_not_ready(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    (iface,) = [row for row in idl.rows("Interface") if row.name == ep.port]
    iface._data["error"] = ["could not open network device oep-x (No such device)"]
    idl.catch_up()
    clock.advance(0.1)
    failed = outcome(vswitch.port_ready(ep))
    assert failed[0].check(VSwitchError)
    assert f"could not add port {ep.port}: could not open" in str(failed[0].value)


def test_readiness_vswitchd_never_reaches_fails_after_the_apply_timeout(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    failed = outcome(vswitch.port_ready(ep))
    clock.pump([1.0] * 15)
    assert failed[0].check(OVSDBUnavailable)
    assert "ovs-vswitchd did not apply the change within 15 s" in str(failed[0].value)


def test_a_sandbox_is_sent_after_the_turn_that_recorded_it(clock, idl, vswitch):
    ep = committed_endpoint(clock, idl, vswitch)
    recorded = outcome(vswitch.set_sandbox(ep.endpoint_id, "/var/run/docker/netns/a"))
    assert idl.outstanding == []  # Join's answer goes out first
    clock.advance(0)
    assert len(idl.outstanding) == 1
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert recorded == [None]
    assert sandbox(idl, ep) == "/var/run/docker/netns/a"
    later = endpoint(network(NET_A), endpoint_id="f2" * 32, port="oep-f2f2f2f2f2f")
    outcome(vswitch.add_endpoint(later))
    clock.advance(0)
    left = outcome(vswitch.set_sandbox(ep.endpoint_id, None))
    assert len(idl.outstanding) == 1  # one transaction at a time
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert len(idl.outstanding) == 1
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    assert left == [None]
    assert sandbox(idl, ep) is None


def sandbox(idl, ep):
    (iface,) = [row for row in idl.rows("Interface") if row.name == ep.port]
    return iface.external_ids.get("ovsdriver-sandbox")
