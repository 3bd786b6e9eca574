"""Keep Open vSwitch in line with what the engine still has: collect orphan
endpoints, and repair endpoints that an ovs-vswitchd restart broke.

The engine does not always tell the driver that an endpoint is gone: it only
logs a failed Leave or DeleteEndpoint (a container removed while the driver
was down), and after a crash of its own it drops stale endpoints without any
call at all. The driver never asks the engine (calling the Docker API from a
request handler can deadlock, and the engine may be down); it decides from
what it can observe itself:

- OVSDB: every endpoint's port, its creation time and the sandbox that Join
  named (the SandboxKey, a bind mount of the container's network namespace);
- the file system: a live sandbox is a mounted namespace file. When the
  sandbox goes the engine unmounts it at once but deletes the file only at its
  next garbage collection (libnetwork runs one every 60 s), also when a
  restarted engine cleans up after a crash. The driver must run in the
  engine's mount namespace (as a host service does) to see them;
- the kernel's links, in its own namespace and inside sandboxes.

An endpoint is an orphan when it was joined and its sandbox is gone, or it has
not been joined for `Reconciler.unjoined_grace` seconds after it was created:
the engine calls Join right after CreateEndpoint, and DeleteEndpoint right
after Leave, so a long-unjoined endpoint is one whose DeleteEndpoint was lost.
A sandbox is gone when its file is missing, or is no longer a mounted
namespace while the driver can see the engine's namespace mounts (it saw this
one mounted, or sees another one mounted now; without that evidence, as in a
mount namespace that does not receive the engine's mounts, it waits for the
file to be deleted). At Join the sandbox file may not exist yet (the engine
makes it when the container's task starts), so a missing file is only trusted
once the driver saw the sandbox mounted, or after the same grace. An endpoint
is collected only when two passes in a row find it orphaned; one whose sandbox
is mounted is never collected. A veth host end (``ove-...``) that no endpoint
owns for the grace period is deleted too (a CreateEndpoint cut short by a
crash).

Repair. With the userspace (``netdev``) datapath an internal port is a tap that
ovs-vswitchd owns. When ovs-vswitchd restarts it makes every tap anew, in its
own (the host's) namespace, while the container keeps the old tap: dead, with
no carrier, still holding the container's name (eth0...), addresses and
routes. For a joined endpoint with a live sandbox whose port shows up in the
driver's namespace, the reconciler looks inside the sandbox: a link there with
the endpoint's MAC and no carrier is the dead copy, and
`Netlink.repair_endpoint` puts the fresh tap in its place (name, MAC, MTU,
addresses, routes). Without such a link the engine simply has not moved the
port in yet (between Join and the container's start) and it is left alone.
With the kernel (``system``) datapath internal ports are datapath vports that
survive an ovs-vswitchd restart inside the container, so there is nothing to
repair; veth ports survive with either datapath.

A pass runs every `Reconciler.interval` seconds (the next starts only after
the previous one ended); its failures are logged and the next pass tries
again.
"""

import os
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ovsdriver.metrics import NO_METRICS
from ovsdriver.vswitch import veth_host_name

log = Logger()

#: The prefix of the veth host ends the driver makes.
VETH_PREFIX = veth_host_name("")
#: What `Reconciler._safely` returns when the action failed.
FAILED = object()

# What `probe_sandbox` finds at a sandbox's path.
MOUNTED = "mounted"  # a network namespace is mounted there: the sandbox lives
UNMOUNTED = "unmounted"  # a plain file: the engine tore the sandbox down
MISSING = "missing"  # no file (yet, or any more)
INVISIBLE = "invisible"  # not even the directory: the driver cannot judge


