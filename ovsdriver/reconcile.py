"""Keep Open vSwitch in line with what the engine still has: collect orphan
endpoints, and repair endpoints that an ovs-vswitchd restart broke.

The engine does not always tell the driver that an endpoint is gone: it only
logs a failed Leave or DeleteEndpoint (a container removed while the driver
was down), and after a crash of its own it drops stale endpoints without any
call at all. The driver never asks the engine (calling the Docker API from a
request handler can deadlock, and the engine may be down); it decides from
what it can observe itself:

- OVSDB: every endpoint's port and the sandbox that Join named (the
  SandboxKey, a file on which the engine bind-mounts the container's network
  namespace);
- the kernel's mount views (`ovsdriver.sandboxes`): whether the sandbox is
  mounted in the driver's own mount namespace or in any other one a process
  on the host is in, and which network namespaces live processes are in;
- the kernel's links, in its own namespace and inside sandboxes.

The rule: a joined endpoint's port is removed only on positive evidence that
its sandbox is gone, never on a timer, and never on what one mount view
alone shows. A view can be stale: a driver run in a container with a plain
``-v`` of the netns directory keeps a private copy of the engine's mounts, in
which old sandboxes stay mounted and new ones are plain files. So:

- a sandbox mounted in any view is alive. The first time the reconciler sees
  it mounted it records where: the view (its own if it is mounted there,
  else the longest-lived one: short-lived processes come and go with copies
  of the mounts) and the network namespace, in the endpoint's
  ``ovsdriver-sandbox-seen``, so a restarted driver knows too;
- from then on that view decides: the sandbox is gone when that view still
  exists and shows it unmounted or deleted (a copy elsewhere that still has
  it mounted proves nothing), and no process that was in its network
  namespace then is still there (namespace numbers are reused: start times
  tell). The engine unmounts a sandbox when it tears it down (and deletes
  the file at its next garbage collection, within 60 s), also when a
  restarted engine cleans up after a crash;
- a sandbox the driver never saw (it was killed right after the container
  started, which was removed while it was down) is gone when the engine has
  moved the endpoint's interface out of the driver's namespace into it (an
  internal port's tap exists only once ovs-vswitchd has made the port) and
  its file is deleted from a directory in which the driver sees the engine's
  other sandboxes mounted; or when the engine has moved the interface back
  out, as it does before Leave, and the sandbox is mounted nowhere: the
  interface is in the driver's namespace with the MAC the engine gives it in
  the sandbox (a tap or veth end is made with another one);
- anything else is no evidence: a sandbox that has not appeared yet (at Join
  the engine may not have made it: it does when the container's task starts,
  after image pulls, volume plugins...), a plain file that was never seen
  mounted, a view that is gone. The port stays, and the reconciler says so
  once in the log (after the grace, counted from Join, so that a starting
  container does not make it talk).

An endpoint that was never joined (or was left and not deleted) is an orphan
once it has been unjoined for `Reconciler.unjoined_grace` seconds, measured on
a monotonic clock from when this process first saw it so (a restart never
shortens it), and its interface is still in the driver's namespace (or, for a
veth, its pair is gone): the engine calls Join right after CreateEndpoint,
and DeleteEndpoint right after Leave, so a long-unjoined endpoint is one whose
DeleteEndpoint was lost. An endpoint is collected only when two passes in a
row find it orphaned.

Join answers before its record of the sandbox is committed, so a driver
killed at that moment (or an OVSDB outage then) loses the record of a live
container. An unjoined endpoint whose interface has left the driver's
namespace is therefore no orphan: a container took it. The reconciler looks
for that interface (its MAC and address) in the sandboxes mounted in the
driver's view, in the engine's sandbox directories (those of the other
endpoints' sandboxes and ``/var/run/docker/netns``), and records the one
holding it; from then on the rules above apply. Until it is found, the port
stays, and the reconciler says so once.

A veth host end (``ove-...``) that no endpoint owns for the grace period is
deleted too (a CreateEndpoint cut short by a crash).

Repair. With the userspace (``netdev``) datapath an internal port is a tap that
ovs-vswitchd owns. When ovs-vswitchd restarts it makes every tap anew, in its
own (the host's) namespace, while the container keeps the old tap: dead, with
no carrier, still holding the container's name (eth0...), addresses and
routes. For a joined endpoint with a live sandbox whose port shows up in the
driver's namespace, the reconciler looks inside the sandbox: a link there with
the endpoint's MAC and no carrier is the dead copy, and `Reconciler.repair`
puts the fresh tap in its place from the netlink port's small operations:
move it in, delete the dead copy, give it the dead copy's name, the MAC and
MTU, set it up, add the addresses and routes back. Without such a link the
engine simply has not moved the port in yet (between Join and the container's
start) and it is left alone. With the kernel (``system``) datapath internal
ports are datapath vports that survive an ovs-vswitchd restart inside the
container, so there is nothing to repair; veth ports survive with either
datapath.

Upgrades. Drivers before 2026-12 set each internal endpoint port's Interface
``mac``, which ovs-vswitchd keeps setting again, failing (with an error line)
for every port inside a container; the first pass clears it.

Gateways. The kernel forgets a network's gateway addresses, and its
``route_localnet``, when the interface holding them is made anew: the bridge
after a reboot, or after an ovs-vswitchd restart that recreates it. When two
passes in a row find a gateway interface with an index the reconciler has not
put the addresses on (new to this process, or made anew), the second puts
them back (adding one already there does nothing) and, when one was missing,
says so and calls *after_restore*.

Unfinished removals. DeleteEndpoint only marks an endpoint's port for deletion
and deletes it in the background; each pass (the first one right at start)
deletes marked ports still there, e.g. after the driver was killed in between.

A pass runs every `Reconciler.interval` seconds (the next starts only after
the previous one ended); its failures are logged and the next pass tries
again.
"""

