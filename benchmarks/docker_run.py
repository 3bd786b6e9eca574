"""Benchmark: what ``docker run`` costs on an ovs network next to Docker's bridge driver.

One private dockerd (``tests/world.py``'s DockerWorld, ``--iptables=true`` as a
real user has it, so the bridge driver does its firewall work too, like
ovsdriver always does), one driver, and five networks side by side: none
(``--network none``), Docker's bridge driver (a user-defined ``-d bridge``
network: the world's dockerd runs ``--bridge=none``), ovsdriver with internal
ports, ovsdriver with veth ports, and a remote driver that does nothing
(``benchmarks/null_driver.py``: what the engine itself spends on any remote
driver's calls).

Sequential: N times, one ``docker run -d`` on each network in turn (the order
rotates), each timed alone, then ``docker rm -f`` of those, each timed.
Concurrent: R times, for each network in turn, 8 containers started by 8
concurrent clients (the batch timed), then removed by 8 clients. Interleaving
the networks container by container keeps the machine's drift out of the
comparison; the table gives medians per container and the network cost (the
median minus the no-network median), with the ratio to the bridge driver and
its bootstrap 90% interval; a second table gives each network minus the
bridge round by round (the two ran side by side), the median of those
differences and its bootstrap interval.

Run it with the Python libraries the driver is deployed with (the .deb and
``scripts/run-driver`` use Debian's; ``scripts/run-tests-debian`` makes
``.venv-debian`` with them): PyPI's python-ovs parses JSON in pure Python.

    sudo .venv-debian/bin/python benchmarks/docker_run.py [--containers 40] [--rounds 20]
    sudo .venv-debian/bin/python benchmarks/docker_run.py --trace   # one traced run per network

``--api ROUNDS`` adds, after those, ROUNDS rounds of a container's create,
start and removal through the engine's API on one connection (the networks
interleaved the same way): the start and remove calls timed without the
docker CLI, whose own time and spread per command widen the intervals.
``--cpu ROUNDS`` adds ROUNDS more such rounds, each call followed by 0.3 s
without calls, and prints the CPU each daemon (ovsdriver, ovsdb-server,
ovs-vswitchd, dockerd) spent per start and per removal on each network,
those 0.3 s included: what a container costs the machine, not only the
caller; and how many times ovs-vswitchd reconfigured all its bridges
meanwhile (its ``bridge_reconfigure`` count), which varies far less than
CPU time does.

``--trace`` starts the driver through ``benchmarks/trace.py`` and dockerd with
``--debug`` and prints, for one ``docker run`` on each network, the driver's
timeline (engine calls, OVSDB transactions, ``cur_cfg``, netlink calls, child
processes) and ovs-vswitchd's log lines; for the bridge driver, the child
processes and netlink requests dockerd makes (``strace``, which slows it:
counts only); then, over N containers per network, the phases of a
container's start in dockerd's debug log, with the driver's handlers in them.
"""

import argparse
import contextlib
import json
import os
import random
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

import ovs.json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.world import (  # noqa: E402
    BUSYBOX_IMAGE,
    PLUGIN_DIR,
    DockerWorld,
    Driver,
    UnixHTTPConnection,
    engine_call,
    read_pidfile,
    stop_process,
    wait_until,
)

NULL = "null"  # in NETWORKS: the do-nothing remote driver

