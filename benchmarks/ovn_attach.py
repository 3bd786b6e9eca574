"""Benchmark: attaching containers to an OVN network, and allocating its addresses.

Builds the two-host OVN world of the multi-host tests (``tests.world.OVNWorld``:
an OVN central, two hosts each with Open vSwitch, ovn-controller and the real
driver), talks to the drivers over their UNIX sockets exactly like the engine,
and reports:

- attach latency, CreateEndpoint + Join returning (for OVN: the port bound and
  installed by ovn-controller), p50 and p90 over N attaches, on an OVN network
  and, beside it, on a local network of the same host;
- addresses allocated per second (IpamDriver.RequestAddress, each a claim in
  the Northbound database) by one host alone and by both hosts at once, with
  W concurrent clients per host. (A local network uses Docker's built-in IPAM,
  in the engine's own process: there is no plugin figure to put beside it.)

    sudo python3 benchmarks/ovn_attach.py [--attaches 50] [--addresses 200] [--workers 8]
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.world import OVNWorld, plugin_post  # noqa: E402

OVN_NET = ("0a" * 32, "0b" * 32)  # the OVN network's id on host 0 and host 1
LOCAL_NET = "0c" * 32
SPACE = "OVN"


def call(socket, method, body):
    status, reply = plugin_post(socket, method, body, timeout=60)
    if status != 200 or not isinstance(reply, dict) or reply.get("Err") or reply.get("Error"):
        raise RuntimeError(f"{method} failed: {status} {reply}")
    return reply


def eid(prefix, n):
    return hashlib.sha256(f"{prefix}{n}".encode()).hexdigest()


def create_ovn_network(socket, network_id, subnet):
    options = {"ovs.ovn.switch": "bench"}
    pool = call(socket, "IpamDriver.RequestPool", {"Pool": subnet or "", "Options": options})
    gateway = pool["Data"].get("com.docker.network.gateway")
    if gateway is None:
        gateway = call(
            socket,
            "IpamDriver.RequestAddress",
            {
                "PoolID": pool["PoolID"],
                "Options": {"RequestAddressType": "com.docker.network.gateway"},
            },
        )["Address"]
    data = [{"AddressSpace": SPACE, "Pool": pool["Pool"], "Gateway": gateway}]
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.generic": {}},
        "IPv4Data": data,
    }
    call(socket, "NetworkDriver.CreateNetwork", body)
    return pool["PoolID"]


def attach(socket, network_id, endpoint_id, address):
    """CreateEndpoint + Join; seconds taken."""
    ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
    start = time.perf_counter()
    call(socket, "NetworkDriver.CreateEndpoint", dict(ids, Interface={"Address": address}))
    call(socket, "NetworkDriver.Join", dict(ids, SandboxKey="/var/run/docker/netns/bench"))
    took = time.perf_counter() - start
    call(socket, "NetworkDriver.Leave", ids)
    call(socket, "NetworkDriver.DeleteEndpoint", ids)
    return took


def percentiles(times):
    times = sorted(times)
    return statistics.median(times) * 1000, times[max(int(len(times) * 0.9) - 1, 0)] * 1000


def allocate(socket, pool, count, workers):
    """`count` RequestAddress calls with `workers` clients; the addresses."""
    with ThreadPoolExecutor(workers) as threads:
        replies = threads.map(
            lambda _: call(socket, "IpamDriver.RequestAddress", {"PoolID": pool})["Address"],
            range(count),
        )
        return list(replies)


def release(socket, pool, addresses):
    for address in addresses:
        call(socket, "IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": address})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attaches", type=int, default=50)
    parser.add_argument("--addresses", type=int, default=200, help="per host")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients per host")
    args = parser.parse_args()
    with OVNWorld() as world:
        sockets = [host.start_driver().socket for host in world.hosts]
        pools = [
            create_ovn_network(sockets[0], OVN_NET[0], "10.98.0.0/16"),
            create_ovn_network(sockets[1], OVN_NET[1], None),
        ]
        call(
            sockets[0],
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": LOCAL_NET,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"Pool": "10.97.0.0/16", "Gateway": "10.97.0.1/16"}],
            },
        )

        ovn_times, local_times = [], []
        for n in range(args.attaches):
            address = call(sockets[0], "IpamDriver.RequestAddress", {"PoolID": pools[0]})
            ovn_times.append(attach(sockets[0], OVN_NET[0], eid("o", n), address["Address"]))
            release(sockets[0], pools[0], [address["Address"]])
            local_times.append(attach(sockets[0], LOCAL_NET, eid("l", n), "10.97.0.9/16"))
        print(f"attach (CreateEndpoint + Join returning), {args.attaches} attaches each")
        print(f"{'network':>10} {'p50 ms':>8} {'p90 ms':>8}")
        for name, times in (("local", local_times), ("OVN", ovn_times)):
            p50, p90 = percentiles(times)
            print(f"{name:>10} {p50:>8.1f} {p90:>8.1f}")

        start = time.perf_counter()
        alone = allocate(sockets[0], pools[0], args.addresses, args.workers)
        one_host = len(alone) / (time.perf_counter() - start)
        release(sockets[0], pools[0], alone)
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as hosts:
            both = list(
                hosts.map(
                    lambda h: allocate(sockets[h], pools[h], args.addresses, args.workers), (0, 1)
                )
            )
        two_hosts = sum(map(len, both)) / (time.perf_counter() - start)
        everything = both[0] + both[1]
        assert len(set(everything)) == len(everything), "an address was handed out twice"
        print(f"\naddresses allocated per second ({args.workers} clients per host)")
        print(f"  one host alone:     {one_host:8.0f}/s ({len(alone)} addresses)")
        print(
            f"  two hosts at once:  {two_hosts:8.0f}/s ({len(everything)} addresses, all distinct)"
        )


if __name__ == "__main__":
    main()
