"""Self-tests of tests/world.py: the worlds really work and leave nothing behind."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from tests import world


def _host_links() -> list[str]:
    out = world.run(["ip", "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out)]


def _netns_names() -> list[str]:
    out = world.run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _assert_nothing_left(pids: list[int], netns: world.Netns, directory: Path) -> None:
    alive = {p: world._cmdline(p) for p in pids if world.pid_alive(p)}
    assert not alive, f"processes left behind: {alive}"
    assert netns.name not in _netns_names()
    assert not os.path.lexists(netns.path)
    assert not world.mounts_under(directory), "mounts left behind"
    assert not directory.exists()


# --------------------------------------------------------------------------
# Helpers that need no privileges


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "done"])
    assert world.wait_until(lambda: next(values), timeout=5, interval=0.01) == "done"


def test_wait_until_is_bounded_and_says_what_it_waited_for() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="the sky to fall"):
        world.wait_until(lambda: False, 0.3, 0.05, "the sky to fall")
    assert time.monotonic() - start < 2


def test_command_errors_show_the_output() -> None:
    with pytest.raises(world.CommandError, match="boom"):
        world.run(["sh", "-c", "echo boom >&2; exit 3"])


def test_busybox_tarball_has_the_applets_as_symlinks() -> None:
    if not os.path.exists("/bin/busybox"):
        pytest.skip("no /bin/busybox")
    with tarfile.open(fileobj=BytesIO(world.busybox_tar())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile()
    for applet in ["sh", "ip", "ping", "nc", "httpd", "awk", "true"]:
        assert members[f"bin/{applet}"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.requests.append((self.path, dict(self.headers), body))
        reply = b"not json" if self.path == "/Text" else b'{"Implements": ["X"]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.UnixStreamServer):
    def get_request(self):  # BaseHTTPRequestHandler wants a client address
        request, _ = super().get_request()
        return request, ("local", 0)


@pytest.fixture
def recording_server() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ovsw-") as d:
        path = f"{d}/p.sock"
        server = _UnixHTTPServer(path, _Recorder)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
            _Recorder.requests.clear()


def test_plugin_post_speaks_like_the_engine(recording_server: str) -> None:
    status, reply = world.plugin_post(
        recording_server, "NetworkDriver.CreateNetwork", {"NetworkID": "n1"}
    )
    assert (status, reply) == (200, {"Implements": ["X"]})
    path, headers, body = _Recorder.requests[-1]
    assert path == "/NetworkDriver.CreateNetwork"
    assert "Content-Type" not in headers
    assert headers["Accept"] == "application/vnd.docker.plugins.v1.2+json"
    assert body == b'{"NetworkID": "n1"}\n'


def test_plugin_post_sends_an_empty_body_and_returns_text(
    recording_server: str,
) -> None:
    assert world.plugin_post(recording_server, "Text") == (200, "not json")
    assert _Recorder.requests[-1][2] == b""


# --------------------------------------------------------------------------
# Open vSwitch world


@pytest.mark.integration
def test_ovs_world_bridges_live_in_the_namespace_and_vanish_on_close() -> None:
    world.require()
    w = world.OVSWorld()
    try:
        w.ovs.vsctl("add-br", "b0", "--", "set", "bridge", "b0", "datapath_type=netdev")
        assert "b0" in w.netns.links()
        assert "b0" not in _host_links()
        assert w.ovs.bridges() == ["b0"]
        pids = [w.ovs.ovsdb_pid, w.ovs.vswitchd_pid, *w.netns.pids()]
        assert None not in pids
    finally:
        w.close()
    _assert_nothing_left(pids, w.netns, w.directory)
    w.close()  # idempotent


@pytest.mark.integration
def test_ovs_world_daemons_restart_and_keep_the_database() -> None:
    world.require()
    with world.OVSWorld() as w:
        ovs = w.ovs
        ovs.vsctl("add-br", "b0", "--", "set", "bridge", "b0", "datapath_type=netdev")
        old = ovs.vswitchd_pid
        ovs.restart_vswitchd()
        assert ovs.vswitchd_pid not in (None, old)
        ovs.stop_ovsdb()
        assert ovs.ovsdb_pid is None
        ovs.start_ovsdb()
        assert ovs.bridges() == ["b0"]
        # vswitchd reconnected: a change that waits for it completes.
        ovs.vsctl("add-br", "b1", "--", "set", "bridge", "b1", "datapath_type=netdev")
        world.wait_until(lambda: "b1" in w.netns.links(), 10)
        assert "b0" in w.netns.links()


@pytest.mark.integration
def test_driver_class_starts_kills_and_cleans_up_a_twistd_server() -> None:
    """Driver's mechanics, checked with twistd's own web server as stand-in."""
    world.require()

    class WebDriver(world.Driver):
        @property
        def argv(self) -> list[str]:
            argv = super().argv
            cut = argv.index("ovsdriver")
            return argv[:cut] + [
                *("web", "--listen", f"unix:{self.socket}:mode=660"),
                *("--path", str(self.directory)),
            ]

    with world.OVSWorld() as w:
        name = world.unique_driver_name()
        d = WebDriver(w.netns, name, w.ovs.remote, w.directory / "driver")
        try:
            assert d.socket == f"/run/docker/plugins/{name}.sock"
            assert d.accepting()
            assert w.netns.owns(d.pid)
            assert os.stat(d.socket).st_mode & 0o777 == 0o660
            status, _ = d.post("Plugin.Activate")
            assert status == 404  # a static file server: no such file
            d.kill()  # SIGKILL: socket and lock stay, as in a real crash
            assert not d.running
            assert os.path.exists(d.socket) and not d.accepting()
            d.restart()
            assert d.accepting()
            d.restart(signal.SIGTERM)
            assert d.accepting()
            assert d.log().count(f"{name}.sock") >= 3  # one start per run, in one log
        finally:
            pid = d.pid
            d.close()
        assert not world.pid_alive(pid)
        assert not os.path.lexists(d.socket)
        assert not os.path.lexists(d.lockfile)


# --------------------------------------------------------------------------
# Docker world


def _world_pids(w: world.DockerWorld, containers: list[str]) -> list[int]:
    pids = [*w.netns.pids()]
    for c in containers:
        pid = w.dockerd.docker("inspect", "-f", "{{.State.Pid}}", c).stdout.strip()
        pids.append(int(pid))
    return pids


@pytest.mark.e2e
def test_docker_world_runs_busybox_and_close_leaves_nothing() -> None:
    world.require(docker=True)
    w = world.DockerWorld()
    try:
        docker = w.dockerd.docker
        docker("run", "--rm", "--network", "none", world.BUSYBOX_IMAGE, "true")
        out = docker("run", "--rm", "--network", "none", world.BUSYBOX_IMAGE, "ls")
        assert "bin" in out.stdout.split()
        cid = docker(
            "run", "-d", "--network", "none", world.BUSYBOX_IMAGE, "sleep", "600"
        ).stdout.strip()
        pids = _world_pids(w, [cid])
        assert w.dockerd.pid in pids
        assert world.mounts_under(w.directory)
    finally:
        w.close()
    _assert_nothing_left(pids, w.netns, w.directory)


@pytest.mark.e2e
def test_docker_world_cleans_up_after_dockerd_crashed() -> None:
    world.require(docker=True)
    w = world.DockerWorld()
    try:
        docker = w.dockerd.docker
        cid = docker(
            "run", "-d", "--network", "none", world.BUSYBOX_IMAGE, "sleep", "600"
        ).stdout.strip()
        pids = _world_pids(w, [cid])
        w.dockerd.stop(signal.SIGKILL)  # shims and the container live on
        assert any(world.pid_alive(p) for p in pids)
    finally:
        w.close()
    _assert_nothing_left(pids, w.netns, w.directory)


@pytest.mark.e2e
def test_docker_world_engine_restarts_with_its_images() -> None:
    world.require(docker=True)
    with world.DockerWorld() as w:
        w.dockerd.restart()
        images = w.dockerd.docker("images", "--format", "{{.Repository}}").stdout
        assert world.BUSYBOX_IMAGE in images.split()


@pytest.mark.e2e
def test_docker_world_with_iptables_changes_only_its_own_firewall() -> None:
    world.require(docker=True)
    host_before = world.run(["iptables", "-S"]).stdout
    with world.DockerWorld(iptables=True) as w:
        rules = w.netns.run(["iptables", "-S", "FORWARD"]).stdout
        assert "-P FORWARD DROP" in rules.splitlines()
        assert "DOCKER" in w.netns.run(["iptables", "-S"]).stdout
    assert world.run(["iptables", "-S"]).stdout == host_before


@pytest.mark.e2e
def test_dockerd_that_cannot_start_raises_and_leaves_nothing() -> None:
    world.require(docker=True)
    with world.Netns() as netns:
        directory = Path(tempfile.mkdtemp(prefix="ovsw-", dir="/tmp"))
        try:
            with pytest.raises(world.WorldError, match="no-such-flag"):
                world.Dockerd(netns, directory, extra_args=["--no-such-flag"])
            assert not netns.pids()
            assert not world.mounts_under(directory)
            assert sorted(p.name for p in directory.iterdir()) == [
                "daemon.json",
                "dockerd.log",
            ]
        finally:
            world.remove_tree(directory)


def test_ovn_world_binds_ports_across_hosts_and_close_leaves_nothing() -> None:
    world.require()
    with world.OVNWorld() as w:
        namespaces = [w.central.netns.name] + [h.netns.name for h in w.hosts]
        pids = [p for h in w.hosts for p in h.netns.pids()] + w.central.netns.pids()
        directory = w.directory
        assert w.chassis_count() == 2
        a = w.hosts[0]
        a.ovs.vsctl("add-port", "br-int", "t0", "--", "set", "interface", "t0",
                    "type=internal", "external_ids:iface-id=lp0")  # fmt: skip
        w.central.nbctl("ls-add", "s0", "--", "lsp-add", "s0", "lp0")
        world.wait_until(
            lambda: (
                a.ovs.vsctl("--if-exists", "get", "interface", "t0", "external_ids:ovn-installed")
                == '"true"'
            ),  # fmt: skip
            15,
            0.1,
            "ovn-controller did not install the port",
        )
    listed = world.run(["ip", "netns", "list"]).stdout
    assert not any(name in listed for name in namespaces)
    assert not any(world.pid_alive(p) for p in pids)
    assert not Path(directory).exists()
