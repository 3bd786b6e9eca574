"""The behaviour every implementation of the host-port holder must have.

`HostPortsContract` is mixed into one test class per implementation: the
real `ovsdriver.hostports.HostPorts` with sockets in a throwaway network
namespace (``tests/integration/test_hostports_real.py``), where a "program"
is a socket the test binds there, and `ovsdriver.testing.FakeHostPorts`.
Each class gives `self.ports`, `program_binds(port)`: a program on the
host binds *port*'s address and port (kept until the test ends); whether
it could, `program_exits(port)`: that program exits, and
`limit_open_files(more)`: from now on the holder may open
*more* files besides those it has and `SPARE_FILES`.
"""

import pytest

from ovsdriver.hostports import SPARE_FILES
from ovsdriver.ports import PortUnavailable
from ovsdriver.values import PublishedPort

FOREIGN = "198.51.100.1"  # an address the host does not have


def port(host_port, proto="tcp", host_ip=None, ipv6=False):
    container_ip = "fd00:9::2" if ipv6 else "10.99.0.2"
    return PublishedPort(proto, host_port, container_ip, 80, host_ip)


class HostPortsContract:
    def test_a_free_port_is_held_until_released(self):
        p = port(18080)
        assert self.ports.check(p) is None
        assert self.ports.hold([p]) == {}
        assert self.ports.holds(p) and self.ports.check(p) is None
        assert not self.program_binds(p)
        assert self.ports.hold([]) == {}
        assert not self.ports.holds(p)
        assert self.program_binds(p)

    def test_a_port_a_program_uses_is_named_and_not_held(self):
        p = port(18081)
        assert self.program_binds(p)
        why = self.ports.check(p)
        assert "host port 18081/tcp is in use by another program" in why
        assert self.ports.hold([p]) == {p: why}
        assert not self.ports.holds(p)

    def test_a_port_is_held_once_the_program_that_had_it_is_gone(self):
        p = port(18092)
        assert self.program_binds(p)
        assert "in use by another program" in self.ports.hold([p])[p]
        self.program_exits(p)
        assert self.ports.hold([p]) == {} and self.ports.holds(p)
        assert not self.program_binds(p)

    def test_a_program_on_one_address_keeps_the_port_from_every_address(self):
        assert self.program_binds(port(18082, host_ip="127.0.0.1"))
        assert "in use" in self.ports.check(port(18082))
        assert self.ports.check(port(18082, host_ip="127.0.0.2")) is None
        assert self.ports.hold([port(18083, host_ip="127.0.0.1")]) == {}
        assert not self.program_binds(port(18083))
        assert self.program_binds(port(18083, host_ip="127.0.0.2"))

    def test_protocols_and_families_are_held_apart(self):
        held = [port(18084), port(18084, "udp"), port(18084, ipv6=True)]
        assert self.ports.hold(held) == {}
        for p in held:
            assert not self.program_binds(p)
        assert self.program_binds(port(18084, "udp", ipv6=True))
        assert self.ports.hold(held[1:]) == {}
        assert self.program_binds(port(18084))

    def test_holding_more_keeps_what_is_held(self):
        a, b = port(18085), port(18086)
        assert self.ports.hold([a]) == {}
        assert self.ports.hold([a, b]) == {}
        assert not self.program_binds(a) and not self.program_binds(b)

    def test_an_address_of_another_host_is_refused_by_name(self):
        p = port(18087, host_ip=FOREIGN)
        with pytest.raises(PortUnavailable, match=f"{FOREIGN} is not an address of this host"):
            self.ports.check(p)
        assert f"{FOREIGN} is not an address of this host" in self.ports.hold([p])[p]

    def test_ports_are_held_only_while_files_are_left_for_the_rest(self):
        held = [port(18100 + i) for i in range(5)]
        assert self.ports.hold(held) == {}
        self.limit_open_files(10)
        more = [port(18110 + i) for i in range(11)]
        self.ports.room(held)  # held ports need no more files
        self.ports.room(held + more[:10])
        with pytest.raises(PortUnavailable, match="cannot publish 11 more host ports") as e:
            self.ports.room(more)
        assert f"fewer than {SPARE_FILES} for the rest of its work" in str(e.value)
        assert "LimitNOFILE=" in str(e.value)
