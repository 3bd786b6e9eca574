"""Benchmark: endpoint lifecycles at the API, against a raw-OVSDB floor and ovs-vsctl.

Runs the real driver (``twistd ovsdriver``) against a private ovsdb-server and
userspace ovs-vswitchd in a network namespace of its own (the test worlds of
``tests/world.py``), talks to it over its UNIX socket exactly like the engine,
and reports, first on an empty bridge, then with 1000 endpoints already on it
(created concurrently, which also shows how well concurrent requests share
OVSDB transactions), the median and 90th percentile of:

- a CreateEndpoint + Join + Leave + DeleteEndpoint cycle;
- the attach latency right after a deletion: Leave + DeleteEndpoint of the
  previous endpoint, then at once a CreateEndpoint and a Join, then a pause
  standing for the rest of a container's start (``--pause``). Timed: the
  CreateEndpoint alone (it answers before the port is made) and CreateEndpoint
  + Join (Join answers once ovs-vswitchd has made the port: the attach);
  the same 55 ms after the deletion, as the driver has the previous port
  deleted (after 50 ms without requests), and alone (a pause in between);
- the floor, measured in the same run: one raw OVSDB transaction adding an
  internal port and waiting for ovs-vswitchd to apply it (python-ovs, what
  the driver itself sends);

and, with 1000 endpoints, the lifecycles per second of 8 concurrent clients,
through the driver (with the CPU each daemon spent per lifecycle, the
scheduler's count: it moves by up to a tenth between runs, wall times by
tens of percent) and through one ``ovs-vsctl`` call per step.

    sudo python3 benchmarks/endpoint_cycle.py [--cycles 100] [--fill 1000]
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import ovs.db.idl
import ovs.poller

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.docker_run import cpu_seconds  # noqa: E402
from ovsdriver.ovsdb import OVSDB  # noqa: E402
from tests.world import OVSWorld, plugin_post, read_pidfile, wait_until  # noqa: E402

NETWORK = "be" * 32
BURST = 8  # clients attaching at once in the bursts


def call(socket, method, body):
    status, reply = plugin_post(socket, method, body, timeout=60)
    if status != 200 or not isinstance(reply, dict) or reply.get("Err"):
        raise RuntimeError(f"{method} failed: {status} {reply}")
    return reply


def endpoint_id(prefix, n):
    """A distinct Docker-like id (random-looking from its first digits on)."""
    return hashlib.sha256(f"{prefix}{n}".encode()).hexdigest()


def ids_of(eid):
    return {"NetworkID": NETWORK, "EndpointID": eid}


def create_endpoint(socket, eid, address):
    body = {"NetworkID": NETWORK, "EndpointID": eid, "Interface": {"Address": address}}
    call(socket, "NetworkDriver.CreateEndpoint", body)


def cycle(socket, eid):
    """One container's life at the API; returns its duration in seconds."""
    ids = ids_of(eid)
    start = time.perf_counter()
    create_endpoint(socket, eid, "10.99.255.254/16")
    call(socket, "NetworkDriver.Join", dict(ids, SandboxKey="/var/run/docker/netns/bench"))
    call(socket, "NetworkDriver.Leave", ids)
    call(socket, "NetworkDriver.DeleteEndpoint", ids)
    return time.perf_counter() - start


def p50_p90(times):
    times = sorted(times)
    return statistics.median(times), times[max(int(len(times) * 0.9) - 1, 0)]


def measure(socket, cycles, prefix):
    return p50_p90([cycle(socket, endpoint_id(prefix, n)) for n in range(cycles)])


