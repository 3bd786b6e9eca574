"""The host-port contract, run against the real HostPorts.

Every socket (the holder's and the "programs'") is made in a fresh network
namespace of the test's own, so no port of the host is touched; each is
closed, and the namespace deleted, also when a test fails.
"""

import errno
import resource
import socket

import pytest

from ovsdriver import hostports
from ovsdriver.hostports import HostPorts
from tests import world
from tests.contract_hostports import HostPortsContract, port


class TestRealHostPorts(HostPortsContract):
    @pytest.fixture(autouse=True)
    def _real(self):
        world.require()
        with world.Netns() as netns:
            self.netns = netns
            self.sockets = []
            self.programs = {}  # key -> the socket a "program" holds
            self.ports = HostPorts(make_socket=self._socket)
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)
                self.ports.hold([])
                for sock in self.sockets:
                    sock.close()

    def limit_open_files(self, more):
        used, _ = hostports.open_files()
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + hostports.SPARE_FILES + more, hard))

    def _socket(self, *args):
        sock = self.netns.socket(*args)
        self.sockets.append(sock)
        return sock

    def test_a_port_a_gone_program_left_in_time_wait_can_be_held(self):
        server = self._socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        server.bind(("127.0.0.1", 18090))
        server.listen()
        client = self._socket(socket.AF_INET, socket.SOCK_STREAM)
        client.connect(("127.0.0.1", 18090))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: its end waits in TIME_WAIT
        client.close()
        server.close()
        p = port(18090)
        assert self.ports.check(p) is None
        assert self.ports.hold([p]) == {}

    def test_a_held_ipv6_port_refuses_what_no_rule_forwards(self):
        # ::1 is never DNATed: a connection there must be refused, not hang.
        assert self.ports.hold([port(18091, ipv6=True)]) == {}
        client = self._socket(socket.AF_INET6, socket.SOCK_STREAM)
        client.settimeout(2)
        with pytest.raises(ConnectionRefusedError):
            client.connect(("::1", 18091))

    def program_binds(self, port):
        family, proto, address, host_port = hostports.key(port)
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        sock = self._socket(socket.AF_INET6 if family == 6 else socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, host_port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            return False
        if kind == socket.SOCK_STREAM:
            sock.listen()
        self.programs[hostports.key(port)] = sock
        return True

    def program_exits(self, port):
        self.programs.pop(hostports.key(port)).close()