NETWORKS = {
    "none": None,
    "docker bridge": ("bench-bridge", "bridge", "10.201.0.0/16"),
    "ovs (internal ports)": ("bench-internal", None, "10.202.0.0/16"),
    "ovs (veth ports)": ("bench-veth", None, "10.203.0.0/16", "ovs.port_type=veth"),
    # The floor of any remote driver: benchmarks/null_driver.py answers at once.
    "remote driver doing nothing": ("bench-null", NULL, "10.204.0.0/16"),
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


@contextlib.contextmanager
def null_driver(world, trace_file=None):
    """`benchmarks/null_driver.py` inside the world's namespace (tracing its
    calls into `trace_file`): its name."""
    name = "nullbench" + os.urandom(3).hex()
    path = f"{PLUGIN_DIR}/{name}.sock"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-m", "benchmarks.null_driver", path]
    process = world.netns.popen(argv + ([str(trace_file)] if trace_file else []), cwd=here)
    try:
        wait_until(lambda: os.path.exists(path), timeout=30, message=f"{path} never appeared")
        yield name
    finally:
        stop_process(process.pid, popen=process)
        if os.path.exists(path):
            os.unlink(path)


def network_args(world, driver, name, null_name=None):
    spec = NETWORKS[name]
    if spec is None:
        return "none"
    net, kind, subnet, *options = spec
    kind = null_name if kind == NULL else kind or driver.name
    args = ["network", "create", "-d", kind, "--subnet", subnet]
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


def rotated(names, i):
    return names[i % len(names) :] + names[: i % len(names)]


def bench(world, networks, count, rounds):
    """Per network, seconds per container: "run" and "rm" (one at a time),
    "batch" and "batch rm" (8 clients at once, the batch's time / 8)."""
    names = list(networks)
    samples = {name: {"run": [], "rm": [], "batch": [], "batch rm": []} for name in names}
    for i in range(count):
        started = {}
        for name in rotated(names, i):
            took, started[name] = run_many(world, networks[name], 1, 1)
            samples[name]["run"].append(took)
        for name in rotated(names, i):
            samples[name]["rm"].append(remove_many(world, started[name], 1))
    print(f"  {count} sequential runs per network done", flush=True)
    for r in range(rounds):
        for name in rotated(names, r):
            took, ids = run_many(world, networks[name], CLIENTS, CLIENTS)
            samples[name]["batch"].append(took / CLIENTS)
            samples[name]["batch rm"].append(remove_many(world, ids, CLIENTS) / CLIENTS)
    print(f"  {rounds} concurrent batches per network done", flush=True)
    return samples


class Engine:
    """The engine's API over its socket, one connection: a container's create,
    start and removal timed without the docker CLI's own ~0.1 s per command."""

    def __init__(self, dockerd):
        self._conn = UnixHTTPConnection(str(dockerd.socket), timeout=120)

    def call(self, method, url, body=None):
        return engine_call(self._conn, method, url, body)

    def create(self, network):
        spec = {"Image": BUSYBOX_IMAGE, "Cmd": ["sleep", "600"]}
        spec["HostConfig"] = {"NetworkMode": network}
        return self.call("POST", "/containers/create", spec)["Id"]

    def close(self):
        self._conn.close()


def bench_api(world, networks, rounds):
    """Per network, seconds of the engine's start call ("start") and its
    removal ("remove"), the networks interleaved as in `bench`."""
    names = list(networks)
    samples = {name: {"start": [], "remove": []} for name in names}
    engine = Engine(world.dockerd)
    try:
        for i in range(rounds):
            made = {}
            for name in rotated(names, i):
                made[name] = engine.create(networks[name])
                samples[name]["start"].append(
                    timed(engine.call, "POST", f"/containers/{made[name]}/start")
                )
            for name in rotated(names, i):
                url = f"/containers/{made[name]}?force=1"
                samples[name]["remove"].append(timed(engine.call, "DELETE", url))
    finally:
        engine.close()
    print(f"  {rounds} rounds through the engine's API done", flush=True)
    return samples


#: Seconds after a call during which what it set off in the daemons (the
#: reconciler's look at a new sandbox, a deferred port deletion) is counted.
CPU_SETTLE = 0.3


def cpu_seconds(pid):
    """CPU seconds the threads of a process have run (the scheduler's own
    count, to the nanosecond: /proc's utime and stime come in 10 ms ticks)."""
    total = 0
    with contextlib.suppress(OSError):  # gone
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


#: The column of ovs-vswitchd's reconfigurations in `bench_cpu`'s samples.
RECONFIGURATIONS = "ovs-vswitchd reconfigurations"


def reconfigurations(world):
    """How many times ovs-vswitchd has reconfigured every bridge: it does for
    any change it sees (an OVSDB row, an external_ids key included, or a link
    appearing, changing or going anywhere in its network namespace), once per
    turn of its main loop however many changes came together."""
    shown = world.ovs.appctl("coverage/show")
    found = re.search(r"^bridge_reconfigure .*total: (\d+)$", shown, re.MULTILINE)
    return int(found.group(1)) if found else 0


def bench_cpu(world, driver, networks, rounds):
    """Per network, call ("start", "remove") and daemon, the CPU seconds of
    each call and the `CPU_SETTLE` seconds after it, the networks interleaved
    as in `bench`; and how many times ovs-vswitchd reconfigured meanwhile."""
    daemons = {
        "ovsdriver": read_pidfile(driver.pidfile),
        "ovsdb-server": read_pidfile(world.ovs.ovsdb_pidfile),
        "ovs-vswitchd": read_pidfile(world.ovs.vswitchd_pidfile),
        "dockerd": world.dockerd.pid,
    }
    columns = [*daemons, RECONFIGURATIONS]
    cpu = {
        name: {"start": {c: [] for c in columns}, "remove": {c: [] for c in columns}}
        for name in networks
    }
    engine = Engine(world.dockerd)

    def measure(name, call, method, url):
        count = reconfigurations(world)  # ovs-appctl: outside the CPU counted
        before = {d: cpu_seconds(pid) for d, pid in daemons.items()}
        engine.call(method, url)
        time.sleep(CPU_SETTLE)
        for d, pid in daemons.items():
            cpu[name][call][d].append(cpu_seconds(pid) - before[d])
        cpu[name][call][RECONFIGURATIONS].append(reconfigurations(world) - count)

    try:
        for i in range(rounds):
            for name in rotated(list(networks), i):
                container = engine.create(networks[name])
                time.sleep(CPU_SETTLE)  # the create's own work is not the start's
                measure(name, "start", "POST", f"/containers/{container}/start")
                measure(name, "remove", "DELETE", f"/containers/{container}?force=1")
    finally:
        engine.close()
    print(f"  {rounds} rounds of CPU accounting done", flush=True)
    return cpu


def print_cpu_table(cpu, rounds):
    columns = list(next(iter(cpu.values()))["start"])
    print(
        f"\nCPU per call and the {CPU_SETTLE:g} s after it, through the engine's API, "
        f"{rounds} rounds, means: start / remove"
    )
    print("| network | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))

    def cell(calls, column):
        start, remove = (statistics.mean(calls[call][column]) for call in ("start", "remove"))
        if column == RECONFIGURATIONS:
            return f"{start:.1f} / {remove:.1f}"
        return f"{start * 1000:.1f} / {remove * 1000:.1f} ms"

    for name, calls in cpu.items():
        cells = [cell(calls, column) for column in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_api_table(samples, rounds):
    print(
        f"\nthrough the engine's API, {rounds} rounds, medians; paired by round with the "
        "bridge (bootstrap 90% interval)"
    )
    print(
        "| network | start call | network cost of a start | minus the bridge, paired | "
        "as a ratio of the bridge's network cost | remove call |"
    )
    print("|---" * 6 + "|")
    med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in samples.items()}
    bridge_cost = med["docker bridge"]["start"] - med["none"]["start"]
    for name, m in med.items():
        cost = paired = ratio = "-"
        if name != "none":
            cost = f"{(m['start'] - med['none']['start']) * 1000:.0f} ms"
        if name not in ("none", "docker bridge"):
            paired, ratio = paired_cells(samples, name, "start", bridge_cost)
        print(
            f"| {name} | {m['start'] * 1000:.0f} ms | {cost} | {paired} | {ratio} | "
            f"{m['remove'] * 1000:.0f} ms |"
        )


def cost_ratio_interval(samples, name, key, draws=2000):
    """A bootstrap 90% interval of the cost ratio of *name* to the bridge
    (*key*: "run" or "batch")."""
    rng = random.Random(9)
    runs = {n: samples[n][key] for n in ("none", "docker bridge", name)}
    ratios = []
    for _ in range(draws):
        med = {n: statistics.median(rng.choices(v, k=len(v))) for n, v in runs.items()}
        bridge = med["docker bridge"] - med["none"]
        if bridge > 0:
            ratios.append((med[name] - med["none"]) / bridge)
    ratios.sort()
    return ratios[int(len(ratios) * 0.05)], ratios[int(len(ratios) * 0.95) - 1]


def paired_cells(samples, name, key, bridge_cost):
    """`paired_difference` as table cells: in ms, and as a ratio of the
    bridge's network cost (*bridge_cost* seconds)."""
    d, low, high = paired_difference(samples, name, key)
    cell = f"{d * 1000:+.1f} ms ({low * 1000:+.1f} to {high * 1000:+.1f})"
    b = bridge_cost
    return cell, f"{1 + d / b:.2f}x ({1 + low / b:.2f}-{1 + high / b:.2f}x)"


def paired_difference(samples, name, key, base="docker bridge", draws=2000):
    """The median of *name* minus *base* round by round (the two ran side by
    side in each round, so the machine's drift cancels), and its bootstrap
    90% interval, resampling rounds: (median, low, high) seconds."""
    rng = random.Random(9)
    diffs = [a - b for a, b in zip(samples[name][key], samples[base][key])]
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return statistics.median(diffs), medians[int(draws * 0.05)], medians[int(draws * 0.95) - 1]


def print_table(samples, count, rounds):
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\ndriver: {sys.executable}, python-ovs JSON parser: {ovs.json.PARSER}")
    print(
        f"{count} sequential runs and {rounds} batches of {CLIENTS} per network, interleaved;"
        f" medians per container; load average at the end {' '.join(load)}"
    )
    med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in samples.items()}
    print(
        "| network | docker run, one at a time | 8 at once, per container | network cost "
        "(seq / conc) | vs bridge (seq / conc) | ratio's 90% interval (seq / conc) | docker rm -f, "
        "one at a time | 8 at once, per container |"
    )
    print("|---" * 8 + "|")
    none, bridge = med["none"], med["docker bridge"]
    for name, m in med.items():
        cost = [m[k] - none[k] for k in ("run", "batch")]
        bcost = [bridge[k] - none[k] for k in ("run", "batch")]
        if name == "none":
            costs = ratio = interval = "-"
        else:
            costs = f"{cost[0] * 1000:.0f} ms / {cost[1] * 1000:.0f} ms"
            ratio = " / ".join(f"{c / b:.2f}x" if b > 0 else "n/a" for c, b in zip(cost, bcost))
            interval = " / ".join(
                "{:.2f}-{:.2f}x".format(*cost_ratio_interval(samples, name, key))
                for key in ("run", "batch")
            )
        print(
            f"| {name} | {m['run'] * 1000:.0f} ms | {m['batch'] * 1000:.0f} ms | {costs} | "
            f"{ratio} | {interval} | {m['rm'] * 1000:.0f} ms | {m['batch rm'] * 1000:.0f} ms |"
        )
    print(
        "\n| network | minus the bridge, paired by round: one at a time | 8 at once, per "
        "container | as a ratio of the bridge's network cost (seq / conc) |"
    )
    print("|---" * 4 + "|")
    for name in med:
        if name in ("none", "docker bridge"):
            continue
        cells, ratios = [], []
        for key in ("run", "batch"):
            cell, ratio = paired_cells(samples, name, key, bridge[key] - none[key])
            cells.append(cell)
            ratios.append(ratio)
        print(f"| {name} | {cells[0]} | {cells[1]} | {' / '.join(ratios)} |")
    # What a remote driver costs beyond the engine's own handling of one.
    floor = "remote driver doing nothing"
    print(f"\n| network | minus the {floor}, paired by round: one at a time | 8 at once |")
    print("|---" * 3 + "|")
    for name in ("ovs (internal ports)", "ovs (veth ports)"):
        cells = [
            "{:+.1f} ms ({:+.1f} to {:+.1f})".format(
                *(1000 * v for v in paired_difference(samples, name, key, floor))
            )
            for key in ("run", "batch")
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


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


#: What dockerd's debug log says while it starts a container, in order:
#: (phase name, the line that ends it).
PHASES = (
    ("start API call -> first address assigned", "Assigning addresses"),
    ("CreateEndpoint (in process for the bridge)", "Assigning addresses"),
    ("Join", "Programming external connectivity"),
    ("ProgramExternalConnectivity, EndpointOperInfo x2", "bundle dir created"),
)


TASK_STARTED = "topic=/tasks/start"
START = re.compile(r"Calling POST /v[\d.]+/containers/\w+/start")
SET_KEY = re.compile(r"sandbox set key processing took ([\d.]+)(ms|s) for container")
NETWORK_NAME = re.compile(r'on network ([\w.-]+)"?$')


def _dockerd_lines(world):
    """(epoch seconds, message) of every line of dockerd's (debug) log."""
    found = []
    for line in world.dockerd.logfile.read_text(errors="replace").splitlines():
        match = re.match(r'time="([^"]+)" level=\w+ msg="(.*)', line)
        if match and "." in match.group(1):
            when = datetime.strptime(match.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f")
            found.append((when.replace(tzinfo=timezone.utc).timestamp(), match.group(2)))
    return found


def phases(world, trace_file, networks, count):
    """Where the engine spends a container's start, network by network: the
    phases of dockerd's debug log, and the driver's handlers inside them."""
    names = [name for name in NETWORKS if name != "none"]
    for i in range(count):
        started = {}
        for name in rotated(names, i):
            _, started[name] = run_many(world, networks[name], 1, 1)
        for name in names:
            remove_many(world, started[name], 1)
    lines = _dockerd_lines(world)
    handlers = [json.loads(line) for line in Path(trace_file).read_text().splitlines()]
    handlers = [r for r in handlers if r["what"].startswith("api ")]
    starts = [(t, i) for i, (t, m) in enumerate(lines) if START.match(m)]
    table = {}
    for k, (start, first) in enumerate(starts):
        last = starts[k + 1][1] if k + 1 < len(starts) else len(lines)
        window = lines[first:last]
        network = next((NETWORK_NAME.search(m) for _, m in window if "Assigning" in m), None)
        name = next((n for n in names if network and networks[n] == network.group(1)), None)
        if name is None:
            continue
        times, at = [start], 0
        for _, marker in PHASES:
            at = next((j for j in range(at, len(window)) if marker in window[j][1]), None)
            if at is None:
                break
            times.append(window[at][0])
            at += 1
        if len(times) != len(PHASES) + 1:
            continue
        row = table.setdefault(name, {})
        for (phase, _), begin, end in zip(PHASES, times, times[1:]):
            row.setdefault(phase, []).append((end - begin) * 1000)
        row.setdefault("whole: start API call -> bundle", []).append((times[-1] - start) * 1000)
        # Later, runc's hook hands the container's namespace to dockerd, which
        # moves the interface in and sets up its DNS resolver there.
        setkey = next(filter(None, (SET_KEY.search(m) for _, m in window)), None)
        if setkey:
            row.setdefault("sandbox SetKey (the hook: interface moved in, DNS)", []).append(
                float(setkey.group(1)) * (1000 if setkey.group(2) == "s" else 1)
            )
        started = next((t for t, m in window if TASK_STARTED in m), None)
        if started:
            row.setdefault("whole: start API call -> task started", []).append(
                (started - start) * 1000
            )
        mine = [r for r in handlers if start <= r["t"] <= times[-1]]
        for record in mine:
            row.setdefault("  driver: " + record["what"][4:], []).append(record["ms"])
        # The engine's share of a phase with one engine call in it: before the
        # driver's handler starts, and after its answer.
        for method, phase in (("CreateEndpoint", 1), ("Join", 2)):
            call = next((r for r in mine if r["what"] == "api NetworkDriver." + method), None)
            if call is not None:
                answered = call["t"] + call["ms"] / 1000
                row.setdefault(f"  {method} phase: engine, until the handler starts", []).append(
                    (call["t"] - times[phase]) * 1000
                )
                row.setdefault(f"  {method} phase: engine, after the answer", []).append(
                    (times[phase + 1] - answered) * 1000
                )
    print(f"\n--- where dockerd spends a container's start, {count} per network, medians (ms) ---")
    print("| phase (dockerd's debug log) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    keys = list(dict.fromkeys(key for row in table.values() for key in row))
    for key in keys:
        cells = [
            f"{statistics.median(table[n][key]):.1f}" if key in table.get(n, {}) else "-"
            for n in names
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=40, help="sequential runs per network")
    parser.add_argument("--rounds", type=int, default=20, help="concurrent batches per network")
    parser.add_argument("--trace", action="store_true", help="trace one run per network instead")
    parser.add_argument(
        "--api", type=int, default=0, metavar="ROUNDS", help="then start and remove through the API"
    )
    parser.add_argument(
        "--cpu", type=int, default=0, metavar="ROUNDS", help="then CPU per start and removal"
    )
    args = parser.parse_args()
    debug = ["--debug"] if args.trace else []  # the phases come from its debug log
    with contextlib.ExitStack() as stack:
        world = stack.enter_context(DockerWorld(iptables=True, dockerd_args=debug))
        trace_file = world.directory / "driver-trace.jsonl" if args.trace else None
        if args.trace:
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
            null = stack.enter_context(null_driver(world, trace_file))
            networks = {name: network_args(world, driver, name, null) for name in NETWORKS}
            # Warm up every path once (image, first bridge use, firewall chains).
            for net in networks.values():
                _, ids = run_many(world, net, 2, 1)
                remove_many(world, ids, 1)
            if args.trace:
                for name in ("ovs (internal ports)", "ovs (veth ports)"):
                    trace_one(world, driver, trace_file, name, networks[name])
                trace_bridge(world, networks["docker bridge"])
                phases(world, trace_file, networks, args.containers)
            else:
                samples = bench(world, networks, args.containers, args.rounds)
                api = bench_api(world, networks, args.api) if args.api else None
                cpu = bench_cpu(world, driver, networks, args.cpu) if args.cpu else None
                print_table(samples, args.containers, args.rounds)
                if api:
                    print_api_table(api, args.api)
                if cpu:
                    print_cpu_table(cpu, args.cpu)
        finally:
            world.dockerd.reset()
            if args.trace:
                driver.close()


if __name__ == "__main__":
    main()
