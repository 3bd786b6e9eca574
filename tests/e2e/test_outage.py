"""End to end: the engine's view of an OVSDB outage and an ovsdb-server restart."""

import time

from tests.e2e.cli import IMAGE
from tests.world import wait_until


def test_docker_run_fails_promptly_while_ovsdb_is_down_then_works_again(e2e):
    e2e.network("steady", "10.71.0.0/24")
    e2e.run("r1", "steady")
    r1 = e2e.container_net("r1", "steady")["IPAddress"]
    e2e.world.ovs.stop_ovsdb()
    try:
        began = time.monotonic()
        run = ["run", "-d", "--name", "r2", "--network", "steady", IMAGE, "sleep", "600"]
        result = e2e.docker(*run, check=False)
        took = time.monotonic() - began
        assert result.returncode != 0 and "OVSDB" in result.stderr, result.stderr
        assert took < 15, f"docker run took {took:.1f} s to fail"
        # (A userspace ovs-vswitchd stops forwarding while ovsdb-server is
        # down, so running containers are checked once it is back.)
    finally:
        e2e.world.ovs.start_ovsdb()
    e2e.docker("rm", "-f", "r2", check=False)

    def start_r3():
        run = ["run", "-d", "--name", "r3", "--network", "steady", IMAGE, "sleep", "600"]
        if e2e.docker(*run, check=False).returncode == 0:
            return True
        e2e.docker("rm", "-f", "r3", check=False)
        return False

    wait_until(start_r3, timeout=30, interval=1)
    assert e2e.ping("r3", r1)
    assert e2e.ping("r1", "10.71.0.1")


def test_an_ovsdb_server_restart_goes_unnoticed(e2e):
    e2e.network("calm", "10.72.0.0/24")
    e2e.run("q1", "calm")
    e2e.world.ovs.restart_ovsdb()
    e2e.run("q2", "calm")  # may wait for the reconnection, must not fail
    assert e2e.ping("q2", e2e.container_net("q1", "calm")["IPAddress"])
