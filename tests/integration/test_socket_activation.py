"""The driver serving a socket passed by systemd (``--listen systemd:...``),
started the way ovsdriver.socket starts it, with ``systemd-socket-activate``
standing in for systemd (not PID 1 here): the socket is made before the
driver runs, the driver starts on the first connection, serves it with mode
0660 and leaves it in place when it stops, for the next start."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from contextlib import ExitStack

import pytest
from twisted.python.systemd import ListenFDs

from tests import world

# Twisted 23 and later ignore passed sockets when LISTEN_FDNAMES is missing.
TWISTED_WANTS_NAMES = hasattr(ListenFDs, "inheritedNamedDescriptors")


@pytest.fixture
def netns():
    world.require()
    if world.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate is missing (package systemd)")
    with world.Netns() as ns:
        yield ns


def activate(netns, directory, *activate_args):
    """``systemd-socket-activate`` running the driver on ``directory/d.sock``."""
    sock = f"{directory}/d.sock"
    argv = [
        world.which("systemd-socket-activate"),
        f"--listen={sock}",
        f"--setenv=PYTHONPATH={world.REPO_ROOT}",
        *activate_args,
        *world.twistd_argv(),
        "-n",
        "--pidfile=",
        f"--logfile={directory}/driver.log",
        "ovsdriver",
        "--listen",
        "systemd:domain=UNIX:index=0",
        "--ovsdb",
        f"unix:{directory}/no-ovsdb.sock",
        "--datapath-type",
        "netdev",
    ]
    out = open(f"{directory}/driver.out", "ab")  # noqa: SIM115 - closed by the caller
    proc = netns.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    out.close()
    world.wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 10)
    return proc, sock


def output(directory):
    return world.tail(f"{directory}/driver.out") + world.tail(f"{directory}/driver.log")


def test_a_socket_from_systemd_is_served_with_mode_660_and_kept(netns, tmp_path):
    with ExitStack() as stack:
        proc, sock = activate(netns, tmp_path, "--fdname=ovsdriver.socket")
        stack.callback(world.stop_process, proc.pid, popen=proc)
        # systemd-socket-activate makes it 0644; Twisted's adoption, 0666.
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o644
        status, reply = world.plugin_post(sock, "Plugin.Activate")
        assert (status, reply) == (200, {"Implements": ["NetworkDriver", "IpamDriver"]}), output(
            tmp_path
        )
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert world.plugin_post(sock, "NetworkDriver.GetCapabilities")[0] == 200
        world.stop_process(proc.pid, popen=proc)
        assert "Server Shut Down" in output(tmp_path)
        # The socket belongs to systemd, which keeps listening for the next start.
        assert stat.S_ISSOCK(os.stat(sock).st_mode), output(tmp_path)


def test_a_socket_without_a_name_is_served_or_refused_with_the_fix(netns, tmp_path):
    """systemd always names passed sockets; systemd-socket-activate only with
    --fdname, and Twisted 23+ then ignores them: the driver must say so."""
    with ExitStack() as stack:
        proc, sock = activate(netns, tmp_path)
        stack.callback(world.stop_process, proc.pid, popen=proc)
        try:
            status, _ = world.plugin_post(sock, "Plugin.Activate", timeout=20)
        except OSError:
            status = None
        if TWISTED_WANTS_NAMES:
            proc.wait(30)
            assert status is None and proc.returncode != 0
            assert "--fdname" in output(tmp_path) and "LISTEN_FDNAMES" in output(tmp_path)
        else:
            assert status == 200, output(tmp_path)
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660


def test_the_default_unix_listener_still_removes_its_socket(netns, tmp_path):
    """Only passed sockets are kept: a socket the driver made is its own."""
    sock = f"{tmp_path}/own.sock"
    argv = [
        *world.twistd_argv(),
        "-n",
        "--pidfile=",
        f"--logfile={tmp_path}/driver.log",
        "ovsdriver",
        "--listen",
        f"unix:{sock}",
        "--ovsdb",
        f"unix:{tmp_path}/no-ovsdb.sock",
        "--datapath-type",
        "netdev",
    ]
    env = world._env(PYTHONPATH=str(world.REPO_ROOT))
    proc = netns.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        world.wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 30)
        assert world.plugin_post(sock, "Plugin.Activate")[0] == 200
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert not os.path.exists(sock)
    finally:
        world.stop_process(proc.pid, popen=proc)


def start_like_systemd(netns, directory, listener):
    """The driver started as systemd starts ovsdriver.service: the listening
    socket as fd 3, LISTEN_PID (the driver's own PID), LISTEN_FDS, LISTEN_FDNAMES."""
    fd = listener.fileno()
    script = (
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=ovsdriver.socket; "
        f'exec "$@" 3<&{fd} {fd}<&-'
    )
    argv = [
        "bash",  # dash redirects single-digit descriptors only
        "-c",
        script,
        "bash",
        *world.twistd_argv(),
        "-n",
        "--pidfile=",
        f"--logfile={directory}/driver.log",
        "ovsdriver",
        "--listen",
        "systemd:domain=UNIX:index=0",
        "--ovsdb",
        f"unix:{directory}/no-ovsdb.sock",
        "--datapath-type",
        "netdev",
    ]
    env = world._env(PYTHONPATH=str(world.REPO_ROOT))
    return netns.popen(argv, env=env, stdin=subprocess.DEVNULL, pass_fds=(fd,))


def test_a_restarted_driver_serves_the_same_socket_again(netns, tmp_path):
    """What systemd does on a restart (Restart=on-failure, an upgrade): it
    keeps the socket open and passes it to the next driver."""
    sock = f"{tmp_path}/kept.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock)
        listener.listen(16)
        os.chmod(sock, 0o660)  # SocketMode=0660
        for _ in range(2):
            proc = start_like_systemd(netns, tmp_path, listener)
            try:
                status, _ = world.plugin_post(sock, "Plugin.Activate", timeout=30)
                assert status == 200, output(tmp_path)
                assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
            finally:
                world.stop_process(proc.pid, popen=proc)
            assert stat.S_ISSOCK(os.stat(sock).st_mode), output(tmp_path)
