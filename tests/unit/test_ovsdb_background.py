"""Background operations (deletions) over the scripted IDL: an addition never
waits behind one, and one still goes under constant load."""

import pytest

from tests.scripted_idl import Txn, scripted_engine

TICK = 0.01


@pytest.fixture
def ovsdb(clock, idl):
    engine = scripted_engine(clock, idl, unavailable_timeout=3.0, apply_timeout=15.0)
    yield engine
    engine.running = False


def bridge(name):
    """A builder adding a bridge (it waits for ovs-vswitchd)."""
    return lambda ctx: ctx.insert("Bridge", name) and None


def outcome(deferred):
    box = []
    deferred.addBoth(box.append)
    return box


def committing(idl):
    """The names of the bridges each outstanding transaction inserts."""
    return [
        sorted(data["name"] for _, data in txn.writes["inserted"].values())
        for txn in idl.outstanding
    ]


def run_for(clock, seconds):
    for _ in range(round(seconds / TICK)):
        clock.advance(TICK)


def test_an_addition_overtakes_a_background_operation_queued_before_it(clock, idl, ovsdb):
    deletion = outcome(ovsdb.transact(bridge("background"), background=True))
    addition = outcome(ovsdb.transact(bridge("addition")))
    clock.advance(0)
    assert committing(idl) == [["addition"]]
    idl.answer(Txn.SUCCESS)
    run_for(clock, 0.2)
    assert committing(idl) == []  # the addition waits for ovs-vswitchd: so does the deletion
    idl.catch_up()
    while not addition and clock.seconds() < 5:
        clock.advance(TICK)
    assert addition == [None] and committing(idl) == []
    ended = clock.seconds()
    while not idl.outstanding and clock.seconds() < ended + 1:
        clock.advance(TICK)
    assert committing(idl) == [["background"]] and deletion == []
    assert clock.seconds() - ended == pytest.approx(ovsdb.background_quiet, abs=2 * TICK)


def test_background_operations_go_in_batches_of_their_own_one_at_a_time(clock, idl, ovsdb):
    """An addition then waits for one batch at most in ovs-vswitchd (which
    closes a tap in ~17 ms), not for every deletion queued."""
    for name in ("b1", "b2"):
        ovsdb.transact(bridge(name), background=True)
    run_for(clock, ovsdb.background_quiet + 2 * TICK)
    assert committing(idl) == [["b1"]]
    idl.answer(Txn.SUCCESS)
    run_for(clock, 0.2)
    assert committing(idl) == []  # until ovs-vswitchd has applied b1
    idl.catch_up()
    caught_up = clock.seconds()
    while not idl.outstanding and clock.seconds() < caught_up + 5:
        clock.advance(TICK)
    assert committing(idl) == [["b2"]]
    assert clock.seconds() - caught_up <= ovsdb.fallback_tick + TICK


def test_only_a_background_batch_others_wait_behind_asks_ovs_vswitchd_to_say_when_done(
    clock, idl, ovsdb
):
    """A deletion costs ovs-vswitchd nothing to wait for (no next_cfg to
    apply and write back) unless another batch is to follow it."""

    bridge_row = idl._load("Bridge", {"name": "br"})

    def mark(key):  # like a port's deletion: nothing waits for ovs-vswitchd
        return lambda ctx: bridge_row.setkey("external_ids", key, "x") and None

    for key in ("k1", "k2"):
        ovsdb.transact(mark(key), background=True)
    run_for(clock, ovsdb.background_quiet + 2 * TICK)
    assert [txn.writes["increment"] is not None for txn in idl.outstanding] == [True]
    idl.answer(Txn.SUCCESS)
    run_for(clock, 0.2)
    assert idl.outstanding == []
    idl.catch_up()
    run_for(clock, ovsdb.fallback_tick + TICK)
    assert [txn.writes["increment"] is not None for txn in idl.outstanding] == [False]


def test_a_background_batch_holds_more_the_more_ports_there_are(clock, idl, ovsdb):
    """With many ports a transaction of its own costs ovs-vswitchd more than
    closing taps: one more operation per `ports_per_background_op` ports."""
    for n in range(2 * ovsdb.ports_per_background_op):
        idl._load("Port", {"name": f"p{n}"})
    for name in ("b1", "b2", "b3", "b4"):
        ovsdb.transact(bridge(name), background=True)
    run_for(clock, ovsdb.background_quiet + 2 * TICK)
    assert committing(idl) == [["b1", "b2", "b3"]]


def test_the_next_background_batch_waits_for_ovs_vswitchd_only_so_long(clock, idl, ovsdb):
    for name in ("b1", "b2"):
        ovsdb.transact(bridge(name), background=True)
    queued = clock.seconds()
    run_for(clock, ovsdb.background_quiet + 2 * TICK)
    idl.answer(Txn.SUCCESS)
    run_for(clock, 0.2)
    assert committing(idl) == []
    # ovs-vswitchd never catches up.
    while not idl.outstanding and clock.seconds() < queued + 5:
        clock.advance(TICK)
    assert committing(idl) == [["b2"]]
    assert clock.seconds() - queued == pytest.approx(ovsdb.background_limit, abs=0.15)


def test_under_constant_load_a_background_operation_still_goes(clock, idl, ovsdb):
    ovsdb.transact(bridge("addition"))
    clock.advance(0)
    idl.answer(Txn.SUCCESS)
    run_for(clock, 0.2)
    assert committing(idl) == []
    queued = clock.seconds()
    deletion = outcome(ovsdb.transact(bridge("background"), background=True))
    # ovs-vswitchd never catches up: the addition keeps waiting.
    while not idl.outstanding and clock.seconds() < queued + 5:
        clock.advance(TICK)
    assert committing(idl) == [["background"]]
    assert clock.seconds() - queued == pytest.approx(ovsdb.background_limit, abs=0.15)
    assert deletion == []


def test_under_constant_load_an_overdue_background_operation_joins_the_next_batch(
    clock, idl, ovsdb
):
    ovsdb.transact(bridge("first"))
    clock.advance(0)
    deletion = outcome(ovsdb.transact(bridge("background"), background=True))
    # Additions keep coming: one is always queued when a transaction ends.
    for n in range(200):
        if any("background" in names for names in committing(idl)):
            break
        ovsdb.transact(bridge(f"a{n}"))
        idl.answer(Txn.SUCCESS)
        idl.catch_up()
        clock.advance(TICK)
    (names,) = committing(idl)
    assert "background" in names and len(names) == 2  # with the next addition
    assert clock.seconds() <= ovsdb.background_limit + 0.15
    assert deletion == []
