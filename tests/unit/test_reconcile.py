"""The reconciler on fakes and a fake clock: which endpoints it collects, which
it repairs after an ovs-vswitchd restart, and which it must never touch.

The sandboxes are in a `FakeMountViews`: the driver's own mount view and the
engine's (``ENGINE``), which the scenes make agree, or not (a driver with a
private, aging copy of the engine's mounts). What is inside them is in the
`FakeNetlink`. Time is a `Clock`, which the fakes' answers wait for too.
"""

import attr
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger

from ovsdriver import reconcile
from ovsdriver.netlink import LinkError
from ovsdriver.reconcile import Reconciler, Seen
from ovsdriver.testing import FakeMountViews, FakeNetlink, FakeVSwitch
from ovsdriver.values import Endpoint, Network, PublishedPort, Subnet

NET = "a1" * 32
EP_1 = "e1" * 32
EP_2 = "f2" * 32
MAC = "02:00:5e:00:00:01"
MAC_2 = "02:00:5e:00:00:02"
INTERVAL = 2.0
GRACE = 20.0
NETNS_DIR = "/run/docker/netns"
ENGINE = "engine"
OWN = FakeMountViews.OWN


class Scene:
    """A driver's world in memory: OVSDB, kernel, mount views, clock, reconciler."""

    def __init__(self, port_type="internal", shared_view=True):
        self.clock = Clock()
        self.clock.advance(1_000)  # a monotonic clock's seconds
        self.kernel = FakeNetlink(clock=self.clock)
        self.vswitch = FakeVSwitch(kernel=self.kernel)
        self.views = FakeMountViews(clock=self.clock)
        self.views.add_view(ENGINE, started=1.0)  # dockerd: there since boot
        self.views.add_dir(NETNS_DIR)
        #: Whether the driver's mount view follows the engine's (a host
        #: service) or is a private copy (a plain -v bind in a container).
        self.shared_view = shared_view
        self._netns = iter(range(4026532000, 4026533000))
        self.network = Network(
            network_id=NET,
            bridge="obr-" + NET[:11],
            port_type=port_type,
            ipv4=[Subnet("10.9.0.0/24", "10.9.0.1/24")],
        )
        self.vswitch.add_network(self.network)
        self.collected_firewall = []
        self.events = []
        self.reconciler = self.new_reconciler()

    def new_reconciler(self):
        return Reconciler(
            self.clock,
            self.vswitch,
            self.kernel,
            views=self.views,
            interval=INTERVAL,
            unjoined_grace=GRACE,
            clock=self.clock.seconds,
            after_collect=lambda: self.collected_firewall.append(True),
        )

    def _views(self):
        return None if self.shared_view else [ENGINE]

    def settle(self):
        self.clock.advance(0)

    # -- building the world ----------------------------------------------------

    def endpoint(self, endpoint_id=EP_1, mac=MAC, **fields):
        """CreateEndpoint (an hour ago by the wall clock: it must not matter)."""
        port = ("oep-" if self.network.port_type == "internal" else "ove-") + endpoint_id[:11]
        ep = Endpoint(
            endpoint_id=endpoint_id,
            network_id=NET,
            bridge=self.network.bridge,
            port=port,
            ifname="oep-" + endpoint_id[:11],
            mac=mac,
            port_type=self.network.port_type,
            ipv4="10.9.0.2/24",
            created=1_700_000_000 - 3600,
            **fields,
        )
        if ep.port_type == "veth":
            self.kernel.create_veth(ep.port, ep.ifname, ep.mtu)
            self.settle()
        self.vswitch.add_endpoint(ep)  # OVS gives a tap a MAC of its own
        return ep

    def sandbox(self, name="sb1", views=None, directory=NETNS_DIR):
        """A sandbox the engine made and mounted (seen in the driver's view
        too when the views are shared); returns its path."""
        path = f"{directory}/{name}"
        netns = next(self._netns)
        self.views.mount(path, netns, views if views is not None else self._views())
        self.views.create(path)  # the file is in the shared directory anyway
        self.views.hold(netns)  # the container's processes are in it
        self.kernel.add_sandbox(path)
        self.netns_of = getattr(self, "netns_of", {})
        self.netns_of[path] = netns
        return path

    def join(self, ep, sandbox, move=True):
        """Join; with *move*, the engine also moves the link in as eth0 (and
        gives it the endpoint's MAC)."""
        self.vswitch.set_sandbox(ep.endpoint_id, sandbox)
        if move:
            self._move(ep, sandbox)

    def move_in(self, ep, sandbox):
        """The engine moves the link in as eth0 and gives it its MAC and
        address (no record)."""
        index = self._move(ep, sandbox)
        self.kernel.add_address_in(sandbox, index, ep.ipv4)
        self.settle()

    def _move(self, ep, sandbox):
        """The link moved in as eth0 with the endpoint's MAC: its index there."""
        self.kernel.move_to_sandbox(ep.ifname, sandbox, "eth0")
        index = self.kernel.sandbox_state(sandbox, "eth0").index
        self.kernel.set_link_in(sandbox, index, mac=ep.mac)
        self.settle()
        return index

    def stop_container(self, sandbox):
        """The container's processes end."""
        self.views.release(self.netns_of[sandbox])

    def tear_down(self, sandbox):
        """The engine tears the container's sandbox down (no call reaches us):
        it unmounts it in its view (and in views that follow it)."""
        self.stop_container(sandbox)
        self.views.unmount(sandbox, self._views())
        self.kernel.remove_sandbox(sandbox)

    def delete(self, sandbox):
        """The engine's next garbage collection deletes the file (which also
        detaches any private copy of its mount)."""
        self.tear_down(sandbox)
        self.views.delete(sandbox)

    def restart_vswitchd(self, ep, sandbox):
        """What an ovs-vswitchd restart does with the userspace datapath: the
        container keeps a dead copy, a fresh tap appears in the host."""
        self.kernel.remove_sandbox(sandbox)
        self.kernel.add_sandbox(sandbox)
        self.kernel.add_sandbox_link(sandbox, "eth0", ep.mac, addresses=[ep.ipv4], carrier=False)
        self.kernel.add_sandbox_route(sandbox, "default", "10.9.0.1", "eth0")
        self.kernel.add_sandbox_route(sandbox, "10.77.0.0/16", "10.9.0.1", "eth0")
        self.kernel.add_link(ep.ifname)

    # -- running ---------------------------------------------------------------

    def start(self):
        reconcile.log = Logger(observer=self.events.append)
        self.reconciler.startService()
        self.settle()  # the first pass

    def restart_driver(self):
        """A new driver process: nothing in memory, OVSDB as it was."""
        self.reconciler.stopService()
        self.settle()
        self.reconciler = self.new_reconciler()
        self.start()

    def run_for(self, seconds):
        """Let *seconds* pass, one interval at a time (a pass each)."""
        for _ in range(int(seconds / INTERVAL)):
            self.clock.advance(INTERVAL)

    def ports(self):
        return {ep.port for ep in self.vswitch.endpoints().result}

    def warnings(self):
        return [
            e["problem"]
            for e in self.events
            if e.get("log_level").name == "warn" and "problem" in e
        ]


