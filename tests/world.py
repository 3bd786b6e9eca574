"""Isolated "test worlds" for integration and end-to-end tests.

A world is a private network namespace with real daemons inside it: an
ovsdb-server and a userspace (``netdev``) ovs-vswitchd, optionally a private
dockerd, and the driver under test (``twistd -n ovsdriver``).  Every world has
its own namespace because two userspace ovs-vswitchd in one namespace break
each other and a dockerd with ``--iptables=true`` rewrites the firewall of the
namespace it runs in (see ``/work/shared/docs/testing.md``).

Rules every class here follows, so that a failing or interrupted test cannot
break the next one:

- Every wait is bounded; a timeout raises with the relevant log tail.
- Every daemon is stopped by the PID from its pidfile (never by name), waited
  for, and SIGKILLed if it does not go away in time.  A PID is only signalled
  after checking that it still belongs to this world (it lives in the world's
  network namespace), so a stale pidfile cannot hit an unrelated process.
- Every class is a context manager with an idempotent ``close()`` that also
  works after a half-failed start, so ``contextlib.ExitStack`` composes them.
- Names on shared machine-wide resources carry a recognisable prefix
  (``ovsw-`` for namespaces and directories, ``ovstest`` for driver sockets in
  the shared ``/run/docker/plugins``) so that stale leftovers of a killed run
  can be found and removed (``.ci/run`` does that).

Usage::

    with OVSWorld() as world:
        world.ovs.vsctl("add-br", "b0", "--", "set", "bridge", "b0",
                        "datapath_type=netdev")
        assert "b0" in world.netns.links()

    with DockerWorld() as world:
        driver = world.start_driver()
        world.dockerd.docker("network", "create", "-d", driver.name, "n1")
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

#: Prefix of world namespaces and world directories (``/tmp/ovsw-*``).
PREFIX = "ovsw"
#: Prefix of driver names, i.e. of sockets in the shared plugin directory.
DRIVER_PREFIX = "ovstest"
#: Where the engine looks for plugin sockets; fixed and shared machine-wide.
PLUGIN_DIR = "/run/docker/plugins"
#: The image :meth:`Dockerd.import_busybox` builds.
BUSYBOX_IMAGE = "ovsdriver-test/busybox"
#: Applets linked in the busybox image: testing.md's list plus a few that
#: tests commonly run as a container's command (``true``, ``echo``...).
BUSYBOX_APPLETS = (
    *("sh", "ip", "ping", "ping6", "ifconfig", "sleep", "cat", "nc", "wget"),
    *("httpd", "route", "ls", "grep", "awk"),
    *("true", "false", "echo", "hostname", "timeout", "mkdir"),
)
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Daemons and admin tools live in sbin, which a test runner's PATH may lack.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
# Longest usable path of a UNIX socket (sun_path is 108 bytes with the NUL).
_MAX_SOCKET_PATH = 107


class WorldError(RuntimeError):
    """A world could not be started or cleaned up."""


class CommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, str() shows its output."""

    def __str__(self) -> str:
        parts = [f"{shlex.join(self.cmd)} exited with status {self.returncode}"]
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                if isinstance(data, bytes):
                    data = data.decode("utf-8", "replace")
                parts.append(f"--- {label} ---\n{data.rstrip()}")
        return "\n".join(parts)


# --------------------------------------------------------------------------
# Small helpers


def which(program: str) -> str | None:
    """Find ``program`` on PATH or in the sbin directories."""
    return shutil.which(program, path=_SEARCH_PATH)


def _tool(program: str) -> str:
    path = which(program)
    if path is None:
        raise WorldError(f"{program} is not installed (looked in {_SEARCH_PATH})")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = _SEARCH_PATH
    env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 30,
    env: dict[str, str] | None = None,
    input: str | bytes | None = None,
    text: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``argv`` (a list, never a shell string) with a bounded runtime.

    Output is captured.  With ``check`` a non-zero exit raises
    :class:`CommandError`, whose message includes stdout and stderr.  A
    command still running after ``timeout`` seconds is killed and
    :class:`subprocess.TimeoutExpired` is raised.
    """
    args = [os.fspath(a) for a in argv]
    if input is not None and text and isinstance(input, bytes):
        text = False
    result = subprocess.run(
        args,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=text,
        timeout=timeout,
        env=env if env is not None else _env(),
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise CommandError(result.returncode, args, result.stdout, result.stderr)
    return result


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.1,
    message: str | Callable[[], str] | None = None,
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises :class:`TimeoutError` after ``timeout`` seconds (the predicate is
    always called at least once, and once more at the deadline).  ``message``
    (a string or a callable producing one, e.g. to add a log tail) explains
    what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise TimeoutError(
                f"{text or getattr(predicate, '__name__', 'condition')}:"
                f" still false after {timeout:g} s"
            )
        time.sleep(min(interval, remaining))


def tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return ""


def _unlink(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _close_all(steps: Iterable[Callable[[], Any]]) -> None:
    """Run every cleanup step even if some fail; then raise the first error."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as e:  # keep cleaning up
            errors.append(e)
    if errors:
        if len(errors) > 1:
            others = "; ".join(repr(e) for e in errors[1:])
            raise WorldError(f"cleanup failed: {errors[0]} (also: {others})") from (errors[0])
        raise errors[0]


# --------------------------------------------------------------------------
# Processes


def read_pidfile(path: str | os.PathLike[str]) -> int | None:
    """The PID in a pidfile, or None if it is missing or empty."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold
    spaces and parentheses): the state first; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (zombies count as dead)."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def net_ns_inode(pid: int | str) -> int | None:
    """The inode of the network namespace ``pid`` lives in (None if gone)."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    match = re.fullmatch(r"net:\[(\d+)\]", link)
    return int(match.group(1)) if match else None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def _wait_dead(pid: int, popen: subprocess.Popen | None, timeout: float) -> bool:
    if popen is not None and popen.pid == pid:
        try:
            popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        wait_until(lambda: not pid_alive(pid), timeout, 0.05)
        return True
    except TimeoutError:
        return False


def stop_process(
    pid: int | None,
    *,
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    popen: subprocess.Popen | None = None,
) -> None:
    """Send ``sig`` to ``pid``, wait up to ``timeout``, then SIGKILL and wait.

    ``popen``, if given, is reaped as well (so no zombie is left behind).
    Raises :class:`WorldError` if the process survives SIGKILL for 10 s.
    """
    if pid is not None and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if not _wait_dead(pid, popen, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_dead(pid, popen, 10.0):
                raise WorldError(f"process {pid} ({_cmdline(pid)}) survived SIGKILL")
    if popen is not None:
        if popen.poll() is None and popen.pid != pid:
            stop_process(popen.pid, sig=sig, timeout=timeout, popen=popen)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)


