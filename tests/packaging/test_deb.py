"""The Debian package on this machine: lintian, install, the installed driver
(system Python, Debian's Twisted and libraries) started through socket
activation against a real dockerd, upgrade, removal and purge.

systemd is not PID 1 here, so ``systemd-socket-activate`` runs the unit's own
ExecStart (read from the installed ovsdriver.service, with the options of
/etc/default/ovsdriver) the way ovsdriver.socket would: it makes the socket
first and starts the driver on the first connection. The tests run in file
order and share the installed package."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from tests import world
from tests.packaging.conftest import scenario

UNITS = Path("/lib/systemd/system")
DEFAULTS = Path("/etc/default/ovsdriver")
SITE = Path("/usr/lib/python3/dist-packages")
DROPIN_CACHE = SITE / "twisted" / "plugins" / "dropin.cache"
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Present while this test has the package installed: a run killed half-way
#: leaves it, so the next run (or .ci/run) knows the package is a leftover.
MARKER = Path("/run/ovsdriver-tests/package-installed")


def apt_get(*args: str) -> None:
    env = world._env(DEBIAN_FRONTEND="noninteractive", NEEDRESTART_SUSPEND="1")
    argv = ["apt-get", "-y", "-o", "DPkg::Lock::Timeout=600", *args]
    world.run(argv, timeout=900, env=env)


def status() -> str:
    """dpkg's status and version of ovsdriver ('' when it is unknown)."""
    result = world.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", "ovsdriver"], check=False
    )
    found = result.stdout.strip() if result.returncode == 0 else ""
    return "" if found.startswith("un") else found


def system(*argv: str) -> subprocess.CompletedProcess:
    """Run as a service would: system PATH, no PYTHONPATH, outside the checkout."""
    return world.run(list(argv), env=dict(SYSTEM_ENV), cwd="/", check=False, timeout=120)


def twistd_lists_ovsdriver() -> bool:
    return " ovsdriver " in system("/usr/bin/twistd3", "--help").stdout


@pytest.fixture(scope="module")
def installed(deb: Path):
    """The package installed with apt-get; purged afterwards whatever happened."""
    if status() and MARKER.exists():
        apt_get("purge", "ovsdriver")  # left by a killed run of this test
    if status():
        pytest.fail(
            f"ovsdriver is already installed here ({status()}); this test installs and "
            "purges it: remove it first with 'apt-get purge ovsdriver'",
            pytrace=False,
        )
    MARKER.parent.mkdir(exist_ok=True)
    MARKER.touch()
    try:
        apt_get("install", str(deb))
        yield deb
    finally:
        if status():
            apt_get("purge", "ovsdriver")
        MARKER.unlink()


def test_lintian_reports_no_errors(deb):
    result = world.run(["lintian", "--fail-on", "error", deb], check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("E:")]


def test_it_installs_for_the_system_python_with_debians_libraries(installed):
    assert status().startswith("ii ")
    depends = world.run(["dpkg-query", "-W", "-f=${Depends}", "ovsdriver"]).stdout
    for package in ("python3-twisted", "python3-openvswitch", "python3-pyroute2"):
        assert package in depends
    assert "openvswitch-switch" in depends
    found = system("/usr/bin/python3", "-c", "import ovsdriver; print(ovsdriver.__file__)")
    assert found.stdout.strip() == str(SITE / "ovsdriver" / "__init__.py"), found
    # python3-twisted's trigger rebuilt the plugin cache: twistd3 finds the dropin.
    assert b"ovsdriver_plugin" in DROPIN_CACHE.read_bytes()
    assert twistd_lists_ovsdriver()
    for unit in ("ovsdriver.socket", "ovsdriver.service"):
        assert (UNITS / unit).is_file()
    assert "OVSDRIVER_OPTS" in DEFAULTS.read_text()
    # Console scripts declared in setup.py come with the package.
    if "console_scripts" in (world.REPO_ROOT / "setup.py").read_text():
        assert os.access("/usr/bin/ovsdriver", os.X_OK)


