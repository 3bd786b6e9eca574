"""``ovsdriver status`` and ``--metrics`` against a real Open vSwitch, the
kernel and iptables of a private namespace (no engine: the engine's side is
in tests/e2e/test_status.py). A sandbox here is a network namespace the test
makes and moves the endpoint's link into, as the engine would."""

import json
import os
import sys

import pytest

from tests.world import REPO_ROOT, Netns, WorldError, wait_until

NET = "7b" * 32
EP = "5d" * 32
EP2 = "6e" * 32
PORT = "oep-" + EP[:11]
PORT2 = "oep-" + EP2[:11]
METRICS_PORT = 9478


def ok(driver, method, body=None):
    status, reply = driver.post(method, body)
    assert status == 200 and not reply.get("Err"), reply
    return reply


def ids(endpoint_id=EP):
    return {"NetworkID": NET, "EndpointID": endpoint_id}


def create(driver, *endpoints):
    """A network with endpoints (not joined)."""
    ok(
        driver,
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {},
            "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}],
            "IPv6Data": [],
        },
    )
    for n, endpoint_id in enumerate(endpoints, start=2):
        body = dict(ids(endpoint_id), Interface={"Address": f"10.41.0.{n}/24"})
        ok(driver, "NetworkDriver.CreateEndpoint", body)


def join(world, driver, sandbox, endpoint_id=EP):
    """Join, and move the link into the sandbox as eth0, up, as the engine does."""
    ok(driver, "NetworkDriver.Join", dict(ids(endpoint_id), SandboxKey=sandbox.path))
    port = "oep-" + endpoint_id[:11]
    world.netns.run(["ip", "link", "set", port, "netns", sandbox.path])
    sandbox.run(["ip", "link", "set", port, "name", "eth0", "address", attached_mac(world, port)])
    sandbox.run(["ip", "link", "set", "eth0", "up"])


def attached_mac(world, port):
    """The endpoint's MAC, which the engine gives the link as it moves it in."""
    return world.ovs.vsctl("get", "Interface", port, "external_ids:attached-mac").strip('"')


def status(world, *argv, remote=None):
    """``ovsdriver status`` run in the world's namespace: (exit status, output)."""
    argv = [sys.executable, "-m", "ovsdriver", "status", "--docker", "none", *argv]
    argv += ["--ovsdb", remote or world.ovs.remote]
    result = world.netns.run(argv, check=False, cwd=REPO_ROOT, timeout=60)
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout


def report(world, *argv):
    code, out = status(world, "--json", *argv)
    return code, json.loads(out)


def endpoints_of(document):
    (network,) = document["networks"]
    return {e["endpoint_id"]: e for e in network["endpoints"]}


@pytest.fixture
def sandbox():
    with Netns() as namespace:
        yield namespace


def test_a_healthy_world_is_shown_and_exits_zero(ovs_world, driver, sandbox):
    create(driver, EP)
    join(ovs_world, driver, sandbox)
    code, text = status(ovs_world)
    assert code == 0, text
    assert text.startswith(f"Network {NET[:12]}\n    bridge: obr-{NET[:11]}\n")
    assert f"    Endpoint {EP[:12]}\n        port: {PORT} (ofport " in text
    assert f"        sandbox: {sandbox.path} (mounted)\n        link: eth0 up\n" in text
    assert text.endswith("healthy: 1 network, 1 endpoint\n")
    code, document = report(ovs_world)
    assert code == 0 and document["healthy"] is True, document
    endpoint = endpoints_of(document)[EP]
    assert endpoint["addresses"] == ["10.41.0.2/24"] and endpoint["link"] == "eth0 up"


def test_it_works_with_the_driver_stopped_and_sees_a_sandbox_go(ovs_world, driver, sandbox):
    create(driver, EP, EP2)
    join(ovs_world, driver, sandbox)
    with Netns() as other:
        join(ovs_world, driver, other, EP2)
        driver.stop()
    code, document = report(ovs_world)
    assert code == 1
    endpoints = endpoints_of(document)
    assert endpoints[EP]["healthy"] is True, endpoints[EP]
    assert endpoints[EP2]["problems"][0].startswith(f"its sandbox {other.path} is gone")