def _stop_many(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM several processes at once, then SIGKILL the survivors."""
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout, 0.05)
    for pid in pids:
        if pid_alive(pid):
            stop_process(pid, sig=signal.SIGKILL, timeout=10)


# --------------------------------------------------------------------------
# Mounts


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(*paths: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below any of ``paths`` (host mount namespace)."""
    roots = [os.path.realpath(p) for p in paths]
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
                found.append(point)
    return found


def unmount_under(*paths: str | os.PathLike[str]) -> None:
    """Lazily unmount everything at or below ``paths``, deepest first."""
    for _attempt in range(5):
        points = mounts_under(*paths)
        if not points:
            return
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            run(["umount", "-l", point], check=False, timeout=30)
    left = mounts_under(*paths)
    if left:
        raise WorldError(f"could not unmount {left}")


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Unmount what is mounted below ``path``, then delete it.

    Refuses to delete while anything is still mounted below, so a bind mount
    left behind can never make this delete files outside ``path``.
    """
    if not os.path.lexists(path):
        return
    unmount_under(path)
    shutil.rmtree(path)


# --------------------------------------------------------------------------
# Requirements


def _is_static_elf(path: str) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return False
            order = "little" if head[5] == 1 else "big"
            phoff = int.from_bytes(head[32:40], order)
            phentsize = int.from_bytes(head[54:56], order)
            phnum = int.from_bytes(head[56:58], order)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize : i * phentsize + 4], order) == 3:
            return False  # PT_INTERP: dynamically linked
    return True


def missing_requirements(docker: bool = False) -> list[str]:
    """What this machine lacks to build worlds (empty list: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    tools = ["ip", "nsenter", "umount"]
    tools += ["ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-appctl"]
    if docker:
        tools += ["dockerd", "containerd", "containerd-shim-runc-v2", "runc"]
    missing += [t for t in tools if which(t) is None]
    if not os.path.exists(OVS_SCHEMA):
        missing.append(OVS_SCHEMA)
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if docker:
        if docker_cli() is None:
            missing.append("docker (CLI)")
        if not _is_static_elf("/bin/busybox"):
            missing.append("static /bin/busybox (busybox-static)")
    return missing


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(docker: bool = False) -> None:
    """Skip the calling test (fail it when ``$CI`` is set) if worlds can't run.

    For use in fixtures and tests: a developer without root or without the
    packages sees a clear skip reason, while CI, which has everything, never
    skips silently.
    """
    import pytest

    missing = missing_requirements(docker)
    if not missing:
        return
    what = "dockerd and Open vSwitch" if docker else "Open vSwitch"
    reason = f"needs {what} as root; missing: {', '.join(missing)}"
    if _ci():
        pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------
# Network namespace


class _Closing:
    """A context manager whose exit is ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class Netns(_Closing):
    """A fresh network namespace ``<prefix>-<random hex>`` with ``lo`` up.

    Everything of a world runs in here via ``nsenter --net=PATH`` (not
    ``ip netns exec``, which remounts /sys and so breaks dockerd).
    ``close()`` ends any process still living in the namespace and deletes it.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.path = f"/run/netns/{self.name}"
        self._closed = False
        run(["ip", "netns", "add", self.name], timeout=10)
        try:
            #: Inode of the namespace: identifies the processes living in it.
            self.inode = os.stat(self.path).st_ino
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *map(os.fspath, argv)]

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        check: bool = True,
        timeout: float = 30,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace; see :func:`run`."""
        return run(self.argv(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any):
        """Start ``argv`` inside the namespace; the caller must reap it."""
        kw.setdefault("env", _env())
        return subprocess.Popen(self.argv(argv), **kw)

    def socket(self, *args: Any) -> socket.socket:
        """``socket.socket(*args)`` made in this namespace (and staying in
        it): made by a thread of its own that enters the namespace first."""
        made: list[Any] = []

        def make() -> None:
            try:
                with open(self.path) as ns:
                    if _libc().setns(ns.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {self.path}")
                made.append(socket.socket(*args))
            except OSError as e:
                made.append(e)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if isinstance(made[0], OSError):
            raise made[0]
        return made[0]

    def bind_tcp(self, port: int) -> str | None:
        """Bind TCP *port* on every address here as a server does (with
        SO_REUSEADDR) and let it go: None if that worked, else why not."""
        with self.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as e:
                return e.strerror
        return None

    def pids(self) -> list[int]:
        """PIDs of the live processes whose network namespace is this one."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and net_ns_inode(entry) == self.inode:
                found.append(int(entry))
        return found

    def owns(self, pid: int | None) -> bool:
        """Whether ``pid`` is alive and lives in this namespace."""
        return pid is not None and pid_alive(pid) and net_ns_inode(pid) == self.inode

    def links(self) -> list[str]:
        """Names of the network interfaces in the namespace."""
        out = self.run(["ip", "-j", "link", "show"]).stdout
        return [link["ifname"] for link in json.loads(out or "[]")]

    def close(self) -> None:
        """Stop every process left in the namespace, then delete it."""
        if self._closed:
            return
        if hasattr(self, "inode"):
            _stop_many(self.pids())
        if os.path.lexists(self.path):
            run(["ip", "netns", "delete", self.name], timeout=30)
        self._closed = True

    def __repr__(self) -> str:
        return f"<Netns {self.name}>"


# --------------------------------------------------------------------------
# Open vSwitch


class OVS(_Closing):
    """A private ovsdb-server and userspace ovs-vswitchd inside ``netns``.

    All files (database, sockets, pidfiles, logs) live in ``directory``.
    Bridges must be created with ``datapath_type=netdev``.  ``remote`` is the
    OVSDB remote to hand to the driver.  The database file survives
    :meth:`stop_ovsdb` / :meth:`start_ovsdb`, so restarts keep the content.
    """

    def __init__(self, netns: Netns, directory: str | os.PathLike[str], start: bool = True) -> None:
        self.netns = netns
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        self.db = d / "conf.db"
        self.db_socket = d / "db.sock"
        #: The OVSDB remote of this instance, e.g. ``unix:/tmp/ovsw-x/db.sock``.
        self.remote = f"unix:{self.db_socket}"
        self.ovsdb_ctl = d / "ovsdb.ctl"
        self.vswitchd_ctl = d / "vswitchd.ctl"
        self.ovsdb_pidfile = d / "ovsdb-server.pid"
        self.vswitchd_pidfile = d / "ovs-vswitchd.pid"
        self.ovsdb_log = d / "ovsdb-server.log"
        self.vswitchd_log = d / "ovs-vswitchd.log"
        self._closed = False
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def env(self) -> dict[str, str]:
        """Environment for OVS tools that must talk to *this* instance."""
        d = str(self.directory)
        return _env(OVS_RUNDIR=d, OVS_LOGDIR=d, OVS_DBDIR=d)

    def _start_daemon(self, argv: list[str], name: str, timeout: float) -> None:
        # --detach returns once the daemon is ready.  Its output goes to a
        # file, not a pipe: a daemon inheriting a pipe could hold it open.
        with open(self.directory / f"{name}.out", "ab") as out:
            proc = self.netns.popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc.pid, popen=proc)
                rc = None
        if rc != 0:
            why = "timed out" if rc is None else f"exited with {rc}"
            raise WorldError(
                f"{name} {why}:\n{tail(self.directory / f'{name}.out')}"
                f"{tail(self.directory / f'{name}.log')}"
            )

    def start(self) -> None:
        """Create the database if needed, start ovsdb-server and ovs-vswitchd."""
        if not self.db.exists():
            run([_tool("ovsdb-tool"), "create", self.db, OVS_SCHEMA], env=self.env)
        self.start_ovsdb()
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()

    def start_ovsdb(self, timeout: float = 30, extra_args: Sequence[str] = ()) -> None:
        """Start ovsdb-server on the existing database file (``extra_args``:
        more options, e.g. a ``pssl`` remote and its files)."""
        argv = [
            _tool("ovsdb-server"),
            str(self.db),
            f"--remote=punix:{self.db_socket}",
            f"--unixctl={self.ovsdb_ctl}",
            f"--pidfile={self.ovsdb_pidfile}",
            f"--log-file={self.ovsdb_log}",
            "--detach",
            *extra_args,
        ]
        try:
            self._start_daemon(argv, "ovsdb-server", timeout)
        except BaseException:
            self.stop_ovsdb()
            raise

    def start_vswitchd(self, timeout: float = 30) -> None:
        """Start ovs-vswitchd (needs a running ovsdb-server)."""
        argv = [
            _tool("ovs-vswitchd"),
            self.remote,
            f"--unixctl={self.vswitchd_ctl}",
            f"--pidfile={self.vswitchd_pidfile}",
            f"--log-file={self.vswitchd_log}",
            "--detach",
        ]
        try:
            self._start_daemon(argv, "ovs-vswitchd", timeout)
        except BaseException:
            self.stop_vswitchd()
            raise

    def _stop(self, pidfile: Path, timeout: float) -> None:
        pid = read_pidfile(pidfile)
        if self.netns.owns(pid):
            stop_process(pid, timeout=timeout)
        _unlink(pidfile)  # it is stale now (SIGKILL leaves it behind)

    @property
    def ovsdb_pid(self) -> int | None:
        """PID of the running ovsdb-server, or None."""
        pid = read_pidfile(self.ovsdb_pidfile)
        return pid if self.netns.owns(pid) else None

    @property
    def vswitchd_pid(self) -> int | None:
        """PID of the running ovs-vswitchd, or None."""
        pid = read_pidfile(self.vswitchd_pidfile)
        return pid if self.netns.owns(pid) else None

    def stop_vswitchd(self, timeout: float = 10) -> None:
        """Stop ovs-vswitchd (SIGTERM, then SIGKILL after ``timeout``)."""
        self._stop(self.vswitchd_pidfile, timeout)

    def stop_ovsdb(self, timeout: float = 10) -> None:
        """Stop ovsdb-server; the database file is kept."""
        self._stop(self.ovsdb_pidfile, timeout)

    def restart_vswitchd(self) -> None:
        """Stop and start ovs-vswitchd (internal ports' taps are recreated)."""
        self.stop_vswitchd()
        self.start_vswitchd()

    def restart_ovsdb(self) -> None:
        """Stop and start ovsdb-server, keeping the database."""
        self.stop_ovsdb()
        self.start_ovsdb()

    def vsctl(self, *args: str, check: bool = True, timeout: float = 10) -> str:
        """Run ``ovs-vsctl`` against this instance; return stdout stripped.

        Like plain ovs-vsctl it waits for ovs-vswitchd to apply changes
        (unless ``--no-wait`` is passed); ``--timeout`` bounds that wait.
        """
        argv = [_tool("ovs-vsctl"), f"--db={self.remote}", f"--timeout={timeout:g}"]
        result = run([*argv, *args], check=check, timeout=timeout + 10, env=self.env)
        return result.stdout.strip()

    def appctl(self, *args: str, check: bool = True, timeout: float = 10) -> str:
        """Run ``ovs-appctl`` against this ovs-vswitchd; return stdout stripped."""
        argv = [_tool("ovs-appctl"), "-t", str(self.vswitchd_ctl)]
        argv.append(f"--timeout={timeout:g}")
        result = run([*argv, *args], check=check, timeout=timeout + 10, env=self.env)
        return result.stdout.strip()

    def bridges(self) -> list[str]:
        """Names of the bridges in the database."""
        return self.vsctl("--no-wait", "list-br").split()

    def reset(self) -> None:
        """Delete every bridge (e.g. between tests sharing one world)."""
        args: list[str] = []
        for bridge in self.bridges():
            args += ["--", "--if-exists", "del-br", bridge]
        if args:
            self.vsctl(*args)

    def log(self) -> str:
        """The ovs-vswitchd log."""
        return tail(self.vswitchd_log, 10**9)

    def close(self) -> None:
        """Stop ovs-vswitchd, then ovsdb-server (files stay in the directory)."""
        if self._closed:
            return
        _close_all([self.stop_vswitchd, self.stop_ovsdb])
        self._closed = True

    def __repr__(self) -> str:
        return f"<OVS {self.remote} in {self.netns.name}>"


