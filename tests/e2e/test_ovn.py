"""End to end: one Docker network across two hosts through OVN.

The world (``tests.world.OVNWorld``) is an OVN central and two simulated hosts,
each a namespace with its own Open vSwitch, ovn-controller, dockerd (with
``--iptables=true``) and driver (with ``--ovn-nb``), joined by a veth underlay
that carries Geneve. Everything goes through the docker CLI.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import secrets
import subprocess
import sys
import time

import pytest

from tests import world

IMAGE = world.BUSYBOX_IMAGE
SUBNET = "10.60.0.0/24"
#: A 1 MiB file (16384 lines of 64 bytes) written by the web container.
BIG_FILE = "awk 'BEGIN{for(i=0;i<16384;i++) printf \"%063d\\n\", i}' > /www/big"


class Cluster:
    """The two hosts, their drivers and the central, as one test uses them."""

    def __init__(self, ovn_world, drivers):
        self.world = ovn_world
        self.central = ovn_world.central
        self.hosts = ovn_world.hosts
        self.drivers = drivers

    def docker(self, host, *args, check=True, timeout=60):
        return self.hosts[host].docker(*args, check=check, timeout=timeout)

    def network(self, host, name="blue", switch="blue", *extra, check=True):
        driver = self.drivers[host].name
        args = ["network", "create", "-d", driver, "--ipam-driver", driver]
        args += ["--ipam-opt", f"ovs.ovn.switch={switch}", *extra, name]
        return self.docker(host, *args, check=check)

    def run(self, host, name, network="blue", *extra, command=("sleep", "600"), check=True):
        args = ["run", "-d", "--name", name, "--network", network, *extra, IMAGE, *command]
        return self.docker(host, *args, check=check)

    def web(self, host, name, network="blue"):
        script = f"mkdir -p /www && {BIG_FILE} && exec httpd -f -p 80 -h /www"
        return self.run(host, name, network, command=("sh", "-c", script))

    def ip(self, host, container, network="blue"):
        out = self.docker(host, "inspect", container).stdout
        return json.loads(out)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]

    def exec(self, host, container, *argv, check=False, timeout=60):
        return self.docker(host, "exec", container, *argv, check=check, timeout=timeout)

    def ping(self, host, container, address, count=1):
        result = self.exec(host, container, "ping", "-c", str(count), "-W", "2", address)
        return result.returncode == 0

    def reaches(self, host, container, address, timeout=15):
        """Whether `container` gets a ping answer from `address` within `timeout` s."""
        try:
            world.wait_until(lambda: self.ping(host, container, address), timeout, 0.2)
        except TimeoutError:
            return False
        return True

    def endpoint_ports(self, host, removing=False):
        """The driver's endpoint ports on the host's integration bridge: those
        of live endpoints, and with ``removing`` also those DeleteEndpoint
        marked, which a background transaction deletes within a second."""
        out = self.hosts[host].ovs.vsctl(
            "--format=json",
            "--columns=name,external_ids",
            "find",
            "Port",
            "external_ids:docker-endpoint-id!=x",
        )
        return sorted(
            name
            for name, (_, pairs) in json.loads(out)["data"]
            if removing or "ovsdriver-removing" not in dict(pairs)
        )

    def reset(self):
        for host in range(2):
            dockerd = self.hosts[host].dockerd
            try:
                dockerd.reset()
            except Exception:  # a broken test's leftovers; keep cleaning
                time.sleep(1)
                dockerd.reset()


@pytest.fixture(scope="module")
def ovn_world():
    world.require(docker=True)
    for tool in ("ovn-northd", "ovn-controller", "ovn-nbctl"):
        if world.which(tool) is None:
            if world._ci():
                raise world.WorldError(f"{tool} is missing (install ovn-central ovn-host)")
            pytest.skip(f"{tool} is not installed")
    with world.OVNWorld(docker=True, iptables=True) as w:
        yield w


@pytest.fixture(scope="module")
def drivers(ovn_world):
    return [host.start_driver() for host in ovn_world.hosts]


@pytest.fixture
def cluster(ovn_world, drivers):
    c = Cluster(ovn_world, drivers)
    try:
        yield c
    finally:
        if not (c.central.directory / "nb.pid").exists():
            c.central.start_nb()
        for driver in drivers:
            if not driver.running:
                driver.start()
        c.reset()


def test_containers_on_two_hosts_ping_and_move_a_megabyte(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)  # the subnet comes from the switch
    c.web(1, "web")
    c.run(0, "client")
    web, client = c.ip(1, "web"), c.ip(0, "client")
    assert web != client and web.startswith("10.60.0.") and client.startswith("10.60.0.")
    assert c.reaches(0, "client", web)
    assert c.reaches(1, "web", client)
    # 1 MiB over TCP across the tunnel: the MTU leaves room for Geneve.
    fetch = c.exec(
        0, "client", "sh", "-c",
        f"timeout 30 wget -q -O /tmp/big http://{web}/big && ls -l /tmp/big",
    )  # fmt: skip
    assert fetch.returncode == 0, fetch.stderr
    assert fetch.stdout.split()[4] == str(1024 * 1024)
    mtu = c.exec(0, "client", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == str(1500 - 58)
    # What ovn-nbctl shows: one switch, the gateway localport, the two ports.
    ports = c.central.ports()
    assert sorted(ports) == sorted(["blue/gateway", f"blue/{web}", f"blue/{client}"])
    ids = c.central.nbctl("get", "Logical_Switch_Port", f"blue/{client}", "external_ids")
    assert "docker-endpoint-id" in ids and "docker-network-id" in ids
    assert "system-id=host0" in ids
    chassis = c.central.nbctl("get", "Logical_Switch_Port", f"blue/{client}", "options")
    assert "requested-chassis=host0" in chassis
    # The local side: the port's iface-id names the logical port.
    networks = json.loads(c.docker(0, "inspect", "client").stdout)[0]["NetworkSettings"]
    port = "oep-" + networks["Networks"]["blue"]["EndpointID"][:11]
    iface_id = c.hosts[0].ovs.vsctl("get", "Interface", port, "external_ids:iface-id")
    assert iface_id.strip('"') == f"blue/{client}"
    # Restarted, web gets another address (OVN's allocator goes on after the
    # last one) and the MAC that goes with it, and client reaches it at once.
    c.docker(1, "restart", "-t", "1", "web")
    web = c.ip(1, "web")
    settings = json.loads(c.docker(1, "inspect", "web").stdout)[0]["NetworkSettings"]
    octets = ipaddress.ip_address(web).packed
    assert settings["Networks"]["blue"]["MacAddress"] == "02:42:" + octets.hex(":")
    assert c.reaches(0, "client", web, timeout=5)


def test_twenty_containers_at_once_get_distinct_reachable_addresses(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)

    def start(job):
        host, n = job
        return c.run(host, f"c{host}-{n}")

    jobs = [(host, n) for n in range(10) for host in range(2)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(start, jobs))
    addresses = {f"c{h}-{n}": c.ip(h, f"c{h}-{n}") for h, n in jobs}
    assert len(set(addresses.values())) == 20, addresses
    targets = " ".join(addresses.values())
    # A port that came up on the other host a moment ago may take a little
    # longer to be known here (its binding travels through the Southbound
    # database): one more try each.
    script = (
        f"for ip in {targets}; do ping -c1 -W2 $ip >/dev/null || ping -c1 -W3 $ip >/dev/null"
        " || echo unreachable $ip; done"
    )
    for host in range(2):
        out = c.exec(host, f"c{host}-0", "sh", "-c", script, timeout=120)
        assert out.stdout.strip() == "", f"from host {host}: {out.stdout}"


def test_a_given_address_is_never_handed_out_on_the_other_host(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1, "blue", "blue", "--subnet", SUBNET)  # repeating it allows --ip
    c.run(0, "fixed", "blue", "--ip", "10.60.0.2")
    refused = c.run(1, "same", "blue", "--ip", "10.60.0.2", check=False)
    assert refused.returncode != 0
    assert "10.60.0.2 is already in use on OVN switch blue" in refused.stderr
    for n in range(3):
        c.run(1, f"auto{n}")
        assert c.ip(1, f"auto{n}") != "10.60.0.2"


def test_a_given_gateway_is_the_switchs_on_every_host(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET, "--gateway", "10.60.0.254")
    c.network(1)
    c.run(0, "a1")
    c.run(1, "b1")
    for host, name in ((0, "a1"), (1, "b1")):
        assert "default via 10.60.0.254" in c.exec(host, name, "ip", "route").stdout
        assert c.ping(host, name, "10.60.0.254")  # each host's own gateway port
    assert c.ip(0, "a1") != "10.60.0.254" != c.ip(1, "b1")


def test_a_conflicting_subnet_is_refused_with_what_the_switch_has(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    refused = c.network(1, "blue", "blue", "--subnet", "10.61.0.0/24", check=False)
    assert refused.returncode != 0
    assert "has subnet 10.60.0.0/24, not 10.61.0.0/24" in refused.stderr
    name = c.drivers[0].name
    local = c.docker(
        0, "network", "create", "-d", name, "--ipam-driver", name, "--subnet", "10.62.0.0/24",
        "plain", check=False,
    )  # fmt: skip
    assert local.returncode != 0 and "ovs.ovn.switch=NAME" in local.stderr
    mismatch = c.network(1, "blue", "blue", "-o", "ovs.ovn.switch=green", check=False)
    assert mismatch.returncode != 0
    assert "-o ovs.ovn.switch=green does not match --ipam-opt ovs.ovn.switch=blue" in (
        mismatch.stderr
    )
    c.network(1, "blue", "blue", "-o", "ovs.ovn.switch=blue")  # the same switch is fine


def test_dual_stack_containers_on_two_hosts_talk_over_ipv6(cluster):
    c = cluster
    subnets = ("--subnet", "10.65.0.0/24", "--subnet", "fd00:65::/64")
    # The switch's IPv6 subnet comes with the network that makes it.
    c.network(0, "six", "six", "--ipv6", *subnets)
    refused = c.network(1, "six", "six", check=False)
    assert "has IPv6 subnet fd00:65::/64: create the network with --ipv6" in refused.stderr
    c.network(1, "six", "six", "--ipv6")
    c.run(0, "s0", "six")
    c.run(1, "s1", "six")

    def ipv6(host, container):
        out = c.docker(host, "inspect", container).stdout
        return json.loads(out)[0]["NetworkSettings"]["Networks"]["six"]["GlobalIPv6Address"]

    a, b = ipv6(0, "s0"), ipv6(1, "s1")
    assert a != b and {a, b} <= {"fd00:65::2", "fd00:65::3"}

    def ping6(host, container, peer):
        return c.exec(host, container, "ping6", "-c", "1", "-W", "2", peer).returncode == 0

    for host, container, peer in ((0, "s0", b), (1, "s1", a), (0, "s0", "fd00:65::1")):
        world.wait_until(lambda: ping6(host, container, peer), 15, 0.2, f"{container} -> {peer}")  # noqa: B023
    assert "default via fd00:65::1" in c.exec(0, "s0", "ip", "-6", "route").stdout
    # --ip6 (on the host that gave the subnets) is claimed like any address.
    c.run(0, "s2", "six", "--ip6", "fd00:65::99")
    world.wait_until(lambda: ping6(1, "s1", "fd00:65::99"), 15, 0.2, "s1 -> fd00:65::99")
    refused = c.run(0, "s3", "six", "--ip6", b, check=False)
    assert f"address {b} is already in use on OVN switch six" in refused.stderr, refused.stderr
    # The host reaches its own containers through the gateway, over IPv6 too.
    assert (
        c.hosts[1].netns.run(["ping", "-6", "-c", "1", "-W", "2", b], check=False).returncode == 0
    )
    # The IPv4 claim's logical port carries both addresses (and port security).
    addresses = c.central.nbctl(
        "get", "Logical_Switch_Port", f"six/{c.ip(0, 's0', 'six')}", "addresses"
    )
    assert addresses.endswith(f' {c.ip(0, "s0", "six")} {a}"]'), addresses
    # A switch made without --ipv6 stays IPv4 only.
    c.network(0, "four", "four", "--subnet", "10.66.0.0/24")
    refused = c.network(1, "four", "four", "--ipv6", check=False)
    assert "OVN logical switch four is IPv4 only" in refused.stderr, refused.stderr
    # Removing the containers and networks gives back both addresses and the switch.
    c.docker(0, "rm", "-f", "s2", "s3")
    for host, container in ((0, "s0"), (1, "s1")):
        c.docker(host, "rm", "-f", container)
        c.docker(host, "network", "rm", "six")
    # Docker 20.10 does not give back the IPv4 address of an endpoint whose
    # IPv6 one was refused (s3's); the network's removal does.
    assert "six" not in c.central.switches()
    assert not [p for p in c.central.ports() if p.startswith("six/")], c.central.ports()


def test_each_host_hands_out_addresses_from_its_own_ip_range(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET, "--ip-range", "10.60.0.128/25")
    c.network(1, "blue", "blue", "--subnet", SUBNET, "--ip-range", "10.60.0.64/26")
    for host, name in ((0, "r0"), (0, "r1"), (1, "r2")):
        c.run(host, name)
    ranges = {0: "10.60.0.128/25", 1: "10.60.0.64/26"}
    got = {name: c.ip(host, name) for host, name in ((0, "r0"), (0, "r1"), (1, "r2"))}
    assert len(set(got.values())) == 3, got
    for host, name in ((0, "r0"), (0, "r1"), (1, "r2")):
        assert ipaddress.ip_address(got[name]) in ipaddress.ip_network(ranges[host]), got
    # Outside the range, --ip is honoured as with Docker's own IPAM.
    c.run(1, "r3", "blue", "--ip", "10.60.0.5")
    assert c.ip(1, "r3") == "10.60.0.5"
    assert c.reaches(0, "r0", "10.60.0.5")


def test_local_networks_work_beside_ovn_ones(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    driver = c.drivers[0].name
    c.docker(0, "network", "create", "-d", driver, "--subnet", "10.64.0.0/24", "local")
    c.run(0, "l1", "local")
    c.run(0, "l2", "local")
    assert c.ip(0, "l1", "local").startswith("10.64.0.")
    assert c.ping(0, "l1", c.ip(0, "l2", "local"))
    bridge = "obr-" + c.docker(0, "network", "inspect", "-f", "{{.Id}}", "local").stdout[:11]
    assert bridge in c.hosts[0].ovs.bridges()
    assert c.central.ports() == ["blue/gateway"]  # nothing of it in OVN


class Outside:
    """A namespace behind a veth from one host, with an HTTP server answering
    with the client's address (so the test sees whether it was NATed)."""

    SERVER = (
        "import http.server, sys, threading\n"
        "class P(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = ('peer=%s' % self.client_address[0]).encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *a): pass\n"
        "s = http.server.HTTPServer((sys.argv[1], 8080), P)\n"
        "threading.Timer(120, s.shutdown).start()\n"
        "print('ready', flush=True); s.serve_forever()\n"
    )

    def __init__(self, host, prefix):
        self.name = f"{world.PREFIX}-out-{secrets.token_hex(3)}"
        self.host_ip, self.ip = f"{prefix}.1", f"{prefix}.2"
        self.process = None
        world.run(["ip", "netns", "add", self.name])
        try:
            hn = host.netns.name
            for argv in (
                ["ip", "-n", self.name, "link", "set", "lo", "up"],
                ["ip", "-n", hn, "link", "add", "ovx0", "type", "veth", "peer", "name", "ovx1",
                 "netns", self.name],
                ["ip", "-n", hn, "addr", "add", f"{self.host_ip}/24", "dev", "ovx0"],
                ["ip", "-n", hn, "link", "set", "ovx0", "up"],
                ["ip", "-n", self.name, "addr", "add", f"{self.ip}/24", "dev", "ovx1"],
                ["ip", "-n", self.name, "link", "set", "ovx1", "up"],
            ):  # fmt: skip
                world.run(argv)
            argv = ["nsenter", f"--net=/run/netns/{self.name}", "--", sys.executable, "-c",
                    self.SERVER, self.ip]  # fmt: skip
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert self.process.stdout.readline().strip() == "ready"
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.process is not None:
            world.stop_process(self.process.pid, popen=self.process, timeout=5)
            self.process.stdout.close()
        world.run(["ip", "netns", "delete", self.name], check=False)


