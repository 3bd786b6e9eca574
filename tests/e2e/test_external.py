"""End to end: external connectivity, isolation, internal networks and
published ports, with the real firewall in the world's namespace.

Every test builds an "outside" host of its own: a namespace ``ovsw-out-*``
behind a veth from the world (192.0.2.1 on the world's side, 192.0.2.2
outside) with no route to the container subnets, so only masquerading and
DNAT can connect it with containers. Servers are small Python programs the
test starts with nsenter (in the outside namespace, or in a container's) and
stops by PID; each also ends by itself after a bounded time.
"""

import concurrent.futures
import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

from tests import world

IMAGE = world.BUSYBOX_IMAGE
WORLD_IP, OUTSIDE_IP = "192.0.2.1", "192.0.2.2"
LIFETIME = 120  # seconds a helper server lives at most

#: An HTTP server answering every GET with the client's address.
HTTP_PEER_SERVER = """
import http.server, sys, threading
class Peer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("peer=%s\\n" % self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Peer)
threading.Timer(float(sys.argv[3]), server.shutdown).start()
print("ready", flush=True)
server.serve_forever()
"""

#: A UDP server answering every datagram with "echo:<data>:<sender address>".
UDP_ECHO_SERVER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(0.5)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        data, peer = sock.recvfrom(2048)
    except socket.timeout:
        continue
    sock.sendto(b"echo:" + data + b":" + peer[0].encode(), peer)
"""

#: Fetch a URL (bounded): print the body, or exit 1 with the error.
HTTP_GET = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:
    sys.exit("%s: %s" % (type(e).__name__, e))
"""

#: Send one UDP datagram and print the answer (bounded), or exit 1.
UDP_ASK = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(float(sys.argv[4]))
for attempt in range(3):
    sock.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(sock.recv(2048).decode())
        break
    except socket.timeout:
        continue
else:
    sys.exit("no answer")