def test_a_port_being_deleted_is_no_endpoint(ovs_world, driver, sandbox):
    create(driver, EP, EP2)
    join(ovs_world, driver, sandbox)
    driver.stop()  # DeleteEndpoint's mark, with its background deletion not run yet
    ovs_world.ovs.vsctl("set", "Port", PORT2, "external_ids:ovsdriver-removing=1")
    code, text = status(ovs_world)
    assert code == 0 and EP2[:12] not in text, text
    assert text.endswith("healthy: 1 network, 1 endpoint\n")


def test_a_sandbox_mounted_only_in_another_mount_view_is_judged_there(ovs_world, driver):
    """As when status runs in a container with a stale copy of the engine's
    mounts: the sandbox is mounted only in the mount namespace of another
    process, and status finds it (and its link) through that process."""
    create(driver, EP)
    path = ovs_world.directory / "sandbox"
    path.touch()
    view = ovs_world.netns.popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        own = os.stat("/proc/self/ns/mnt").st_ino
        wait_until(lambda: os.stat(f"/proc/{view.pid}/ns/mnt").st_ino != own, 10, 0.02)
        in_view = f"/proc/{view.pid}/root{path}"
        ovs_world.netns.run(
            ["nsenter", f"--mount=/proc/{view.pid}/ns/mnt", "unshare", f"--net={path}", "true"]
        )
        ok(driver, "NetworkDriver.Join", dict(ids(), SandboxKey=str(path)))
        ovs_world.netns.run(["ip", "link", "set", PORT, "netns", in_view])
        inside = ["nsenter", f"--net={in_view}", "ip", "link", "set"]
        ovs_world.netns.run(
            [*inside, PORT, "name", "eth0", "address", attached_mac(ovs_world, PORT)]
        )
        ovs_world.netns.run([*inside, "eth0", "up"])
        code, document = report(ovs_world)
        endpoint = endpoints_of(document)[EP]
        assert code == 0, document
        assert (endpoint["sandbox_state"], endpoint["link"]) == ("mounted", "eth0 up"), endpoint
    finally:
        view.kill()
        view.wait(10)


def test_a_port_vswitchd_cannot_add_is_unhealthy(ovs_world, driver):
    create(driver, EP)
    ovs_world.ovs.vsctl("set", "Interface", PORT, "type=patch", "options:peer=nowhere")
    # ovs-vsctl returns once ovs-vswitchd has reconfigured, which may be before
    # it writes the port's error column; judge once Open vSwitch reports it.
    wait_until(
        lambda: ovs_world.ovs.vsctl("get", "Interface", PORT, "error") != "[]",
        message=f"the error column of interface {PORT}",
    )
    code, document = report(ovs_world)
    assert code == 1
    problem = endpoints_of(document)[EP]["problems"][0]
    assert problem.startswith(f"Open vSwitch reports an error on port {PORT}: No usable peer")


def test_hand_edited_values_are_reported_not_fatal(ovs_world, driver):
    create(driver, EP, EP2)
    ovs_world.ovs.vsctl("set", "Interface", PORT, "external_ids:ovsdriver-portmap=garbage")
    code, text = status(ovs_world)
    assert code == 1
    assert f"PROBLEM: external_ids:ovsdriver-portmap of interface {PORT} is unreadable" in text
    code, document = report(ovs_world)
    endpoints = endpoints_of(document)
    assert endpoints[EP2]["healthy"] is True  # the neighbour is still judged
    bridge = "obr-" + NET[:11]
    ovs_world.ovs.vsctl("set", "Bridge", bridge, f"external_ids:ovsdriver-network-{NET}=nonsense")
    code, document = report(ovs_world)
    assert code == 1
    (network,) = document["networks"]
    assert network["problems"][0].startswith(
        f"the record of network {NET[:12]} in OVSDB (Bridge {bridge} "
        f"external_ids:ovsdriver-network-{NET}) cannot be read"
    )


