"""Metrics: what each hook records in a private registry, and the page that
serves them (tests/integration/test_status_real.py scrapes a real driver)."""

import json

import pytest
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from ovsdriver.api import Handlers, Plugin
from ovsdriver.driver import Driver
from ovsdriver.metrics import NO_METRICS, Metrics, MetricsPage
from ovsdriver.ovsdb import OVSDB
from ovsdriver.plugin_http import PluginFactory
from ovsdriver.tap import Options, makeService
from ovsdriver.testing import FakeFirewall, FakeHostPorts, FakeNetlink, FakeVSwitch
from ovsdriver.values import Endpoint, Network
from ovsdriver.vswitch import VSwitch
from tests.scripted_idl import ScriptedIdl, ScriptedTransaction, Txn
from tests.unit.plugin_client import Connection, request
from tests.unit.test_firewall import Recording, kernel_text, network
from tests.unit.test_ovsdb_engine import serve
from tests.unit.test_ports import EP1, host, result_of, tcp
from tests.unit.test_ports import World as PortsWorld
from tests.unit.test_reconcile import INTERVAL, Scene

NET = "4e" * 32
SUBNET = [{"Pool": "10.30.0.0/24", "Gateway": "10.30.0.1/24"}]


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry(), clock=Clock().seconds)


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0


def api_calls(metrics, method, outcome):
    return value(metrics, "ovsdriver_api_requests_total", method=method, outcome=outcome)


# -- the API -----------------------------------------------------------------------


class Served:
    """The real plugin socket's protocol over a driver on fakes, with metrics."""

    def __init__(self, metrics):
        kernel = FakeNetlink()
        self.driver = Driver(FakeVSwitch(kernel=kernel), kernel, FakeFirewall())
        self.plugin = Plugin(Handlers(self.driver))
        self.plugin.metrics = metrics

    def post(self, method, data):
        connection = Connection(self.plugin)
        connection.send(request(method, data))
        ((code, _, body),) = connection.answers()
        return code, json.loads(body)


def test_api_calls_are_counted_by_method_and_outcome(metrics):
    plugin = Served(metrics)
    body = json.dumps({"NetworkID": NET, "Options": {}, "IPv4Data": SUBNET}).encode()
    assert plugin.post("NetworkDriver.CreateNetwork", body) == (200, {})
    bad = json.dumps({"NetworkID": "nothex", "Options": {}}).encode()
    assert "Err" in plugin.post("NetworkDriver.CreateNetwork", bad)[1]
    assert plugin.post("NetworkDriver.CreateNetwork", b"{")[0] == 400
    assert plugin.post("NetworkDriver.Nonsense", b"{}")[0] == 404
    assert api_calls(metrics, "NetworkDriver.CreateNetwork", "ok") == 1
    assert api_calls(metrics, "NetworkDriver.CreateNetwork", "error") == 1
    assert api_calls(metrics, "NetworkDriver.CreateNetwork", "bad_request") == 1
    assert api_calls(metrics, "unknown", "unknown_method") == 1
    count = "ovsdriver_api_request_seconds_count"
    assert value(metrics, count, method="NetworkDriver.CreateNetwork") == 2


def test_an_unexpected_failure_is_an_internal_error(metrics, monkeypatch):
    plugin = Served(metrics)

    async def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(plugin.driver, "delete_network", broken)
    code, reply = plugin.post(
        "NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": NET}).encode()
    )
    assert code == 200 and "internal error" in reply["Err"]
    assert api_calls(metrics, "NetworkDriver.DeleteNetwork", "internal_error") == 1


def test_api_latency_is_measured_until_the_answer():
    clock = Clock()
    metrics = Metrics(CollectorRegistry(), clock=clock.seconds)
    answer = defer.Deferred()
    metrics.api_request("NetworkDriver.Join", answer)
    clock.advance(0.3)
    answer.callback({})
    name = "ovsdriver_api_request_seconds_sum"
    assert value(metrics, name, method="NetworkDriver.Join") == pytest.approx(0.3)
    bucket = "ovsdriver_api_request_seconds_bucket"
    assert value(metrics, bucket, method="NetworkDriver.Join", le="0.25") == 0
    assert value(metrics, bucket, method="NetworkDriver.Join", le="0.5") == 1


# -- OVSDB (the arithmetic; the hooks' places are covered against a real server) ----


def test_ovsdb_transactions_batches_and_retries():
    clock = Clock()
    metrics = Metrics(CollectorRegistry(), clock=clock.seconds)
    metrics.ovsdb_commit_started()
    clock.advance(0.01)
    metrics.ovsdb_committed("try again", 3)
    metrics.ovsdb_commit_started()
    metrics.ovsdb_committed("error", 3)
    metrics.ovsdb_commit_started()
    metrics.ovsdb_committed("success", 3)
    transactions = "ovsdriver_ovsdb_transactions_total"
    assert value(metrics, transactions, status="try_again") == 1
    assert value(metrics, transactions, status="error") == 1
    assert value(metrics, transactions, status="success") == 1
    assert value(metrics, "ovsdriver_ovsdb_retries_total", reason="try_again") == 3
    assert value(metrics, "ovsdriver_ovsdb_retries_total", reason="alone") == 3
    assert value(metrics, "ovsdriver_ovsdb_transaction_operations_sum") == 9
    assert value(metrics, "ovsdriver_ovsdb_commit_seconds_sum") == pytest.approx(0.01)