import ipaddress
import json
import os
import time

import attr
from twisted.application import service
from twisted.internet import base, defer
from twisted.logger import Logger

from ovsdriver.deferreds import call_hook, follow
from ovsdriver.metrics import NO_METRICS
from ovsdriver.netlink import LinkError
from ovsdriver.sandboxes import INVISIBLE, MISSING, MOUNTED, MountViews
from ovsdriver.vswitch import gateway_ifname, veth_host_name

log = Logger()

#: The prefix of the veth host ends the driver makes.
VETH_PREFIX = veth_host_name("")
#: Where the engine keeps its sandboxes unless its exec root is elsewhere.
SANDBOX_DIRECTORY = "/var/run/docker/netns"
#: What `Reconciler._safely` returns when the action failed.
FAILED = object()


# What `judge` concludes about a sandbox.
ALIVE = "alive"
GONE = "gone"
UNKNOWN = "unknown"


@attr.s(frozen=True, slots=True)
class Seen:
    """Where a sandbox was seen mounted: a mount view and its network
    namespace; when (seconds since boot) and in which boot."""

    sandbox = attr.ib()
    view = attr.ib(converter=lambda v: tuple(v) if isinstance(v, list) else v)
    netns = attr.ib()
    since = attr.ib(default=None, eq=False)
    boot = attr.ib(default=None, eq=False)

    def to_text(self):
        record = attr.asdict(self)
        return json.dumps(record, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_text(cls, text, sandbox):
        """The record in *text* if it is about *sandbox*, else None (also for
        a value that cannot be read: then there is simply no evidence)."""
        try:
            record = json.loads(text)
            seen = cls(
                record["sandbox"],
                record["view"],
                record["netns"],
                float(record["since"]) if record.get("since") is not None else None,
                record.get("boot"),
            )
            hash(seen)
        except (TypeError, ValueError, KeyError, AttributeError):
            return None
        return seen if seen.sandbox == sandbox else None


@attr.s(frozen=True, slots=True)
class Verdict:
    kind = attr.ib()  # ALIVE, GONE or UNKNOWN
    reason = attr.ib(default=None)  # why GONE or UNKNOWN, a sentence part
    seen = attr.ib(default=None)  # a new `Seen` to record, when ALIVE
    path = attr.ib(default=None)  # opens the sandbox's namespace, when ALIVE and mounted


def judge(sandbox, sighting, seen, observation, moved_in=False, moved_back=False):
    """A `Verdict` on *sandbox* from its `Sighting`, where it was `Seen`
    mounted before (or None) and the whole `Observation`; *moved_in*: the
    endpoint's interface has left the driver's namespace; *moved_back*: it is
    in the driver's namespace with the MAC the engine gives it in the sandbox.

    Once seen, the view that showed it mounted decides: other views may hold
    private copies of the mount, which outlive the engine's. A sandbox not
    seen yet is alive as soon as any view has it mounted; the driver's own
    view, else the longest-lived one, becomes its witness.
    """
    if seen is not None and seen.boot not in (None, observation.boot):
        seen = None  # the host restarted: that view and namespace are no more
        restarted = True
    else:
        restarted = False
    there = sighting.probes.get(seen.view) if seen is not None else None
    if there is not None and there.kind != INVISIBLE:
        if there.kind == MOUNTED:
            if there.netns == seen.netns:
                return Verdict(ALIVE, path=sighting.path_in(seen.view))
            return _witnessed(sandbox, sighting, seen.view, observation)
        started = observation.held.get(seen.netns)
        if started is not None and (seen.since is None or started <= seen.since):
            # Unmounted, yet a process that was there when the sandbox was
            # seen is in its namespace (a newer one may have its number).
            return Verdict(ALIVE)
        if there.kind == MISSING:
            return Verdict(GONE, f"its container's sandbox {sandbox} was deleted")
        return Verdict(GONE, f"its container's sandbox {sandbox} was torn down")
    mounted = sighting.mounted_in()
    if mounted:
        oldest = min(mounted, key=lambda view: observation.views.get(view, float("inf")))
        witness = observation.own_view if observation.own_view in mounted else oldest
        return _witnessed(sandbox, sighting, witness, observation)
    if restarted:
        return Verdict(GONE, f"the host restarted since its sandbox {sandbox} was seen")
    if moved_in and _deleted(sandbox, sighting, observation):
        return Verdict(
            GONE,
            f"its interface was moved into sandbox {sandbox}, which the engine has deleted",
        )
    if moved_back:
        return Verdict(
            GONE,
            f"the engine moved its interface back out of sandbox {sandbox} (it has the "
            "MAC the engine gave it there), which is mounted nowhere",
        )
    if seen is not None:
        return Verdict(
            UNKNOWN,
            f"the mount namespace in which its sandbox {sandbox} was seen mounted "
            f"({_describe_view(seen.view)}) is gone or out of the driver's sight",
        )
    own = sighting.probes[observation.own_view].kind
    if own == INVISIBLE:
        return Verdict(
            UNKNOWN,
            f"the directory of its sandbox {sandbox} does not exist for the driver; "
            "run the driver where it sees the engine's sandboxes (on the host, or "
            "with the directory bind-mounted with rslave propagation)",
        )
    if own == MISSING:
        return Verdict(UNKNOWN, f"its sandbox {sandbox} does not exist (yet)")
    return Verdict(
        UNKNOWN,
        f"its sandbox {sandbox} is mounted in no mount namespace the driver can see "
        "and it was never seen mounted",
    )


def _moved_in(endpoint, links):
    """Whether the endpoint's interface has left the driver's namespace in
    *links*. A veth's exists from CreateEndpoint on (the driver makes it); an
    internal port's only once ovs-vswitchd has made the port, which may take
    seconds (while it reconnects to OVSDB, say)."""
    made = endpoint.made or endpoint.port_type == "veth"
    return made and endpoint.ifname not in links


def _deleted(sandbox, sighting, observation):
    """Whether the driver's own view shows the sandbox's file deleted from a
    directory in which it sees the engine's sandboxes now: another sandbox
    there is mounted in its view. (A directory of its own, such as a copy,
    holds no live mounts; a missing file there says nothing.)"""
    if sighting.probes[observation.own_view].kind != MISSING:
        return False
    directory = os.path.dirname(sandbox)
    return any(
        other.probes[observation.own_view].kind == MOUNTED
        for path, other in observation.sightings.items()
        if path != sandbox and os.path.dirname(path) == directory
    )


def _witnessed(sandbox, sighting, view, observation):
    netns = sighting.probes[view].netns
    seen = Seen(sandbox, view, netns, observation.now, observation.boot)
    return Verdict(ALIVE, seen=seen, path=sighting.path_in(view))


def _describe_view(view):
    if isinstance(view, tuple) and len(view) == 3:
        return f"mnt:[{view[0]}], root {view[1]}:{view[2]}"
    return str(view)


def _link_local(address):
    """An IPv6 link-local address: the kernel makes a new one for the new link."""
    return address.version == 6 and address.is_link_local


class Reconciler(service.Service):
    """Periodic orphan collection and post-restart repair of endpoints.

    *vswitch* and *netlink* are the driver's ports; *views* observes the
    sandboxes (`ovsdriver.sandboxes.MountViews` unless given); *clock* gives
    monotonic seconds. *after_collect*, if given, is called (and may return a
    Deferred) after a pass collected endpoints that had published ports, e.g.
    to drop their firewall rules; *after_restore*, with the interface's name,
    after gateway addresses were put back on an interface made anew.
    """

    metrics = NO_METRICS

    def __init__(
        self,
        reactor,
        vswitch,
        netlink,
        views=None,
        interval=2.0,
        unjoined_grace=20.0,
        clock=time.monotonic,
        after_collect=None,
        after_restore=None,
        look_timeout=30.0,
        watch_interval=0.25,
    ):
        self.reactor = reactor
        self.vswitch = vswitch
        self.netlink = netlink
        self.views = views if views is not None else MountViews(reactor)
        self.interval = interval
        self.unjoined_grace = unjoined_grace
        self.look_timeout = look_timeout
        self.watch_interval = watch_interval
        self._watched = {}  # (endpoint id, sandbox) -> Endpoint: joined, not seen mounted yet
        self._watch = None  # the timer or look of the quick watch
        self.clock = clock
        self.after_collect = after_collect
        self.after_restore = after_restore
        self._gateways = {}  # gateway interface -> (its index, whether its addresses are on)
        self._timer = None
        self._pass = None
        self._unjoined = {}  # endpoint id -> when this process first saw it unjoined
        self._searched = {}  # endpoint id -> when its sandbox was last looked for
        self._upgraded = False  # whether older drivers' Interface macs are cleared
        self._joined = {}  # (endpoint id, sandbox) -> when this process first saw the Join
        self._seen = {}  # (endpoint id, sandbox) -> Seen
        self._suspects = {}  # endpoint id -> why the previous pass found it orphaned
        self._stray = {}  # name of a veth host end nobody owns -> first seen
        self._complaints = {}  # endpoint id, link name... -> the last problem logged

    # -- the service ---------------------------------------------------------

    def startService(self):
        super().startService()
        self._schedule(0)

    def stopService(self):
        """Stop; the Deferred fires once a pass in progress has ended."""
        super().stopService()
        for timer in (self._timer, self._watch):
            if isinstance(timer, base.DelayedCall) and timer.active():
                timer.cancel()
        self._timer = None
        return None if self._pass is None else follow(self._pass)

    def _schedule(self, delay):
        self._timer = self.reactor.callLater(delay, self._start_pass)

    async def recheck(self):
        """Run two passes now, one right after the other (an orphan is
        collected once two passes in a row find it), rather than in the next
        few seconds."""
        for _ in range(2):
            while self._pass is not None:
                await follow(self._pass)
            if not self.running:
                return
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._start_pass()
        while self._pass is not None:
            await follow(self._pass)

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
        """One pass: finish removals, collect orphans, repair broken endpoints,
        delete stray veths."""
        await self._finish_removals()
        if self.running and not self._upgraded:
            await self._upgrade()
        if not self.running:
            return  # stopping: OVSDB may be gone, don't wait for it
        endpoints = await self.vswitch.endpoints()
        self._forget_all_but(endpoints)
        joined = [ep for ep in endpoints if ep.sandbox]
        observation = None
        if joined:
            observation = await self._look({ep.sandbox for ep in joined})
        # After the look: a starting container's interface read in the host
        # before its sandbox showed up mounted looks like a tap ovs-vswitchd
        # made anew, and its sandbox would be searched for a dead copy.
        links = await self.netlink.links()
        await self._restore_gateways(links)
        now = self.clock()
        self._complain("pass", None)
        returned = await self._moved_back(endpoints, links, observation)
        orphans, broken, seen, taken = self._classify(endpoints, links, observation, now, returned)
        for endpoint in taken:
            if self.running:
                await self._find_sandbox(endpoint, endpoints, now)
        for endpoint, record in seen:
            await self._safely(
                (endpoint.endpoint_id, "record"),
                f"cannot record where the sandbox of endpoint {endpoint.endpoint_id[:12]} is",
                lambda ep=endpoint, r=record: self.vswitch.set_sandbox_seen(
                    ep.endpoint_id, ep.sandbox, r.to_text()
                ),
            )
        collected = []
        for endpoint, reason in orphans:
            if not self.running:
                return
            if await self._collect(endpoint, reason):
                collected.append(endpoint)
        for endpoint, path in broken:
            if not self.running:
                return
            await self._repair(endpoint, path)
        await self._delete_stray_veths(endpoints, links, now)
        if self.after_collect is not None and any(ep.published for ep in collected):
            await self._safely(
                "firewall",
                "cannot update the firewall",
                lambda: call_hook(self.after_collect),
            )

    async def _look(self, sandboxes):
        """The views' `Observation` of *sandboxes*, within `look_timeout` seconds."""
        looking = self.views.observe(sandboxes)
        looking.addTimeout(self.look_timeout, self.reactor)
        try:
            return await looking
        except defer.TimeoutError:
            raise RuntimeError(
                f"looking at the sandboxes took longer than {self.look_timeout:g} s "
                "(a hung file system?); no port is removed meanwhile"
            ) from None

    def _forget_all_but(self, endpoints):
        ids = {ep.endpoint_id for ep in endpoints}
        joins = {(ep.endpoint_id, ep.sandbox) for ep in endpoints if ep.sandbox}
        for table in (self._unjoined, self._searched):
            for gone in set(table) - ids:
                del table[gone]
        for table in (self._joined, self._seen, self._watched):
            for gone in set(table) - joins:
                del table[gone]
        for key in list(self._complaints):
            if isinstance(key, tuple) and key[0] not in ids:  # about an endpoint
                del self._complaints[key]

    def _seen_of(self, endpoint):
        """Where the endpoint's sandbox was seen mounted: by this process, or
        as recorded in OVSDB (by this process or an earlier one), or None."""
        key = (endpoint.endpoint_id, endpoint.sandbox)
        if key not in self._seen and endpoint.sandbox_seen:
            recorded = Seen.from_text(endpoint.sandbox_seen, endpoint.sandbox)
            if recorded is not None:
                self._seen[key] = recorded
        return self._seen.get(key)

    async def _moved_back(self, endpoints, links, observation):
        """Ids of the joined endpoints whose interface the engine has moved
        back out of a sandbox that is mounted nowhere: the interface is in
        the driver's namespace again, with the MAC the engine gave it in the
        sandbox (a port or veth end is made with another one; the engine
        moves it back as it tears the sandbox down, before Leave)."""
        returned = set()
        for ep in endpoints:
            if (
                not ep.sandbox
                or not ep.mac
                or ep.ifname not in links
                or observation.sightings[ep.sandbox].mounted_in()
            ):
                continue
            mac = await self._safely(
                (ep.endpoint_id, "mac"),
                f"cannot read the MAC of {ep.ifname}",
                lambda ep=ep: self.netlink.link_mac(ep.ifname),
            )
            if mac == ep.mac.lower():
                returned.add(ep.endpoint_id)
        return returned

    def _classify(self, endpoints, links, observation, now, returned):
        """(orphans confirmed by two passes, with why; (endpoint, sandbox path)
        to repair; (endpoint, `Seen`) to record; unjoined endpoints whose
        interface a container took). *returned*: the ids of endpoints whose
        interface the engine moved back (`_moved_back`)."""
        suspects, orphans, broken, seen, taken = {}, [], [], [], []
        for ep in endpoints:
            reason = None
            if ep.sandbox is None:
                since = self._unjoined.setdefault(ep.endpoint_id, now)
                if now - since < self.unjoined_grace:
                    pass
                elif ep.port_type == "veth" and ep.port not in links:
                    reason = "its veth pair is gone (with its container's namespace)"
                elif not _moved_in(ep, links):
                    reason = f"not joined to any container for {now - since:.0f} s"
                else:
                    taken.append(ep)
            else:
                self._unjoined.pop(ep.endpoint_id, None)
                reason = self._judge_joined(ep, links, observation, now, broken, seen, returned)
            if reason is None:
                continue
            suspects[ep.endpoint_id] = reason
            if ep.endpoint_id in self._suspects:
                orphans.append((ep, reason))
        self._suspects = suspects
        return orphans, broken, seen, taken

    def _judge_joined(self, ep, links, observation, now, broken, seen, returned):
        """Why the joined *ep* is an orphan, or None; fills *broken* and *seen*."""
        key = (ep.endpoint_id, ep.sandbox)
        joined = self._joined.setdefault(key, now)
        verdict = judge(
            ep.sandbox,
            observation.sightings[ep.sandbox],
            self._seen_of(ep),
            observation,
            moved_in=_moved_in(ep, links),
            moved_back=ep.endpoint_id in returned,
        )
        if verdict.kind == GONE:
            return verdict.reason
        self._watched.pop(key, None)
        if verdict.kind == ALIVE:
            self._complain((ep.endpoint_id, "evidence"), None)
            if verdict.seen is not None:
                self._seen[key] = verdict.seen
                seen.append((ep, verdict.seen))
            if verdict.path and ep.port_type == "internal" and ep.ifname in links:
                broken.append((ep, verdict.path))
            return None
        if self._seen_of(ep) is None and now - joined < self.unjoined_grace:
            self._watch_for(key, ep)
        if now - joined >= self.unjoined_grace:
            # Quiet while a container is starting; then say it once.
            self._complain(
                (ep.endpoint_id, "evidence"),
                f"keeping the port of endpoint {ep.endpoint_id[:12]}: {verdict.reason}, "
                "so there is no evidence that its container is gone",
            )
        return None

    # -- the quick watch over starting containers ----------------------------------

    def watch_join(self, endpoint):
        """Join was just answered: watch for the sandbox at once, not from the
        next pass, so that a driver killed right after its container started
        has still recorded where it ran."""
        key = (endpoint.endpoint_id, endpoint.sandbox)
        if endpoint.sandbox and key not in self._seen:
            self._joined.setdefault(key, self.clock())
            self._watch_for(key, endpoint)

    def _watch_for(self, key, endpoint):
        """Look for a starting container's sandbox every `watch_interval`
        seconds in the driver's own view (cheap), so that where it is mounted
        gets recorded even if the driver dies right after the start: it is
        the evidence a restarted driver needs once the container is gone."""
        self._watched[key] = endpoint
        if self._watch is None and self.running:
            self._watch = self.reactor.callLater(self.watch_interval, self._glance)

    def _glance(self):
        watched = dict(self._watched)
        looking = self.views.observe({ep.sandbox for ep in watched.values()}, own_only=True)
        looking.addCallback(lambda seen: defer.ensureDeferred(self._glanced(seen, watched)))
        self._watch = looking
        looking.addErrback(lambda failure: None)  # the next pass looks again
        looking.addBoth(self._glance_ended)

    async def _glanced(self, observation, watched):
        for key, ep in watched.items():
            if key not in self._watched or key in self._seen:
                continue
            verdict = judge(ep.sandbox, observation.sightings[ep.sandbox], None, observation)
            if verdict.seen is not None and verdict.seen.view == observation.own_view:
                del self._watched[key]
                self._seen[key] = verdict.seen
                await self._safely(
                    (ep.endpoint_id, "record"),
                    f"cannot record where the sandbox of endpoint {ep.endpoint_id[:12]} is",
                    lambda ep=ep, seen=verdict.seen: self.vswitch.set_sandbox_seen(
                        ep.endpoint_id, ep.sandbox, seen.to_text()
                    ),
                )

    def _glance_ended(self, _):
        self._watch = None
        if self._watched and self.running:
            self._watch = self.reactor.callLater(self.watch_interval, self._glance)

    async def _find_sandbox(self, endpoint, endpoints, now):
        """Record the sandbox that holds the interface of *endpoint*, which
        has no sandbox recorded (its Join's record was lost); looked for once
        per grace period."""
        key = endpoint.endpoint_id
        if now - self._searched.get(key, -self.unjoined_grace) < self.unjoined_grace:
            return
        self._searched[key] = now
        directories = {os.path.dirname(ep.sandbox) for ep in endpoints if ep.sandbox}
        directories.add(SANDBOX_DIRECTORY)
        found = await self._safely(
            (key, "find"),
            f"cannot look for the sandbox of endpoint {key[:12]}",
            lambda: self._holder(endpoint, directories),
        )
        if found is FAILED:
            return
        if found is None:
            self._complain(
                (key, "evidence"),
                f"keeping the port of endpoint {key[:12]}: no sandbox is recorded, yet its "
                f"interface {endpoint.ifname} has left the driver's namespace, so a container "
                "may hold it (none mounted where the driver looks does)",
            )
            return
        recorded = await self._safely(
            (key, "record"),
            f"cannot record the sandbox of endpoint {key[:12]}",
            lambda: self.vswitch.set_sandbox(key, found),
        )
        if recorded is not FAILED:
            self._complain((key, "evidence"), None)
            log.info(
                "endpoint {endpoint} had no sandbox recorded; its interface is in {sandbox}, "
                "now recorded",
                endpoint=key[:12],
                sandbox=found,
            )

    async def _holder(self, endpoint, directories):
        """The mounted sandbox in *directories* with the endpoint's link (its
        MAC and, when it has any, one of its addresses), or None."""
        mac = (endpoint.mac or "").lower()
        addresses = {ipaddress.ip_interface(a) for a in (endpoint.ipv4, endpoint.ipv6) if a}

        def is_its(link):
            found = {ipaddress.ip_interface(a) for a in link.addresses}
            return link.mac == mac and (not addresses or addresses & found)

        for path in await self.views.mounted_in(sorted(directories)):
            try:
                links = await self.netlink.sandbox_links(path)
            except LinkError:
                continue  # torn down meanwhile
            if any(is_its(link) for link in links):
                return path
        return None

    async def _upgrade(self):
        """Clear the Interface mac older drivers set (until that worked once)."""
        doing = "cannot clear the Interface mac older drivers set on endpoint ports"
        cleared = await self._safely("macs", doing, self.vswitch.forget_port_macs)
        self._upgraded = cleared is not FAILED

    async def _restore_gateways(self, links):
        """Put the gateway addresses back on interfaces made anew."""
        networks = await self._safely("networks", "cannot read the networks", self.vswitch.networks)
        if networks is FAILED:
            return
        wanted = {gateway_ifname(n): n for n in networks.values() if n.gateways}
        for gone in set(self._gateways) - set(wanted):
            del self._gateways[gone]
        for ifname, network in wanted.items():
            index = links.get(ifname)
            if index is None or self._gateways.get(ifname) == (index, True) or not self.running:
                continue
            if self._gateways.get(ifname) != (index, False):
                # New to this pass: wait for the next one (CreateNetwork may
                # be putting the addresses on right now).
                self._gateways[ifname] = (index, False)
                continue
            added = await self._safely(
                "gateway " + ifname,
                f"cannot put the gateway addresses of network {network.network_id[:12]} "
                f"back on {ifname}",
                lambda n=network, i=ifname: self._put_gateway_back(n, i),
            )
            if added is FAILED:
                continue
            self._gateways[ifname] = (index, True)
            if added:
                log.info(
                    "put the gateway address(es) {added} of network {network} back on "
                    "{ifname}, made anew (a reboot or an ovs-vswitchd restart)",
                    added=", ".join(added),
                    network=network.network_id[:12],
                    ifname=ifname,
                )
                if self.after_restore is not None:
                    await self._safely(
                        "restored " + ifname,
                        f"cannot finish restoring {ifname}",
                        lambda i=ifname: call_hook(self.after_restore, i),
                    )

    async def _put_gateway_back(self, network, ifname):
        """Add *network*'s gateway addresses to *ifname*; a network deleted
        meanwhile (its bridge with it) has none to put back."""
        try:
            return await self.netlink.add_addresses(ifname, list(network.gateways))
        except LinkError:
            if network.network_id in await self.vswitch.networks():
                raise
            return []

    async def _finish_removals(self):
        """Delete the ports DeleteEndpoint marked and that are still there."""
        doing = "cannot delete the ports of removed endpoints"
        removed = await self._safely("removals", doing, self.vswitch.finish_removals)
        for name, veth in removed if removed is not FAILED else ():
            if veth and self.running:
                await self._safely(
                    name, f"cannot delete {name}", lambda name=name: self.netlink.delete_link(name)
                )

    async def _collect(self, endpoint, reason):
        async def remove():
            await self.vswitch.remove_endpoint(endpoint.endpoint_id)
            if endpoint.port_type == "veth":
                await self.netlink.delete_link(endpoint.port)

        doing = f"cannot remove orphan endpoint {endpoint.endpoint_id[:12]}"
        if await self._safely((endpoint.endpoint_id, "collect"), doing, remove) is FAILED:
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

    # -- repair ----------------------------------------------------------------

    async def _repair(self, endpoint, path):
        doing = f"cannot repair endpoint {endpoint.endpoint_id[:12]}"
        name = await self._safely(
            (endpoint.endpoint_id, "repair"), doing, lambda: self._repair_if_there(endpoint, path)
        )
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

    async def _repair_if_there(self, endpoint, path):
        """`repair`; a sandbox torn down meanwhile (its container is going)
        has nothing to repair: the next pass sees to it."""
        try:
            return await self.repair(endpoint, path)
        except Exception:
            if not await self._torn_down(endpoint.sandbox):
                raise
            return None

    async def _torn_down(self, sandbox):
        """Whether *sandbox* is mounted in no view any more (False when a
        look cannot tell)."""
        try:
            observation = await self.views.observe([sandbox])
        except Exception:
            return False
        return not observation.sightings[sandbox].mounted_in()

    async def repair(self, endpoint, path):
        """Put the endpoint's fresh link (in the driver's namespace) in the
        place of its dead copy in the sandbox at *path*.

        Returns the name it now has there, or None when the sandbox holds no
        dead copy (the engine has not moved a new endpoint's link in yet).
        Fails with LinkError; one that names addresses or routes means the
        link itself is back.
        """
        netlink = self.netlink
        mac = (endpoint.mac or "").lower()
        dead = next(
            (
                link
                for link in await netlink.sandbox_links(path)
                if link.mac == mac and not link.carrier and link.name != endpoint.ifname
            ),
            None,
        )
        if dead is None:
            return None
        await netlink.move_link_to_netns(endpoint.ifname, path)
        await netlink.delete_link_in(path, dead.index)
        fresh = next(
            (link for link in await netlink.sandbox_links(path) if link.name == endpoint.ifname),
            None,
        )
        if fresh is None:
            raise LinkError(
                f"cannot repair {endpoint.ifname} in sandbox {endpoint.sandbox}: "
                "it vanished after it was moved in"
            )
        mtu = int(endpoint.mtu or dead.mtu)
        await netlink.set_link_in(path, fresh.index, name=dead.name, mac=mac, mtu=mtu)
        await netlink.set_link_in(path, fresh.index, up=True)
        wanted = [a for a in map(ipaddress.ip_interface, dead.addresses) if not _link_local(a)]
        wanted += [
            a
            for a in map(ipaddress.ip_interface, filter(None, (endpoint.ipv4, endpoint.ipv6)))
            if a not in wanted
        ]
        failures = []
        for address in wanted:
            try:
                await netlink.add_address_in(path, fresh.index, str(address))
            except LinkError as e:
                failures.append(str(e))
        for route in dead.routes:
            try:
                await netlink.add_route_in(path, fresh.index, route)
            except LinkError as e:
                failures.append(str(e))
        if failures:
            raise LinkError(
                f"{endpoint.ifname} is back in sandbox {endpoint.sandbox} as {dead.name}, "
                "but not all of it: " + "; ".join(failures)
            )
        return dead.name

    # -- stray veths -------------------------------------------------------------

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