def test_a_missing_firewall_chain_is_unhealthy(ovs_world, driver):
    create(driver)
    assert status(ovs_world)[0] == 0
    driver.stop()  # a running driver puts its chains back within seconds
    ovs_world.netns.run(
        ["iptables", "-t", "nat", "-D", "POSTROUTING", "-j", "OVSDRIVER-POSTROUTING"]
    )
    ovs_world.netns.run(["iptables", "-t", "nat", "-F", "OVSDRIVER-POSTROUTING"])
    ovs_world.netns.run(["iptables", "-t", "nat", "-X", "OVSDRIVER-POSTROUTING"])
    code, text = status(ovs_world)
    assert code == 1
    assert "PROBLEM: the IPv4 firewall chain nat OVSDRIVER-POSTROUTING is missing" in text
    assert status(ovs_world, "--no-firewall")[0] == 0


def test_without_ovsdb_it_exits_two_and_says_why(ovs_world):
    remote = f"unix:{ovs_world.directory}/nothing.sock"
    code, text = status(ovs_world, remote=remote)
    assert code == 2
    assert text.startswith(f"ovsdriver status: cannot reach OVSDB at {remote}")


# -- metrics ------------------------------------------------------------------------


def scrape(world, port=METRICS_PORT):
    """The metrics page over the world's loopback: {sample line without value: value}."""
    code = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10)"
        ".read().decode())"
    )
    out = world.netns.run([sys.executable, "-c", code]).stdout
    samples = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def test_metrics_show_the_calls_made(ovs_world, sandbox):
    driver = ovs_world.start_driver(
        extra_args=["--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1"]
    )
    create(driver, EP, EP2)
    join(ovs_world, driver, sandbox)
    assert driver.post("NetworkDriver.Join", {"NetworkID": NET})[0] == 400
    ok(driver, "NetworkDriver.DeleteEndpoint", ids(EP2))
    samples = scrape(ovs_world)

    def api(method, outcome="ok"):
        key = f'ovsdriver_api_requests_total{{method="NetworkDriver.{method}",outcome="{outcome}"}}'
        return samples.get(key, 0)

    assert api("CreateNetwork") == 1
    assert api("CreateEndpoint") == 2
    assert api("Join") == 1 and api("Join", "bad_request") == 1
    assert api("DeleteEndpoint") == 1
    assert (
        samples['ovsdriver_api_request_seconds_count{method="NetworkDriver.CreateEndpoint"}'] == 2
    )
    assert samples['ovsdriver_ovsdb_transactions_total{status="success"}'] >= 5
    assert samples["ovsdriver_ovsdb_transaction_operations_count"] >= 5
    assert samples["ovsdriver_ovsdb_commit_seconds_count"] >= 5
    assert samples["ovsdriver_ovsdb_apply_seconds_count"] >= 2  # network and endpoints
    assert samples['ovsdriver_firewall_syncs_total{outcome="ok"}'] >= 2  # restore, network
    assert samples['ovsdriver_reconciler_passes_total{outcome="ok"}'] >= 1
    assert samples["ovsdriver_ovsdb_connected"] == 1
    assert samples["ovsdriver_networks"] == 1
    assert samples['ovsdriver_endpoints{state="joined"}'] == 1
    assert samples['ovsdriver_endpoints{state="unjoined"}'] == 0


def test_a_metrics_endpoint_that_cannot_listen_stops_the_driver(ovs_world):
    ovs_world.start_driver(extra_args=["--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1"])
    with pytest.raises(WorldError, match="exited") as caught:
        ovs_world.start_driver(extra_args=["--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1"])
    assert "Address already in use" in str(caught.value)
