"""The reconciler of a real driver (twistd, real Open vSwitch) against real
sandboxes: network namespaces bind-mounted on files, as the engine makes them,
driven through the plugin API as the engine drives it.

- A driver in a mount namespace of its own with private propagation (as in a
  container with a plain ``-v`` of the netns directory): sandboxes mounted
  before it started look mounted to it, later ones look like plain files.
  It must never take those for torn down, and still collect real orphans.
- A container that starts slowly: its sandbox file appears long after Join.
  Its port stays, and the driver says once that it waits.
- A container whose record of its sandbox was lost (the driver was killed
  between Join's answer and the record's commit): found again, never collected.
"""

import os
import secrets
import signal
import subprocess
import time

import pytest

from tests import world

pytestmark = pytest.mark.integration

NET = "3d" * 32
#: The driver's default pass interval and grace, in seconds.
INTERVAL = 2.0
GRACE = 20.0


def endpoint_id(n):
    return f"{n:02x}" * 32


def port(n):
    return "oep-" + endpoint_id(n)[:11]


class Sandboxes:
    """Sandbox files in *directory*: a network namespace (made with ``ip
    netns``) bind-mounted on a file, as the engine does. Everything made is
    unmounted and deleted by `close`."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._names = []

    def path(self, name):
        return os.path.join(self.directory, name)

    def mount(self, name):
        """Make (or remount) the sandbox *name*: a fresh namespace on its file."""
        netns = f"ovsw-rc-{secrets.token_hex(4)}"
        world.run(["ip", "netns", "add", netns], timeout=10)
        try:
            open(self.path(name), "a").close()
            self._names.append(name)
            world.run(["mount", "--bind", f"/run/netns/{netns}", self.path(name)], timeout=10)
        finally:
            world.run(["ip", "netns", "del", netns], check=False, timeout=10)
        return self.path(name)

    def unmount(self, name):
        """Tear the sandbox down: the file stays, as until the engine's next
        garbage collection. Detached lazily, as the engine does (MNT_DETACH):
        the driver may be looking at it at that very moment."""
        world.run(["umount", "-l", self.path(name)], timeout=10)

    def delete(self, name):
        self.unmount(name)
        os.unlink(self.path(name))

    def close(self):
        world.unmount_under(self.directory)
        for name in self._names:
            if os.path.lexists(self.path(name)):
                os.unlink(self.path(name))


@pytest.fixture
def sandboxes(ovs_world):
    sandboxes = Sandboxes(str(ovs_world.directory / "netns"))
    yield sandboxes
    sandboxes.close()


def ok(driver, method, body=None):
    status, reply = driver.post(method, body)
    assert status == 200 and not reply.get("Err"), (method, reply)
    return reply


def create_network(driver):
    ok(
        driver,
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {},
            "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}],
            "IPv6Data": [],
        },
    )


def join(driver, n, sandbox):
    """CreateEndpoint and Join, as the engine does when a container starts;
    the endpoint's MAC."""
    ids = {"NetworkID": NET, "EndpointID": endpoint_id(n)}
    interface = {"Address": f"10.41.0.{n}/24"}
    reply = ok(driver, "NetworkDriver.CreateEndpoint", dict(ids, Interface=interface))
    ok(driver, "NetworkDriver.Join", dict(ids, SandboxKey=sandbox))
    return reply["Interface"]["MacAddress"]


def ports(ovs_world):
    return set(ovs_world.ovs.vsctl("--no-wait", "list-ports", "obr-" + NET[:11]).split())


def stays(condition, seconds, message):
    """Check *condition* every half second for *seconds*; fail as soon as it is false."""
    deadline = time.monotonic() + seconds
    while True:
        assert condition(), message()
        if time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def wait_gone(ovs_world, driver, name, timeout=6 * INTERVAL):
    world.wait_until(
        lambda: name not in ports(ovs_world),
        timeout,
        0.25,
        lambda: f"{name} was not collected:\n{world.tail(driver.logfile)}",
    )


