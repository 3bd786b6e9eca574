"""End to end: ``ovsdriver status`` next to a real engine (healthy, a port
deleted behind the driver's back, a container gone while the driver was
down), and the metrics of a driver after a docker scenario."""

import json
import signal
import sys

import pytest

from tests.e2e.cli import E2E
from tests.world import REPO_ROOT

METRICS_PORT = 9479


def status(e2e, *argv):
    """``ovsdriver status`` in the world's namespace against its engine."""
    argv = [
        *(sys.executable, "-m", "ovsdriver", "status", "--ovsdb", e2e.world.ovs.remote),
        *("--docker", e2e.world.dockerd.host, "--driver", e2e.name, *argv),
    ]
    result = e2e.world.netns.run(argv, check=False, cwd=REPO_ROOT, timeout=60)
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout


def report(e2e):
    code, out = status(e2e, "--json")
    return code, json.loads(out)


def by_container(document, network):
    (found,) = [n for n in document["networks"] if n["name"] == network]
    return {e["container"]: e for e in found["endpoints"]}


def test_status_shows_the_engines_view_and_a_port_deleted_behind_its_back(e2e):
    e2e.network("blue", "10.61.0.0/24")
    e2e.run("s1", "blue", "-p", "18080:80")
    e2e.run("s2", "blue")
    code, text = status(e2e)
    assert code == 0, text
    network_id = e2e.network_id("blue")
    assert text.startswith(f"Network blue ({network_id[:12]})\n    bridge: obr-{network_id[:11]}\n")
    s1 = e2e.container_net("s1", "blue")
    assert f"    Endpoint {s1['EndpointID'][:12]} (container s1)\n" in text
    assert f"        published: 18080->{s1['IPAddress']}:80/tcp\n" in text
    assert text.endswith("healthy: 1 network, 2 endpoints\n")
    code, document = report(e2e)
    assert code == 0 and document["healthy"] is True
    endpoints = by_container(document, "blue")
    assert endpoints["s2"]["link"] == "eth0 up"
    assert endpoints["s2"]["mac"] == e2e.container_net("s2", "blue")["MacAddress"]

    port = e2e.port_of("s2", "blue")
    e2e.vsctl("del-port", port)
    code, text = status(e2e)
    assert code == 1
    assert f"        PROBLEM: its port {port} is missing from Open vSwitch" in text
    code, document = report(e2e)
    assert code == 1 and document["healthy"] is False
    endpoints = by_container(document, "blue")
    assert endpoints["s1"]["healthy"] is True
    assert endpoints["s2"]["problems"][0].startswith(f"its port {port} is missing")


def test_status_with_the_driver_down_sees_a_container_that_is_gone(e2e):
    e2e.network("green", "10.62.0.0/24")
    e2e.run("g1", "green")
    e2e.run("g2", "green")
    gone = e2e.container_net("g1", "green")["EndpointID"]
    e2e.driver.kill(signal.SIGKILL)
    try:
        # The engine's Leave and DeleteEndpoint fail (after its retries): logged only.
        e2e.docker("rm", "-f", "g1")
        code, document = report(e2e)
    finally:
        e2e.driver.start()
    assert code == 1
    (network,) = document["networks"]
    endpoints = {e["endpoint_id"]: e for e in network["endpoints"]}
    assert "its sandbox" in endpoints[gone]["problems"][0]
    assert "is gone" in endpoints[gone]["problems"][0]
    healthy = [e for e in network["endpoints"] if e["container"] == "g2"]
    assert healthy and healthy[0]["healthy"] is True


def test_a_network_removed_while_the_driver_was_down_gives_way_when_its_subnet_comes_back(e2e):
    e2e.network("old", "10.63.0.0/24")
    old = e2e.network_id("old")
    e2e.driver.kill(signal.SIGKILL)
    try:
        e2e.docker("network", "rm", "old")  # the engine forgets it anyway
    finally:
        e2e.driver.start()
    code, document = report(e2e)
    assert code == 1
    assert "left over in Open vSwitch" in document["networks"][0]["problems"][0]
    # The engine's IPAM gives the subnet again: proof that it no longer has
    # the old network, which goes (until 2026-12-03 this was refused, with
    # the ovs-vsctl command to remove it by hand).
    e2e.network("new", "10.63.0.0/24")
    assert e2e.vsctl("list-br").split() == ["obr-" + e2e.network_id("new")[:11]]
    assert f"removing network {old[:12]} (bridge obr-{old[:11]}" in e2e.driver.log()
    e2e.run("n1", "new")
    assert e2e.ping("n1", "10.63.0.1")
    assert report(e2e)[0] == 0


# -- metrics ------------------------------------------------------------------------


@pytest.fixture
def measured(docker_world):
    """A fresh driver serving metrics on the world's loopback; cleaned up like ``driver``."""
    driver = docker_world.start_driver(
        extra_args=["--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1"]
    )
    try:
        yield E2E(docker_world, driver)
    finally:
        try:
            docker_world.dockerd.reset()
        finally:
            driver.close()
            docker_world.ovs.reset()


def scrape(e2e):
    code = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10)"
        ".read().decode())"
    )
    out = e2e.world.netns.run([sys.executable, "-c", code]).stdout
    samples = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def test_metrics_after_a_docker_scenario_show_its_calls(measured):
    measured.network("red", "10.63.0.0/24")
    measured.run("m1", "red", "-p", "18081:80")
    measured.run("m2", "red")
    measured.docker("rm", "-f", "m2")
    samples = scrape(measured)

    def api(method):
        key = f'ovsdriver_api_requests_total{{method="NetworkDriver.{method}",outcome="ok"}}'
        return samples.get(key, 0)

    assert api("CreateNetwork") == 1
    assert api("CreateEndpoint") == 2
    assert api("Join") == 2
    assert api("ProgramExternalConnectivity") >= 1
    assert api("Leave") == 1
    assert api("DeleteEndpoint") == 1
    assert samples['ovsdriver_ovsdb_transactions_total{status="success"}'] >= 6
    assert samples["ovsdriver_ovsdb_apply_seconds_count"] >= 3
    assert samples['ovsdriver_firewall_syncs_total{outcome="ok"}'] >= 3
    assert samples["ovsdriver_networks"] == 1
    assert samples['ovsdriver_endpoints{state="joined"}'] == 1
