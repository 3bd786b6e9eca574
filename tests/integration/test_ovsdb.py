"""The reactor-driven OVSDB connection against a real ovsdb-server and
ovs-vswitchd: batching, outages, restarts and vswitchd failures."""

import time

import ovs.db.idl
import pytest
from twisted.internet import defer

from ovsdriver.ovsdb import OVSDB, OVSDBUnavailable, by_name, column
from ovsdriver.values import Endpoint, Network
from ovsdriver.vswitch import VSwitch
from tests.reactor_thread import get_reactor, run_in_reactor
from tests.world import wait_until

NET = "0d" * 32


def start(remote, **kwargs):
    service = OVSDB(get_reactor(), remote, **kwargs)
    run_in_reactor(service.startService)
    return service


@pytest.fixture
def services():
    started = []
    yield started
    for service in started:
        run_in_reactor(service.stopService)


def network():
    return Network(network_id=NET, bridge="obr-" + NET[:11])


def endpoint(n):
    eid = f"{n:02x}" * 32
    return Endpoint(
        endpoint_id=eid,
        network_id=NET,
        bridge="obr-" + NET[:11],
        port="oep-" + eid[:11],
        ifname="oep-" + eid[:11],
        mac=f"02:00:00:00:00:{n:02x}",
    )


def next_cfg(world):
    return int(world.ovs.vsctl("get", "Open_vSwitch", ".", "next_cfg"))


def test_concurrent_operations_share_transactions(ovs_world, services):
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())
    before = next_cfg(ovs_world)
    run_in_reactor(
        lambda: defer.gatherResults([vswitch.add_endpoint(endpoint(n)) for n in range(16)])
    )
    reconfigurations = next_cfg(ovs_world) - before
    assert 1 <= reconfigurations < 16
    ports = ovs_world.ovs.vsctl("list-ports", "obr-" + NET[:11]).split()
    assert len(ports) == 16
    # Each port really exists in the datapath.
    links = ovs_world.netns.links()
    assert all(endpoint(n).port in links for n in range(16))


def test_an_addition_overtakes_a_deletion_queued_before_it(ovs_world, services):
    """ovs-vswitchd applies changes in order: a deletion committed first would
    make the addition wait for the tap to close."""
    ovsdb = start(ovs_world.ovs.remote)
    ovsdb.background_limit = 30.0  # only a quiet moment lets the deletion go
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())
    gone, added = endpoint(1), endpoint(2)
    run_in_reactor(vswitch.add_endpoint, gone)
    run_in_reactor(vswitch.mark_removed, gone.endpoint_id)

    def deletion_then_addition():
        removal = vswitch.finish_removals([gone.port])
        addition = vswitch.add_endpoint(added)
        addition.addCallback(lambda _: by_name(ovsdb.idl, "Port", gone.port) is not None)
        return defer.gatherResults([removal, addition])

    removed, still_there_when_added = run_in_reactor(deletion_then_addition)
    assert still_there_when_added
    assert removed == [(gone.port, False)]
    assert ovs_world.ovs.vsctl("list-ports", added.bridge).split() == [added.port]


def test_one_bad_operation_does_not_fail_its_batch(ovs_world, services):
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())

    def both():
        good = vswitch.add_endpoint(endpoint(1))
        bad = ovsdb.transact(lambda ctx: ctx.insert("Port", "no-interfaces"))  # violates the schema
        return defer.DeferredList([good, bad], consumeErrors=True)

    (ok_good, _), (ok_bad, failure) = run_in_reactor(both)
    assert ok_good and not ok_bad
    assert isinstance(failure.value, OVSDBUnavailable)
    assert "OVSDB refused" in str(failure.value)


def test_an_idle_connection_sleeps_and_wakes_for_the_next_operation(ovs_world, services):
    """With nothing waiting the engine runs the IDL about once a second (the
    idle tick), not ten times (the fallback tick kept while something waits);
    an operation still goes out at once and is applied without waiting for it."""
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())
    runs = []
    run_idl = ovsdb._run_idl

    def counted():
        runs.append(time.monotonic())
        run_idl()

    run_in_reactor(lambda: setattr(ovsdb, "_run_idl", counted))
    time.sleep(3)
    idle = len(runs)
    began = time.monotonic()
    run_in_reactor(vswitch.add_endpoint, endpoint(3))
    took = time.monotonic() - began
    assert idle <= 3 / ovsdb.idle_tick + 2, f"{idle} IDL runs in 3 idle seconds"
    assert took < ovsdb.idle_tick, f"an addition took {took:.2f} s"
    assert run_in_reactor(vswitch.endpoint, endpoint(3).endpoint_id) == endpoint(3)


def test_an_unreachable_ovsdb_fails_fast_and_names_itself(tmp_path, services):
    remote = f"unix:{tmp_path}/nothing.sock"
    ovsdb = start(remote, unavailable_timeout=1.0)
    services.append(ovsdb)
    began = time.monotonic()
    with pytest.raises(OVSDBUnavailable, match="OVSDB at " + remote):
        run_in_reactor(VSwitch(ovsdb).networks)
    assert time.monotonic() - began < 5