def test_a_driver_with_a_private_mount_view_collects_no_live_port(ovs_world, sandboxes):
    old = sandboxes.mount("old")  # before the driver's copy of the mounts
    driver = ovs_world.start_driver(wrapper=["unshare", "--mount", "--propagation", "private"])
    create_network(driver)
    join(driver, 2, old)
    new = sandboxes.mount("new")  # a plain file in the driver's copy
    join(driver, 3, new)
    orphan = sandboxes.mount("orphan")
    join(driver, 4, orphan)
    seen = "external_ids:ovsdriver-sandbox-seen"
    world.wait_until(
        lambda: ovs_world.ovs.vsctl("--if-exists", "get", "Interface", port(4), seen),
        6 * INTERVAL,
        0.25,
        lambda: world.tail(driver.logfile),
    )
    sandboxes.unmount("orphan")  # the engine tears it down; no call reaches the driver
    wait_gone(ovs_world, driver, port(4))
    stays(
        lambda: {port(2), port(3)} <= ports(ovs_world),
        GRACE + 3 * INTERVAL,
        lambda: f"a live port was collected:\n{world.tail(driver.logfile)}",
    )
    # Torn down and deleted, the old one is gone from the driver's copy too.
    sandboxes.delete("old")
    wait_gone(ovs_world, driver, port(2))
    sandboxes.unmount("new")
    wait_gone(ovs_world, driver, port(3))
    log = driver.log()
    assert "removed orphan endpoint" in log and "Traceback" not in log, log


def test_a_sandbox_that_appears_long_after_join_keeps_its_port(ovs_world, sandboxes):
    driver = ovs_world.start_driver()
    create_network(driver)
    slow = sandboxes.path("slow")  # the engine makes it when the container starts
    join(driver, 5, slow)
    collected = lambda: f"the port was collected:\n{world.tail(driver.logfile)}"  # noqa: E731
    stays(lambda: port(5) in ports(ovs_world), GRACE + 5 * INTERVAL, collected)
    sandboxes.mount("slow")
    stays(lambda: port(5) in ports(ovs_world), 3 * INTERVAL, collected)
    assert driver.log().count(f"keeping the port of endpoint {endpoint_id(5)[:12]}") == 1
    sandboxes.unmount("slow")
    wait_gone(ovs_world, driver, port(5))


def test_a_container_whose_record_of_its_sandbox_was_lost_keeps_its_port(ovs_world, sandboxes):
    """Join answers before its record of the sandbox is committed, so a driver
    killed right then loses it. The restarted driver finds the port inside
    the container's sandbox by its MAC and records it again."""
    driver = ovs_world.start_driver()
    create_network(driver)
    join(driver, 6, sandboxes.mount("other"))  # another container, same directory
    lost = sandboxes.mount("lost")
    mac = join(driver, 7, lost)
    # The engine moves the port in and gives it its name, MAC and address there.
    ovs_world.netns.run(["ip", "link", "set", "dev", port(7), "netns", lost])
    inside = ["nsenter", f"--net={lost}", "ip"]
    world.run([*inside, "link", "set", "dev", port(7), "name", "eth0", "address", mac, "up"])
    world.run([*inside, "address", "add", "10.41.0.7/24", "dev", "eth0"])
    driver.kill(signal.SIGKILL)
    for key in ("ovsdriver-sandbox", "ovsdriver-sandbox-seen"):
        ovs_world.ovs.vsctl("remove", "Interface", port(7), "external_ids", key)
    driver.start()
    collected = lambda: f"the port was collected:\n{world.tail(driver.logfile)}"  # noqa: E731
    stays(lambda: port(7) in ports(ovs_world), GRACE + 3 * INTERVAL, collected)
    recorded = "external_ids:ovsdriver-sandbox"
    assert ovs_world.ovs.vsctl("get", "Interface", port(7), recorded).strip('"') == lost
    sandboxes.unmount("lost")  # the container ends: its port goes as any other's
    wait_gone(ovs_world, driver, port(7))
    assert port(6) in ports(ovs_world)


def test_the_private_view_scenario_is_real(ovs_world, sandboxes):
    """The world reproduces what it claims: in a private mount namespace made
    after "old" was mounted, "old" is mounted and "new" is a plain file."""
    old = sandboxes.mount("old")
    script = 'mountpoint -q "$1"; echo $?; read _; mountpoint -q "$2"; echo $?'
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "-", old,
         sandboxes.path("new")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "0"
        sandboxes.mount("new")
        assert subprocess.run(["mountpoint", "-q", sandboxes.path("new")]).returncode == 0
        out, _ = process.communicate("\n", timeout=10)
        assert out.strip() == "32", "new is mounted in the private copy too"  # 32: not one
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