def test_ovsdb_apply_latency_ends_when_vswitchd_catches_up():
    clock = Clock()
    metrics = Metrics(CollectorRegistry(), clock=clock.seconds)
    metrics.ovsdb_applying(7)
    clock.advance(0.2)
    metrics.ovsdb_applying(8)
    metrics.ovsdb_applying(None)  # nothing to wait for
    clock.advance(0.1)
    metrics.ovsdb_caught_up(7)
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_count") == 1
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_sum") == pytest.approx(0.3)
    clock.advance(0.1)
    metrics.ovsdb_caught_up(9)
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_count") == 2
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_sum") == pytest.approx(0.5)


def test_ovsdb_hooks_record_batches_retries_commits_and_application():
    """The OVSDB engine over a scripted server (see tests/scripted_idl.py)."""
    clock = Clock()
    metrics = Metrics(CollectorRegistry(), clock=clock.seconds)
    idl = ScriptedIdl()
    engine = OVSDB(clock, "unix:/scripted/db.sock")
    engine.transaction_class = ScriptedTransaction
    engine.idl = idl
    engine.metrics = metrics
    engine.running = True
    vswitch = VSwitch(engine)
    done = []
    for network_id in ("a1" * 32, "b2" * 32):
        net = Network(network_id=network_id, bridge="obr-" + network_id[:11])
        vswitch.add_network(net).addBoth(done.append)
    clock.advance(0)  # one transaction of both
    idl.answer(Txn.TRY_AGAIN)
    clock.advance(0.1)  # built again
    clock.advance(0.1)
    idl.answer(Txn.SUCCESS)
    clock.advance(0.1)
    clock.advance(0.5)
    idl.catch_up()  # ovs-vswitchd applied it
    clock.advance(0.1)
    engine.running = False
    assert done == [None, None]
    transactions = "ovsdriver_ovsdb_transactions_total"
    assert value(metrics, transactions, status="try_again") == 1
    assert value(metrics, transactions, status="success") == 1
    assert value(metrics, "ovsdriver_ovsdb_transaction_operations_sum") == 4
    assert value(metrics, "ovsdriver_ovsdb_retries_total", reason="try_again") == 2
    assert value(metrics, "ovsdriver_ovsdb_commit_seconds_count") == 2
    assert value(metrics, "ovsdriver_ovsdb_commit_seconds_sum") == pytest.approx(0.3)
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_count") == 1
    assert value(metrics, "ovsdriver_ovsdb_apply_seconds_sum") == pytest.approx(0.6)


def test_networks_and_endpoints_gauges_follow_the_replica(metrics):
    clock = Clock()
    idl = ScriptedIdl()
    engine = OVSDB(clock, "unix:/scripted/db.sock")
    engine.transaction_class = ScriptedTransaction
    engine.idl = idl
    engine.running = True
    metrics.watch_replica(engine)
    vswitch = VSwitch(engine)
    net = Network(network_id=NET, bridge="obr-" + NET[:11])
    endpoints = [
        Endpoint(
            endpoint_id=eid,
            network_id=NET,
            bridge=net.bridge,
            port="oep-" + eid[:11],
            ifname="oep-" + eid[:11],
            mac=f"02:00:00:00:00:0{n}",
        )
        for n, eid in enumerate(("e1" * 32, "e2" * 32))
    ]

    def do(deferred):
        serve(clock, idl)
        assert deferred.called

    do(vswitch.add_network(net))
    for endpoint in endpoints:
        do(vswitch.add_endpoint(endpoint))
    do(vswitch.set_sandbox(endpoints[0].endpoint_id, "/var/run/docker/netns/1"))
    assert value(metrics, "ovsdriver_ovsdb_connected") == 1
    assert value(metrics, "ovsdriver_networks") == 1
    assert value(metrics, "ovsdriver_endpoints", state="joined") == 1
    assert value(metrics, "ovsdriver_endpoints", state="unjoined") == 1
    do(vswitch.set_sandbox(endpoints[1].endpoint_id, "/var/run/docker/netns/2"))
    assert value(metrics, "ovsdriver_endpoints", state="joined") == 2
    assert value(metrics, "ovsdriver_endpoints", state="unjoined") == 0
    # DeleteEndpoint: its port, marked, stays until a background deletion.
    do(vswitch.set_sandbox(endpoints[1].endpoint_id, None))
    do(vswitch.mark_removed(endpoints[1].endpoint_id))
    assert idl.tables["Port"].rows  # not deleted yet
    assert value(metrics, "ovsdriver_endpoints", state="joined") == 1
    assert value(metrics, "ovsdriver_endpoints", state="unjoined") == 0
    idl.tables["Bridge"].rows.clear()  # as if it were edited away
    idl.change_seqno += 1
    assert value(metrics, "ovsdriver_networks") == 0
    idl.disconnect()
    assert value(metrics, "ovsdriver_ovsdb_connected") == 0
    engine.running = False


