"""Prometheus metrics of the driver (``twistd ovsdriver --metrics ENDPOINT``).

The modules that do the work carry one-line hooks (``self.metrics.x(...)``)
whose default, `NO_METRICS`, does nothing; `Metrics` implements the same
hooks with prometheus_client counters and histograms in a private
`CollectorRegistry`, so nothing is global and tests can read what a scenario
recorded. prometheus_client is only imported when metrics are switched on, so
the driver runs without it.

`MetricsPage` renders the registry on the reactor thread: the gauges of
networks and endpoints read the OVSDB replica, which only that thread may
touch (prometheus_client's own Twisted resource renders in a worker thread).
"""

import time

from twisted.web import resource, server

#: Latency buckets, in seconds: an API call is milliseconds to ovs-vswitchd's 15 s timeout.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Operations folded into one OVSDB transaction.
OPERATIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class NoMetrics:
    """The hooks, doing nothing: what every hooked object has by default."""

    def api_request(self, method, deferred, user_errors=()):
        """An API call whose result `deferred` will carry (user_errors: its expected failures)."""

    def api_rejected(self, method, outcome):
        """An API call answered without running it (bad_request, too_large, unknown_method)."""

    def ovsdb_commit_started(self):
        """A transaction was built and committed for the first time."""

    def ovsdb_committed(self, status, operations):
        """OVSDB answered the transaction of `operations` with `status`."""

    def ovsdb_applying(self, cfg):
        """ovs-vswitchd must reach ``cur_cfg >= cfg`` for the last commit to apply."""

    def ovsdb_caught_up(self, cur_cfg):
        """ovs-vswitchd reports ``cur_cfg``."""

    def reconciler_pass(self, deferred):
        """A reconciler pass; returns `deferred` (which fires when the pass ends)."""
        return deferred

    def reconciler_collected(self):
        """The reconciler removed an orphan endpoint."""

    def reconciler_repaired(self):
        """The reconciler repaired an endpoint after an ovs-vswitchd restart."""

    def firewall_sync(self, deferred):
        """A firewall update; returns `deferred` (which fires when it is done)."""
        return deferred

    def firewall_checked(self, problems):
        """The rules were read and compared with what was written; the
        `problems` found were mended."""

    def published_unheld(self, count):
        """`count` published host ports are not held (another program has
        them, or their address is gone)."""


NO_METRICS = NoMetrics()


class Metrics(NoMetrics):
    """The hooks, recorded in `registry` (a prometheus_client CollectorRegistry).

    *clock* measures latencies in seconds (the reactor's ``seconds``).
    """

    def __init__(self, registry, clock=time.monotonic):
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.clock = clock
        self._commit_started = None
        self._applying = []  # (cfg, since)

        def counter(name, text, labels=()):
            return Counter(name, text, labels, registry=registry)

        def histogram(name, text, labels=(), buckets=SECONDS):
            return Histogram(name, text, labels, registry=registry, buckets=buckets)

        self.api_requests = counter(
            "ovsdriver_api_requests",
            "Remote API calls by method and outcome.",
            ["method", "outcome"],
        )
        self.api_seconds = histogram(
            "ovsdriver_api_request_seconds", "Time to answer a remote API call.", ["method"]
        )
        self.ovsdb_transactions = counter(
            "ovsdriver_ovsdb_transactions", "OVSDB transactions by final status.", ["status"]
        )
        self.ovsdb_operations = histogram(
            "ovsdriver_ovsdb_transaction_operations",
            "Operations folded into one OVSDB transaction.",
            buckets=OPERATIONS,
        )
        self.ovsdb_commit_seconds = histogram(
            "ovsdriver_ovsdb_commit_seconds", "Time from commit to OVSDB's answer."
        )
        self.ovsdb_apply_seconds = histogram(
            "ovsdriver_ovsdb_apply_seconds",
            "Time from a committed change to ovs-vswitchd having applied it (cur_cfg).",
        )
        self.ovsdb_retries = counter(
            "ovsdriver_ovsdb_retries",
            "Operations queued again: after TRY_AGAIN, or alone after a shared transaction failed.",
            ["reason"],
        )
        self.reconciler_passes = counter(
            "ovsdriver_reconciler_passes", "Reconciler passes by outcome.", ["outcome"]
        )
        self.reconciler_pass_seconds = histogram(
            "ovsdriver_reconciler_pass_seconds", "Duration of a reconciler pass."
        )
        self.reconciler_collections = counter(
            "ovsdriver_reconciler_collected_endpoints", "Orphan endpoints the reconciler removed."
        )
        self.reconciler_repairs = counter(
            "ovsdriver_reconciler_repaired_endpoints",
            "Endpoints repaired after an ovs-vswitchd restart.",
        )
        self.firewall_syncs = counter(
            "ovsdriver_firewall_syncs", "Firewall updates by outcome.", ["outcome"]
        )
        self.firewall_seconds = histogram(
            "ovsdriver_firewall_sync_seconds", "Duration of a firewall update."
        )
        self.firewall_checks = counter(
            "ovsdriver_firewall_checks",
            "Reads of the firewall rules to compare them with what the driver wrote.",
        )
        self.firewall_heals = counter(
            "ovsdriver_firewall_heals",
            "Rewrites of the firewall rules after a check found them changed from outside.",
        )
        self.unheld = Gauge(
            "ovsdriver_published_ports_unheld",
            "Published host ports the driver cannot hold (a program has them, or no address).",
            registry=registry,
        )

    # -- the API -------------------------------------------------------------

    def api_request(self, method, deferred, user_errors=()):
        started = self.clock()

        def done(result, outcome):
            if outcome == "error" and not result.check(*user_errors):
                outcome = "internal_error"
            self.api_requests.labels(method, outcome).inc()
            self.api_seconds.labels(method).observe(self.clock() - started)
            return result

        deferred.addCallbacks(done, done, callbackArgs=("ok",), errbackArgs=("error",))

    def api_rejected(self, method, outcome):
        self.api_requests.labels(method, outcome).inc()

    # -- OVSDB ---------------------------------------------------------------

    def ovsdb_commit_started(self):
        self._commit_started = self.clock()

    def ovsdb_committed(self, status, operations):
        status = str(status).replace(" ", "_")
        self.ovsdb_transactions.labels(status).inc()
        self.ovsdb_operations.observe(operations)
        if self._commit_started is not None:
            self.ovsdb_commit_seconds.observe(self.clock() - self._commit_started)
            self._commit_started = None
        if status == "try_again":
            self.ovsdb_retries.labels("try_again").inc(operations)
        elif status not in ("success", "unchanged") and operations > 1:
            self.ovsdb_retries.labels("alone").inc(operations)

    def ovsdb_applying(self, cfg):
        if cfg is not None:
            self._applying.append((cfg, self.clock()))

    def ovsdb_caught_up(self, cur_cfg):
        now, waiting = self.clock(), []
        for cfg, since in self._applying:
            if cur_cfg >= cfg:
                self.ovsdb_apply_seconds.observe(now - since)
            else:
                waiting.append((cfg, since))
        self._applying = waiting[-1000:]  # bounded, should ovs-vswitchd never catch up

    # -- the reconciler and the firewall --------------------------------------

    def reconciler_pass(self, deferred):
        return self._outcome(deferred, self.reconciler_passes, self.reconciler_pass_seconds)

    def reconciler_collected(self):
        self.reconciler_collections.inc()

    def reconciler_repaired(self):
        self.reconciler_repairs.inc()

    def firewall_sync(self, deferred):
        return self._outcome(deferred, self.firewall_syncs, self.firewall_seconds)

    def firewall_checked(self, problems):
        self.firewall_checks.inc()
        if problems:
            self.firewall_heals.inc()

    def published_unheld(self, count):
        self.unheld.set(count)

    def _outcome(self, deferred, counter, histogram):
        started = self.clock()

        def done(result, outcome):
            counter.labels(outcome).inc()
            histogram.observe(self.clock() - started)
            return result

        return deferred.addCallbacks(done, done, callbackArgs=("ok",), errbackArgs=("failed",))

    # -- gauges from the replica -----------------------------------------------

    def watch_replica(self, ovsdb):
        """Export the networks and endpoints in `ovsdb`'s replica as gauges."""
        self.registry.register(_ReplicaCollector(ovsdb))


