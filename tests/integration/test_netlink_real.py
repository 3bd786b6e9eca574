"""The netlink contract, run against the real Netlink in a throwaway namespace.

Each test gets a fresh network namespace (``ovsw-nl-<random>``: the prefix
``.ci/run`` sweeps) that only the Netlink worker thread enters; it is deleted
afterwards, also when a test fails, and takes every link made in it along.
Needs root and iproute2's ``ip``.
"""

import functools
import json
import os
import secrets
import shutil
import subprocess
import threading
import time

import pytest
from twisted.internet import defer

from ovsdriver.netlink import LinkError, Netlink
from tests.contract_netlink import LinkView, NetlinkContract, cidr
from tests.reactor_thread import get_reactor, run_in_reactor

pytestmark = pytest.mark.integration


def ip(*args, check=True):
    """Run iproute2's ``ip``; its stdout, or raise with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if check and done.returncode:
        raise AssertionError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


#: Link kinds for "a link appears"; the first the kernel has is used (some
#: kernels, e.g. in microVMs, lack the dummy driver but have the bridge one).
STANDALONE_KINDS = ["dummy", "bridge"]


def make_standalone_link(namespace, name):
    """Add a link that needs no peer or lower device, like a tap OVS made."""
    for kind in list(STANDALONE_KINDS):
        done = subprocess.run(
            ["ip", "-n", namespace, "link", "add", name, "type", kind],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            return
        if "Unknown device type" not in done.stderr or len(STANDALONE_KINDS) == 1:
            raise AssertionError(f"cannot add link {name}: {done.stderr.strip()}")
        STANDALONE_KINDS.remove(kind)


@pytest.fixture
def namespace():
    """A fresh network namespace's name (``lo`` up, as a host has it),
    deleted after the test."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip command is not installed")
    name = f"ovsw-nl-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


@pytest.fixture
def netlink(namespace):
    """A started Netlink whose worker thread lives in *namespace*."""
    netlink = Netlink(get_reactor(), netns=f"/run/netns/{namespace}")
    run_in_reactor(netlink.start)
    try:
        yield netlink
    finally:
        run_in_reactor(netlink.stop)


