"""Benchmark: what ``docker run`` costs on an ovs network next to Docker's bridge driver.

One private dockerd (``tests/world.py``'s DockerWorld, ``--iptables=true`` as a
real user has it, so the bridge driver does its firewall work too, like
ovsdriver always does), one driver, and four networks side by side: none
(``--network none``), Docker's bridge driver (a user-defined ``-d bridge``
network: the world's dockerd runs ``--bridge=none``), ovsdriver with internal
ports and ovsdriver with veth ports. Each round runs, for every network in
turn (the order rotates from round to round), N containers one after another,
then ``docker rm -f`` them one after another, then N containers from 8
concurrent clients and ``docker rm -f`` them from 8 clients. Prints medians
over the rounds and the network cost per container (time minus the
no-network time, divided by N).

    sudo python3 benchmarks/docker_run.py [--containers 20] [--rounds 3]
    sudo python3 benchmarks/docker_run.py --trace   # one traced run per network

``--trace`` starts the driver through ``benchmarks/trace.py`` and prints, for
one ``docker run`` on each network, the driver's timeline (engine calls, OVSDB
transactions, ``cur_cfg``, netlink calls, child processes) and
ovs-vswitchd's log lines; for the bridge driver, the child processes and
netlink requests dockerd makes (``strace``, which slows it: counts only).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.world import BUSYBOX_IMAGE, DockerWorld, Driver  # noqa: E402

NETWORKS = {
    "none": None,
    "docker bridge": ("bench-bridge", "bridge", "10.201.0.0/16"),
    "ovs (internal ports)": ("bench-internal", None, "10.202.0.0/16"),
    "ovs (veth ports)": ("bench-veth", None, "10.203.0.0/16", "ovs.port_type=veth"),
}
CLIENTS = 8


class TracedDriver(Driver):
    """The driver started through ``benchmarks.trace``, writing `trace_file`."""

    trace_file = None

    @property
    def argv(self):
        argv = super().argv
        at = argv.index("-n")
        return [sys.executable, "-m", "benchmarks.trace", str(self.trace_file), *argv[at:]]


def network_args(world, driver, name):
    spec = NETWORKS[name]
    if spec is None:
        return "none"
    net, kind, subnet, *options = spec
    args = ["network", "create", "-d", kind or driver.name, "--subnet", subnet]
    for option in options:
        args += ["-o", option]
    world.dockerd.docker(*args, net)
    return net


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_many(world, network, count, clients):
    """Start `count` containers with `clients` concurrent CLIs: (seconds, ids)."""
    ids = []

    def one(_):
        out = world.dockerd.docker(
            "run", "-d", "--network", network, BUSYBOX_IMAGE, "sleep", "600", timeout=120
        )
        ids.append(out.stdout.strip())

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - start, ids


def remove_many(world, ids, clients):
    def one(cid):
        world.dockerd.docker("rm", "-f", cid, timeout=120)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, ids))
    return time.perf_counter() - start


def bench(world, networks, count, rounds):
    results = {name: {} for name in networks}
    names = list(networks)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            net = networks[name]
            for label, clients in (("seq", 1), ("conc", CLIENTS)):
                took, ids = run_many(world, net, count, clients)
                removed = remove_many(world, ids, clients)
                results[name].setdefault(label, []).append(took)
                results[name].setdefault("rm " + label, []).append(removed)
            print(f"  round {r + 1}: {name} done", flush=True)
    return {name: {k: statistics.median(v) for k, v in m.items()} for name, m in results.items()}


def print_table(medians, count, rounds):
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\n{count} containers per step, median of {rounds} rounds, {CLIENTS} concurrent clients;"
        f" load average at the end {' '.join(load)}"
    )
    none = medians["none"]
    bridge = medians["docker bridge"]
    head = (
        f"| network | {count} x docker run, sequential | {count} at once | "
        f"network cost per container (seq / conc) | vs bridge (seq / conc) | "
        f"{count} x docker rm -f, sequential | at once |"
    )
    print(head)
    print("|---" * 7 + "|")
    for name, m in medians.items():
        cost = [(m[k] - none[k]) / count for k in ("seq", "conc")]
        bcost = [(bridge[k] - none[k]) / count for k in ("seq", "conc")]
        if name == "none":
            costs, ratio = "-", "-"
        else:
            costs = f"{cost[0] * 1000:.0f} ms / {cost[1] * 1000:.0f} ms"
            ratio = " / ".join(f"{c / b:.2f}x" if b > 0 else "n/a" for c, b in zip(cost, bcost))
        print(
            f"| {name} | {m['seq']:.2f} s | {m['conc']:.2f} s | {costs} | {ratio} | "
            f"{m['rm seq']:.2f} s | {m['rm conc']:.2f} s |"
        )


# -- tracing ------------------------------------------------------------------------


def _vswitchd_lines(world, start, end):
    """ovs-vswitchd's log lines (epoch seconds, text) between start and end."""
    found = []
    path = world.directory / "ovs" / "ovs-vswitchd.log"
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition("|")
        try:
            when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            continue
        t = when.replace(tzinfo=timezone.utc).timestamp()
        if start <= t <= end and ("bridge|" in rest or "netdev" in rest):
            found.append((t, "vswitchd " + rest.split("|", 3)[-1][:90]))
    return found