def test_driver_starts_before_ovsdb_and_serves_once_it_is_up(ovs_world, services):
    ovs_world.ovs.stop_ovsdb()
    ovsdb = start(ovs_world.ovs.remote, unavailable_timeout=1.0)
    services.append(ovsdb)
    with pytest.raises(OVSDBUnavailable):
        run_in_reactor(VSwitch(ovsdb).networks)
    ovs_world.ovs.start_ovsdb()
    wait_until(lambda: ovsdb.connected, timeout=15)
    assert run_in_reactor(VSwitch(ovsdb).networks) == {}


def test_ovsdb_restart_is_transparent(ovs_world, services):
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())
    ovs_world.ovs.restart_ovsdb()
    # The first operation may wait for the reconnection but must not fail.
    run_in_reactor(vswitch.add_endpoint, endpoint(7), timeout=20)
    assert run_in_reactor(vswitch.endpoint, endpoint(7).endpoint_id) == endpoint(7)


def test_a_stopped_vswitchd_is_reported(ovs_world, services):
    ovsdb = start(ovs_world.ovs.remote, apply_timeout=2.0)
    services.append(ovsdb)
    ovs_world.ovs.stop_vswitchd()
    with pytest.raises(OVSDBUnavailable, match="ovs-vswitchd did not apply"):
        run_in_reactor(VSwitch(ovsdb).add_network, network())


def test_a_failing_builder_in_a_batch_leaves_none_of_its_writes(ovs_world, services):
    """The real counterpart of the scripted-IDL unit test of the same name."""
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    ovs_world.netns.run(["ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1"])
    first = Network(network_id=NET, bridge="obr-" + NET[:11], uplink="upl0")
    run_in_reactor(vswitch.add_network, first)
    clash = Network(network_id="0e" * 32, bridge="obr-" + "0e" * 5 + "0", uplink="upl0")
    fine = Network(network_id="0f" * 32, bridge="obr-" + "0f" * 5 + "0")

    def batch():
        return defer.DeferredList(
            [vswitch.add_network(clash), vswitch.add_network(fine)], consumeErrors=True
        )

    (ok_clash, failure), (ok_fine, _) = run_in_reactor(batch)
    assert not ok_clash and ok_fine
    assert "uplink upl0 is already a port of another bridge" in str(failure.value)
    names = ovs_world.ovs.vsctl("list-br").split()
    assert clash.bridge not in names and fine.bridge in names
    records = ovs_world.ovs.vsctl("--columns=external_ids", "list", "Bridge")
    assert "ovsdriver-network-" + clash.network_id not in records


def test_schema_fetch_timeouts_leave_no_connection_open(tmp_path):
    """A server that accepts and never answers: every timed-out fetch closes
    its connection (none is left open per retry)."""
    import socket
    import threading

    from ovsdriver.ovsdb import fetch_schema

    path = str(tmp_path / "mute.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(10)
    accepted = []

    def accept(count):
        for _ in range(count):
            conn, _ = server.accept()
            conn.settimeout(10)
            accepted.append(conn)

    acceptor = threading.Thread(target=accept, args=(3,), daemon=True)
    acceptor.start()
    try:
        for _ in range(3):
            with pytest.raises(OVSDBUnavailable, match="no answer in time"):
                fetch_schema(f"unix:{path}", timeout=0.3)
        acceptor.join(10)
        assert len(accepted) == 3
        for conn in accepted:
            conn.recv(65536)  # the get_schema request
            assert conn.recv(1) == b"", "the driver left this connection open"
    finally:
        for conn in accepted:
            conn.close()
        server.close()


def test_column_reads_what_python_ovs_reads(ovs_world, services):
    ovsdb = start(ovs_world.ovs.remote)
    services.append(ovsdb)
    vswitch = VSwitch(ovsdb)
    run_in_reactor(vswitch.add_network, network())
    run_in_reactor(vswitch.add_endpoint, endpoint(1))
    ovs_world.ovs.vsctl("set", "Port", endpoint(1).port, "tag=7")
    wait_until(
        lambda: (
            run_in_reactor(ovsdb.query, lambda idl: by_name(idl, "Port", endpoint(1).port).tag)
            == [7]
        )
    )

    def compare(idl):
        port = by_name(idl, "Port", endpoint(1).port)
        bridge = by_name(idl, "Bridge", network().bridge)
        for row, name in ((port, "external_ids"), (port, "interfaces"), (port, "tag"),
                          (bridge, "ports"), (bridge, "name")):  # fmt: skip
            assert column(row, name) == getattr(row, name), name
        # Inside an open transaction, the change shows (python-ovs reads it).
        txn = ovs.db.idl.Transaction(idl)
        port.setkey("external_ids", "ovsdriver-test", "1")
        port.tag = [8]
        assert column(port, "external_ids")["ovsdriver-test"] == "1"
        assert column(port, "tag") == [8]
        txn.abort()
        assert "ovsdriver-test" not in column(port, "external_ids")
        assert column(port, "tag") == [7]

    run_in_reactor(ovsdb.query, compare)