@pytest.fixture
def scene():
    scene = Scene()
    yield scene
    scene.reconciler.stopService()
    reconcile.log = Logger()


@pytest.fixture
def private_scene():
    """A driver whose mount view is a private copy: it sees what was mounted
    when it started, never what the engine mounts or unmounts later."""
    scene = Scene(shared_view=False)
    yield scene
    scene.reconciler.stopService()
    reconcile.log = Logger()


# -- orphans: positive evidence ------------------------------------------------------


def test_an_endpoint_whose_sandbox_was_torn_down_is_collected_within_two_passes(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.tear_down(sandbox)
    scene.run_for(INTERVAL)
    assert ep.port in scene.ports(), "collected on the evidence of one pass"
    scene.run_for(INTERVAL)
    assert ep.port not in scene.ports()


def test_an_endpoint_whose_sandbox_was_deleted_is_collected(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.delete(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_where_a_sandbox_was_seen_is_recorded_so_a_restarted_driver_collects_it(scene):
    """The container is removed while the driver is down."""
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    recorded = scene.vswitch.endpoint(EP_1).result.sandbox_seen
    assert Seen.from_text(recorded, sandbox) == Seen(sandbox, OWN, scene.netns_of[sandbox])
    scene.reconciler.stopService()
    scene.tear_down(sandbox)
    scene.restart_driver()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_sandbox_mounted_just_before_the_driver_died_is_recorded_in_time(scene):
    """Joined, started, then the driver is killed within the pass interval and
    the container removed while it is down: where the sandbox was mounted is
    recorded by the quick watch over starting containers."""
    ep = scene.endpoint()
    path = f"{NETNS_DIR}/quick"
    scene.join(ep, path, move=False)
    scene.start()
    scene.clock.advance(0.3)
    assert scene.sandbox("quick") == path
    scene.clock.advance(0.5)
    scene.reconciler.stopService()
    scene.delete(path)
    scene.restart_driver()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_join_starts_the_quick_watch_at_once(scene):
    """The driver runs; a container joins and starts between two passes, and
    the driver is killed before the next pass: the watch Join started has
    recorded its sandbox, so once it is removed a restarted driver collects it."""
    scene.start()
    scene.clock.advance(0.1)
    ep = scene.endpoint()
    path = f"{NETNS_DIR}/between"
    scene.join(ep, path, move=False)
    scene.reconciler.watch_join(attr.evolve(ep, sandbox=path))
    scene.clock.advance(0.1)
    scene.sandbox("between")
    scene.clock.advance(0.5)  # well before the next pass
    scene.reconciler.stopService()
    scene.delete(path)
    scene.restart_driver()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_only_the_orphan_goes(scene):
    live = scene.endpoint(EP_1)
    scene.join(live, scene.sandbox("live"))
    orphan = scene.endpoint(EP_2, mac=MAC_2)
    sandbox = scene.sandbox("old")
    scene.join(orphan, sandbox, move=False)
    scene.start()
    scene.tear_down(sandbox)
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == {live.port}


# -- never a live container's port -------------------------------------------------


def test_an_endpoint_with_a_live_sandbox_is_never_touched(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.run_for(10 * GRACE)
    assert ep.port in scene.ports()
    assert scene.kernel.sandbox_state(sandbox, "eth0").mac == MAC
    assert scene.warnings() == []


def test_a_private_mount_view_cannot_make_a_new_sandbox_look_torn_down(private_scene):
    """Old sandboxes look mounted in the driver's copy, new ones are plain
    files there; the engine's view shows the truth."""
    scene = private_scene
    old = scene.endpoint(EP_1)
    old_sandbox = scene.sandbox("old", views=[OWN, ENGINE])  # mounted before the copy
    scene.join(old, old_sandbox)
    scene.start()
    new = scene.endpoint(EP_2, mac=MAC_2)
    new_sandbox = scene.sandbox("new")
    scene.join(new, new_sandbox)
    scene.run_for(10 * GRACE)
    assert scene.ports() == {old.port, new.port}
    assert scene.warnings() == []


def test_a_private_mount_view_alone_is_no_evidence(private_scene):
    """Without the engine's view in sight (the driver in its own PID
    namespace) a plain file may be a live sandbox: keep it, and say so once."""
    scene = private_scene
    scene.views.remove_view(ENGINE)
    ep = scene.endpoint()
    sandbox = scene.sandbox("new", views=[])  # the engine's mount: out of sight
    scene.join(ep, sandbox)
    scene.start()
    scene.run_for(10 * GRACE)
    assert ep.port in scene.ports()
    warnings = scene.warnings()
    assert len(warnings) == 1, warnings
    assert EP_1[:12] in warnings[0] and "never seen mounted" in warnings[0]


def test_a_sandbox_torn_down_in_the_engines_view_is_collected_despite_a_private_copy(
    private_scene,
):
    """The old sandbox stays mounted in the driver's copy until the engine
    deletes its file; the new one is judged in the engine's view."""
    scene = private_scene
    old = scene.endpoint(EP_1)
    old_sandbox = scene.sandbox("old", views=[OWN, ENGINE])
    scene.join(old, old_sandbox)
    new = scene.endpoint(EP_2, mac=MAC_2)
    new_sandbox = scene.sandbox("new")
    scene.join(new, new_sandbox)
    scene.start()
    scene.tear_down(new_sandbox)
    scene.tear_down(old_sandbox)
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == {old.port}, "the old one is still mounted in the driver's copy"
    scene.delete(old_sandbox)
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == set()


def test_a_private_copy_in_another_process_neither_keeps_nor_hides_a_sandbox(scene):
    """A process that made a mount namespace of its own while the sandbox was
    mounted (``unshare --mount``) keeps a copy of the mount after the engine
    unmounts it; the view that first showed the sandbox decides."""
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.views.add_view("copy")
    scene.views.mount(sandbox, scene.netns_of[sandbox], ["copy"])
    scene.tear_down(sandbox)
    scene.views.mount(sandbox, scene.netns_of[sandbox], ["copy"])  # private: it stays
    scene.run_for(INTERVAL)
    scene.views.remove_view("copy")  # that process ends
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_the_longest_lived_view_witnesses_a_sandbox_the_driver_cannot_see(private_scene):
    """Short-lived processes come and go with copies of the mounts; the
    engine's view is older."""
    scene = private_scene
    ep = scene.endpoint()
    scene.clock.advance(100)
    scene.views.add_view("transient")
    sandbox = scene.sandbox(views=[ENGINE, "transient"])
    scene.join(ep, sandbox)
    scene.start()
    scene.views.remove_view("transient")
    scene.run_for(10 * INTERVAL)
    assert ep.port in scene.ports()
    scene.tear_down(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def _never_seen_and_deleted(scene, ep, name):
    """A sandbox the driver never saw: its container started just before the
    driver died and was removed (its file deleted) before it came back."""
    path = f"{NETNS_DIR}/{name}"
    scene.kernel.add_sandbox(path)
    scene.join(ep, path)  # the engine moved the interface in...
    scene.kernel.remove_sandbox(path)  # ...and the namespace went with the container
    return path


def test_a_sandbox_deleted_after_the_interface_moved_in_is_gone_though_never_seen(scene):
    live = scene.endpoint(EP_1)
    scene.join(live, scene.sandbox("live"))
    orphan = scene.endpoint(EP_2, mac=MAC_2)
    _never_seen_and_deleted(scene, orphan, "gone")
    scene.start()
    scene.run_for(INTERVAL)
    assert scene.ports() == {live.port}


@pytest.mark.parametrize("port_type", ["internal", "veth"])
def test_an_interface_the_engine_moved_back_out_is_gone_though_its_sandbox_was_never_seen(
    port_type,
):
    """The driver died right after the container started, before it saw the
    sandbox, and the container was removed while it was down: the engine
    moved the interface back out (with the MAC it gave it inside) and
    unmounted the sandbox, whose file stays until its next garbage collection."""
    scene = Scene(port_type)
    try:
        live = scene.endpoint(EP_1)
        scene.join(live, scene.sandbox("live"))
        ep = scene.endpoint(EP_2, mac=MAC_2)
        path = scene.sandbox("gone")
        scene.join(ep, path)
        scene.kernel.move_from_sandbox(path, "eth0", ep.ifname)
        scene.tear_down(path)
        scene.start()
        scene.run_for(INTERVAL)
        assert scene.ports() == {live.port}
    finally:
        scene.reconciler.stopService()
        reconcile.log = Logger()


def test_a_port_ovs_vswitchd_has_not_made_yet_is_not_taken_for_one_moved_in(scene):
    """Join records the sandbox, then waits for the port: while ovs-vswitchd
    reconnects to OVSDB its tap exists nowhere, and the sandbox not yet (the
    engine makes it after Join), next to a running container."""
    live = scene.endpoint(EP_1)
    scene.join(live, scene.sandbox("live"))
    scene.vswitch.stall_vswitchd()
    ep = scene.endpoint(EP_2, mac=MAC_2)
    scene.join(ep, f"{NETNS_DIR}/starting", move=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert ep.port in scene.ports()
    scene.vswitch.resume_vswitchd()
    scene.run_for(3 * INTERVAL)
    assert ep.port in scene.ports()


def test_a_missing_file_in_a_directory_without_live_sandboxes_is_no_evidence(private_scene):
    """A directory of the driver's own (a copy) shows neither new files nor
    mounts: a missing file there says nothing."""
    scene = private_scene
    live = scene.endpoint(EP_1)
    scene.join(live, scene.sandbox("live", views=[ENGINE]))
    ep = scene.endpoint(EP_2, mac=MAC_2)
    _never_seen_and_deleted(scene, ep, "gone")
    scene.start()
    scene.run_for(2 * GRACE)
    assert scene.ports() == {live.port, ep.port}


def test_a_sandbox_that_appears_a_minute_after_join_keeps_its_port(scene):
    """A slow container start (image pull, volume plugins, a loaded host),
    next to a running one."""
    other = scene.endpoint(EP_2, mac=MAC_2)
    scene.join(other, scene.sandbox("running"))
    ep = scene.endpoint()
    path = f"{NETNS_DIR}/slow"
    scene.join(ep, path, move=False)
    scene.start()
    scene.run_for(60)
    assert ep.port in scene.ports()
    warnings = scene.warnings()
    assert len(warnings) == 1 and "does not exist (yet)" in warnings[0], warnings
    assert scene.sandbox("slow") == path
    scene.kernel.move_to_sandbox(ep.ifname, path, "eth0")
    scene.run_for(10 * GRACE)
    assert ep.port in scene.ports()
    scene.tear_down(path)
    scene.run_for(2 * INTERVAL)
    assert scene.ports() == {other.port}


def test_a_restarted_driver_never_collects_a_sandbox_that_has_not_appeared(scene):
    ep = scene.endpoint()
    scene.join(ep, f"{NETNS_DIR}/slow", move=False)
    scene.start()
    scene.run_for(GRACE)
    scene.restart_driver()
    scene.run_for(5 * GRACE)
    assert ep.port in scene.ports()


def test_a_namespace_a_process_is_in_is_alive_whatever_the_mounts_show(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.views.unmount(sandbox)  # the container's processes still run in it
    scene.run_for(10 * INTERVAL)
    assert ep.port in scene.ports()


def test_a_newer_namespace_with_the_same_number_is_no_evidence_of_life(scene):
    """The kernel reuses namespace inode numbers: a process that started after
    the sandbox was seen is in another namespace."""
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.tear_down(sandbox)
    scene.views.hold(scene.netns_of[sandbox], started=scene.clock.seconds() + 1)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_record_from_before_the_host_restarted_is_evidence_enough(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.reconciler.stopService()
    scene.tear_down(sandbox)
    scene.views.hold(scene.netns_of[sandbox], started=0.0)  # the number, in use again
    scene.views.boot = "after-a-reboot"
    scene.restart_driver()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_sandbox_whose_view_is_gone_is_kept(private_scene):
    scene = private_scene
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.stop_container(sandbox)
    scene.views.remove_view(ENGINE)  # e.g. the driver restarted in its own PID namespace
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()
    assert any("out of the driver's sight" in w for w in scene.warnings())


def test_nothing_is_collected_when_the_sandboxes_directory_is_invisible(scene):
    """A driver in another mount namespace sees no sandbox at all: it must not
    take that for every container being gone."""
    ep = scene.endpoint()
    scene.join(ep, "/nonexistent/docker/netns/abc", move=False)
    scene.start()
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()
    assert any("does not exist for the driver" in w for w in scene.warnings())


@pytest.mark.parametrize("recorded", ["{bad json", '{"sandbox": 1}', '{"view": [[1]]}', "[]"])
def test_an_unreadable_record_of_where_a_sandbox_was_seen_is_no_evidence(scene, recorded):
    ep = scene.endpoint()
    sandbox = f"{NETNS_DIR}/hand-edited"
    scene.views.create(sandbox)
    scene.join(ep, sandbox, move=False)
    scene.vswitch.set_sandbox_seen(EP_1, sandbox, recorded)
    scene.start()
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()


def test_a_record_about_another_sandbox_is_no_evidence(scene):
    ep = scene.endpoint()
    sandbox = f"{NETNS_DIR}/second"
    scene.views.create(sandbox)
    scene.join(ep, sandbox, move=False)
    other = Seen(f"{NETNS_DIR}/first", OWN, 4026531999)
    scene.vswitch.set_sandbox_seen(EP_1, sandbox, other.to_text())
    scene.start()
    scene.run_for(2 * GRACE)
    assert ep.port in scene.ports()


# -- unjoined endpoints --------------------------------------------------------------


@pytest.mark.parametrize("made", [True, False], ids=["made", "never made by ovs-vswitchd"])
def test_an_unjoined_endpoint_is_collected_after_the_grace(scene, made):
    if not made:
        scene.vswitch.stall_vswitchd()
    ep = scene.endpoint()
    scene.start()
    scene.run_for(GRACE - INTERVAL)
    assert ep.port in scene.ports()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()
    assert scene.kernel.state(ep.port) is None


def test_a_restarted_driver_gives_unjoined_endpoints_the_whole_grace_again(scene):
    """Creation times are wall-clock and may lie; only this process's
    monotonic clock counts."""
    ep = scene.endpoint()
    scene.start()
    scene.run_for(GRACE - 2 * INTERVAL)
    scene.restart_driver()
    scene.run_for(GRACE - 2 * INTERVAL)
    assert ep.port in scene.ports()
    scene.run_for(4 * INTERVAL)
    assert ep.port not in scene.ports()


def test_an_endpoint_left_and_never_deleted_is_collected_after_the_grace(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    # Leave (the engine moves the link back first); DeleteEndpoint never comes.
    scene.kernel.move_from_sandbox(sandbox, "eth0", ep.ifname)
    scene.vswitch.set_sandbox(EP_1, None)
    scene.run_for(GRACE)
    assert ep.port in scene.ports()
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


# -- a lost record of the sandbox ------------------------------------------------------


def test_a_container_whose_record_was_lost_keeps_its_port_and_gets_the_record_back(scene):
    """Join answered, then the driver died before its record was committed."""
    ep = scene.endpoint()
    other = scene.endpoint(EP_2, mac=MAC_2)
    scene.join(other, scene.sandbox("sb2"))  # tells where the engine's sandboxes are
    sandbox = scene.sandbox()
    scene.move_in(ep, sandbox)
    scene.start()
    scene.run_for(GRACE + 3 * INTERVAL)
    assert ep.port in scene.ports()
    assert scene.vswitch.endpoint(EP_1).result.sandbox == sandbox
    scene.delete(sandbox)  # from now on, as any joined endpoint
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports() and other.port in scene.ports()


def test_a_link_with_the_mac_but_another_address_is_not_the_endpoints(scene):
    """A MAC given twice (--mac-address) on two networks: the address tells.
    (In the engine's default directory, which the driver looks in anyway.)"""
    ep = scene.endpoint()
    other = scene.endpoint(EP_2, mac=MAC)
    stranger = scene.sandbox("a-stranger", directory=reconcile.SANDBOX_DIRECTORY)
    scene.join(other, stranger, move=False)
    scene.kernel.add_sandbox_link(stranger, "eth0", MAC, addresses=["10.9.0.3/24"])
    sandbox = scene.sandbox(directory=reconcile.SANDBOX_DIRECTORY)
    scene.move_in(ep, sandbox)
    scene.start()
    scene.run_for(GRACE + 3 * INTERVAL)
    assert scene.vswitch.endpoint(EP_1).result.sandbox == sandbox


def test_an_interface_a_container_took_keeps_its_port_while_no_sandbox_is_found(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox(directory="/elsewhere")  # an exec root the driver cannot guess
    scene.move_in(ep, sandbox)
    scene.start()
    scene.run_for(3 * GRACE)
    assert ep.port in scene.ports()
    assert scene.vswitch.endpoint(EP_1).result.sandbox is None
    (warning,) = [w for w in scene.warnings() if "no sandbox is recorded" in w]
    assert f"interface {ep.ifname} has left the driver's namespace" in warning


def test_a_veth_endpoint_whose_pair_is_gone_is_collected_without_a_record():
    scene = Scene(port_type="veth")
    ep = scene.endpoint()
    sandbox = scene.sandbox(directory=reconcile.SANDBOX_DIRECTORY)
    scene.move_in(ep, sandbox)
    scene.start()
    scene.run_for(GRACE + 3 * INTERVAL)
    assert scene.vswitch.endpoint(EP_1).result.sandbox == sandbox  # found, alive
    scene.vswitch.set_sandbox(EP_1, None)  # lost again; then the container ends
    scene.tear_down(sandbox)  # its namespace takes the pair along
    scene.run_for(GRACE + 2 * INTERVAL)
    assert ep.port not in scene.ports()
    scene.reconciler.stopService()


def test_a_veth_orphan_takes_its_veth_along():
    scene = Scene(port_type="veth")
    ep = scene.endpoint()
    assert scene.kernel.state(ep.port) is not None
    scene.start()
    scene.run_for(GRACE + 2 * INTERVAL)
    assert ep.port not in scene.ports()
    assert scene.kernel.state(ep.port) is None
    assert scene.kernel.state(ep.ifname) is None
    scene.reconciler.stopService()


@pytest.mark.parametrize("port_type", ["internal", "veth"])
def test_a_removal_cut_short_is_finished_at_start(port_type):
    """DeleteEndpoint marked the port, then the driver was killed before it went."""
    scene = Scene(port_type=port_type)
    ep = scene.endpoint()
    scene.vswitch.mark_removed(ep.endpoint_id)
    scene.start()
    assert not scene.vswitch.port_exists(ep.port)
    assert scene.kernel.state(ep.port) is None
    scene.reconciler.stopService()


def test_a_veth_no_endpoint_owns_is_deleted_after_the_grace(scene):
    """CreateEndpoint makes the veth before the port: a crash between leaves it."""
    scene.kernel.create_veth("ove-0123456789a", "oep-0123456789a", 1500)
    scene.start()
    scene.run_for(GRACE - INTERVAL)
    assert scene.kernel.state("ove-0123456789a") is not None
    scene.run_for(2 * INTERVAL)
    assert scene.kernel.state("ove-0123456789a") is None


def test_collecting_an_endpoint_with_published_ports_updates_the_firewall(scene):
    scene.endpoint()
    scene.vswitch.set_published(EP_1, [PublishedPort("tcp", 8080, "10.9.0.2", 80)])
    scene.start()
    scene.run_for(GRACE + 2 * INTERVAL)
    assert scene.ports() == set()
    assert scene.collected_firewall == [True]


def test_a_coroutine_hook_after_collecting_is_run(scene):
    async def sync_firewall():  # as the driver's
        scene.collected_firewall.append("synced")

    scene.reconciler.after_collect = sync_firewall
    scene.endpoint()
    scene.vswitch.set_published(EP_1, [PublishedPort("tcp", 8080, "10.9.0.2", 80)])
    scene.start()
    scene.run_for(GRACE + 2 * INTERVAL)
    assert scene.collected_firewall == ["synced"]


def test_a_recheck_collects_an_orphan_at_once(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.tear_down(sandbox)  # the container is gone; the next pass is 2 s away
    rechecked = defer.ensureDeferred(scene.reconciler.recheck())
    scene.settle()
    assert rechecked.called
    assert ep.port not in scene.ports()
    assert scene.clock.seconds() == 1_000  # no time passed


# -- repair after an ovs-vswitchd restart ------------------------------------------


def _links_with_mac(scene, sandbox, mac):
    links = scene.kernel.sandbox_links(sandbox)
    scene.settle()
    return [link.name for link in links.result if link.mac == mac]


def test_an_endpoint_whose_tap_was_recreated_is_repaired(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.restart_vswitchd(ep, sandbox)
    routes = scene.kernel.sandbox_routes(sandbox)
    scene.run_for(INTERVAL)
    assert scene.kernel.state(ep.ifname) is None
    eth0 = scene.kernel.sandbox_state(sandbox, "eth0")
    assert (eth0.mac, eth0.up, eth0.mtu) == (MAC, True, 1500)
    assert "10.9.0.2/24" in eth0.addresses
    assert _links_with_mac(scene, sandbox, MAC) == ["eth0"]
    assert scene.kernel.sandbox_routes(sandbox) == routes
    assert ep.port in scene.ports()


def _to_repair(scene):
    """A joined endpoint whose tap an ovs-vswitchd restart made anew, and the
    reconciler's netlink port made `Flaky`."""
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.restart_vswitchd(ep, sandbox)
    netlink = scene.reconciler.netlink = Flaky(scene.kernel)
    return ep, sandbox, netlink


def test_a_repair_cut_short_by_the_containers_removal_is_not_warned_about(scene):
    # The engine tears the sandbox down while the pass repairs it: entering
    # it fails (EINVAL on an unmounted file), and the next pass collects it.
    ep, sandbox, netlink = _to_repair(scene)
    moving = netlink.hanging["move_link_to_netns"] = defer.Deferred()
    scene.run_for(INTERVAL)
    scene.tear_down(sandbox)
    moving.errback(LinkError(f"cannot enter sandbox {sandbox}: Invalid argument"))
    scene.run_for(3 * INTERVAL)
    assert scene.warnings() == []
    assert ep.port not in scene.ports()


def test_a_repair_that_fails_in_a_live_sandbox_is_warned_about(scene):
    ep, sandbox, netlink = _to_repair(scene)
    netlink.failures["move_link_to_netns"] = [LinkError("cannot move it: no luck")]
    scene.run_for(2 * INTERVAL)
    assert [w for w in scene.warnings() if "cannot repair endpoint" in w] == [
        f"cannot repair endpoint {ep.endpoint_id[:12]}: cannot move it: no luck"
    ]
    assert scene.kernel.sandbox_state(sandbox, "eth0").up  # repaired by the next pass


def test_a_link_the_engine_has_not_moved_yet_is_left_alone(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.state(ep.ifname) is not None
    assert _links_with_mac(scene, sandbox, MAC) == []
    assert ep.port in scene.ports()


def test_a_link_moved_in_while_a_pass_looks_is_not_searched_for(scene, monkeypatch):
    """The engine moves a starting container's interface in right after its
    sandbox is mounted: a pass that read the links before the sandboxes must
    not take it for a tap made anew (and visit the sandbox for nothing)."""
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    look, visit, visits = scene.views.observe, scene.kernel.sandbox_links, []

    def the_engine_moves_it_meanwhile(*args, **kwargs):
        looked = look(*args, **kwargs)
        if scene.kernel.state(ep.ifname) is not None:
            scene.kernel.move_to_sandbox(ep.ifname, sandbox, "eth0")
        return looked

    monkeypatch.setattr(scene.views, "observe", the_engine_moves_it_meanwhile)
    monkeypatch.setattr(scene.kernel, "sandbox_links", lambda p: visits.append(p) or visit(p))
    scene.start()
    scene.run_for(2 * INTERVAL)
    assert visits == []
    assert ep.port in scene.ports()


def test_a_live_link_with_the_same_mac_is_not_taken_for_a_dead_copy(scene):
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.kernel.add_sandbox_link(sandbox, "eth0", MAC, carrier=True)
    scene.join(ep, sandbox, move=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.state(ep.ifname) is not None
    assert _links_with_mac(scene, sandbox, MAC) == ["eth0"]


def test_veth_endpoints_are_never_repaired():
    scene = Scene(port_type="veth")
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox, move=False)
    scene.kernel.add_sandbox_link(sandbox, "eth0", MAC, carrier=False)
    scene.start()
    scene.run_for(3 * INTERVAL)
    assert scene.kernel.state(ep.ifname) is not None
    assert scene.kernel.sandbox_state(sandbox, "eth0") is not None
    scene.reconciler.stopService()


# -- the service -----------------------------------------------------------------


class Flaky:
    """Wraps a port so that chosen methods fail or hang on demand."""

    def __init__(self, port):
        self._port = port
        self.failures = {}  # method -> exceptions to raise, in order
        self.hanging = {}  # method -> Deferred to return instead
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self._port, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            if self.failures.get(name):
                return defer.fail(self.failures[name].pop(0))
            if name in self.hanging:
                return self.hanging.pop(name)
            return method(*args, **kwargs)

        return call


def test_a_failing_pass_is_logged_and_the_next_pass_runs(scene):
    vswitch = Flaky(scene.vswitch)
    vswitch.failures["endpoints"] = [RuntimeError("OVSDB is down")]
    scene.reconciler.vswitch = vswitch
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    assert vswitch.calls == ["finish_removals", "forget_port_macs", "endpoints"]
    assert any("OVSDB is down" in w for w in scene.warnings())
    scene.run_for(INTERVAL)
    scene.tear_down(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_a_failing_removal_does_not_stop_the_others(scene):
    vswitch = Flaky(scene.vswitch)
    vswitch.failures["remove_endpoint"] = [RuntimeError("refused")]
    scene.reconciler.vswitch = vswitch
    first = scene.endpoint(EP_1)
    second = scene.endpoint(EP_2, mac=MAC_2)
    scene.start()
    scene.run_for(GRACE + INTERVAL)
    assert len(scene.ports()) == 1
    scene.run_for(2 * INTERVAL)
    assert not {first.port, second.port} & scene.ports()


def test_a_look_at_the_sandboxes_that_hangs_fails_the_pass_and_the_next_one_runs(scene):
    views = Flaky(scene.views)
    views.hanging["observe"] = defer.Deferred()  # a hung file system
    scene.reconciler.views = views
    ep = scene.endpoint()
    sandbox = scene.sandbox()
    scene.join(ep, sandbox)
    scene.start()
    scene.clock.advance(scene.reconciler.look_timeout)
    assert any("took longer than" in w for w in scene.warnings())
    scene.run_for(INTERVAL)
    assert views.calls == ["observe", "observe"]
    scene.tear_down(sandbox)
    scene.run_for(2 * INTERVAL)
    assert ep.port not in scene.ports()


def test_passes_never_overlap(scene):
    netlink = Flaky(scene.kernel)
    slow = netlink.hanging["links"] = defer.Deferred()
    scene.reconciler.netlink = netlink
    scene.start()
    scene.run_for(10 * INTERVAL)
    assert netlink.calls == ["links"]
    slow.callback({})
    scene.clock.advance(INTERVAL - 0.1)
    assert netlink.calls == ["links"], "the next pass must wait a whole interval"
    scene.clock.advance(0.1)
    assert netlink.calls.count("links") == 2


def test_stopping_waits_for_the_pass_in_progress_and_ends_the_passes(scene):
    netlink = Flaky(scene.kernel)
    slow = netlink.hanging["links"] = defer.Deferred()
    scene.reconciler.netlink = netlink
    scene.start()
    stopped = scene.reconciler.stopService()
    assert not stopped.called
    slow.callback(frozenset())
    scene.settle()
    assert stopped.called
    scene.run_for(10 * INTERVAL)
    assert netlink.calls == ["links"]
    assert scene.clock.getDelayedCalls() == []


# -- gateways ------------------------------------------------------------------


def _infos(scene):
    return [e for e in scene.events if e.get("log_level").name == "info"]


def test_a_gateway_interface_made_anew_gets_its_addresses_back(scene):
    restored = []
    scene.reconciler.after_restore = restored.append
    bridge = scene.network.bridge
    scene.kernel.add_addresses(bridge, ["10.9.0.1/24"])  # as CreateNetwork left it
    scene.settle()
    scene.start()
    scene.run_for(INTERVAL)
    assert restored == [] and _infos(scene) == []  # it had them: nothing to say
    # A reboot, or ovs-vswitchd making the bridge's tap anew: no address, down.
    scene.kernel.delete_link(bridge)
    scene.settle()
    scene.kernel.add_link(bridge)
    scene.run_for(INTERVAL)
    assert restored == []  # a pass to make sure CreateNetwork is not on it
    scene.run_for(INTERVAL)
    state = scene.kernel.state(bridge)
    assert "10.9.0.1/24" in state.addresses and state.up
    assert restored == [bridge]
    assert any("10.9.0.1/24" in e["added"] for e in _infos(scene))
    # Later passes leave it alone.
    netlink = scene.reconciler.netlink = Flaky(scene.kernel)
    scene.run_for(3 * INTERVAL)
    assert "add_addresses" not in netlink.calls


def test_a_gateway_that_cannot_be_put_back_is_warned_about_once_and_retried(scene):
    netlink = scene.reconciler.netlink = Flaky(scene.kernel)
    netlink.failures["add_addresses"] = [LinkError("no luck")] * 3
    scene.start()
    scene.run_for(4 * INTERVAL)
    assert netlink.calls.count("add_addresses") == 4
    assert len([w for w in scene.warnings() if "gateway addresses" in w]) == 1
    state = scene.kernel.state(scene.network.bridge)
    assert "10.9.0.1/24" in state.addresses


def test_a_network_deleted_while_its_gateway_is_put_back_is_not_warned_about(scene):
    # A pass puts a new bridge's addresses on again (adding those there does
    # nothing); DeleteNetwork may take the bridge meanwhile.
    netlink = scene.reconciler.netlink = Flaky(scene.kernel)
    adding = netlink.hanging["add_addresses"] = defer.Deferred()
    scene.start()
    scene.run_for(INTERVAL)
    assert "add_addresses" in netlink.calls
    scene.vswitch.remove_network(NET)
    scene.kernel.delete_link(scene.network.bridge)
    scene.settle()
    adding.errback(LinkError(f"cannot set {scene.network.bridge} up: No such device"))
    scene.run_for(2 * INTERVAL)
    assert scene.warnings() == []


def test_a_network_being_created_is_not_taken_for_one_made_anew(scene):
    restored = []
    scene.reconciler.after_restore = restored.append
    scene.start()  # the bridge is there, CreateNetwork has not put its address on yet
    scene.kernel.add_addresses(scene.network.bridge, ["10.9.0.1/24"])
    scene.run_for(3 * INTERVAL)
    assert restored == [] and _infos(scene) == []