# --------------------------------------------------------------------------
# Docker


def docker_cli() -> str | None:
    """The docker CLI to use: Debian's (matching its dockerd 20.10) if present.

    /usr/local/bin/docker may be a different (newer) client build; Debian's
    docker.io CLI is known to match the engine.
    """
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return which("docker")


def busybox_tar(busybox: str = "/bin/busybox", applets: Sequence[str] = BUSYBOX_APPLETS) -> bytes:
    """A root file system tarball holding Debian's static busybox.

    The layout testing.md describes: /bin/busybox, one symlink per applet,
    and empty /etc /proc /sys /dev /tmp.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in [
            ("bin", 0o755),
            ("etc", 0o755),
            ("proc", 0o755),
            ("sys", 0o755),
            ("dev", 0o755),
            ("tmp", 0o1777),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        real = os.path.realpath(busybox)
        info = tar.gettarinfo(real, arcname="bin/busybox")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with open(real, "rb") as f:
            tar.addfile(info, f)
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
    return buf.getvalue()


class Dockerd(_Closing):
    """A private Docker engine inside ``netns``, with its files in ``directory``.

    Started with ``nsenter --net`` (not ``ip netns exec``: that remounts /sys
    and dockerd then dies with "Devices cgroup isn't mounted"), its own
    data-root, exec-root (where its private containerd lives), API socket,
    pidfile, an empty daemon config (so /etc/docker/daemon.json cannot leak
    in), a private containerd namespace, ``--bridge=none`` and
    ``--iptables=<iptables> --ip6tables=false``.  Its output goes to
    ``dockerd.log``.  ``iptables_kind="legacy"`` makes it write its rules with
    iptables-legacy, as on a host whose ``iptables`` is that kind.

    ``close()`` removes all containers, stops dockerd by PID, ends whatever it
    left running (containerd, shims, container processes), unmounts everything
    below its data-root and exec-root and deletes them.  ``dockerd.log`` stays.
    """

    def __init__(
        self,
        netns: Netns,
        directory: str | os.PathLike[str],
        iptables: bool = False,
        start: bool = True,
        extra_args: Sequence[str] = (),
        iptables_kind: str | None = None,
    ) -> None:
        self.netns = netns
        self.iptables_kind = iptables_kind
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        self.iptables = iptables
        self.data_root = d / "root"
        self.exec_root = d / "exec"
        self.socket = d / "docker.sock"
        #: The ``-H`` value for the docker CLI.
        self.host = f"unix://{self.socket}"
        self.pidfile = d / "docker.pid"
        self.logfile = d / "dockerd.log"
        self.config_file = d / "daemon.json"
        self.cli_config = d / "cli"
        self.containerd_namespace = f"{PREFIX}-{secrets.token_hex(4)}"
        self.extra_args = list(extra_args)
        self._popen: subprocess.Popen | None = None
        self._closed = False
        # containerd's ttrpc socket is the longest path dockerd creates.
        longest = self.exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"directory {d} is too long for UNIX socket paths below it;"
                " use a short one such as tempfile.mkdtemp(dir='/tmp')"
            )
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def cli(self) -> str:
        """Path of the docker CLI used by :meth:`docker`."""
        cli = docker_cli()
        if cli is None:
            raise WorldError("no docker CLI installed")
        return cli

    @property
    def pid(self) -> int | None:
        """PID of the running dockerd, or None."""
        pid = read_pidfile(self.pidfile)
        if not self.netns.owns(pid) and self._popen and self._popen.poll() is None:
            pid = self._popen.pid  # started, pidfile not written yet
        return pid if self.netns.owns(pid) else None

    def _cli_env(self) -> dict[str, str]:
        env = _env(DOCKER_CONFIG=str(self.cli_config))
        for key in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY"):
            env.pop(key, None)
        env.pop("DOCKER_CERT_PATH", None)
        return env

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the docker CLI against this engine; text output in the result."""
        return run(
            [self.cli, "-H", self.host, *args],
            check=check,
            timeout=timeout,
            input=input,
            env=self._cli_env(),
        )

    def ready(self) -> bool:
        """Whether the engine answers ``docker info``."""
        try:
            result = self.docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _env(self) -> dict[str, str]:
        """dockerd's environment: its iptables tools first on the PATH."""
        if self.iptables_kind is None:
            return _env()
        tools = self.directory / f"iptables-{self.iptables_kind}"
        tools.mkdir(exist_ok=True)
        for name in ("iptables", "ip6tables"):
            for suffix in ("", "-save", "-restore"):
                link = tools / f"{name}{suffix}"
                if not link.exists():
                    link.symlink_to(_tool(f"{name}-{self.iptables_kind}{suffix}"))
        return _env(PATH=f"{tools}{os.pathsep}{_SEARCH_PATH}")

    def start(self, timeout: float = 60) -> None:
        """Start dockerd and wait until ``docker info`` works."""
        if self._popen is not None and self._popen.poll() is None:
            raise WorldError("dockerd is already running")
        self.config_file.write_text("{}\n")
        self.cli_config.mkdir(exist_ok=True)
        argv = [
            _tool("dockerd"),
            f"--config-file={self.config_file}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--host={self.host}",
            f"--pidfile={self.pidfile}",
            "--bridge=none",
            f"--iptables={'true' if self.iptables else 'false'}",
            "--ip6tables=false",
            f"--containerd-namespace={self.containerd_namespace}",
            f"--containerd-plugins-namespace={self.containerd_namespace}-plugins",
            "--shutdown-timeout=5",
            *self.extra_args,
        ]
        with open(self.logfile, "ab") as log:
            log.write(f"=== {shlex.join(argv)}\n".encode())
            log.flush()
            self._popen = self.netns.popen(
                argv,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C reaches pytest, not dockerd
            )

        def up() -> bool:
            if self._popen.poll() is not None:
                raise WorldError(
                    f"dockerd exited with {self._popen.returncode}:\n" + tail(self.logfile)
                )
            return self.ready()

        try:
            wait_until(
                up,
                timeout,
                0.2,
                lambda: f"dockerd did not answer:\n{tail(self.logfile)}",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop dockerd (SIGTERM: it stops its containers, then SIGKILL).

        Data is kept: :meth:`start` brings the engine back with its networks,
        images and (stopped) containers, as after a real daemon restart.
        Pass ``sig=signal.SIGKILL`` to simulate a crash.
        """
        stop_process(self.pid, sig=sig, timeout=timeout, popen=self._popen)
        if self._popen is not None:
            stop_process(self._popen.pid, popen=self._popen)
            self._popen = None
        _unlink(self.pidfile)

    def restart(self, timeout: float = 60) -> None:
        """Stop and start dockerd."""
        self.stop()
        self.start(timeout)

    def containers(self) -> list[str]:
        """IDs of all containers, running or not."""
        return self.docker("ps", "-aq", "--no-trunc").stdout.split()

    def reset(self) -> None:
        """Remove all containers and user-defined networks.

        Call it while the network drivers in use are still running: removing
        a network or container whose driver is gone makes the engine retry
        for about 15 seconds per call.
        """
        ids = self.containers()
        if ids:
            self.docker("rm", "-f", *ids, timeout=120)
        nets = self.custom_networks()
        if not nets:
            return
        removal = self.docker("network", "rm", *nets, check=False, timeout=120)
        left = self.custom_networks()
        if "has active endpoints" in removal.stderr and left and not self._endpoints(left):
            # moby#42119: after concurrent container removals the engine's
            # count of a network's endpoints can stay above zero with no
            # endpoint left ("has active endpoints", nothing logged).  The
            # engine recounts when it starts, as a user would find out.
            print(f"\nrestarting dockerd: {removal.stderr.strip()}")
            self.restart()
            removal = self.docker("network", "rm", *left, check=False, timeout=120)
        if removal.returncode:
            raise CommandError(removal.returncode, removal.args, removal.stdout, removal.stderr)

    def custom_networks(self) -> list[str]:
        """IDs of the user-defined networks."""
        return self.docker("network", "ls", "-q", "--filter", "type=custom").stdout.split()

    def _endpoints(self, networks: Sequence[str]) -> list[str]:
        """Names of the endpoints the engine lists on ``networks``."""
        out = self.docker("network", "inspect", "-f", "{{json .Containers}}", *networks).stdout
        return [ep["Name"] for line in out.splitlines() for ep in (json.loads(line) or {}).values()]

    def import_busybox(self, image: str = BUSYBOX_IMAGE) -> str:
        """Build ``image`` from /bin/busybox (see :func:`busybox_tar`)."""
        result = run(
            [self.cli, "-H", self.host, "import", "-", image],
            input=busybox_tar(),
            timeout=120,
            env=self._cli_env(),
        )
        return result.stdout.decode().strip()

    def log(self) -> str:
        """dockerd's output."""
        return tail(self.logfile, 10**9)

    def _tasks(self) -> list[Path]:
        """containerd's state directories of this engine's containers."""
        tasks = self.exec_root / "containerd" / "daemon"
        return sorted(tasks.glob("io.containerd.runtime.v2.task/*/*"))

    def _sweep(self) -> None:
        """End what outlived dockerd (a crash, a failed stop), by PID.

        Container processes have their own network namespaces: they are found
        by the init.pid files containerd keeps, checked against their cgroup,
        and SIGKILLed (PID 1 of a container ignores SIGTERM).  containerd and
        the shims live in our namespace and name our exec-root on their
        command line.  Last, the shims' sockets, which containerd 1.6 keeps in
        the machine-wide /run/containerd/s named by a hash of (containerd
        address, namespace, container id), are removed.
        """
        tasks = self._tasks()
        for task in tasks:
            pid = read_pidfile(task / "init.pid")
            with contextlib.suppress(OSError):
                if pid and task.name in Path(f"/proc/{pid}/cgroup").read_text():
                    stop_process(pid, sig=signal.SIGKILL)
        exec_root = str(self.exec_root)
        _stop_many(p for p in self.netns.pids() if exec_root in _cmdline(p))
        address = self.exec_root / "containerd" / "containerd.sock"
        for task in tasks:
            key = f"{address}/{task.parent.name}/{task.name}".encode()
            _unlink(f"/run/containerd/s/{hashlib.sha256(key).hexdigest()}")

    def close(self) -> None:
        """Remove containers, stop everything, unmount and delete the roots."""
        if self._closed:
            return

        def remove_containers() -> None:
            if self.pid is not None and self.ready():
                ids = self.containers()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=120)

        _close_all(
            [
                remove_containers,
                self.stop,
                self._sweep,
                lambda: unmount_under(self.data_root, self.exec_root),
                lambda: remove_tree(self.data_root),
                lambda: remove_tree(self.exec_root),
                lambda: _unlink(self.socket),
                lambda: shutil.rmtree(self.cli_config, ignore_errors=True),
            ]
        )
        self._closed = True

    def __repr__(self) -> str:
        return f"<Dockerd {self.host} in {self.netns.name}>"