class _ReplicaCollector:
    """Gauges read from the OVSDB replica at scrape time (on the reactor thread).

    Counting reads three columns per port; the counts are kept until the
    replica changes, so scrapes of an idle driver cost nothing.
    """

    def __init__(self, ovsdb):
        self.ovsdb = ovsdb
        self._seqno = None
        self._counts = None

    def describe(self):
        return []  # nothing to register up front: the values come at scrape time

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        connected = self.ovsdb.connected
        yield GaugeMetricFamily(
            "ovsdriver_ovsdb_connected", "1 while the OVSDB replica is live.", int(connected)
        )
        if not connected:
            return
        idl = self.ovsdb.idl
        if self._counts is None or self._seqno != idl.change_seqno:
            self._counts, self._seqno = _count(idl), idl.change_seqno
        networks, unreadable, joined, unjoined = self._counts
        yield GaugeMetricFamily("ovsdriver_networks", "Networks recorded in OVSDB.", networks)
        yield GaugeMetricFamily(
            "ovsdriver_unreadable_networks",
            "Network records in OVSDB that cannot be read (edited by hand?).",
            unreadable,
        )
        gauge = GaugeMetricFamily(
            "ovsdriver_endpoints", "Endpoints recorded in OVSDB, by state.", labels=["state"]
        )
        gauge.add_metric(["joined"], joined)
        gauge.add_metric(["unjoined"], unjoined)
        yield gauge


def _count(idl):
    """(networks, unreadable networks, joined endpoints, unjoined endpoints) in a replica."""
    from ovsdriver import vswitch
    from ovsdriver.values import Network

    networks = unreadable = joined = unjoined = 0
    for bridge in idl.tables["Bridge"].rows.values():
        for key, value in bridge.external_ids.items():
            if key.startswith(vswitch.NETWORK_RECORD):
                networks += 1
                network_id = key[len(vswitch.NETWORK_RECORD) :]
                record = vswitch._read_network(bridge.name, key, network_id, value)
                unreadable += not isinstance(record, Network)
        for port in bridge.ports:
            if vswitch.is_endpoint_port(port.external_ids):
                if vswitch.SANDBOX in port.interfaces[0].external_ids:
                    joined += 1
                else:
                    unjoined += 1
    return networks, unreadable, joined, unjoined


def metrics_site(registry):
    """The web site of ``--metrics``: `MetricsPage` at every path, no access log."""
    site = _QuietSite(MetricsPage(registry))
    site.displayTracebacks = False
    return site


class _QuietSite(server.Site):
    """A scraper calls every few seconds: that is not worth a log line each time."""

    def log(self, request):
        pass


class MetricsPage(resource.Resource):
    """A twisted.web resource answering GET with the registry in Prometheus text."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)
