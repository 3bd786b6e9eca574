"""End to end: the docker CLI against a private dockerd, with the driver and
Open vSwitch (userspace datapath) all in one network namespace of their own."""

import re
import signal

from tests import world
from tests.e2e.cli import IMAGE


def test_containers_talk_to_each_other_and_the_gateway(e2e):
    e2e.network("blue", "10.51.0.0/24")
    bridge = "obr-" + e2e.network_id("blue")[:11]
    assert "10.51.0.1/24" in e2e.host("ip", "-o", "addr", "show", "dev", bridge)
    e2e.run("a1", "blue")
    e2e.run("a2", "blue")
    a2 = e2e.container_net("a2", "blue")["IPAddress"]
    assert e2e.ping("a1", a2)
    assert e2e.ping("a1", "10.51.0.1")
    # The default route goes through the host; no docker_gwbridge leg.
    routes = e2e.exec("a1", "ip", "route").stdout
    assert re.search(r"default via 10\.51\.0\.1 dev eth0", routes), routes
    links = e2e.exec("a1", "ip", "-o", "link").stdout
    assert "eth1" not in links
    # The container's MAC is docker's and is recorded as attached-mac.
    mac = e2e.container_net("a1", "blue")["MacAddress"]
    assert mac in e2e.exec("a1", "cat", "/sys/class/net/eth0/address").stdout
    endpoint = e2e.container_net("a1", "blue")["EndpointID"]
    found = e2e.vsctl(
        "--bare",
        "--columns=name",
        "find",
        "Interface",
        f'external_ids:attached-mac="{mac}"',
        f"external_ids:iface-id={endpoint}",
    )
    assert found == "oep-" + endpoint[:11]
    # a2's port was made while a1's sat in its container: ovs-vswitchd's
    # reconfigurations must not try to set the MAC of ports it cannot reach.
    assert "setting MAC failed" not in e2e.world.ovs.log()


def test_containers_find_each_other_by_name_and_alias(e2e):
    """The engine's embedded DNS answers on the driver's networks as on its
    own user-defined ones: names, --network-alias, and aliases given at
    docker network connect, gone with the container's disconnection."""
    e2e.network("blue", "10.51.0.0/24")
    e2e.network("green", "10.53.0.0/24")
    e2e.run("n1", "blue", "--network-alias", "web")
    e2e.run("n2", "blue")
    e2e.docker("network", "connect", "--alias", "db", "green", "n2")
    e2e.run("n3", "green")
    n1 = e2e.container_net("n1", "blue")["IPAddress"]
    n2 = e2e.container_net("n2", "green")["IPAddress"]
    assert "nameserver 127.0.0.11" in e2e.exec("n2", "cat", "/etc/resolv.conf").stdout

    def ping(container, name):
        """What `name` resolved to, if it answered (busybox has no nslookup)."""
        result = e2e.exec(container, "ping", "-c", "1", "-W", "2", name, check=False)
        found = re.search(r"PING \S+ \(([\d.]+)\)", result.stdout)
        return found.group(1) if found and result.returncode == 0 else None

    assert ping("n2", "n1") == n1
    assert ping("n2", "web") == n1
    assert ping("n3", "db") == n2
    assert ping("n3", "web") is None  # names stay within their network
    e2e.docker("network", "disconnect", "green", "n2")
    assert ping("n3", "db") is None


def test_a_restarted_container_is_reachable_at_once(e2e):
    # Its new endpoint gets its address again and, like on Docker's bridge
    # driver, the MAC that goes with it: its peers' ARP caches stay right
    # (with a new MAC they kept sending to the old one for ~30 s).
    e2e.network("blue", "10.51.0.0/24")
    e2e.run("r1", "blue")
    e2e.run("r2", "blue")
    before = e2e.container_net("r2", "blue")
    ping = ("ping", "-c", "2", "-W", "2", before["IPAddress"])
    assert e2e.ping("r1", before["IPAddress"])
    e2e.host(*ping)  # the host (its published ports) caches the MAC too
    e2e.docker("restart", "-t", "1", "r2")
    after = e2e.container_net("r2", "blue")
    assert after["EndpointID"] != before["EndpointID"]
    assert e2e.ping("r1", after["IPAddress"])
    e2e.host(*ping)
    assert (after["IPAddress"], after["MacAddress"]) == (before["IPAddress"], before["MacAddress"])