# --------------------------------------------------------------------------
# The driver under test


def unique_driver_name() -> str:
    """A driver name no other engine or test run on this machine uses."""
    return f"{DRIVER_PREFIX}{secrets.token_hex(3)}"


def twistd_argv() -> list[str]:
    """twistd as the running Python has it: the script next to the interpreter
    (a venv's), else the interpreter running twistd's entry point. Never the
    twistd on PATH, which may belong to another Python with other libraries."""
    candidate = Path(sys.executable).parent / "twistd"
    if os.access(candidate, os.X_OK):
        return [str(candidate)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Driver(_Closing):
    """The driver under test, ``twistd -n ovsdriver``, inside ``netns``.

    It listens on ``/run/docker/plugins/<name>.sock`` (the engine finds it as
    ``-d <name>``) and uses the OVSDB at ``ovsdb_remote``.  Its pidfile, log
    and stdout/stderr (``driver.out``: errors before logging starts) are in
    ``directory``.  The repository root is put first on PYTHONPATH, so the
    checkout is what runs, and twistd finds its dropin, however (or whether)
    the package is installed.

    ``kill()`` leaves the socket behind as a real crash would; ``close()``
    removes the socket and its ``.lock``.
    """

    def __init__(
        self,
        netns: Netns,
        name: str,
        ovsdb_remote: str,
        directory: str | os.PathLike[str],
        datapath_type: str | None = "netdev",
        extra_args: Sequence[str] = (),
        start: bool = True,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.netns = netns
        self.name = name
        #: A command the driver is started through, which must exec it
        #: (same PID), e.g. ``unshare --mount`` for a mount namespace of its own.
        self.wrapper = list(wrapper)
        self.ovsdb_remote = ovsdb_remote
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.datapath_type = datapath_type
        self.extra_args = list(extra_args)
        self.socket = f"{PLUGIN_DIR}/{name}.sock"
        self.lockfile = f"{self.socket}.lock"
        self.pidfile = self.directory / "driver.pid"
        self.logfile = self.directory / "driver.log"
        self.outfile = self.directory / "driver.out"
        self._popen: subprocess.Popen | None = None
        self._closed = False
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def argv(self) -> list[str]:
        """The command line run inside the namespace."""
        argv = [
            *self.wrapper,
            *twistd_argv(),
            "-n",
            f"--pidfile={self.pidfile}",
            f"--logfile={self.logfile}",
            "ovsdriver",
            "--listen",
            f"unix:{self.socket}:mode=660",
            "--ovsdb",
            self.ovsdb_remote,
        ]
        if self.datapath_type:
            argv += ["--datapath-type", self.datapath_type]
        return argv + self.extra_args

    @property
    def pid(self) -> int | None:
        """PID of the running driver, or None."""
        pid = read_pidfile(self.pidfile)
        if not self.netns.owns(pid) and self._popen and self._popen.poll() is None:
            pid = self._popen.pid  # nsenter execs twistd: same PID
        return pid if self.netns.owns(pid) else None

    @property
    def running(self) -> bool:
        """Whether the driver process is alive."""
        return self.pid is not None

    def accepting(self) -> bool:
        """Whether something accepts connections on the driver's socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def start(self, timeout: float = 30) -> None:
        """Start the driver and wait until its socket accepts connections."""
        if self.running:
            raise WorldError(f"driver {self.name} is already running")
        os.makedirs(PLUGIN_DIR, exist_ok=True)
        if not self.netns.owns(read_pidfile(self.pidfile)):
            _unlink(self.pidfile)  # stale: twistd would refuse to start
        pythonpath = os.environ.get("PYTHONPATH", "")
        env = _env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), pythonpath])))
        with open(self.outfile, "ab") as out:
            self._popen = self.netns.popen(
                self.argv,
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            if self._popen.poll() is not None:
                raise WorldError(
                    f"driver exited with {self._popen.returncode}:\n"
                    f"{tail(self.outfile)}{tail(self.logfile)}"
                )
            return self.accepting()

        try:
            wait_until(
                up,
                timeout,
                0.1,
                lambda: f"driver socket {self.socket} not accepting:\n" + tail(self.logfile),
            )
        except BaseException:
            self.kill()
            raise

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        """Send ``sig`` to the driver and wait for it to exit.

        If it is still alive after ``timeout`` it is SIGKILLed.  After a
        SIGKILL the socket and lock are left behind, as in a real crash.
        """
        stop_process(self.pid, sig=sig, timeout=timeout, popen=self._popen)
        self._popen = None
        if not self.netns.owns(read_pidfile(self.pidfile)):
            _unlink(self.pidfile)

    def stop(self, timeout: float = 10) -> None:
        """Stop the driver gracefully (SIGTERM)."""
        self.kill(signal.SIGTERM, timeout)

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop the driver with ``sig`` and start it again."""
        self.kill(sig)
        self.start(timeout)

    def log(self) -> str:
        """The driver's whole log (twistd's rotated files included)."""
        rotated = sorted(
            self.directory.glob("driver.log.*"),
            key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
            reverse=True,
        )
        return "".join(tail(p, 10**9) for p in [*rotated, self.logfile])

    def output(self) -> str:
        """What twistd wrote to stdout/stderr (startup errors)."""
        return tail(self.outfile, 10**9)

    def post(self, method: str, body: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
        """:func:`plugin_post` to this driver."""
        return plugin_post(self.socket, method, body, timeout)

    def close(self) -> None:
        """Stop the driver; remove its socket, lock and pidfile."""
        if self._closed:
            return
        _close_all(
            [
                self.stop,
                lambda: _unlink(self.socket),
                lambda: _unlink(self.lockfile),
                lambda: _unlink(self.pidfile),
            ]
        )
        self._closed = True

    def __repr__(self) -> str:
        return f"<Driver {self.name} in {self.netns.name}>"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def engine_call(conn: http.client.HTTPConnection, method: str, url: str, body: Any = None) -> Any:
    """One call to the engine's API on ``conn`` (JSON in and out), without
    the docker CLI's ~0.1 s per command: the pace of docker compose."""
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = response.read()
    if response.status >= 300:
        raise WorldError(f"{method} {url}: {response.status} {reply[:300]!r}")
    return json.loads(reply) if reply else None


def plugin_post(
    socket_path: str | os.PathLike[str],
    method: str,
    body: dict | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """POST to ``/<method>`` over a UNIX socket the way the engine does.

    Like the engine: an ``Accept: application/vnd.docker.plugins.v1.2+json``
    header, *no* Content-Type, a JSON body with a trailing newline (an empty
    body when ``body`` is None, as for Plugin.Activate).  Returns
    ``(status, parsed JSON)``, or ``(status, text)`` if the reply is not JSON.
    """
    data = b"" if body is None else (json.dumps(body) + "\n").encode()
    conn = UnixHTTPConnection(os.fspath(socket_path), timeout)
    try:
        conn.putrequest("POST", f"/{method}", skip_accept_encoding=True)
        conn.putheader("Accept", "application/vnd.docker.plugins.v1.2+json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# --------------------------------------------------------------------------
# Whole worlds


def make_world_dir(prefix: str = PREFIX) -> Path:
    """A fresh short directory ``/tmp/<prefix>-XXXXXXXX``.

    Short, because UNIX socket paths below it must fit in 108 bytes (pytest's
    ``tmp_path`` can be much longer).
    """
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))


class OVSWorld(_Closing):
    """A network namespace with a private Open vSwitch: ``netns``, ``ovs``.

    Files live in ``directory`` (a fresh ``/tmp/ovsw-*`` unless given), which
    ``close()`` deletes unless the environment sets ``OVSW_KEEP=1`` (to read
    the logs after a failure).  Drivers started with :meth:`start_driver` are
    closed with the world.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._stack = contextlib.ExitStack()
        self._drivers = contextlib.ExitStack()
        try:
            if directory is None:
                directory = make_world_dir()
                if os.environ.get("OVSW_KEEP") != "1":
                    self._stack.callback(remove_tree, directory)
            self.directory = Path(directory)
            self.netns = self._stack.enter_context(Netns())
            self.ovs = self._stack.enter_context(OVS(self.netns, self.directory / "ovs"))
            self._stack.callback(self._drivers.close)
            self._setup()
        except BaseException:
            self._stack.close()
            raise

    def _setup(self) -> None:
        """Hook for subclasses: add more to the world (closed before drivers)."""

    def start_driver(self, name: str | None = None, **kwargs: Any) -> Driver:
        """Start a :class:`Driver` in this world, closed with the world.

        ``name`` defaults to a unique one; ``kwargs`` go to :class:`Driver`.
        """
        name = name or unique_driver_name()
        driver = Driver(
            self.netns,
            name,
            self.ovs.remote,
            self.directory / f"driver-{name}",
            **kwargs,
        )
        return self._drivers.enter_context(driver)

    def logs(self, lines: int = 40) -> str:
        """Tails of every log of the world, for assertion messages."""
        parts = []
        for path in sorted(self.directory.rglob("*.log")):
            parts.append(f"--- {path} ---\n{tail(path, lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Close everything in reverse order of creation."""
        self._stack.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.netns.name} in {self.directory}>"


class DockerWorld(OVSWorld):
    """An :class:`OVSWorld` plus a private ``dockerd`` with the busybox image.

    The engine is closed before the drivers, so that removing its containers
    can still reach them.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        iptables: bool = False,
        dockerd_args: Sequence[str] = (),
        iptables_kind: str | None = None,
    ) -> None:
        self._iptables = iptables
        self._dockerd_args = list(dockerd_args)
        self._iptables_kind = iptables_kind
        super().__init__(directory)

    def _setup(self) -> None:
        self.dockerd = self._stack.enter_context(
            Dockerd(
                self.netns,
                self.directory / "docker",
                iptables=self._iptables,
                extra_args=self._dockerd_args,
                iptables_kind=self._iptables_kind,
            )
        )
        self.dockerd.import_busybox()


# --------------------------------------------------------------------------
# Several hosts with OVN

OVN_NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
OVN_SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
#: The underlay network joining the simulated hosts (inside their namespaces).
UNDERLAY = "172.31.250.0/24"


class OVNCentral(_Closing):
    """An OVN central in a namespace of its own: the Northbound and Southbound
    ovsdb-servers on UNIX sockets in ``directory`` and ovn-northd.

    ``nb_remote`` / ``sb_remote`` are what hosts and drivers connect to.
    :meth:`stop_nb` / :meth:`start_nb` keep the database file.
    """

    def __init__(self, directory: str | os.PathLike[str], start: bool = True) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        self.nb_db, self.sb_db = d / "nb.db", d / "sb.db"
        self.nb_socket, self.sb_socket = d / "nb.sock", d / "sb.sock"
        self.nb_remote, self.sb_remote = f"unix:{self.nb_socket}", f"unix:{self.sb_socket}"
        self._closed = False
        self.netns = Netns()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def env(self) -> dict[str, str]:
        d = str(self.directory)
        return _env(OVS_RUNDIR=d, OVS_LOGDIR=d, OVN_RUNDIR=d, OVN_LOGDIR=d, OVN_DBDIR=d)

    def _daemon(self, name: str, argv: list[str], timeout: float = 30) -> None:
        with open(self.directory / f"{name}.out", "ab") as out:
            proc = self.netns.popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc.pid, popen=proc)
                rc = None
        if rc != 0:
            raise WorldError(
                f"{name} failed ({rc}):\n{tail(self.directory / f'{name}.out')}"
                f"{tail(self.directory / f'{name}.log')}"
            )

    def _ovsdb_argv(self, name: str, db: Path, sock: Path) -> list[str]:
        d = self.directory
        return [
            _tool("ovsdb-server"),
            str(db),
            f"--remote=punix:{sock}",
            f"--unixctl={d / (name + '.ctl')}",
            f"--pidfile={d / (name + '.pid')}",
            f"--log-file={d / (name + '.log')}",
            "--detach",
        ]

    def start(self) -> None:
        for db, schema in ((self.nb_db, OVN_NB_SCHEMA), (self.sb_db, OVN_SB_SCHEMA)):
            if not db.exists():
                run([_tool("ovsdb-tool"), "create", db, schema], env=self.env)
        self.start_nb()
        self._daemon("sb", self._ovsdb_argv("sb", self.sb_db, self.sb_socket))
        d = self.directory
        self._daemon(
            "ovn-northd",
            [
                _tool("ovn-northd"),
                f"--ovnnb-db={self.nb_remote}",
                f"--ovnsb-db={self.sb_remote}",
                f"--unixctl={d / 'northd.ctl'}",
                f"--pidfile={d / 'ovn-northd.pid'}",
                f"--log-file={d / 'ovn-northd.log'}",
                "--detach",
            ],
        )

    def start_nb(self) -> None:
        """Start the Northbound ovsdb-server on its existing database."""
        self._daemon("nb", self._ovsdb_argv("nb", self.nb_db, self.nb_socket))

    def _stop(self, name: str) -> None:
        pidfile = self.directory / f"{name}.pid"
        pid = read_pidfile(pidfile)
        if self.netns.owns(pid):
            stop_process(pid)
        _unlink(pidfile)

    def stop_nb(self) -> None:
        """Stop the Northbound ovsdb-server (the database file stays)."""
        self._stop("nb")

    def nbctl(self, *args: str, check: bool = True, timeout: float = 10) -> str:
        """``ovn-nbctl`` against this central; stdout stripped."""
        argv = [_tool("ovn-nbctl"), f"--db={self.nb_remote}", f"--timeout={timeout:g}", *args]
        return run(argv, check=check, timeout=timeout + 10, env=self.env).stdout.strip()

    def switches(self) -> list[str]:
        return self.nbctl("--bare", "--columns=name", "list", "Logical_Switch").split()

    def ports(self) -> list[str]:
        return self.nbctl("--bare", "--columns=name", "list", "Logical_Switch_Port").split()

    def close(self) -> None:
        if self._closed:
            return
        _close_all(
            [
                lambda: self._stop("ovn-northd"),
                lambda: self._stop("sb"),
                self.stop_nb,
                self.netns.close,
            ]
        )
        self._closed = True


class OVNHost(_Closing):
    """One simulated OVN host: a namespace with its own Open vSwitch (``br-int``
    netdev fail_mode=secure, ``br-phy`` holding the encap address ``encap_ip``
    on the underlay link ``underlay``), ovn-controller as chassis
    ``system_id``, and optionally a dockerd (``docker=True``).
    """

    def __init__(
        self,
        central: OVNCentral,
        directory: str | os.PathLike[str],
        system_id: str,
        encap_ip: str,
        docker: bool = False,
        iptables: bool = True,
    ) -> None:
        self.central = central
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.system_id = system_id
        self.encap_ip = encap_ip
        self.underlay = "underlay0"
        self._stack = contextlib.ExitStack()
        self._drivers = contextlib.ExitStack()
        self.dockerd: Dockerd | None = None
        try:
            self.netns = self._stack.enter_context(Netns())
            self.ovs = self._stack.enter_context(OVS(self.netns, self.directory / "ovs"))
            self._stack.callback(self.stop_controller)
            self._stack.callback(self._drivers.close)
            if docker:
                self.dockerd = self._stack.enter_context(
                    Dockerd(self.netns, self.directory / "docker", iptables=iptables)
                )
                self.dockerd.import_busybox()
        except BaseException:
            self._stack.close()
            raise

    @property
    def env(self) -> dict[str, str]:
        d = str(self.directory / "ovs")
        return _env(OVS_RUNDIR=d, OVS_LOGDIR=d, OVN_RUNDIR=d, OVN_LOGDIR=d)

    def configure(self) -> None:
        """Bridges, encap address and the chassis settings (the underlay link
        must be in the namespace already)."""
        prefix = UNDERLAY.split("/")[1]
        self.ovs.vsctl(
            "--", "add-br", "br-int",
            "--", "set", "bridge", "br-int", "datapath_type=netdev", "fail_mode=secure",
            "other_config:disable-in-band=true",
            "--", "add-br", "br-phy",
            "--", "set", "bridge", "br-phy", "datapath_type=netdev",
            "--", "add-port", "br-phy", self.underlay,
            "--", "set", "open", ".",
            f"external_ids:system-id={self.system_id}",
            f"external_ids:ovn-remote={self.central.sb_remote}",
            "external_ids:ovn-encap-type=geneve",
            f"external_ids:ovn-encap-ip={self.encap_ip}",
            "external_ids:ovn-bridge-datapath-type=netdev",
        )  # fmt: skip
        self.netns.run(["ip", "link", "set", self.underlay, "up"])
        self.netns.run(["ip", "addr", "add", f"{self.encap_ip}/{prefix}", "dev", "br-phy"])
        self.netns.run(["ip", "link", "set", "br-phy", "up"])

    @property
    def controller_pidfile(self) -> Path:
        return self.directory / "ovs" / "ovn-controller.pid"

    def start_controller(self, timeout: float = 30) -> None:
        d = self.directory / "ovs"
        argv = [
            _tool("ovn-controller"),
            self.ovs.remote,
            f"--pidfile={self.controller_pidfile}",
            f"--log-file={d / 'ovn-controller.log'}",
            "--detach",
        ]
        with open(d / "ovn-controller.out", "ab") as out:
            proc = self.netns.popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            rc = proc.wait(timeout)
        if rc != 0:
            raise WorldError(f"ovn-controller failed:\n{tail(d / 'ovn-controller.out')}")

    def stop_controller(self) -> None:
        pid = read_pidfile(self.controller_pidfile)
        if self.netns.owns(pid):
            stop_process(pid)
        _unlink(self.controller_pidfile)

    def restart_controller(self) -> None:
        self.stop_controller()
        self.start_controller()

    def start_driver(self, name: str | None = None, **kwargs: Any) -> Driver:
        """The driver of this host, with ``--ovn-nb`` (closed with the host)."""
        name = name or unique_driver_name()
        extra = ["--ovn-nb", self.central.nb_remote, *kwargs.pop("extra_args", ())]
        driver = Driver(
            self.netns,
            name,
            self.ovs.remote,
            self.directory / f"driver-{name}",
            extra_args=extra,
            **kwargs,
        )
        return self._drivers.enter_context(driver)

    def docker(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        assert self.dockerd is not None, "this host has no dockerd"
        return self.dockerd.docker(*args, **kw)

    def close(self) -> None:
        self._stack.close()

    def __repr__(self) -> str:
        return f"<OVNHost {self.system_id} in {self.netns.name}>"


class OVNWorld(_Closing):
    """An OVN central and ``hosts`` simulated hosts joined by veth underlays.

    Hosts are ``world.hosts`` (chassis ``host0``, ``host1``...; encap
    addresses 172.31.250.1, .2...). Host 0 and host 1 share one veth pair;
    more hosts are not supported. ``docker=True`` gives each host a dockerd.
    """

    def __init__(self, docker: bool = False, iptables: bool = True, hosts: int = 2) -> None:
        if hosts != 2:
            raise ValueError("an OVNWorld has two hosts")
        self._stack = contextlib.ExitStack()
        try:
            directory = make_world_dir()
            if os.environ.get("OVSW_KEEP") != "1":
                self._stack.callback(remove_tree, directory)
            self.directory = directory
            self.central = self._stack.enter_context(OVNCentral(directory / "c"))
            self.hosts = []
            for i in range(hosts):
                net = UNDERLAY.rsplit(".", 1)[0]
                host = OVNHost(
                    self.central, directory / f"h{i}", f"host{i}", f"{net}.{i + 1}",
                    docker=docker, iptables=iptables,
                )  # fmt: skip
                self.hosts.append(self._stack.enter_context(host))
            a, b = self.hosts
            run(["ip", "link", "add", "ovsw-ul0", "netns", a.netns.name, "type", "veth",
                 "peer", "name", "ovsw-ul1", "netns", b.netns.name])  # fmt: skip
            for i, host in enumerate(self.hosts):
                host.netns.run(["ip", "link", "set", f"ovsw-ul{i}", "name", host.underlay])
                host.configure()
                host.start_controller()
            # Userspace tunnels need the peer's underlay MAC first: warm up.
            wait_until(
                lambda: (
                    a.netns.run(["ping", "-c1", "-W1", b.encap_ip], check=False).returncode == 0
                ),
                15,
                0.2,
                "the underlay between the hosts does not carry pings",
            )
            wait_until(
                lambda: self.chassis_count() == 2,
                30,
                0.2,
                lambda: "ovn-controllers did not register:\n" + self.logs(),
            )
        except BaseException:
            self._stack.close()
            raise

    def chassis_count(self) -> int:
        out = run(
            [_tool("ovn-sbctl"), f"--db={self.central.sb_remote}", "--bare",
             "--columns=name", "list", "Chassis"],
            env=self.central.env, check=False,
        ).stdout  # fmt: skip
        return len(out.split())

    def logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(Path(self.directory).rglob("*.log")):
            parts.append(f"--- {path} ---\n{tail(path, lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        self._stack.close()

    def __repr__(self) -> str:
        return f"<OVNWorld in {self.directory}>"
