"""What the kernel shows of the engine's sandboxes, in every mount view.

A sandbox (Join's SandboxKey) is a file on which the engine bind-mounts a
container's network namespace. Whether it is mounted depends on whose mount
namespace looks: a driver run in a container with a plain ``-v`` of the netns
directory keeps a private, aging copy of the engine's mounts (old sandboxes
stay mounted there, new ones are plain files). So the driver does not trust
its own view alone: `MountViews.observe` looks at a sandbox through the
driver's own mount namespace and, when it is not mounted there, through
every other mount namespace a process on the host is in
(``/proc/PID/root/...`` resolves a path in that process's mount namespace).
It also says which network namespaces live processes are in, and which
views exist at all.

This module only observes; `ovsdriver.reconcile` decides what the
observations mean. All of it reads ``/proc`` and so runs on a worker thread.
"""

import os
import time

import attr
from twisted.internet import defer, threads

# What a `Probe` finds at a sandbox's path in one mount view.
MOUNTED = "mounted"  # a network namespace is mounted there
PLAIN = "unmounted"  # a plain file: nothing mounted on it (now, in that view)
MISSING = "missing"  # no file, but its directory is there
INVISIBLE = "invisible"  # not even the directory: this view cannot judge


@attr.s(frozen=True, slots=True)
class Probe:
    """What one mount view shows at one sandbox path."""

    kind = attr.ib()  # MOUNTED, PLAIN, MISSING or INVISIBLE
    netns = attr.ib(default=None)  # the network namespace's inode, when MOUNTED


@attr.s(frozen=True, slots=True)
class Sighting:
    """One sandbox as the mount views the driver can see show it.

    *probes* maps a view (see `view_of`) to the `Probe` there; the driver's
    own view is always in it, the others (every view a live process has) only
    when the sandbox is not mounted in the driver's own view. *roots* maps
    those other views to a root through which paths resolve in them
    (``/proc/PID/root``).
    """

    sandbox = attr.ib()
    probes = attr.ib(converter=dict)
    roots = attr.ib(factory=dict, converter=dict)

    def mounted_in(self):
        """The views that have it mounted."""
        return [view for view, probe in self.probes.items() if probe.kind == MOUNTED]

    def path_in(self, view):
        """A path that opens the sandbox as *view* has it."""
        return self.roots.get(view, "") + self.sandbox


@attr.s(frozen=True, slots=True)
class Observation:
    """What `MountViews.observe` saw in one look."""

    own_view = attr.ib()  # the driver's view
    sightings = attr.ib(converter=dict)  # sandbox path -> Sighting
    #: every view a live process has -> when the oldest such process started
    #: (seconds since boot; the driver's own view: 0); like *held*, only
    #: filled when a sandbox is not mounted in the driver's own view
    views = attr.ib(converter=dict)
    #: network namespace a live process is in -> when the oldest such process
    #: started (seconds since boot; inode numbers are reused, start times tell
    #: an old namespace from a new one with the same number)
    held = attr.ib(converter=dict)
    now = attr.ib(default=0.0)  # seconds since boot, when the look was taken
    boot = attr.ib(default=None)  # the kernel's boot id


def _nsfs_device():
    """The device of the namespace file system, which every mounted namespace shows."""
    return os.stat("/proc/self/ns/net").st_dev


def probe(path, nsfs_device=None):
    """The `Probe` of *path* in the calling process's mount namespace (or, for
    a ``/proc/PID/root/...`` path, in that process's)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return Probe(MISSING if os.path.isdir(os.path.dirname(path)) else INVISIBLE)
    except OSError:
        return Probe(INVISIBLE)
    if found.st_dev == (nsfs_device or _nsfs_device()):
        return Probe(MOUNTED, found.st_ino)
    return Probe(PLAIN)


def view_of(pid="self"):
    """A process's view of the file system: (mount namespace inode, root
    directory device, root directory inode), or None once it is gone.

    Two processes in one mount namespace can still see different trees (a
    chroot), so the root is part of the view.
    """
    try:
        mnt = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        root = os.stat(f"/proc/{pid}/root")
    except OSError:
        return None
    return (mnt, root.st_dev, root.st_ino)


def _net_of(pid):
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


_TICKS = os.sysconf("SC_CLK_TCK")


def _started(pid):
    """When the process started, in seconds since boot, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return int(stat[stat.rindex(b")") + 2 :].split()[19]) / _TICKS


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _scan():
    """(view -> its oldest process, view -> when that one started, network
    namespace -> when its oldest process started) over every live process."""
    viewers, ages, held = {}, {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        view, net, started = view_of(name), _net_of(name), _started(name)
        if started is None:
            continue
        if view is not None and started < ages.get(view, float("inf")):
            viewers[view], ages[view] = name, started
        if net is not None:
            held[net] = min(started, held.get(net, started))
    return viewers, ages, held


def observe(paths, own_only=False):
    """An `Observation` of the sandbox *paths* (with *own_only*, in the
    driver's own view only).

    The other views and the processes are only looked at when a sandbox is not
    mounted in the driver's own view (or no path is given): that is the common
    case of a driver on the host, and it costs one ``stat`` per sandbox.
    Blocking (reads /proc): call it on a worker thread.
    """
    nsfs = _nsfs_device()
    own = view_of()
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    mine = {path: probe(path, nsfs) for path in paths}
    if own_only or (mine and all(found.kind == MOUNTED for found in mine.values())):
        viewers, ages, held = {}, {}, {}
    else:
        viewers, ages, held = _scan()
    viewers.pop(own, None)
    ages[own] = 0.0  # the driver's own view counts as the oldest
    sightings = {}
    for path in paths:
        probes = {own: mine[path]}
        if probes[own].kind != MOUNTED and os.path.isabs(path):
            for view, pid in viewers.items():
                there = probe(f"/proc/{pid}/root{path}", nsfs)
                if view_of(pid) != view:
                    continue  # the process ended or moved meanwhile: it says nothing
                probes[view] = there
        roots = {view: f"/proc/{viewers[view]}/root" for view in probes if view != own}
        sightings[path] = Sighting(path, probes, roots)
    return Observation(own, sightings, ages, held, now, _boot_id())


def mounted_in(directories):
    """The files in *directories* on which a network namespace is mounted in
    the driver's own view, sorted. Blocking (reads the directories)."""
    nsfs = _nsfs_device()
    found = []
    for directory in sorted(set(directories)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        paths = (os.path.join(directory, name) for name in names)
        found += sorted(path for path in paths if probe(path, nsfs).kind == MOUNTED)
    return found


class MountViews:
    """The real observer: `observe` on the reactor's thread pool, one look at
    a time (a look that hangs, say on a dead network file system in some
    process's root, must not take thread after thread with it)."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._looking = set()  # own_only of the looks under way

    def observe(self, paths, own_only=False):
        """Deferred[Observation] of the sandbox *paths* (see `observe`); fails
        at once while an earlier look has not ended."""
        if own_only in self._looking:
            return defer.fail(
                RuntimeError(
                    "an earlier look at the sandboxes has not ended (a hung file system "
                    "under some process's root?); no port is removed meanwhile"
                )
            )
        self._looking.add(own_only)

        def look():
            try:
                return observe(sorted(set(paths)), own_only)
            finally:  # also when the caller gave up waiting
                self._reactor.callFromThread(self._looking.discard, own_only)

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), look)

    def mounted_in(self, directories):
        """Deferred: `mounted_in` on the reactor's thread pool."""
        pool = self._reactor.getThreadPool()
        return threads.deferToThreadPool(self._reactor, pool, mounted_in, directories)