"""


def nsenter(path, *argv):
    return ["nsenter", f"--net={path}", "--", *argv]


class Outside:
    """A namespace behind a veth from the world, with no route to containers."""

    def __init__(self, docker_world):
        self.world = docker_world
        self.name = f"{world.PREFIX}-out-{secrets.token_hex(3)}"
        self.path = f"/run/netns/{self.name}"
        self.processes = []
        world.run(["ip", "netns", "add", self.name])
        try:
            wn = docker_world.netns.name
            for argv in (
                ["ip", "-n", self.name, "link", "set", "lo", "up"],
                ["ip", "-n", wn, "link", "add", "ovx0", "type", "veth"]
                + ["peer", "name", "ovx1", "netns", self.name],
                ["ip", "-n", wn, "addr", "add", f"{WORLD_IP}/24", "dev", "ovx0"],
                ["ip", "-n", wn, "link", "set", "ovx0", "up"],
                ["ip", "-n", self.name, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "ovx1"],
                ["ip", "-n", self.name, "link", "set", "ovx1", "up"],
            ):
                world.run(argv)
        except BaseException:
            self.close()
            raise

    def start(self, netns_path, script, *args):
        """Start a helper server in *netns_path*; wait until it says ready."""
        argv = nsenter(netns_path, sys.executable, "-c", script, *map(str, args), str(LIFETIME))
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        ready = []

        def started():
            if process.poll() is not None:
                return True
            if select.select([process.stdout], [], [], 0.1)[0]:
                ready.append(process.stdout.readline().strip())
            return bool(ready)

        world.wait_until(started, 10, 0)
        if ready != ["ready"]:
            raise AssertionError(f"helper did not start: {process.stderr.read()}")
        return process

    def get(self, url, netns_path=None, timeout=3):
        """GET *url* from the outside (or *netns_path*): (ok, body or error)."""
        done = world.run(
            nsenter(netns_path or self.path, sys.executable, "-c", HTTP_GET, url, str(timeout)),
            check=False,
            timeout=timeout + 20,
        )
        return done.returncode == 0, (done.stdout if done.returncode == 0 else done.stderr)

    def udp(self, host, port, message, timeout=2):
        done = world.run(
            nsenter(
                self.path, sys.executable, "-c", UDP_ASK, host, str(port), message, str(timeout)
            ),
            check=False,
            timeout=3 * timeout + 20,
        )
        return done.returncode == 0, done.stdout.strip() or done.stderr.strip()

    def close(self):
        for process in self.processes:
            world.stop_process(process.pid, popen=process, timeout=5)
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()
        if os.path.lexists(self.path):
            world.run(["ip", "netns", "delete", self.name])  # takes the veth along


class External:
    """Shortcuts for one test: the engine, the driver, the outside."""

    def __init__(self, docker_world, driver, outside):
        self.world = docker_world
        self.driver = driver
        self.outside = outside

    def docker(self, *args, check=True):
        return self.world.dockerd.docker(*args, check=check)

    def host(self, *argv):
        return self.world.netns.run(list(argv)).stdout

    def network(self, name, subnet, *args):
        self.docker("network", "create", "-d", self.driver.name, "--subnet", subnet, *args, name)
        return self.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()

    def run(self, name, network, *args, command=("sleep", "600")):
        self.docker("run", "-d", "--name", name, "--network", network, *args, IMAGE, *command)

    def web(self, name, network, *args):
        """A container serving /www/index.html ("hello from NAME") on port 80."""
        script = f"mkdir -p /www && echo hello from {name} > /www/index.html"
        self.run(
            name, network, *args, command=("sh", "-c", f"{script} && exec httpd -f -p 80 -h /www")
        )

    def ip(self, container, network):
        template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
        return self.docker("inspect", "-f", template, container).stdout.strip()

    def pid(self, container):
        return self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()

    def exec(self, container, *argv):
        return self.docker("exec", container, *argv, check=False)

    def ping(self, container, address):
        return self.exec(container, "ping", "-c", "2", "-W", "2", address).returncode == 0

    def wget(self, container, url):
        """(ok, output) of a bounded busybox wget inside *container*."""
        # (Debian's busybox wget crashes with -T: bound it with timeout instead.)
        done = self.exec(container, "timeout", "8", "wget", "-q", "-O", "-", url)
        return done.returncode == 0, done.stdout + done.stderr

    def nat_rules(self):
        return self.host("iptables-save", "-t", "nat")

    def peer_server(self):
        self.outside.start(self.outside.path, HTTP_PEER_SERVER, OUTSIDE_IP, 8000)
        return f"http://{OUTSIDE_IP}:8000/"


@pytest.fixture(params=["iptables", "plain"])
def ext(request):
    """External-connectivity shortcuts, with dockerd's iptables on ("iptables":
    FORWARD policy DROP) and off ("plain": FORWARD policy ACCEPT)."""
    kind = request.param
    docker_world = request.getfixturevalue(
        "docker_world_iptables" if kind == "iptables" else "docker_world"
    )
    driver = request.getfixturevalue("driver_iptables" if kind == "iptables" else "driver")
    outside = Outside(docker_world)
    try:
        yield External(docker_world, driver, outside)
    finally:
        outside.close()


@pytest.fixture
def ext_iptables(docker_world_iptables, driver_iptables):
    outside = Outside(docker_world_iptables)
    try:
        yield External(docker_world_iptables, driver_iptables, outside)
    finally:
        outside.close()


def test_the_outside_has_no_route_to_containers(ext_iptables):
    routes = world.run(["ip", "-n", ext_iptables.outside.name, "route"]).stdout
    assert routes.split() == ["192.0.2.0/24", "dev", "ovx1", "proto", "kernel"] + [
        "scope",
        "link",
        "src",
        OUTSIDE_IP,
    ]


def test_a_container_reaches_the_outside_masqueraded(ext):
    ext.network("ext", "10.71.0.0/24")
    ext.run("c1", "ext")
    url = ext.peer_server()
    assert ext.ping("c1", OUTSIDE_IP)
    ok, body = ext.wget("c1", url)
    assert ok, body
    assert body.strip() == f"peer={WORLD_IP}"  # the host's address, not 10.71.0.x


def test_networks_of_the_driver_cannot_reach_each_other(ext):
    ext.network("left", "10.72.0.0/24")
    ext.network("right", "10.73.0.0/24")
    ext.run("l1", "left")
    ext.run("r1", "right")
    url = ext.peer_server()
    assert ext.wget("l1", url)[0] and ext.wget("r1", url)[0]  # both do get out
    assert not ext.ping("l1", ext.ip("r1", "right"))
    assert not ext.ping("r1", ext.ip("l1", "left"))
    assert ext.ping("l1", "10.72.0.1")


def test_internal_network_talks_inside_only(ext_iptables):
    ext = ext_iptables
    ext.network("inner", "10.74.0.0/24", "--internal")
    ext.run("i1", "inner")
    ext.run("i2", "inner")
    ext.peer_server()
    assert ext.ping("i1", ext.ip("i2", "inner"))
    assert "default" not in ext.exec("i1", "ip", "route").stdout
    assert not ext.ping("i1", OUTSIDE_IP)
    assert not ext.wget("i1", f"http://{OUTSIDE_IP}:8000/")[0]
    # Nothing is masqueraded nor published for it; no gateway on the host.
    assert "10.74.0.0/24" not in ext.nat_rules()
    assert "10.74.0." not in ext.host("ip", "-o", "addr")
    # Even a route to it from the world goes nowhere.
    assert "10.74.0.0/24 -m comment" in ext.host("iptables-save", "-t", "filter")


def test_a_subnet_the_host_uses_is_refused_and_the_host_keeps_it(ext_iptables):
    ext = ext_iptables
    bridges = ext.world.ovs.bridges()
    argv = ("network", "create", "-d", ext.driver.name, "--subnet", "192.0.2.0/24", "lan")
    failed = ext.docker(*argv, check=False)
    assert failed.returncode != 0
    assert "overlaps 192.0.2.0/24, the subnet of the host's interface ovx0" in failed.stderr
    assert "lan" not in ext.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert ext.world.ovs.bridges() == bridges
    # One route to it, the LAN's (the old code added a second one, through
    # the network's bridge: whichever came first got all the traffic).
    routes = ext.host("ip", "-4", "route", "show", "192.0.2.0/24").splitlines()
    assert [route.split()[:3] for route in routes] == [["192.0.2.0/24", "dev", "ovx0"]]
    ext.host("ping", "-c", "1", "-W", "2", OUTSIDE_IP)


def test_published_tcp_port_is_reachable_from_outside_until_removed(ext):
    ext.network("pub", "10.75.0.0/24")
    ext.web("web", "pub", "-p", "8080:80")
    cip = ext.ip("web", "pub")
    url = f"http://{WORLD_IP}:8080/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url)), 15, 0.5)
    assert body.strip() == "hello from web"
    assert f"--to-destination {cip}:80" in ext.nat_rules()
    # From the host itself (OUTPUT), and hairpin from a container of the network.
    assert ext.outside.get(url, ext.world.netns.path)[0]
    ext.run("neighbour", "pub")
    ok, body = ext.wget("neighbour", url)
    assert ok and "hello from web" in body, body
    # The container port is not reachable without the DNAT (no route anyway,
    # and nothing but published ports comes in).
    ext.docker("rm", "-f", "web")
    assert f"{cip}:80" not in ext.nat_rules()
    assert cip not in ext.host("iptables-save")
    assert not ext.outside.get(url)[0]


def test_published_udp_port_is_reachable_from_outside_until_removed(ext_iptables):
    ext = ext_iptables
    ext.network("dns", "10.76.0.0/24")
    ext.run("udp1", "dns", "-p", "5353:53/udp")
    cip = ext.ip("udp1", "dns")
    ext.outside.start(f"/proc/{ext.pid('udp1')}/ns/net", UDP_ECHO_SERVER, "0.0.0.0", 53)
    ok, answer = ext.outside.udp(WORLD_IP, 5353, "hi")
    assert ok, answer
    assert answer == f"echo:hi:{OUTSIDE_IP}"  # DNAT only: the container sees the client
    assert "-p udp -m udp --dport 5353" in ext.nat_rules()
    ext.docker("rm", "-f", "udp1")
    assert f"{cip}:53" not in ext.nat_rules()


def test_published_port_on_one_host_address_only(ext_iptables):
    ext = ext_iptables
    ext.network("pin", "10.77.0.0/24")
    ext.host("ip", "addr", "add", "192.0.2.11/24", "dev", "ovx0")
    ext.web("pinned", "pin", "-p", "192.0.2.11:8081:80")
    url = "http://{}:8081/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url.format("192.0.2.11"))), 15, 0.5)
    assert "hello from pinned" in body
    assert not ext.outside.get(url.format(WORLD_IP))[0]


def test_routed_network_is_not_masqueraded_and_reachable(ext_iptables):
    ext = ext_iptables
    ext.network("routed", "10.78.0.0/24", "-o", "ovs.nat=false")
    ext.web("r1", "routed")
    world.run(["ip", "-n", ext.outside.name, "route", "add", "10.78.0.0/24", "via", WORLD_IP])
    url = ext.peer_server()
    ok, body = ext.wget("r1", url)
    assert ok and body.strip() == f"peer={ext.ip('r1', 'routed')}", body
    assert ext.outside.get(f"http://{ext.ip('r1', 'routed')}/index.html")[0]


def test_nat_network_is_not_reachable_by_route_even_with_forward_accept(ext):
    ext.network("hidden", "10.79.0.0/24")
    ext.web("h1", "hidden")
    world.run(["ip", "-n", ext.outside.name, "route", "add", "10.79.0.0/24", "via", WORLD_IP])
    assert not ext.outside.get(f"http://{ext.ip('h1', 'hidden')}/index.html", timeout=2)[0]


def test_rules_are_restored_when_the_driver_restarts(ext_iptables):
    ext = ext_iptables
    ext.network("sturdy", "10.80.0.0/24")
    ext.web("web2", "sturdy", "-p", "8082:80")
    url = f"http://{WORLD_IP}:8082/index.html"
    assert world.wait_until(lambda: _ok(ext.outside.get(url)), 15, 0.5)
    ext.driver.kill(signal.SIGKILL)
    # As after a reboot: none of the driver's rules are left.
    for table, builtin, chain in (
        ("filter", "FORWARD", "OVSDRIVER-FORWARD"),
        ("nat", "PREROUTING", "OVSDRIVER-DNAT"),
        ("nat", "POSTROUTING", "OVSDRIVER-POSTROUTING"),
    ):
        rules = ext.host("iptables", "-t", table, "-S", builtin)
        for rule in rules.splitlines():
            if rule.endswith(f"-j {chain}"):
                ext.host("iptables", "-t", table, *rule.replace("-A", "-D", 1).split())
    ext.host("iptables", "-t", "nat", "-F", "OVSDRIVER-DNAT")
    assert not ext.outside.get(url, timeout=2)[0]
    started = time.monotonic()
    ext.driver.start()
    assert world.wait_until(lambda: _ok(ext.outside.get(url)), 15, 0.5)
    assert time.monotonic() - started < 15
    assert "firewall rules restored" in ext.driver.log()


def _ok(result):
    ok, body = result
    return (ok, body) if ok else None


# -- issue 7: every -p form works or is refused; healing; Docker's networks ----------


def test_published_on_loopback_is_reachable_from_the_host_only(ext_iptables):
    ext = ext_iptables
    ext.network("loop", "10.83.0.0/24")
    ext.web("lo1", "loop", "-p", "127.0.0.1:8090:80")
    url = "http://127.0.0.1:8090/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url, ext.world.netns.path)), 15, 0.5)
    assert body.strip() == "hello from lo1"
    assert not ext.outside.get(f"http://{WORLD_IP}:8090/index.html", timeout=2)[0]


def test_a_networks_host_binding_is_where_its_ports_are_published(ext_iptables):
    ext = ext_iptables
    option = "com.docker.network.bridge.host_binding_ipv4=127.0.0.1"
    ext.network("bound", "10.99.0.0/24", "-o", option)
    ext.web("hb1", "bound", "-p", "8066:80")
    url = "http://127.0.0.1:8066/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url, ext.world.netns.path)), 15, 0.5)
    assert body.strip() == "hello from hb1"
    assert not ext.outside.get(f"http://{WORLD_IP}:8066/index.html", timeout=2)[0]


def test_published_on_every_address_answers_on_loopback_too(ext_iptables):
    ext = ext_iptables
    ext.network("loopall", "10.84.0.0/24")
    ext.web("all1", "loopall", "-p", "8092:80")
    url = "http://127.0.0.1:8092/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url, ext.world.netns.path)), 15, 0.5)
    assert body.strip() == "hello from all1"


def test_a_host_port_range_publishes_the_whole_range_or_picks_a_free_port(ext_iptables):
    ext = ext_iptables
    ext.network("ranges", "10.85.0.0/24")
    ext.web("rg1", "ranges", "-p", "8100-8101:80")
    ext.web("rg2", "ranges", "-p", "8100-8101:80")
    for port, name in ((8100, "rg1"), (8101, "rg2")):
        url = f"http://{WORLD_IP}:{port}/index.html"
        ok, body = world.wait_until(lambda url=url: _ok(ext.outside.get(url)), 15, 0.5)
        assert body.strip() == f"hello from {name}"
    failed = ext.docker(
        "run", "-d", "--network", "ranges", "-p", "8100-8101:80", IMAGE, "true", check=False
    )
    assert failed.returncode != 0
    assert "every host port from 8100 to 8101 is already published" in failed.stderr
    ext.run("rg3", "ranges", "-p", "8110-8112:80-82")
    rules = ext.nat_rules()
    cip = ext.ip("rg3", "ranges")
    for n in range(3):
        assert f"--dport {8110 + n} " in rules and f"{cip}:{80 + n}" in rules


def test_ports_docker_would_pick_are_refused_with_what_to_use(ext_iptables):
    ext = ext_iptables
    ext.network("pick", "10.86.0.0/24")
    for flag in (["-p", "80"], ["-P", "--expose", "80"]):
        failed = ext.docker("run", "-d", "--network", "pick", *flag, IMAGE, "true", check=False)
        assert failed.returncode != 0
        assert "-p 8080:80/tcp" in failed.stderr and "internal error" not in failed.stderr
    failed = ext.docker(
        "run", "-d", "--network", "pick", "-p", "[::]:8093:80", IMAGE, "true", check=False
    )
    assert failed.returncode != 0 and "--ipv6" in failed.stderr


def test_the_same_host_port_asked_at_once_is_given_once(ext_iptables):
    ext = ext_iptables
    ext.network("race", "10.87.0.0/24")
    argv = ["run", "-d", "--network", "race", "-p", "8094:80", IMAGE, "sleep", "600"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: ext.docker(*argv, check=False), range(4)))
    assert [r.returncode for r in runs].count(0) == 1, [r.stderr for r in runs]
    for r in runs:
        assert r.returncode == 0 or "8094/tcp is already published" in r.stderr
    assert ext.nat_rules().count("--dport 8094 ") == 1


def test_host_ports_programs_use_are_refused_and_published_ones_are_held(ext_iptables):
    ext = ext_iptables
    ext.network("held", "10.95.0.0/24")

    bind = ext.world.netns.bind_tcp
    # A server of the host on 8060: publishing that port would take its traffic.
    ext.outside.start(ext.world.netns.path, HTTP_PEER_SERVER, "0.0.0.0", 8060)
    argv = ("run", "-d", "--network", "held", "-p", "8060:80", IMAGE, "true")
    failed = ext.docker(*argv, check=False)
    assert failed.returncode != 0
    assert "host port 8060/tcp is in use by another program" in failed.stderr
    ok, body = ext.outside.get(f"http://{WORLD_IP}:8060/")
    assert ok and body.startswith(f"peer={OUTSIDE_IP}"), body
    assert "--dport 8060 " not in ext.nat_rules()
    ext.run("hr1", "held", "-p", "8060-8061:80")  # a range passes over it
    assert "--dport 8061 " in ext.nat_rules()
    # A published port is held: no program takes it while the container has it.
    ext.web("hw1", "held", "-p", "8062:80")
    assert bind(8062) == "Address already in use"
    ext.driver.kill(signal.SIGKILL)
    ext.driver.start()
    assert world.wait_until(lambda: bind(8062) == "Address already in use", 15, 0.2)
    ok, body = ext.outside.get(f"http://{WORLD_IP}:8062/index.html")
    assert ok and body.strip() == "hello from hw1", body
    ext.docker("rm", "-f", "hw1")
    assert bind(8062) is None


def _open_files_limit(pid):
    """(soft, hard) limit of open files of process *pid*."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return tuple(int(n) for n in line.split()[3:5])