def test_each_host_reaches_the_outside_through_its_own_nat(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)
    outsides = []
    try:
        outsides = [Outside(c.hosts[0], "192.0.2"), Outside(c.hosts[1], "198.51.100")]
        for host, outside in enumerate(outsides):
            c.run(host, f"out{host}")
            got = c.exec(
                host, f"out{host}", "timeout", "10", "wget", "-q", "-O", "-",
                f"http://{outside.ip}:8080/",
            )  # fmt: skip
            assert got.returncode == 0, got.stderr
            # Masqueraded behind this host's own address on that link.
            assert got.stdout.strip() == f"peer={outside.host_ip}"
    finally:
        for outside in outsides:
            outside.close()


def test_published_ports_and_internal_networks_on_ovn(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(0, "dark", "dark", "--subnet", "10.63.0.0/24", "--internal")
    outside = Outside(c.hosts[0], "192.0.2")
    try:
        script = "mkdir -p /www && echo published > /www/index.html && exec httpd -f -p 80 -h /www"
        c.run(0, "pub", "blue", "-p", "8081:80", command=("sh", "-c", script))
        get = (
            "import urllib.request, sys; "
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        )
        argv = ["nsenter", f"--net=/run/netns/{outside.name}", "--", sys.executable, "-c",
                get, f"http://{outside.host_ip}:8081/"]  # fmt: skip
        got = world.wait_until(
            lambda: world.run(argv, check=False, timeout=30).stdout.strip() == "published", 15, 0.5
        )
        assert got
        c.run(0, "hidden", "dark")
        cut_off = c.exec(
            0, "hidden", "timeout", "5", "wget", "-q", "-O", "-", f"http://{outside.ip}:8080/"
        )
        assert cut_off.returncode != 0
        routes = c.exec(0, "hidden", "ip", "route").stdout
        assert "default" not in routes
        gateways = c.hosts[0].ovs.vsctl("--bare", "--columns=name", "find", "Interface",
                                        "external_ids:iface-id=dark/gateway")  # fmt: skip
        assert gateways == ""
    finally:
        outside.close()


def test_a_network_removed_on_one_host_keeps_working_on_the_other(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)
    c.run(0, "a1")
    c.run(1, "b1")
    c.run(1, "b2")
    c.docker(0, "rm", "-f", "a1")
    c.docker(0, "network", "rm", "blue")
    assert c.central.switches() == ["blue"]
    assert c.ping(1, "b1", c.ip(1, "b2"))
    c.run(1, "b3")
    assert c.ping(1, "b3", c.ip(1, "b1"))
    c.docker(1, "rm", "-f", "b1", "b2", "b3")
    c.docker(1, "network", "rm", "blue")
    assert c.central.switches() == []
    assert c.central.ports() == []
    assert c.endpoint_ports(0) == [] and c.endpoint_ports(1) == []
    world.wait_until(
        lambda: not c.endpoint_ports(0, removing=True) and not c.endpoint_ports(1, removing=True),
        5,
        message="the removed endpoints' ports were not deleted",
    )


def test_a_network_removed_while_the_driver_was_down_is_made_again_once_its_leftover_goes(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    old = c.docker(0, "network", "inspect", "-f", "{{.Id}}", "blue").stdout.strip()
    c.drivers[0].kill()
    try:
        c.docker(0, "network", "rm", "blue")  # the engine forgets it anyway
    finally:
        c.drivers[0].start()
    refused = c.network(0, check=False)
    assert refused.returncode != 0
    remedy = (
        f"ovs-vsctl del-port ogw-{old[:11]} -- remove Bridge br-int external_ids "
        f"ovsdriver-network-{old}"
    )
    assert f"remove what is left of it: {remedy}" in refused.stderr
    c.hosts[0].ovs.vsctl(*remedy.split()[1:])
    # The switch's record of this host's network names the old one: no matter.
    c.network(0)
    c.run(0, "again")
    assert c.reaches(0, "again", "10.60.0.1")


def test_restarts_and_a_northbound_outage_lose_nothing(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)
    c.run(0, "a1")
    c.run(1, "b1")
    b1 = c.ip(1, "b1")
    assert c.reaches(0, "a1", b1)

    c.hosts[0].restart_controller()
    assert c.reaches(0, "a1", b1)

    c.drivers[0].restart()  # SIGTERM
    c.drivers[1].kill()  # SIGKILL, as in a crash
    c.drivers[1].start()
    assert c.reaches(0, "a1", b1)
    c.run(0, "a2")
    assert c.reaches(1, "b1", c.ip(0, "a2"))

    c.central.stop_nb()
    try:
        assert c.ping(0, "a1", b1)  # the data path does not need the Northbound database
        started = time.monotonic()
        refused = c.run(0, "a3", check=False)
        assert refused.returncode != 0
        assert "OVN Northbound database" in refused.stderr
        assert time.monotonic() - started < 20
    finally:
        c.central.start_nb()

    def started():  # once the driver has reconnected (backoff up to 8 s)
        if c.run(0, "a4", check=False).returncode == 0:
            return True
        c.docker(0, "rm", "-f", "a4", check=False)
        return False

    world.wait_until(started, 40, 1)
    assert c.reaches(1, "b1", c.ip(0, "a4"))
    # No orphans: one logical port per running container, plus the gateway.
    running = {f"blue/{c.ip(h, n)}" for h, n in ((0, "a1"), (0, "a2"), (0, "a4"), (1, "b1"))}
    assert sorted(c.central.ports()) == sorted(running | {"blue/gateway"})
    assert len(c.endpoint_ports(0)) == 3 and len(c.endpoint_ports(1)) == 1


def test_an_ovs_vswitchd_restart_is_repaired_on_ovn_networks(cluster):
    c = cluster
    c.network(0, "blue", "blue", "--subnet", SUBNET)
    c.network(1)
    c.run(0, "a1")
    c.run(1, "b1")
    b1 = c.ip(1, "b1")
    assert c.reaches(0, "a1", b1)
    c.hosts[0].ovs.restart_vswitchd()
    # The reconciler puts the fresh port in the container; ovn-controller
    # installs it again.
    assert c.reaches(0, "a1", b1, timeout=30)
    c.run(0, "a2")
    assert c.reaches(0, "a2", b1)