def test_the_units_say_what_the_socket_and_the_service_are(installed):
    socket_unit = (UNITS / "ovsdriver.socket").read_text()
    assert "ListenStream=/run/docker/plugins/ovs.sock" in socket_unit
    assert "SocketMode=0660" in socket_unit
    assert "RemoveOnStop=yes" in socket_unit
    service = (UNITS / "ovsdriver.service").read_text()
    assert "--listen systemd:domain=UNIX:index=0" in service
    assert "Before=docker.service" in service and "Restart=on-failure" in service
    assert "openvswitch-switch.service" in service
    # An Open vSwitch restart must not stop the driver.
    for line in service.splitlines():
        if line.startswith(("Requires=", "BindsTo=", "PartOf=", "Requisite=")):
            assert "openvswitch" not in line, line
    # systemd's own check (it needs no systemd running): no unknown keys, no
    # missing executables.
    units = [UNITS / "ovsdriver.socket", UNITS / "ovsdriver.service"]
    result = world.run(["systemd-analyze", "verify", *units], check=False, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_removal_stops_both_units_and_upgrades_keep_the_socket(installed):
    """systemd is not PID 1 here, so the scripts' systemctl parts are read."""
    info = Path("/var/lib/dpkg/info")
    prerm = (info / "ovsdriver.prerm").read_text()
    for unit in ("ovsdriver.service", "ovsdriver.socket"):
        assert f"deb-systemd-invoke stop '{unit}'" in prerm
    assert '"$1" = remove' in prerm
    postinst = (info / "ovsdriver.postinst").read_text()
    # The socket is only ever started (an upgrade keeps it listening); the
    # service is restarted after an upgrade to run the new code.
    assert "deb-systemd-invoke start 'ovsdriver.socket'" in postinst
    assert "_dh_action 'ovsdriver.service'" in postinst
    assert "_dh_action 'ovsdriver.socket'" not in postinst
    assert "deb-systemd-helper enable 'ovsdriver.socket'" in postinst


def unit_command(opts: str) -> list[str]:
    """ovsdriver.service's ExecStart with ``$OVSDRIVER_OPTS`` expanded as systemd does."""
    line = next(
        line
        for line in (UNITS / "ovsdriver.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    argv = shlex.split(line[len("ExecStart=") :])
    return [a for arg in argv for a in (shlex.split(opts) if arg == "$OVSDRIVER_OPTS" else [arg])]


def configured_opts() -> str:
    """OVSDRIVER_OPTS as ovsdriver.service reads it from /etc/default/ovsdriver."""
    script = f'set -a; . {DEFAULTS}; printf %s "$OVSDRIVER_OPTS"'
    return world.run(["sh", "-c", script], env=dict(SYSTEM_ENV)).stdout


def test_the_socket_activated_driver_serves_docker(installed, docker_world):
    # The operator's way to point the driver at another OVSDB: the defaults file.
    DEFAULTS.write_text(
        DEFAULTS.read_text()
        + f'OVSDRIVER_OPTS="--ovsdb {docker_world.ovs.remote} --datapath-type netdev"\n'
    )
    name = world.unique_driver_name()
    sock = f"{world.PLUGIN_DIR}/{name}.sock"
    log = docker_world.directory / f"{name}.log"
    argv = [
        world.which("systemd-socket-activate"),
        f"--listen={sock}",
        "--fdname=ovsdriver.socket",  # what systemd names the socket of ovsdriver.socket
        *(f"--setenv={key}={value}" for key, value in SYSTEM_ENV.items()),
        *unit_command(configured_opts()),
    ]
    assert "/usr/bin/twistd3" in argv
    os.makedirs(world.PLUGIN_DIR, exist_ok=True)
    with open(log, "ab") as out:
        proc = docker_world.netns.popen(
            argv, env=dict(SYSTEM_ENV), cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        world.wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 10)
        e2e = scenario(docker_world, name, "10.61.0.0/24")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        text = world.tail(log, 10**6)
        assert "/usr/bin/python3" in text.split("starting up")[0], text[:2000]
        bridge = "obr-" + e2e.network_id("pk")[:11]
        assert bridge in docker_world.ovs.bridges()
        if os.path.exists("/usr/bin/ovsdriver"):  # the console script, with Debian's libraries
            shown = docker_world.netns.run(
                ["/usr/bin/ovsdriver", "status", "--ovsdb", docker_world.ovs.remote, "--json"],
                env=dict(SYSTEM_ENV),
                cwd="/",
                check=False,
            )
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert bridge in shown.stdout
        docker_world.dockerd.docker("rm", "-f", "pk1", "pk2", timeout=120)
    finally:
        world.stop_process(proc.pid, popen=proc)
        world._unlink(sock)


def repack(deb: Path, version: str, directory: Path) -> Path:
    """The same package with another version: an upgrade for dpkg."""
    tree = directory / "tree"
    world.run(["dpkg-deb", "-R", deb, tree])
    control = tree / "DEBIAN" / "control"
    control.write_text(
        "".join(
            f"Version: {version}\n" if line.startswith("Version:") else line
            for line in control.read_text().splitlines(keepends=True)
        )
    )
    out = directory / f"ovsdriver_{version}_all.deb"
    world.run(["dpkg-deb", "--root-owner-group", "-b", tree, out], timeout=120)
    return out


def test_an_upgrade_keeps_the_edited_options_and_the_dropin(installed, tmp_path):
    edited = DEFAULTS.read_text()
    version = status().split()[1] + "+upgrade1"
    apt_get("install", str(repack(installed, version, tmp_path)))
    assert status() == f"ii  {version}"
    assert DEFAULTS.read_text() == edited
    assert twistd_lists_ovsdriver()


def test_remove_and_purge_leave_a_clean_system_and_ovsdb_untouched(installed, docker_world):
    bridges = docker_world.ovs.bridges()
    assert bridges  # the network of the scenario, whose driver is gone now
    apt_get("remove", "ovsdriver")
    assert status().startswith("rc ")
    assert not (SITE / "ovsdriver").exists()
    assert not (SITE / "twisted" / "plugins" / "ovsdriver_plugin.py").exists()
    assert not list(UNITS.glob("ovsdriver.*"))
    assert b"ovsdriver_plugin" not in DROPIN_CACHE.read_bytes()
    assert not twistd_lists_ovsdriver()
    assert DEFAULTS.exists()  # a conffile: kept until purge
    assert docker_world.ovs.bridges() == bridges
    apt_get("purge", "ovsdriver")
    assert status() == ""
    assert not DEFAULTS.exists()
    assert not Path("/usr/share/doc/ovsdriver").exists()
    assert docker_world.ovs.bridges() == bridges