def test_mtu_option_reaches_the_container(e2e):
    e2e.network("jumbo", "10.52.0.0/24", "com.docker.network.driver.mtu=1400")
    e2e.run("m1", "jumbo")
    assert e2e.exec("m1", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1400"


def test_connect_and_disconnect_a_running_container(e2e):
    e2e.network("left", "10.53.0.0/24")
    e2e.network("right", "10.54.0.0/24")
    e2e.run("c1", "left")
    e2e.run("c2", "right")
    e2e.docker("network", "connect", "right", "c1")
    endpoint = e2e.container_net("c1", "right")["EndpointID"]
    assert e2e.vsctl("--bare", "--columns=name", "list", "Port", "oep-" + endpoint[:11])
    assert e2e.ping("c1", e2e.container_net("c2", "right")["IPAddress"])
    e2e.docker("network", "disconnect", "right", "c1")
    assert "eth1" not in e2e.exec("c1", "ip", "-o", "link").stdout
    port = "oep-" + endpoint[:11]

    def port_deleted():  # DeleteEndpoint marks it; a background transaction deletes it
        return port not in e2e.vsctl("--bare", "--columns=name", "list", "Port")

    world.wait_until(port_deleted, 5, message=f"{port} was not deleted after disconnect")
    ports = e2e.vsctl("--bare", "--columns=name", "list", "Port")
    # The driver has no per-container options: one is refused, not ignored.
    refused = e2e.docker(
        "network", "connect", "--driver-opt", "ovs.vlan=7", "right", "c1", check=False
    )
    assert "unknown endpoint option 'ovs.vlan' (--driver-opt)" in refused.stderr, refused.stderr
    assert "eth1" not in e2e.exec("c1", "ip", "-o", "link").stdout
    assert e2e.vsctl("--bare", "--columns=name", "list", "Port") == ports


def test_a_bad_option_is_refused_by_name_and_leaves_nothing(e2e):
    bridges = e2e.vsctl("list-br")
    result = e2e.network("bad", "10.55.0.0/24", "ovs.vlan=9999", check=False)
    assert result.returncode != 0
    assert "ovs.vlan" in result.stderr and "4094" in result.stderr
    result = e2e.network("bad", "10.55.0.0/24", "ovs.bogus=1", check=False)
    assert result.returncode != 0 and "ovs.bogus" in result.stderr
    assert e2e.vsctl("list-br") == bridges
    assert e2e.docker("network", "ls", "-q", "-f", "name=^bad$").stdout.strip() == ""


def test_driver_kill_and_restart_while_containers_run(e2e):
    e2e.network("sturdy", "10.56.0.0/24")
    e2e.run("k1", "sturdy")
    e2e.run("k2", "sturdy")
    k2 = e2e.container_net("k2", "sturdy")["IPAddress"]
    e2e.driver.kill(signal.SIGKILL)
    assert e2e.ping("k1", k2)  # the data path does not need the driver
    e2e.driver.start()
    assert e2e.ping("k1", k2)
    e2e.run("k3", "sturdy")
    assert e2e.ping("k3", k2)
    assert e2e.ping("k3", "10.56.0.1")
    e2e.docker("rm", "-f", "k1")  # Leave and DeleteEndpoint of an old endpoint
    assert e2e.ping("k3", k2)


def test_teardown_leaves_nothing_behind(e2e):
    e2e.network("gone", "10.57.0.0/24")
    bridge = "obr-" + e2e.network_id("gone")[:11]
    e2e.run("g1", "gone")
    endpoint = e2e.container_net("g1", "gone")["EndpointID"]
    e2e.docker("rm", "-f", "g1")
    e2e.docker("network", "rm", "gone")
    assert bridge not in e2e.vsctl("list-br")
    assert "oep-" + endpoint[:11] not in e2e.vsctl("--bare", "--columns=name", "list", "Port")
    links = e2e.host("ip", "-o", "link")
    assert bridge not in links and "oep-" + endpoint[:11] not in links
    assert "10.57.0.1" not in e2e.host("ip", "-o", "addr")


def test_compose_down_through_the_engines_api_leaves_no_veth(e2e):
    """Containers removed and their network deleted at once, through the
    engine's API: the network went before the ports' background deletion,
    which until 2026-12-03 left 1-2 veth pairs of 3 each time (the
    reconciler collected them 20 s later)."""
    e2e.network("down", "10.58.0.0/24", "ovs.port_type=veth")
    spec = {"Image": IMAGE, "Cmd": ["sleep", "600"], "HostConfig": {"NetworkMode": "down"}}
    ids = [e2e.api("POST", "/containers/create", spec)["Id"] for _ in range(3)]
    for container in ids:
        e2e.api("POST", f"/containers/{container}/start")
    for container in ids:
        e2e.api("DELETE", f"/containers/{container}?force=1")
    e2e.api("DELETE", "/networks/down")
    assert e2e.vsctl("list-br") == ""
    links = e2e.host("ip", "-o", "link")
    assert not re.findall(r"\d+: ((?:obr|ove|oep)-[^:@ ]*)", links), links
