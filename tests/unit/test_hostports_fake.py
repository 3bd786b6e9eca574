"""The host-port contract, run against the in-memory FakeHostPorts."""

import pytest

from ovsdriver.hostports import SPARE_FILES
from ovsdriver.testing import FakeHostPorts
from tests.contract_hostports import HostPortsContract


class TestFakeHostPorts(HostPortsContract):
    @pytest.fixture(autouse=True)
    def _fake(self):
        self.ports = FakeHostPorts()

    def program_binds(self, port):
        return self.ports.program_binds(port)

    def program_exits(self, port):
        self.ports.program_exits(port)

    def limit_open_files(self, more):
        used = self.ports.OTHER_FILES + len(self.ports._held)
        self.ports.open_files_limit = used + SPARE_FILES + more
