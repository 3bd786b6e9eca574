"""The mount-view contract, run against the real MountViews: files, network
namespaces bind-mounted on them, and processes in mount and network
namespaces of their own (all made here, ended and removed afterwards)."""

import functools
import os
import secrets
import shutil
import subprocess
import tempfile

import pytest

from ovsdriver.sandboxes import MountViews, view_of
from tests import world
from tests.contract_sandboxes import MountViewsContract
from tests.reactor_thread import get_reactor, run_in_reactor

pytestmark = pytest.mark.integration


class TestRealMountViews(MountViewsContract):
    @pytest.fixture(autouse=True)
    def _real(self):
        if os.geteuid() != 0:
            pytest.skip("mounting namespaces needs root")
        self.views = MountViews(get_reactor())
        self._root = tempfile.mkdtemp(prefix="ovsw-mv-", dir="/tmp")
        self._processes = []
        yield
        for process in self._processes:
            process.kill()
            process.wait(10)
        world.unmount_under(self._root)
        shutil.rmtree(self._root, ignore_errors=True)

    def call(self, method, *args):
        return run_in_reactor(functools.partial(method, *args), timeout=30)

    def directory(self):
        return tempfile.mkdtemp(dir=self._root)

    def make_file(self, path):
        open(path, "a").close()

    def mount_here(self, path):
        netns = f"ovsw-mv-{secrets.token_hex(4)}"
        world.run(["ip", "netns", "add", netns], timeout=10)
        try:
            world.run(["mount", "--bind", f"/run/netns/{netns}", path], timeout=10)
        finally:
            world.run(["ip", "netns", "del", netns], check=False, timeout=10)
        return os.stat(path).st_ino

    def unmount_here(self, path):
        world.run(["umount", "-l", path], timeout=10)  # as the engine does (MNT_DETACH)

    def _spawn(self, *unshare, namespace):
        process = subprocess.Popen(["unshare", *unshare, "sleep", "600"])
        self._processes.append(process)
        mine = os.stat(f"/proc/self/ns/{namespace}").st_ino
        world.wait_until(
            lambda: os.stat(f"/proc/{process.pid}/ns/{namespace}").st_ino != mine, 10, 0.02
        )
        return process.pid

    def other_view(self):
        pid = self._spawn("--mount", "--propagation", "private", namespace="mnt")
        self._pids = getattr(self, "_pids", {})
        view = view_of(pid)
        self._pids[view] = pid
        return view

    def mount_elsewhere(self, view, path):
        pid = self._pids[view]
        world.run(
            ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "unshare", f"--net={path}", "true"],
            timeout=10,
        )
        return os.stat(f"/proc/{pid}/root{path}").st_ino

    def process_in_new_netns(self):
        pid = self._spawn("--net", namespace="net")
        return os.stat(f"/proc/{pid}/ns/net").st_ino
