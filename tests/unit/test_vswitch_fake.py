"""The vswitch contract, run against FakeVSwitch."""

import pytest

from ovsdriver.testing import FakeNetlink, FakeVSwitch
from tests.contract_vswitch import *  # noqa: F403


class FakeHarness:
    def __init__(self):
        self.kernel = FakeNetlink()
        self.vswitch = FakeVSwitch(kernel=self.kernel)
        self.bridge_exists = self.vswitch.bridge_exists
        self.port_exists = self.vswitch.port_exists
        self.break_port = self.vswitch.break_port
        self.add_foreign_bridge = self.vswitch.add_foreign_bridge

    def link_exists(self, name):
        return self.kernel.state(name) is not None

    def add_host_link(self, name):
        """Host interfaces are not the fake vswitch's business."""

    def call(self, method, *args):
        results = []
        method(*args).addBoth(results.append)
        (result,) = results
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result


@pytest.fixture
def harness():
    return FakeHarness()