def test_published_ports_never_take_the_files_the_driver_needs(ext_iptables):
    ext = ext_iptables
    # As under systemd: a soft limit of 1024 and a higher hard one.
    ext.driver.stop()
    ext.driver.wrapper = ["prlimit", "--nofile=1024:2048", "--"]
    ext.driver.start()
    # Like dockerd, the driver raises its soft limit to the hard one at start.
    assert _open_files_limit(ext.driver.pid) == (2048, 2048)
    ext.network("many", "10.99.0.0/24")
    # A socket per port: 1900 would leave the driver too few files; refused whole.
    failed = ext.docker(
        "run", "-d", "--network", "many", "-p", "20000-21899:20000-21899", IMAGE, "true",
        check=False,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "cannot publish 1900 more host ports" in failed.stderr, failed.stderr
    assert "--dport 20000 " not in ext.nat_rules()
    # 1000 are published, and held; the driver goes on working.
    ext.web("wide", "many", "-p", "20000-20999:20000-20999", "-p", "8097:80")
    nat = ext.nat_rules()
    assert "--dport 20000 " in nat and "--dport 20999 " in nat
    ok, body = world.wait_until(
        lambda: _ok(ext.outside.get(f"http://{WORLD_IP}:8097/index.html")), 15, 0.5
    )
    assert body.strip() == "hello from wide"
    assert ext.world.netns.bind_tcp(20500) is not None  # held: a program cannot have it
    ext.docker("rm", "-f", "wide")
    assert ext.world.netns.bind_tcp(20500) is None
    assert "--dport 20000 " not in ext.nat_rules()


def test_published_on_ipv6_on_a_dual_stack_network(ext_iptables):
    ext = ext_iptables
    wn, on = ext.world.netns.name, ext.outside.name
    world.run(["ip", "-n", wn, "addr", "add", "2001:db8:9::1/64", "dev", "ovx0", "nodad"])
    world.run(["ip", "-n", on, "addr", "add", "2001:db8:9::2/64", "dev", "ovx1", "nodad"])
    ext.network("dual", "10.88.0.0/24", "--ipv6", "--subnet", "fd00:88::/64")
    ext.web("web6", "dual", "-p", "8095:80")
    for host in (WORLD_IP, "[2001:db8:9::1]"):
        url = f"http://{host}:8095/index.html"
        ok, body = world.wait_until(lambda url=url: _ok(ext.outside.get(url)), 15, 0.5)
        assert body.strip() == "hello from web6"
    assert "fd00:88::" in ext.host("ip6tables-save", "-t", "nat")
    # On an IPv4-only network an IPv6 host address is refused, saying what to do.
    ext.network("v4only", "10.89.0.0/24")
    failed = ext.docker(
        "run",
        "-d",
        "--network",
        "v4only",
        "-p",
        "[2001:db8:9::1]:8096:80",
        IMAGE,
        "true",
        check=False,
    )
    assert failed.returncode != 0 and "no IPv6 address" in failed.stderr


def test_flushed_rules_come_back_within_ten_seconds_once(ext_iptables):
    ext = ext_iptables
    ext.network("heal", "10.90.0.0/24")
    ext.web("healed", "heal", "-p", "8097:80")
    url = f"http://{WORLD_IP}:8097/index.html"
    assert world.wait_until(lambda: _ok(ext.outside.get(url)), 15, 0.5)
    before = _ours(ext)
    ext.host("iptables", "-F")
    ext.host("iptables", "-t", "nat", "-F")
    assert "OVSDRIVER-DNAT" not in ext.host("iptables", "-t", "nat", "-S", "PREROUTING")
    flushed = time.monotonic()
    world.wait_until(lambda: _ok(ext.outside.get(url, timeout=1)), 20, 0.2)
    elapsed = time.monotonic() - flushed
    print(f"published port answers again {elapsed:.1f} s after the flush")
    assert elapsed < 10
    world.wait_until(lambda: _ours(ext) == before, 10, 0.5)
    assert "were changed from outside" in ext.driver.log()


def _ours(ext):
    """Every rule line of the driver's (and every jump into its chains)."""
    lines = ext.host("iptables-save").splitlines()
    return sorted(line for line in lines if "OVSDRIVER" in line and not line.startswith("#"))


def test_docker_bridge_networks_and_driver_networks_cannot_reach_each_other(ext_iptables):
    ext = ext_iptables
    ext.network("ours", "10.91.0.0/24")
    ext.docker("network", "create", "-d", "bridge", "--subnet", "10.92.0.0/24", "theirs")
    ext.run("o1", "ours")
    ext.run("t1", "theirs")
    ours, theirs = ext.ip("o1", "ours"), ext.ip("t1", "theirs")
    url = ext.peer_server()
    assert ext.wget("o1", url)[0] and ext.wget("t1", url)[0]  # both do get out
    assert not ext.ping("o1", theirs)
    assert not ext.ping("t1", ours)
    # The user's DOCKER-USER rules decide, as between Docker's own networks.
    ext.host(
        "iptables", "-I", "DOCKER-USER", "-s", "10.91.0.0/24", "-d", "10.92.0.0/24", "-j", "ACCEPT"
    )
    ext.host(
        "iptables", "-I", "DOCKER-USER", "-s", "10.92.0.0/24", "-d", "10.91.0.0/24", "-j", "ACCEPT"
    )
    try:
        assert ext.ping("o1", theirs)
    finally:
        for rule in ("-s 10.91.0.0/24 -d 10.92.0.0/24", "-s 10.92.0.0/24 -d 10.91.0.0/24"):
            ext.host("iptables", "-D", "DOCKER-USER", *rule.split(), "-j", "ACCEPT")


def test_a_published_port_is_reachable_from_every_network_through_the_host(ext_iptables):
    ext = ext_iptables
    ext.network("pa", "10.96.0.0/24")
    ext.network("pb", "10.97.0.0/24")
    ext.docker("network", "create", "-d", "bridge", "--subnet", "10.98.0.0/24", "pd")
    ext.web("wa", "pa", "-p", "8064:80")
    ext.web("wd", "pd", "-p", "8065:80")
    for name, network in (("ca", "pa"), ("cb", "pb"), ("cd", "pd")):
        ext.run(name, network)
    # As with Docker's bridge driver: a published port is the host's, so a
    # container of any network reaches it through the host's address.
    for client in ("ca", "cb", "cd"):
        for port, web in ((8064, "wa"), (8065, "wd")):
            ok, body = ext.wget(client, f"http://{WORLD_IP}:{port}/index.html")
            assert ok and body.strip() == f"hello from {web}", (client, port, body)
    # The networks stay isolated from each other otherwise.
    assert not ext.ping("cb", ext.ip("wa", "pa"))
    assert not ext.wget("cb", f"http://{ext.ip('wa', 'pa')}/index.html")[0]


def test_a_dockerd_restart_leaves_the_rules_whole_and_in_place(ext_iptables):
    ext = ext_iptables
    ext.network("ours2", "10.93.0.0/24")
    ext.docker("network", "create", "-d", "bridge", "--subnet", "10.94.0.0/24", "theirs2")
    ext.web("w2", "ours2", "-p", "8098:80")
    ext.run("t2", "theirs2")
    ext.world.dockerd.restart()
    ext.docker("start", "w2", "t2")
    url = f"http://{WORLD_IP}:8098/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url, timeout=1)), 30, 0.5)
    assert body.strip() == "hello from w2"

    def whole():
        lines = _ours(ext)
        jumps = [line for line in lines if line.startswith("-A ") and "-A OVSDRIVER" not in line]
        forward = ext.host("iptables", "-S", "FORWARD").splitlines()
        user = forward.index("-A FORWARD -j DOCKER-USER")
        return (
            len(lines) == len(set(lines))
            and len(jumps) == 6  # FORWARD, INPUT, PREROUTING, OUTPUT, POSTROUTING, stage 2
            and forward[user + 1] == "-A FORWARD -j OVSDRIVER-FORWARD"
        )

    world.wait_until(whole, 10, 0.5, lambda: "\n".join(_ours(ext)))
    assert not ext.ping("t2", ext.ip("w2", "ours2"))
    assert not ext.ping("w2", ext.ip("t2", "theirs2"))


def test_networks_created_at_once_leave_the_rules_in_place_and_quiet(ext_iptables):
    """The engine deletes and re-inserts its DOCKER-USER jump for each
    network it creates; created at once, they leave copies of that jump
    before ours. Ours still comes after DOCKER-USER, and no change "from
    outside" is warned about or undone (the old check did both)."""
    ext = ext_iptables
    user, ours = "-A FORWARD -j DOCKER-USER", "-A FORWARD -j OVSDRIVER-FORWARD"
    names = [f"many{i}" for i in range(8)]
    subnets = [f"10.97.{i}.0/24" for i in range(len(names))]

    def forward():
        return ext.host("iptables", "-S", "FORWARD").splitlines()[1:]

    copied = False
    try:
        # First the usual order, DOCKER-USER first and ours next (after a
        # dockerd restart the engine's isolation jump leads until it creates
        # a network, and the driver then moves its jump: a change it reports).
        ext.network(names[0], subnets[0])
        world.wait_until(lambda: forward()[:2] == [user, ours], 10, 0.2, lambda: str(forward()))
        time.sleep(3.5)  # the healer looks at most every 3 s: let it be done
        logged = len(ext.driver.log())
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(ext.network, names[1:], subnets[1:]))
        # What the engine leaves when the race comes out that way (most runs):
        ext.host("iptables", "-I", "FORWARD", "-j", "DOCKER-USER")
        copied = True
        time.sleep(2)  # the healer reads the rules on the kernel's announcements
        rules = forward()
        position = rules.index(ours)
        assert position > 1 and set(rules[:position]) == {user}, rules
        assert "changed from outside" not in ext.driver.log()[logged:]
    finally:
        if copied:
            ext.host("iptables", "-D", "FORWARD", "-j", "DOCKER-USER")
        ext.docker("network", "rm", *names, check=False)


