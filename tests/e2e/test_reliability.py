"""End to end: the driver under stress and after crashes. Parallel container
starts, a driver killed with SIGKILL (also in the middle of a churn), an
ovs-vswitchd restart and an engine crash; afterwards no orphan port is left
and running containers talk. Times that matter are measured and printed
(``pytest -s`` shows them)."""

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import world

IMAGE = world.BUSYBOX_IMAGE
#: The issue's bound for orphan collection and repair, in seconds.
BOUND = 30.0


class Reliability:
    """Shortcuts over the module's docker world with a fresh driver in it."""

    def __init__(self, docker_world, driver):
        self.world = docker_world
        self.driver = driver

    def docker(self, *args, check=True, timeout=90):
        return self.world.dockerd.docker(*args, check=check, timeout=timeout)

    def network(self, name, subnet):
        self.docker("network", "create", "-d", self.driver.name, "--subnet", subnet, name)
        return self.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()

    def run(self, name, network, check=True, timeout=90):
        args = ["run", "-d", "--name", name, "--network", network, IMAGE, "sleep", "600"]
        return self.docker(*args, check=check, timeout=timeout)

    def inspect(self, *containers):
        if not containers:
            return []
        return json.loads(self.docker("inspect", *containers).stdout)

    def running(self):
        return self.docker("ps", "-q", "--no-trunc").stdout.split()

    def address(self, container, network):
        return self.inspect(container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]

    def ping(self, container, address, wait=1):
        result = self.docker(
            "exec", container, "ping", "-c", "1", "-W", str(wait), address, check=False
        )
        return result.returncode == 0

    def endpoint_ports(self):
        """Ports of Docker endpoints in OVS: port name -> endpoint id."""
        out = self.world.ovs.vsctl(
            "--no-wait", "--format=json", "--columns=name,external_ids", "list", "Port"
        )
        found = {}
        for name, (_, pairs) in json.loads(out)["data"]:
            ids = dict(pairs)
            if "docker-endpoint-id" in ids:
                found[name] = ids["docker-endpoint-id"]
        return found

    def running_endpoints(self):
        """Endpoint ids of the running containers."""
        return {
            net["EndpointID"]
            for info in self.inspect(*self.running())
            for net in info["NetworkSettings"]["Networks"].values()
            if net.get("EndpointID")
        }

    def orphans(self):
        """Endpoint ports in OVS that no running container owns."""
        live = self.running_endpoints()
        return {port for port, ep in self.endpoint_ports().items() if ep not in live}

    def wait_for(self, predicate, timeout, what):
        """Wait (bounded) for *predicate*; return the seconds it took."""
        started = time.monotonic()
        world.wait_until(predicate, timeout, 0.25, lambda: f"{what}\n{self.driver_log()}")
        return time.monotonic() - started

    def driver_log(self, lines=40):
        return world.tail(self.driver.logfile, lines)


@pytest.fixture
def rel(docker_world, driver):
    return Reliability(docker_world, driver)


def _parallel(function, items, workers):
    """Call *function* on every item on *workers* threads; return the results
    (an exception counts as the result)."""

    def safely(item):
        try:
            return function(item)
        except Exception as e:  # reported by the caller
            return e

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(safely, items))


def test_parallel_starts_all_succeed_with_distinct_ports(rel):
    net_id = rel.network("par", "10.71.0.0/24")
    names = [f"par{i}" for i in range(24)]
    started = time.monotonic()
    results = _parallel(lambda n: rel.run(n, "par", timeout=180), names, workers=24)
    took = time.monotonic() - started
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[0]
    print(f"\n24 parallel docker run: {took:.1f} s")
    bridge = "obr-" + net_id[:11]
    ports = rel.world.ovs.vsctl("list-ports", bridge).split()
    endpoints = {
        info["NetworkSettings"]["Networks"]["par"]["EndpointID"] for info in rel.inspect(*names)
    }
    assert len(endpoints) == 24
    assert {"oep-" + ep[:11] for ep in endpoints} <= set(ports)
    assert len([p for p in ports if p.startswith("oep-")]) == 24
    pings = _parallel(lambda n: rel.ping(n, "10.71.0.1", wait=2), names, workers=6)
    assert all(pings), [n for n, ok in zip(names, pings) if not ok]