def trace_one(world, driver, trace_file, name, network):
    start = time.time()
    out = world.dockerd.docker("run", "-d", "--network", network, BUSYBOX_IMAGE, "sleep", "600")
    ran = time.time()
    world.dockerd.docker("rm", "-f", out.stdout.strip())
    end = time.time()
    time.sleep(0.5)  # deferred work after rm
    events = []
    for line in Path(trace_file).read_text().splitlines():
        record = json.loads(line)
        if start <= record["t"] <= end + 0.5:
            extra = {k: v for k, v in record.items() if k not in ("t", "what", "ms")}
            text = record["what"] + (f" {record['ms']:.1f} ms" if "ms" in record else "")
            events.append((record["t"], text + (f" {extra}" if extra else "")))
    events += _vswitchd_lines(world, start, end + 0.5)
    events.append((start, "docker run starts"))
    events.append((ran, f"docker run returns ({(ran - start) * 1000:.0f} ms)"))
    events.append((end, f"docker rm -f returns ({(end - ran) * 1000:.0f} ms)"))
    print(f"\n--- one docker run + rm -f on {name} ---")
    for t, text in sorted(events):
        print(f"{(t - start) * 1000:8.1f} ms  {text}")


def trace_bridge(world, network):
    """Child processes and netlink requests of dockerd for one run on the bridge driver."""
    if not shutil.which("strace"):
        print("(strace is not installed: no trace of the bridge driver)")
        return
    log = tempfile.mktemp(prefix="strace-", dir="/tmp")
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-tt",
            "-o",
            log,
            "-e",
            "trace=execve,sendmsg,sendto",
            "-p",
            str(world.dockerd.pid),
        ],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        out = world.dockerd.docker("run", "-d", "--network", network, BUSYBOX_IMAGE, "sleep", "1")
        world.dockerd.docker("rm", "-f", out.stdout.strip())
    finally:
        tracer.terminate()
        tracer.wait(10)
    text = Path(log).read_text()
    os.unlink(log)
    execs = re.findall(r'^\d+ +(\S+) execve\("[^"]+", \[([^\]]*)\]', text, re.M)
    netlink = len(re.findall(r"send(?:msg|to)\(.*AF_NETLINK", text))
    print("\n--- dockerd, one docker run + rm -f on the bridge driver (strace) ---")
    print(f"child processes: {len(execs)}")
    for when, argv in execs:
        print(f"  {when} {argv[:150]}")
    print(f"netlink requests (sendmsg or sendto to AF_NETLINK): {netlink}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="trace one run per network instead")
    args = parser.parse_args()
    with DockerWorld(iptables=True) as world:
        if args.trace:
            trace_file = world.directory / "driver-trace.jsonl"
            TracedDriver.trace_file = trace_file
            driver = TracedDriver(
                world.netns,
                "ovsbench" + os.urandom(3).hex(),
                world.ovs.remote,
                world.directory / "driver",
            )
        else:
            driver = world.start_driver()
        try:
            networks = {name: network_args(world, driver, name) for name in NETWORKS}
            # Warm up every path once (image, first bridge use, firewall chains).
            for net in networks.values():
                _, ids = run_many(world, net, 2, 1)
                remove_many(world, ids, 1)
            if args.trace:
                for name in ("ovs (internal ports)", "ovs (veth ports)"):
                    trace_one(world, driver, trace_file, name, networks[name])
                trace_bridge(world, networks["docker bridge"])
            else:
                medians = bench(world, networks, args.containers, args.rounds)
                print_table(medians, args.containers, args.rounds)
        finally:
            world.dockerd.reset()
            if args.trace:
                driver.close()


if __name__ == "__main__":
    main()