def test_containers_outlive_a_live_restore_engine_restart(ext_iptables):
    """With ``live-restore`` (usual in production) an engine restart or
    upgrade leaves containers running, and the engine calls the driver for
    nothing of theirs: their ports, addresses and published ports stay, and
    the engine can still remove them afterwards."""
    ext = ext_iptables
    dockerd = ext.world.dockerd
    dockerd.extra_args.append("--live-restore")
    try:
        dockerd.restart()
        bridge = "obr-" + ext.network("live", "10.95.0.0/24")[:11]
        ext.web("lw", "live", "-p", "8099:80")
        ext.run("lc", "live")
        url = f"http://{WORLD_IP}:8099/index.html"
        world.wait_until(lambda: _ok(ext.outside.get(url, timeout=1)), 15, 0.5)
        pids = ext.pid("lw"), ext.pid("lc")
        ports = set(ext.world.ovs.vsctl("list-ports", bridge).split())
        dockerd.restart()
        assert (ext.pid("lw"), ext.pid("lc")) == pids  # never stopped
        assert ext.ping("lc", ext.ip("lw", "live"))
        ok, body = ext.outside.get(url)
        assert ok and body.strip() == "hello from lw", body
        time.sleep(5)  # two reconciler passes: nothing of the live containers goes
        assert set(ext.world.ovs.vsctl("list-ports", bridge).split()) == ports
        assert ext.ping("lc", ext.ip("lw", "live"))
        ext.docker("rm", "-f", "lw", "lc")
        assert not _ok(ext.outside.get(url, timeout=1))
        assert ":8099" not in ext.nat_rules()
        ext.docker("network", "rm", "live")
    finally:
        dockerd.extra_args.remove("--live-restore")
        ext.world.dockerd.reset()
        dockerd.restart()