def test_a_container_removed_while_the_driver_is_down_leaves_no_port(rel):
    rel.network("down", "10.72.0.0/24")
    veth = ["-o", "ovs.port_type=veth", "--subnet", "10.74.0.0/24"]
    rel.docker("network", "create", "-d", rel.driver.name, *veth, "downv")
    for name, network in (("d1", "down"), ("d2", "down"), ("d3", "down"), ("v1", "downv")):
        rel.run(name, network)
    d3 = rel.inspect("d3")[0]["NetworkSettings"]["Networks"]["down"]["EndpointID"]
    v1 = rel.inspect("v1")[0]["NetworkSettings"]["Networks"]["downv"]["EndpointID"]
    orphans = {"oep-" + d3[:11], "ove-" + v1[:11]}
    # Killed at once: the driver may not have seen the sandboxes mounted yet.
    rel.driver.kill(signal.SIGKILL)
    # The engine's Leave and DeleteEndpoint fail (after its retries): logged only.
    rel.docker("rm", "-f", "d3", "v1", timeout=120)
    assert orphans <= set(rel.endpoint_ports())
    rel.driver.start()
    took = rel.wait_for(
        lambda: not orphans & set(rel.endpoint_ports()), BOUND, "the orphan ports stayed"
    )
    print(f"\norphan collected {took:.1f} s after the driver restarted")
    assert rel.ping("d1", rel.address("d2", "down"))
    assert rel.ping("d2", "10.72.0.1")


def test_killing_the_driver_during_a_churn_leaves_no_orphan(rel):
    rel.network("churn", "10.73.0.0/24")
    rel.run("anchor", "churn")
    failures = []
    stop = threading.Event()
    lock = threading.Lock()

    def churn(worker):
        mine = []
        for i in range(12):
            if stop.is_set():
                break
            name = f"ch{worker}-{i}"
            for args in (("run", name), ("rm", mine.pop(0)) if len(mine) > 1 else None):
                if args is None:
                    continue
                try:
                    if args[0] == "run":
                        rel.run(args[1], "churn", timeout=120)
                        mine.append(args[1])
                    else:
                        rel.docker("rm", "-f", args[1], timeout=120)
                except Exception as e:  # counted: only calls in flight may fail
                    with lock:
                        failures.append(f"{args}: {str(e).splitlines()[-1]}")

    threads = [threading.Thread(target=churn, args=(w,), daemon=True) for w in range(3)]
    for thread in threads:
        thread.start()
    kills = 0
    try:
        for pause in (3, 4):
            time.sleep(pause)
            rel.driver.kill(signal.SIGKILL)
            kills += 1
            time.sleep(1)
            rel.driver.start()
    finally:
        for thread in threads:
            thread.join(600)
        stop.set()
    assert not any(t.is_alive() for t in threads), "the churn did not end"
    print(f"\nchurn with {kills} kills: {len(failures)} failed docker commands: {failures}")
    # Only the calls in flight at a kill may fail (the engine retries the rest).
    assert len(failures) <= kills * len(threads), failures
    took = rel.wait_for(lambda: not rel.orphans(), 2 * BOUND, "orphan ports remain")
    print(f"no orphan port {took:.1f} s after the churn ended")
    running = rel.running()
    assert len(rel.endpoint_ports()) == len(running)
    anchor = rel.address("anchor", "churn")
    others = [c for c in rel.inspect(*running) if c["Name"] != "/anchor"]
    assert others, "no container survived the churn"
    for info in others[:4]:
        assert rel.ping(info["Id"], anchor, wait=2), info["Name"]