def attach_after_delete(socket, cycles, prefix, pause, gap=0.0):
    """CreateEndpoint, and CreateEndpoint + Join, `gap` seconds after the
    previous endpoint's Leave + DeleteEndpoint."""
    times, attach = [], []
    previous = None
    for n in range(cycles + 1):
        eid = endpoint_id(prefix, n)
        if previous is not None:
            ids = ids_of(previous)
            call(socket, "NetworkDriver.Leave", ids)
            call(socket, "NetworkDriver.DeleteEndpoint", ids)
            time.sleep(gap)
        start = time.perf_counter()
        create_endpoint(socket, eid, "10.99.255.253/16")
        created = time.perf_counter()
        ids = ids_of(eid)
        call(socket, "NetworkDriver.Join", dict(ids, SandboxKey="/var/run/docker/netns/bench"))
        if previous is not None:
            times.append(created - start)
            attach.append(time.perf_counter() - start)
        previous = eid
        time.sleep(pause)
    ids = ids_of(previous)
    call(socket, "NetworkDriver.Leave", ids)
    call(socket, "NetworkDriver.DeleteEndpoint", ids)
    return p50_p90(times), p50_p90(attach)


def burst_after_burst(socket, rounds, prefix, gap):
    """8 clients each attach (CreateEndpoint + Join) `gap` seconds after the
    8 endpoints before them were left and deleted: one attach's p50 / p90."""
    times, previous = [], []

    def attach(n):
        eid = endpoint_id(prefix, n)
        start = time.perf_counter()
        create_endpoint(socket, eid, f"10.99.250.{n % BURST + 10}/16")
        call(socket, "NetworkDriver.Join", dict(ids_of(eid), SandboxKey=INVISIBLE_SANDBOX))
        return eid, time.perf_counter() - start

    def detach(eid):
        call(socket, "NetworkDriver.Leave", ids_of(eid))
        call(socket, "NetworkDriver.DeleteEndpoint", ids_of(eid))

    with ThreadPoolExecutor(BURST) as pool:
        for r in range(rounds + 1):
            list(pool.map(detach, previous))
            time.sleep(gap)
            attached = list(pool.map(attach, range(r * BURST, (r + 1) * BURST)))
            previous = [eid for eid, _ in attached]
            if r:
                times += [took for _, took in attached]
        list(pool.map(detach, previous))
    return p50_p90(times)


