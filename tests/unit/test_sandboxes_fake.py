"""The mount-view contract, run against the in-memory FakeMountViews."""

import itertools

import pytest
from twisted.internet.task import Clock

from ovsdriver.testing import FakeMountViews
from tests.contract_sandboxes import MountViewsContract
from tests.unit.test_netlink_fake import result_of


class TestFakeMountViews(MountViewsContract):
    @pytest.fixture(autouse=True)
    def _fake(self):
        self.clock = Clock()
        self.clock.advance(100)
        self.views = FakeMountViews(clock=self.clock)
        self._numbers = itertools.count(4026532000)

    def call(self, method, *args):
        return result_of(method(*args), self.clock)

    def directory(self):
        path = f"/fake/dir-{next(self._numbers)}"
        self.views.add_dir(path)
        return path

    def make_file(self, path):
        self.views.create(path)

    def mount_here(self, path):
        netns = next(self._numbers)
        self.views.mount(path, netns, [FakeMountViews.OWN])
        return netns

    def unmount_here(self, path):
        self.views.unmount(path, [FakeMountViews.OWN])

    def other_view(self):
        view = f"view-{next(self._numbers)}"
        self.views.copy_view(view)
        return view

    def mount_elsewhere(self, view, path):
        netns = next(self._numbers)
        self.views.mount(path, netns, [view])
        return netns

    def process_in_new_netns(self):
        netns = next(self._numbers)
        self.views.hold(netns)
        return netns