def probe_sandbox(path):
    """What is at the path of a sandbox: MOUNTED, UNMOUNTED, MISSING or INVISIBLE."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return MISSING if os.path.isdir(os.path.dirname(path)) else INVISIBLE
    except OSError:
        return INVISIBLE
    return MOUNTED if found.st_dev == _nsfs_device() else UNMOUNTED


def _nsfs_device():
    """The device of the namespace file system, which every mounted namespace shows."""
    return os.stat("/proc/self/ns/net").st_dev


class Reconciler(service.Service):
    """Periodic orphan collection and post-restart repair of endpoints.

    *vswitch* and *netlink* are the driver's ports; *clock* gives the time in
    seconds since the epoch (comparable with `Endpoint.created`);
    *probe_sandbox* tells what is at a sandbox's path (see `probe_sandbox`).
    *after_collect*, if given, is called (and may return a Deferred) after a
    pass collected endpoints that had published ports, e.g. to drop their
    firewall rules.
    """

    metrics = NO_METRICS

    def __init__(
        self,
        reactor,
        vswitch,
        netlink,
        interval=2.0,
        unjoined_grace=20.0,
        clock=time.time,
        probe_sandbox=probe_sandbox,
        after_collect=None,
    ):
        self.reactor = reactor
        self.vswitch = vswitch
        self.netlink = netlink
        self.interval = interval
        self.unjoined_grace = unjoined_grace
        self.clock = clock
        self.probe_sandbox = probe_sandbox
        self.after_collect = after_collect
        self._timer = None
        self._pass = None
        self._first_seen = {}  # endpoint id -> when this process first saw it
        self._suspects = {}  # endpoint id -> why the previous pass found it orphaned
        self._seen_alive = set()  # (endpoint id, sandbox) seen mounted
        self._stray = {}  # name of a veth host end nobody owns -> first seen
        self._complaints = {}  # endpoint id, link name... -> the last problem logged

    # -- the service ---------------------------------------------------------

    def startService(self):
        super().startService()
        self._schedule(0)

    def stopService(self):
        """Stop; the Deferred fires once a pass in progress has ended."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pass is None:
            return None
        done = defer.Deferred()
        self._pass.addBoth(lambda result: done.callback(None) or result)
        return done

    def _schedule(self, delay):
        self._timer = self.reactor.callLater(delay, self._start_pass)

    def _start_pass(self):
        self._timer = None
        self._pass = self.metrics.reconciler_pass(defer.ensureDeferred(self.reconcile()))
        self._pass.addErrback(self._pass_failed)
        self._pass.addBoth(self._pass_ended)

    def _pass_failed(self, failure):
        self._complain("pass", f"a reconciliation pass failed: {failure.getErrorMessage()}")

    def _pass_ended(self, _):
        self._pass = None
        if self.running:
            self._schedule(self.interval)

    # -- one pass ------------------------------------------------------------

    async def reconcile(self):
        """One pass: collect orphans, repair broken endpoints, delete stray veths."""
        endpoints = await self.vswitch.endpoints()
        links = await self.netlink.links()
        now = self.clock()
        self._complain("pass", None)
        orphans, broken = self._classify(endpoints, links, now)
        collected = []
        for endpoint, reason in orphans:
            if not self.running:
                return
            if await self._collect(endpoint, reason):
                collected.append(endpoint)
        for endpoint in broken:
            if not self.running:
                return
            await self._repair(endpoint)
        await self._delete_stray_veths(endpoints, links, now)
        if self.after_collect is not None and any(ep.published for ep in collected):
            await self._safely(
                "firewall",
                "cannot update the firewall",
                lambda: defer.maybeDeferred(self.after_collect),
            )

    def _classify(self, endpoints, links, now):
        """(orphans confirmed by two passes, with why; endpoints to repair)."""
        ids = {ep.endpoint_id for ep in endpoints}
        for gone in set(self._first_seen) - ids:
            del self._first_seen[gone]
            self._complaints.pop(gone, None)
        self._seen_alive = {key for key in self._seen_alive if key[0] in ids}
        states = {ep.sandbox: self.probe_sandbox(ep.sandbox) for ep in endpoints if ep.sandbox}
        mounts_visible = MOUNTED in states.values()
        suspects, orphans, broken = {}, [], []
        for ep in endpoints:
            first_seen = self._first_seen.setdefault(ep.endpoint_id, now)
            age = now - (ep.created if ep.created is not None else first_seen)
            seen_alive = (ep.endpoint_id, ep.sandbox) in self._seen_alive
            state = states.get(ep.sandbox)
            reason = None
            if ep.sandbox is None:
                if age >= self.unjoined_grace:
                    reason = f"not joined to any container {age:.0f} s after its creation"
            elif state == MOUNTED:
                self._seen_alive.add((ep.endpoint_id, ep.sandbox))
                if ep.port_type == "internal" and ep.ifname in links:
                    broken.append(ep)
            elif state == INVISIBLE:
                # Not even the directory: the driver cannot see the engine's
                # sandboxes (another mount namespace?), so it cannot judge.
                self._complain(
                    "sandboxes",
                    f"cannot see the directory of sandbox {ep.sandbox}: orphan endpoints are "
                    "not collected; run the driver in the engine's mount namespace",
                )
            elif state == UNMOUNTED and (seen_alive or mounts_visible):
                reason = f"its container's sandbox {ep.sandbox} was torn down"
            elif state == MISSING and seen_alive:
                reason = f"its container's sandbox {ep.sandbox} is gone"
            elif state == MISSING and age >= self.unjoined_grace:
                reason = f"its container's sandbox {ep.sandbox} is missing"
            if reason is None:
                continue
            suspects[ep.endpoint_id] = reason
            if ep.endpoint_id in self._suspects:
                orphans.append((ep, reason))
        self._suspects = suspects
        return orphans, broken

    async def _collect(self, endpoint, reason):
        async def remove():
            await self.vswitch.remove_endpoint(endpoint.endpoint_id)
            if endpoint.port_type == "veth":
                await self.netlink.delete_link(endpoint.port)

        doing = f"cannot remove orphan endpoint {endpoint.endpoint_id[:12]}"
        if await self._safely(endpoint.endpoint_id, doing, remove) is FAILED:
            return False
        self._suspects.pop(endpoint.endpoint_id, None)
        self.metrics.reconciler_collected()
        log.info(
            "removed orphan endpoint {endpoint} (port {port}): {reason}",
            endpoint=endpoint.endpoint_id[:12],
            port=endpoint.port,
            reason=reason,
        )
        return True

    async def _repair(self, endpoint):
        async def repair():
            links = await self.netlink.sandbox_links(endpoint.sandbox)
            mac = (endpoint.mac or "").lower()
            if not any(link.mac == mac and not link.carrier for link in links):
                return None  # the engine has not moved the port in yet
            addresses = [a for a in (endpoint.ipv4, endpoint.ipv6) if a]
            return await self.netlink.repair_endpoint(
                endpoint.sandbox, endpoint.ifname, endpoint.mac, endpoint.mtu, addresses
            )

        doing = f"cannot repair endpoint {endpoint.endpoint_id[:12]}"
        name = await self._safely(endpoint.endpoint_id, doing, repair)
        if name and name is not FAILED:
            self.metrics.reconciler_repaired()
            log.info(
                "repaired endpoint {endpoint} after an ovs-vswitchd restart: moved the new "
                "{port} into sandbox {sandbox} as {name}",
                endpoint=endpoint.endpoint_id[:12],
                port=endpoint.ifname,
                sandbox=endpoint.sandbox,
                name=name,
            )

    async def _delete_stray_veths(self, endpoints, links, now):
        owned = {ep.port for ep in endpoints}
        strays = {name for name in links if name.startswith(VETH_PREFIX) and name not in owned}
        for gone in set(self._stray) - strays:
            del self._stray[gone]
            self._complaints.pop(gone, None)
        for name in strays:
            self._stray.setdefault(name, now)
        for name, first_seen in sorted(self._stray.items()):
            if now - first_seen < self.unjoined_grace or not self.running:
                continue
            deleted = await self._safely(
                name, f"cannot delete {name}", lambda name=name: self.netlink.delete_link(name)
            )
            if deleted is not FAILED:
                del self._stray[name]
                log.info("deleted {name}, a veth no endpoint owns", name=name)

    # -- errors ----------------------------------------------------------------

    async def _safely(self, what, doing, action):
        """Await ``action()`` and return its result; on failure log it (once
        while it repeats) and return `FAILED`."""
        try:
            result = await action()
        except Exception as e:
            self._complain(what, f"{doing}: {e}")
            return FAILED
        self._complain(what, None)
        return result

    def _complain(self, what, problem):
        """Log *problem* about *what* unless it was the last one logged;
        None means that all is well again."""
        if problem is None:
            self._complaints.pop(what, None)
        elif self._complaints.get(what) != problem:
            self._complaints[what] = problem
            log.warn("{problem}", problem=problem)
