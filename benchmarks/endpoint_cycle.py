"""Benchmark: one CreateEndpoint + Join + Leave + DeleteEndpoint cycle at the API.

Runs the real driver (``twistd ovsdriver``) against a private ovsdb-server and
userspace ovs-vswitchd in a network namespace of its own (the test worlds of
``tests/world.py``), talks to it over its UNIX socket exactly like the engine,
and reports the median and 90th percentile of a cycle over N cycles, first on
an empty bridge, then with 1000 endpoints already on it (created concurrently,
which also shows how well concurrent requests share OVSDB transactions).

    sudo python3 benchmarks/endpoint_cycle.py [--cycles 100] [--fill 1000]
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.world import OVSWorld, plugin_post  # noqa: E402

NETWORK = "be" * 32


def call(socket, method, body):
    status, reply = plugin_post(socket, method, body, timeout=60)
    if status != 200 or not isinstance(reply, dict) or reply.get("Err"):
        raise RuntimeError(f"{method} failed: {status} {reply}")
    return reply


def endpoint_id(prefix, n):
    """A distinct Docker-like id (random-looking from its first digits on)."""
    return hashlib.sha256(f"{prefix}{n}".encode()).hexdigest()


def create_endpoint(socket, eid, address):
    body = {"NetworkID": NETWORK, "EndpointID": eid, "Interface": {"Address": address}}
    call(socket, "NetworkDriver.CreateEndpoint", body)


def cycle(socket, eid):
    """One container's life at the API; returns its duration in seconds."""
    ids = {"NetworkID": NETWORK, "EndpointID": eid}
    start = time.perf_counter()
    create_endpoint(socket, eid, "10.99.255.254/16")
    call(socket, "NetworkDriver.Join", dict(ids, SandboxKey="/var/run/docker/netns/bench"))
    call(socket, "NetworkDriver.Leave", ids)
    call(socket, "NetworkDriver.DeleteEndpoint", ids)
    return time.perf_counter() - start


def measure(socket, cycles, prefix):
    times = [cycle(socket, endpoint_id(prefix, n)) for n in range(cycles)]
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9) - 1]


def fill(socket, count, workers, prefix="f111", first=0):
    """Create `count` endpoints with `workers` concurrent clients; seconds taken."""

    def one(n):
        n += first
        address = f"10.99.{n // 250}.{n % 250 + 2}/16"
        create_endpoint(socket, endpoint_id(prefix, n), address)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--fill", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="concurrent clients for the fill")
    args = parser.parse_args()
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
        rows = []
        median, p90 = measure(driver.socket, args.cycles, "c000")
        rows.append((0, median, p90))
        took = fill(driver.socket, args.fill, args.workers)
        print(
            f"filled {args.fill} endpoints with {args.workers} concurrent clients in "
            f"{took:.1f} s ({args.fill / took:.0f} endpoints/s)"
        )
        median, p90 = measure(driver.socket, args.cycles, "c111")
        rows.append((args.fill, median, p90))
        print(f"\nCreateEndpoint+Join+Leave+DeleteEndpoint, {args.cycles} cycles each")
        print(f"{'endpoints on bridge':>20} {'median ms':>10} {'p90 ms':>10}")
        for existing, median, p90 in rows:
            print(f"{existing:>20} {median * 1000:>10.1f} {p90 * 1000:>10.1f}")
        # Batching: the same 50 CreateEndpoints one at a time, then concurrently.
        one_by_one = fill(driver.socket, 50, 1, "b1", first=args.fill)
        together = fill(driver.socket, 50, args.workers, "b2", first=args.fill + 50)
        print(f"\n50 CreateEndpoint on {args.fill}+ endpoints, in one run:")
        print(f"  one at a time: {one_by_one:.2f} s; {args.workers} concurrent: {together:.2f} s")


if __name__ == "__main__":
    main()