# -- the reconciler and the firewall ----------------------------------------------------


def test_reconciler_passes_and_collections_are_counted(metrics):
    scene = Scene()
    scene.reconciler.metrics = metrics
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.tear_down(sandbox)  # its container is gone: an orphan
    scene.clock.advance(INTERVAL)
    scene.clock.advance(INTERVAL)
    scene.reconciler.stopService()
    assert value(metrics, "ovsdriver_reconciler_passes_total", outcome="ok") == 3
    assert value(metrics, "ovsdriver_reconciler_collected_endpoints_total") == 1


def test_a_failed_reconciler_pass_is_counted(metrics):
    scene = Scene()
    scene.reconciler.metrics = metrics
    scene.vswitch.endpoints = lambda: defer.fail(RuntimeError("OVSDB is gone"))
    scene.start()
    scene.reconciler.stopService()
    assert value(metrics, "ovsdriver_reconciler_passes_total", outcome="failed") == 1


def test_a_repair_is_counted(metrics):
    scene = Scene()
    scene.reconciler.metrics = metrics
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.restart_vswitchd(ep, sandbox)
    scene.start()
    scene.reconciler.stopService()
    assert value(metrics, "ovsdriver_reconciler_repaired_endpoints_total") == 1


@pytest.fixture
def plain_iptables(monkeypatch):
    """Only plain ``iptables-save``... installed: no choice of kind."""
    from ovsdriver import firewall

    plain = {"iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"}
    monkeypatch.setattr(firewall, "which", lambda name: name if name in plain else None)


def test_firewall_syncs_are_counted_by_outcome(metrics, plain_iptables):
    fw = Recording()
    fw.metrics = metrics
    fw.apply([network(1)])
    fw.failures["iptables-restore"] = "no"
    fw.apply([network(2)]).addErrback(lambda _: None)  # a change: the same state runs nothing
    assert value(metrics, "ovsdriver_firewall_syncs_total", outcome="ok") == 1
    assert value(metrics, "ovsdriver_firewall_syncs_total", outcome="failed") == 1
    assert value(metrics, "ovsdriver_firewall_sync_seconds_count") == 2


def test_firewall_checks_and_heals_are_counted(metrics, plain_iptables):
    fw = Recording()
    fw.metrics = metrics
    fw.apply([network(1)])
    fw.saved["iptables-save"] = kernel_text([network(1)])
    fw.check()  # all in place
    fw.saved["iptables-save"] = ""  # flushed from outside
    fw.check()
    assert value(metrics, "ovsdriver_firewall_checks_total") == 2
    assert value(metrics, "ovsdriver_firewall_heals_total") == 1


# -- serving them ------------------------------------------------------------------------


def test_the_page_serves_prometheus_text(metrics):
    metrics.api_rejected("NetworkDriver.Join", "bad_request")
    http = StubTreq(MetricsPage(metrics.registry))
    results = []
    d = http.get("http://localhost:9478/metrics")
    d.addCallback(lambda r: r.content().addCallback(lambda body: (r, body)))
    d.addBoth(results.append)
    http.flush()
    response, body = results[0]
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    assert (
        b'ovsdriver_api_requests_total{method="NetworkDriver.Join",outcome="bad_request"} 1.0'
        in body
    )


def test_metrics_are_off_by_default_and_each_driver_has_its_own_registry():
    def services(*argv):
        options = Options()
        options.parseOptions(["--datapath-type", "netdev", *argv])
        return list(makeService(options, Clock()))

    plain = services()
    measured = services("--metrics", "tcp:0:interface=127.0.0.1")
    assert len(measured) == len(plain) + 1
    ovsdb = measured[0]
    assert plain[0].metrics is NO_METRICS
    assert isinstance(ovsdb.metrics, Metrics)
    # The plugin and the driver behind it record into the same registry.
    factories = [getattr(s, "factory", None) for s in measured]
    (plugin,) = [f.plugin for f in factories if isinstance(f, PluginFactory)]
    assert plugin.metrics is ovsdb.metrics and plugin.handlers.driver.metrics is ovsdb.metrics
    other = services("--metrics", "tcp:0:interface=127.0.0.1")[0]
    assert other.metrics.registry is not ovsdb.metrics.registry


def test_published_ports_a_program_took_are_counted_until_held_again(metrics):
    world = PortsWorld()
    result_of(world.program(EP1, tcp(80, 8080)))
    # The driver is down: its sockets are gone, and a program takes 8080.
    ports = FakeHostPorts()
    assert ports.program_binds(host(8080))
    restarted = Driver(world.vswitch, world.kernel, world.firewall, host_ports=ports)
    restarted.metrics = metrics
    result_of(defer.ensureDeferred(restarted.sync_firewall()))
    assert value(metrics, "ovsdriver_published_ports_unheld") == 1
    ports.program_exits(host(8080))
    result_of(defer.ensureDeferred(restarted.sync_firewall()))
    assert value(metrics, "ovsdriver_published_ports_unheld") == 0