@pytest.fixture
def ext_legacy():
    """A world of its own whose engine writes its rules with iptables-legacy,
    as on a host whose ``iptables`` is that kind while the driver's (a
    managed plugin's file system) is iptables-nft."""
    world.require(docker=True)
    with world.DockerWorld(iptables=True, iptables_kind="legacy") as legacy:
        driver = legacy.start_driver()
        outside = Outside(legacy)
        try:
            yield External(legacy, driver, outside)
        finally:
            outside.close()
            legacy.dockerd.reset()


def test_the_rules_go_beside_an_engine_on_iptables_legacy(ext_legacy):
    """The kernel runs a packet through both kinds of rules, and the engine's
    FORWARD policy DROP in x_tables would drop what the driver's rules in
    nftables accept: the driver writes where the engine's chains are."""
    ext = ext_legacy
    ext.network("leg", "10.97.0.0/24")
    ext.web("lw", "leg", "-p", "8100:80")
    url = f"http://{WORLD_IP}:8100/index.html"
    ok, body = world.wait_until(lambda: _ok(ext.outside.get(url, timeout=1)), 15, 0.5)
    assert body.strip() == "hello from lw"
    ok, body = ext.wget("lw", ext.peer_server())
    assert ok and body.strip() == f"peer={WORLD_IP}", body
    assert "-A FORWARD -j OVSDRIVER-FORWARD" in ext.host("iptables-legacy-save")
    assert "OVSDRIVER" not in ext.host("iptables-nft-save")
    status = [sys.executable, "-m", "ovsdriver", "status", "--ovsdb", ext.world.ovs.remote]
    status += ["--docker", ext.world.dockerd.host, "--driver", ext.driver.name]
    done = ext.world.netns.run(status, check=False, cwd=world.REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # it reads iptables-legacy too
    ext.docker("rm", "-f", "lw")
    ext.docker("network", "rm", "leg")
    assert "OVSDRIVER" not in ext.host("iptables-legacy-save")