class RawOVSDB:
    """A blocking python-ovs client: the floor of adding a port."""

    def __init__(self, remote):
        helper = ovs.db.idl.SchemaHelper(location="/usr/share/openvswitch/vswitch.ovsschema")
        helper.register_all()
        self.idl = ovs.db.idl.Idl(remote, helper)
        self._wait(lambda: self.idl.has_ever_connected() and self.root() is not None)

    def root(self):
        return next(iter(self.idl.tables["Open_vSwitch"].rows.values()), None)

    def _wait(self, done, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            self.idl.run()
            if done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the raw OVSDB client timed out")
            poller = ovs.poller.Poller()
            self.idl.wait(poller)
            poller.timer_wait(100)
            poller.block()

    def _transact(self, change):
        """Commit `change(txn)` with next_cfg bumped; wait for ovs-vswitchd."""
        txn = ovs.db.idl.Transaction(self.idl)
        change(txn)
        self.root().increment("next_cfg")
        status = txn.commit_block()
        if status != txn.SUCCESS:
            raise RuntimeError(f"raw transaction failed: {status} {txn.get_error()}")
        cfg = txn.get_increment_new_value()
        self._wait(lambda: self.root().cur_cfg >= cfg)

    def add_port(self, bridge, name):
        def change(txn):
            iface = txn.insert(self.idl.tables["Interface"])
            iface.name, iface.type = name, "internal"
            port = txn.insert(self.idl.tables["Port"])
            port.name, port.interfaces = name, [iface.uuid]
            self._bridge(bridge).addvalue("ports", port.uuid)

        self._transact(change)

    def delete_port(self, bridge, name):
        def change(txn):
            port = next(p for p in self.idl.tables["Port"].rows.values() if p.name == name)
            self._bridge(bridge).delvalue("ports", port.uuid)
            for iface in port.interfaces:
                iface.delete()
            port.delete()

        self._transact(change)

    def _bridge(self, name):
        return next(b for b in self.idl.tables["Bridge"].rows.values() if b.name == name)

    def close(self):
        self.idl.close()


def floor(raw, bridge, cycles, pause):
    """One raw transaction adding a port, waiting for ovs-vswitchd (then removed)."""
    times = []
    for n in range(cycles):
        name = f"rawp{n % 10}"
        start = time.perf_counter()
        raw.add_port(bridge, name)
        times.append(time.perf_counter() - start)
        raw.delete_port(bridge, name)
        time.sleep(pause)
    return p50_p90(times)


def lifecycles_per_second(count, clients, lifecycle):
    """`count` lifecycles from `clients` concurrent clients, per second."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lifecycle, range(count)))
    return count / (time.perf_counter() - start)


def vsctl_lifecycle(world, bridge, n):
    """One endpoint's life the way a driver calling ovs-vsctl per step does it."""
    port = f"vsc{n}"
    vsctl = world.ovs.vsctl
    vsctl("add-port", bridge, port, "--", "set", "Interface", port, "type=internal",
          f"external_ids:docker-endpoint-id={endpoint_id('v', n)}")  # fmt: skip
    vsctl("set", "Interface", port, "external_ids:ovsdriver-sandbox=/var/run/docker/netns/x")
    vsctl("remove", "Interface", port, "external_ids", "ovsdriver-sandbox")
    vsctl("del-port", bridge, port)


def settle(world):
    """Wait until no endpoint port is still being removed in the background."""
    wait_until(
        lambda: (
            "ovsdriver-removing"
            not in world.ovs.vsctl("--no-wait", "--columns=external_ids", "list", "Port")
        ),
        timeout=60,
    )


#: The sandbox the filling endpoints join: its directory does not exist, so the
#: reconciler can judge nothing and leaves them alone (an endpoint never joined
#: would be collected as an orphan 20 s after its creation, in the middle of a
#: measurement).
INVISIBLE_SANDBOX = "/nonexistent-ovsdriver-benchmark/sandbox"


def fill(socket, count, workers, prefix="f111", first=0):
    """Create `count` endpoints with `workers` concurrent clients (each then
    joined); seconds taken."""

    def one(n):
        n += first
        address = f"10.99.{n // 250}.{n % 250 + 2}/16"
        eid = endpoint_id(prefix, n)
        create_endpoint(socket, eid, address)
        ids = {"NetworkID": NETWORK, "EndpointID": eid, "SandboxKey": INVISIBLE_SANDBOX}
        call(socket, "NetworkDriver.Join", ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - start


def phase(driver, raw, bridge, args, prefix):
    """The latencies on the bridge as it is now."""
    cycle_p = measure(driver.socket, args.cycles, prefix + "c")
    attach_p = attach_after_delete(driver.socket, args.cycles, prefix + "a", args.pause)
    # The driver deletes a port once no request came for `background_quiet`.
    gap = OVSDB.background_quiet + 0.005
    during_p = attach_after_delete(driver.socket, args.cycles, prefix + "d", args.pause, gap)
    alone_p = attach_after_delete(driver.socket, args.cycles, prefix + "s", args.pause, args.pause)
    floor_p = floor(raw, bridge, args.cycles, args.pause)
    bursts = [burst_after_burst(driver.socket, 10, prefix + "b" + str(g), g) for g in (gap, 0.5)]
    return cycle_p, attach_p, during_p, alone_p, floor_p, bursts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--fill", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="concurrent clients for the fill")
    parser.add_argument("--clients", type=int, default=8, help="clients for the throughput")
    parser.add_argument("--lifecycles", type=int, default=80, help="for the throughput")
    parser.add_argument(
        "--pause", type=float, default=0.1, help="seconds after each attach (a container start)"
    )
    args = parser.parse_args()
    bridge = "obr-" + NETWORK[:11]
    with OVSWorld() as world:
        driver = world.start_driver()
        call(
            driver.socket,
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": NETWORK,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"Pool": "10.99.0.0/16", "Gateway": "10.99.0.1/16"}],
            },
        )
        raw = RawOVSDB(world.ovs.remote)
        try:
            rows = [(0, *phase(driver, raw, bridge, args, "e"))]
            settle(world)
            took = fill(driver.socket, args.fill, args.workers)
            print(
                f"filled {args.fill} endpoints with {args.workers} concurrent clients in "
                f"{took:.1f} s ({args.fill / took:.0f} endpoints/s)"
            )
            rows.append((args.fill, *phase(driver, raw, bridge, args, "f")))
            settle(world)

            def through_driver(n):
                cycle(driver.socket, endpoint_id("t", n))

            daemons = {
                "ovsdriver": driver.pid,
                "ovsdb-server": read_pidfile(world.ovs.ovsdb_pidfile),
                "ovs-vswitchd": read_pidfile(world.ovs.vswitchd_pidfile),
            }
            before = {name: cpu_seconds(pid) for name, pid in daemons.items()}
            ours = lifecycles_per_second(args.lifecycles, args.clients, through_driver)
            settle(world)  # the ports' deletions count too
            cpu = {
                name: (cpu_seconds(pid) - before[name]) * 1000 / args.lifecycles
                for name, pid in daemons.items()
            }
            theirs = lifecycles_per_second(
                args.lifecycles, args.clients, lambda n: vsctl_lifecycle(world, bridge, n)
            )
        finally:
            raw.close()
        load = " ".join(open("/proc/loadavg").read().split()[:3])  # noqa: SIM115
        print(f"\n{args.cycles} of each, pause {args.pause:g} s after an attach; load {load}")
        print(
            "| endpoints on the bridge | cycle p50 / p90 | right after a deletion: "
            "CreateEndpoint, attach (CreateEndpoint + Join) p50 / p90 | as OVS deletes the "
            "previous port: CreateEndpoint, attach p50 / p90 | alone: CreateEndpoint, "
            "attach p50 / p90 | floor: raw OVSDB add-port p50 / p90 | attach after a deletion "
            "- floor (p50) |"
        )
        print("|---|---|---|---|---|---|---|")

        def ms(pair):
            return f"{pair[0] * 1000:.1f} / {pair[1] * 1000:.1f} ms"

        for existing, cycle_p, (create_p, attach_p), during, alone, floor_p, _ in rows:
            print(
                f"| {existing} | {ms(cycle_p)} | {ms(create_p)}, {ms(attach_p)} | "
                f"{ms(during[0])}, {ms(during[1])} | {ms(alone[0])}, {ms(alone[1])} | {ms(floor_p)}"
                f" | {(attach_p[0] - floor_p[0]) * 1000:+.1f} ms |"
            )
        print(f"\n{BURST} clients each attaching (CreateEndpoint + Join), one attach p50 / p90:")
        for existing, *_, (during, alone) in rows:
            print(
                f"  {existing} endpoints: as the {BURST} endpoints before are deleted "
                f"{ms(during)}; alone {ms(alone)}"
            )
        print(
            f"\n{args.clients} clients, {args.lifecycles} lifecycles (create, join, leave, delete)"
            f" on {args.fill}+ endpoints: driver {ours:.1f}/s, ovs-vsctl per call {theirs:.1f}/s"
            f" ({ours / theirs:.1f}x)"
        )
        print(
            "  CPU per lifecycle through the driver, its port's deletion included: "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu.items())
        )
        # Batching: the same 50 CreateEndpoints (+ Join) one at a time, then concurrently.
        one_by_one = fill(driver.socket, 50, 1, "b1", first=args.fill)
        together = fill(driver.socket, 50, args.workers, "b2", first=args.fill + 50)
        print(f"\n50 CreateEndpoint + Join on {args.fill}+ endpoints, in one run:")
        print(f"  one at a time: {one_by_one:.2f} s; {args.workers} concurrent: {together:.2f} s")


if __name__ == "__main__":
    main()