class TestRealNetlink(NetlinkContract):
    @pytest.fixture(autouse=True)
    def _real(self, namespace, netlink):
        self.namespace = namespace
        self.netlink = netlink
        self._timers = []
        self._sandboxes = []
        yield
        for timer in self._timers:
            timer.cancel()
            timer.join(10)
        for sandbox in self._sandboxes:
            ip("netns", "del", sandbox, check=False)

    def call(self, method, *args, **kwargs):
        # partial: run_in_reactor's own timeout would swallow the method's
        return run_in_reactor(functools.partial(method, *args, **kwargs), timeout=30)

    def make_link(self, name):
        make_standalone_link(self.namespace, name)

    def make_link_while_waiting(self, name):
        timer = threading.Timer(0.3, self.make_link, (name,))
        self._timers.append(timer)
        timer.start()

    def observe(self, name, namespace=None):
        namespace = namespace or self.namespace
        shown = ip("-n", namespace, "-j", "addr", "show", "dev", name, check=False)
        if not shown.strip():
            return None
        (link,) = json.loads(shown)
        return LinkView(
            mtu=link["mtu"],
            mac=link["address"],
            up="UP" in link["flags"],
            addresses=frozenset(cidr(f"{a['local']}/{a['prefixlen']}") for a in link["addr_info"]),
            tx_checksum=self._tx_checksum(name, namespace),
        )

    # -- sandboxes: namespaces of their own, as containers have -----------------

    def make_sandbox(self):
        name = f"ovsw-sb-{secrets.token_hex(4)}"
        ip("netns", "add", name)
        self._sandboxes.append(name)
        return f"/run/netns/{name}"

    def make_tap(self, name, mac):
        ip("-n", self.namespace, "tuntap", "add", "name", name, "mode", "tap")
        ip("-n", self.namespace, "link", "set", name, "address", mac)

    def make_sandbox_link(self, sandbox, name, mac, addresses=(), live=False):
        namespace = os.path.basename(sandbox)
        if live:  # a veth pair with both ends up has carrier
            peer = name + "p"
            ip("-n", namespace, "link", "add", name, "type", "veth", "peer", "name", peer)
            ip("-n", namespace, "link", "set", peer, "up")
        else:  # a tap nobody holds open has none
            ip("-n", namespace, "tuntap", "add", "name", name, "mode", "tap")
        ip("-n", namespace, "link", "set", name, "address", mac, "up")
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            ip("-n", namespace, "addr", "add", address, "dev", name, *extra)

    def remove_sandbox(self, sandbox):
        ip("netns", "del", os.path.basename(sandbox))

    def add_sandbox_route(self, sandbox, dst, gateway, dev):
        family = "-6" if ":" in gateway else "-4"
        ip("-n", os.path.basename(sandbox), family, "route", "add", dst, "via", gateway, "dev", dev)

    def observe_in_sandbox(self, sandbox, name):
        return self.observe(name, os.path.basename(sandbox))

    def sandbox_routes(self, sandbox):
        found = set()
        for family in ("-4", "-6"):
            shown = ip("-n", os.path.basename(sandbox), family, "-j", "route", "show")
            for route in json.loads(shown or "[]"):
                if route.get("protocol") == "kernel":
                    continue
                dst = route["dst"]
                found.add(
                    (dst if dst == "default" else cidr(dst), route.get("gateway"), route["dev"])
                )
        return frozenset(found)

    def _tx_checksum(self, name, namespace=None):
        if shutil.which("ethtool") is None:
            return None
        shown = subprocess.run(
            ["ip", "netns", "exec", namespace or self.namespace, "ethtool", "-k", name],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        for line in shown.splitlines():
            if line.startswith("tx-checksumming:"):
                return line.split(":")[1].split()[0] == "on"
        return None


# -- properties of the real implementation only ------------------------------


def test_links_are_made_in_the_namespace_not_the_tests_own(netlink, namespace):
    run_in_reactor(netlink.create_veth, "nlr-h", "nlr-p", 1500)
    assert "nlr-h" in ip("-n", namespace, "-o", "link", "show")
    assert ip("link", "show", "nlr-h", check=False) == ""


def test_deletions_hold_up_no_other_request_but_a_pair_of_the_same_name(netlink):
    """A deletion waits ~16 ms for the kernel: a pair made meanwhile is made
    at once (on one thread it came after all of them, each time), unless it
    takes a name being deleted, which it gets once the deletion is done."""
    names = [f"nld-{n}" for n in range(8)]
    for name in names:
        run_in_reactor(netlink.create_veth, name, name + "p", 1500)
    finished = []

    def together():
        ds = [netlink.delete_link(name) for name in names]
        ds.append(netlink.create_veth("nld-new", "nld-newp", 1500))
        ds.append(netlink.create_veth("nld-0", "nld-0p", 1500))
        for d, what in zip(ds, [*names, "new", "again"]):
            d.addCallback(lambda _, what=what: finished.append(what))
        return defer.gatherResults(ds)

    run_in_reactor(together, timeout=30)
    assert finished.index("new") < len(names), finished
    assert finished.index("again") > finished.index("nld-0"), finished
    assert {"nld-new", "nld-0", "nld-0p"} <= set(run_in_reactor(netlink.links))


def test_wait_for_link_keeps_polling_until_its_timeout(netlink):
    started = time.monotonic()
    with pytest.raises(Exception, match="nlr-none"):
        run_in_reactor(netlink.wait_for_link, "nlr-none", 0.5)
    assert 0.5 <= time.monotonic() - started < 1.5


def test_kernel_work_does_not_block_the_reactor(netlink):
    """A reactor timer fires promptly while the worker is busy with the kernel:
    in one of three tries, as a pause of the whole process (a garbage
    collection, the VM's CPU taken away) can delay a timer now and then (once
    by 118 ms in CI), where a reactor that waits for the kernel waits every time."""
    pairs = [(f"nlr-h{i}", f"nlr-p{i}") for i in range(40)]

    def scenario():
        reactor = get_reactor()
        started = time.monotonic()
        work = defer.gatherResults(
            [netlink.create_veth(host, peer, 1500) for host, peer in pairs]
            + [netlink.delete_link(host) for host, _ in pairs],
            consumeErrors=True,
        )
        work.addCallback(lambda _: time.monotonic())
        tick = defer.Deferred()
        reactor.callLater(0, lambda: tick.callback(time.monotonic()))
        both = defer.gatherResults([tick, work], consumeErrors=True)
        return both.addCallback(lambda times: (started, *times))

    tries = []
    for _ in range(3):
        started, ticked, finished = run_in_reactor(scenario, timeout=60)
        tries.append((round(ticked - started, 3), round(finished - started, 3)))
        if ticked < finished and ticked - started < 0.1:
            return
    pytest.fail(f"the timer waited for the kernel work, (timer, work) in s: {tries}")


@pytest.mark.skipif(shutil.which("ethtool") is None, reason="ethtool is not installed")
def test_create_veth_peer_has_tx_checksumming_off_as_ethtool_reports(netlink, namespace):
    run_in_reactor(netlink.create_veth, "nlr-h", "nlr-p", 1500)
    shown = ip("netns", "exec", namespace, "ethtool", "-k", "nlr-p")
    assert "tx-checksumming: off" in shown
    shown = ip("netns", "exec", namespace, "ethtool", "-k", "nlr-h")
    assert "tx-checksumming: on" in shown


def test_an_ipv6_address_on_a_host_without_ipv6_says_so(netlink, namespace):
    make_standalone_link(namespace, "nlr-6")
    ip("netns", "exec", namespace, "sysctl", "-qw", "net.ipv6.conf.nlr-6.disable_ipv6=1")
    with pytest.raises(LinkError, match="IPv6 is disabled on it .*leave --ipv6 out"):
        run_in_reactor(netlink.add_addresses, "nlr-6", ["fd00:6::1/64"])
    assert run_in_reactor(netlink.add_addresses, "nlr-6", ["10.6.0.1/24"]) == ["10.6.0.1/24"]


def test_the_worker_comes_back_from_a_sandbox(netlink, namespace):
    """After looking into a sandbox (or failing to), work happens at home again."""
    sandbox = f"ovsw-sb-{secrets.token_hex(4)}"
    ip("netns", "add", sandbox)
    try:
        links = run_in_reactor(netlink.sandbox_links, f"/run/netns/{sandbox}")
        assert [link.name for link in links] == ["lo"]
        with pytest.raises(Exception, match="gone"):
            run_in_reactor(netlink.sandbox_links, f"/run/netns/{sandbox}-gone")
        run_in_reactor(netlink.create_veth, "nlr-h", "nlr-p", 1500)
        assert "nlr-h" in ip("-n", namespace, "-o", "link", "show")
        assert "nlr-h" not in ip("-n", sandbox, "-o", "link", "show")
    finally:
        ip("netns", "del", sandbox, check=False)