def test_containers_talk_again_soon_after_an_ovs_vswitchd_restart(rel):
    rel.network("vsd", "10.74.0.0/24")
    rel.run("v1", "vsd")
    rel.run("v2", "vsd")
    v2 = rel.address("v2", "vsd")
    assert rel.ping("v1", v2)
    rel.world.ovs.restart_vswitchd()
    restarted = time.monotonic()
    rel.wait_for(lambda: rel.ping("v1", v2), BOUND, "v1 cannot reach v2 after the restart")
    took = time.monotonic() - restarted
    print(f"\ncontainers talk again {took:.1f} s after ovs-vswitchd restarted")
    assert rel.ping("v2", rel.address("v1", "vsd"))
    assert rel.ping("v2", "10.74.0.1")
    routes = rel.docker("exec", "v1", "ip", "route").stdout
    assert "default via 10.74.0.1 dev eth0" in routes, routes
    links = rel.docker("exec", "v1", "ip", "-o", "link").stdout
    assert links.count("eth0") == 1 and "oep-" not in links, links
    assert not rel.orphans()


def test_networks_work_again_after_a_reboot(rel):
    """At a reboot every daemon stops and the kernel forgets the bridges, with
    their gateway addresses. Here the driver comes back before Open vSwitch,
    which makes the bridges anew a moment later."""
    rel.network("boot", "10.77.0.0/24")
    args = ("--restart", "always", "--network", "boot", IMAGE, "sleep", "600")
    for name in ("b1", "b2"):
        rel.docker("run", "-d", "--name", name, *args)
    w = rel.world
    w.dockerd.stop()
    rel.driver.stop()
    w.ovs.stop_vswitchd()
    w.ovs.stop_ovsdb()
    try:
        for link in w.netns.links():
            if link.startswith("obr-"):
                w.netns.run(["ip", "link", "del", link])
        rel.driver.start()
    finally:  # the world's other tests need them back
        w.ovs.start_ovsdb()
        w.ovs.start_vswitchd()
        booted = time.monotonic()
        w.dockerd.start(timeout=120)  # b1 and b2 start again
    rel.wait_for(lambda: rel.ping("b1", "10.77.0.1"), BOUND, "b1 cannot reach its gateway")
    print(f"\ncontainers reach their gateway {time.monotonic() - booted:.1f} s after the reboot")
    b2 = rel.address("b2", "boot")
    assert rel.ping("b1", b2)
    w.netns.run(["ping", "-c", "1", "-W", "2", b2])  # and the host reaches them
    assert not rel.orphans()


def _containerd_pid(dockerd):
    return world.read_pidfile(dockerd.exec_root / "containerd" / "containerd.pid")


def _crash_dockerd(dockerd):
    """SIGKILL dockerd, as a crash would; its containerd dies with it."""
    containerd = _containerd_pid(dockerd)
    dockerd.stop(sig=signal.SIGKILL)
    if containerd is not None:
        # A restarted dockerd takes a containerd it finds in the pidfile for
        # alive, even a dying or zombie one, and then times out: wait it out.
        with contextlib.suppress(TimeoutError):
            world.wait_until(lambda: not os.path.exists(f"/proc/{containerd}"), 15, 0.1)
        if not world.pid_alive(containerd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dockerd.exec_root / "containerd" / "containerd.pid")


def test_endpoints_of_an_engine_that_crashed_are_collected(rel):
    rel.network("crash", "10.75.0.0/24")
    rel.run("e1", "crash")
    rel.run("e2", "crash")
    before = set(rel.endpoint_ports())
    assert len(before) == 2
    dockerd = rel.world.dockerd
    try:
        _crash_dockerd(dockerd)
    finally:
        dockerd.start(timeout=120)
    # Without live-restore the engine stops the containers it finds at start
    # and drops their endpoints without calling the driver.
    took = rel.wait_for(
        lambda: not set(rel.endpoint_ports()) & before, BOUND, "stale endpoints remain"
    )
    print(f"\nstale endpoints collected {took:.1f} s after the engine restarted")
    rel.docker("start", "e1", "e2", timeout=120)
    assert rel.ping("e1", rel.address("e2", "crash"))
    assert not rel.orphans()


def test_a_container_restarted_by_a_crashed_engine_gets_its_host_port_again(rel):
    """The restarted engine starts the container again at once, before the
    reconciler has collected its old endpoint, which holds the host port."""
    rel.network("again", "10.78.0.0/24")
    args = ("--restart", "always", "--network", "again", "-p", "8090:80", IMAGE, "sleep", "600")
    rel.docker("run", "-d", "--name", "h1", *args)
    old = rel.running_endpoints()
    dockerd = rel.world.dockerd
    try:
        _crash_dockerd(dockerd)
    finally:
        dockerd.start(timeout=120)
    rel.wait_for(lambda: rel.running_endpoints() - old, BOUND, "h1 did not start again")
    (new,) = rel.running_endpoints()
    portmap = rel.world.ovs.vsctl(
        "get", "Interface", "oep-" + new[:11], "external_ids:ovsdriver-portmap"
    )
    assert [p["host_port"] for p in json.loads(json.loads(portmap))] == [8090]
    assert not rel.orphans()


def test_a_driver_with_a_private_copy_of_the_engines_mounts_keeps_live_containers(rel):
    """As in a container with a plain ``-v`` of the netns directory: sandboxes
    mounted before the driver started look mounted to it, later ones look like
    plain files. Live containers keep their ports; real orphans still go."""
    rel.network("priv", "10.76.0.0/24")
    rel.run("p0", "priv")  # mounted before the driver's copy of the mounts is made
    rel.driver.stop()
    rel.driver.wrapper = ["unshare", "--mount", "--propagation", "private"]
    rel.driver.start()
    rel.run("p1", "priv")  # a plain file in the driver's copy
    p1 = rel.inspect("p1")[0]["NetworkSettings"]["Networks"]["priv"]["EndpointID"]
    started = time.monotonic()
    while time.monotonic() - started < 12:  # six reconciler passes
        assert "oep-" + p1[:11] in rel.endpoint_ports(), rel.driver_log()
        time.sleep(1)
    assert rel.ping("p0", rel.address("p1", "priv"))
    rel.driver.kill(signal.SIGKILL)
    rel.docker("rm", "-f", "p1", timeout=120)  # Leave and DeleteEndpoint fail
    rel.driver.start()
    took = rel.wait_for(
        lambda: "oep-" + p1[:11] not in rel.endpoint_ports(), BOUND, "the orphan port stayed"
    )
    print(f"\norphan of a private-view driver collected {took:.1f} s after its restart")
    assert not rel.orphans()
    assert rel.ping("p0", "10.76.0.1")


def test_a_running_container_whose_record_of_its_sandbox_is_lost_keeps_its_port(rel):
    """Join answers before its record of the sandbox is committed, so a driver
    killed right then loses it (here it is removed while the driver is down).
    The container's port stays, and the record comes back from the
    container's interface, found by its MAC and address."""
    rel.network("lost", "10.95.0.0/24")
    rel.run("l1", "lost")
    rel.run("l2", "lost")  # a recorded sandbox: where the engine keeps them
    l1 = rel.inspect("l1")[0]["NetworkSettings"]
    port = "oep-" + l1["Networks"]["lost"]["EndpointID"][:11]
    rel.driver.kill(signal.SIGKILL)
    for key in ("ovsdriver-sandbox", "ovsdriver-sandbox-seen"):
        rel.world.ovs.vsctl("remove", "Interface", port, "external_ids", key)
    rel.driver.start()

    def recorded():
        key = "external_ids:ovsdriver-sandbox"
        return rel.world.ovs.vsctl("--if-exists", "get", "Interface", port, key).strip('"')

    took = rel.wait_for(lambda: recorded() == l1["SandboxKey"], BOUND, "no sandbox recorded")
    print(f"\nthe sandbox recorded again {took:.1f} s after the driver restarted")
    assert port in rel.endpoint_ports()
    assert rel.ping("l1", rel.address("l2", "lost"))
