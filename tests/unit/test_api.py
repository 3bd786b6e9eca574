"""The remote API through the plugin socket's real protocol in memory, with the
driver on verified fakes of Open vSwitch and the kernel."""

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from ovsdriver.api import MAX_BODY, Handlers, Plugin
from ovsdriver.driver import Driver
from ovsdriver.ovsdb import OVSDBUnavailable
from ovsdriver.testing import FakeFirewall, FakeNetlink, FakeVSwitch
from ovsdriver.vswitch import port_name
from tests.unit.plugin_client import Connection, request

NET = "4e" * 32
EP = "e9" * 32
EP2 = "f1" * 32
SUBNET = [{"AddressSpace": "LocalDefault", "Pool": "10.30.0.0/24", "Gateway": "10.30.0.1/24"}]


class World:
    """A driver on fakes behind the real resource."""

    def __init__(self):
        self.clock = Clock()  # the fakes answer on its next turn, as the real ports do
        self.kernel = FakeNetlink(clock=self.clock)
        self.vswitch = FakeVSwitch(kernel=self.kernel, clock=self.clock)
        self.firewall = FakeFirewall(clock=self.clock)
        self.driver = Driver(self.vswitch, self.kernel, self.firewall, "netdev")
        self.plugin = Plugin(Handlers(self.driver))

    def settle(self):
        for _ in range(1000):  # turn the fakes' clock until all is done
            if not self.clock.getDelayedCalls():
                break
            self.clock.advance(0)

    def raw(self, method, data):
        connection = Connection(self.plugin)
        connection.send(request(method, data))
        self.settle()
        ((code, _, body),) = connection.answers()
        return code, body

    def post(self, method, body=None, status=200):
        data = b"" if body is None else json.dumps(body).encode() + b"\n"
        code, content = self.raw(method, data)
        assert code == status, content
        return json.loads(content)

    def create_network(self, generic=None, network_id=NET, **extra):
        options = {"com.docker.network.enable_ipv6": False}
        options["com.docker.network.generic"] = generic or {}
        options.update(extra.pop("options", {}))
        body = dict(NetworkID=network_id, Options=options, IPv4Data=SUBNET, IPv6Data=[])
        body.update(extra)
        return self.post("NetworkDriver.CreateNetwork", body)

    def create_endpoint(self, endpoint_id=EP, **interface):
        interface.setdefault("Address", "10.30.0.2/24")
        body = {"NetworkID": NET, "EndpointID": endpoint_id, "Interface": interface}
        return self.post("NetworkDriver.CreateEndpoint", body)

    def ids(self, endpoint_id=EP):
        return {"NetworkID": NET, "EndpointID": endpoint_id}


@pytest.fixture
def world():
    return World()


def test_activate_and_capabilities(world):
    assert world.post("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert world.post("NetworkDriver.GetCapabilities") == {
        "Scope": "local",
        "ConnectivityScope": "local",
    }


def test_unknown_path_is_404_with_json(world):
    assert "unknown method" in world.post("NetworkDriver.Teleport", {}, status=404)["Err"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty body (the engine retries a request whose answer it lost"),
        (b'{"NetworkID": 7}', "field NetworkID must be a string"),
        (b'{"NetworkID": "' + b"4e" * 32 + b'", "IPv4Data": {}}', "IPv4Data must be a JSON array"),
    ],
)
def test_unparseable_requests_get_400_naming_the_problem(world, data, message):
    code, content = world.raw("NetworkDriver.CreateNetwork", data)
    assert code == 400
    assert message in json.loads(content)["Err"]


def test_oversized_body_gets_413(world):
    code, _ = world.raw("NetworkDriver.CreateNetwork", b" " * (MAX_BODY + 1))
    assert code == 413


def test_ids_must_be_hex(world):
    body = {"NetworkID": "../../etc", "Options": {}}
    assert "hexadecimal" in world.post("NetworkDriver.CreateNetwork", body)["Err"]


def test_create_network_makes_a_bridge_with_the_gateway_on_the_host(world):
    assert world.create_network(unknown_future_key=1) == {}
    bridge = "obr-" + NET[:11]
    assert world.vswitch.bridge_exists(bridge)
    link = world.kernel.state(bridge)
    assert link.up and link.addresses == {"10.30.0.1/24"}
    assert world.create_network() == {}  # repeated: fine


@pytest.mark.parametrize(
    "generic, named",
    [
        ({"ovs.vlan": "9999"}, "ovs.vlan"),
        ({"ovs.vlan": "abc"}, "ovs.vlan"),
        ({"ovs.bogus": "1"}, "ovs.bogus"),
        ({"com.docker.network.driver.mtu": "40"}, "com.docker.network.driver.mtu"),
        ({"ovs.port_type": "tap"}, "ovs.port_type"),
        ({"ovs.bridge": "a-bridge-name-too-long"}, "ovs.bridge"),
        ({"ovs.nat": "maybe"}, "ovs.nat"),
        ({"com.docker.network.bridge.enable_icc": "no way"}, "enable_icc"),
        ({"com.docker.network.bridge.name": "br0"}, "option of Docker's bridge driver"),
        ({"com.docker.network.bridge.default_bridge": "true"}, "default_bridge"),
        ({"com.docker.network.bridge.host_binding_ipv4": "::1"}, "use an IPv4 address"),
        (
            {"ovs.nat": "true", "com.docker.network.bridge.enable_ip_masquerade": "false"},
            "disagree",
        ),
    ],
)
def test_bad_options_are_refused_by_name_and_leave_nothing(world, generic, named):
    err = world.create_network(generic)["Err"]
    assert named in err
    assert world.vswitch.bridges == {}


def test_an_ipv6_network_below_ipv6s_least_mtu_is_refused_by_name(world):
    v6 = [{"AddressSpace": "LocalDefault", "Pool": "fd00:30::/64", "Gateway": "fd00:30::1/64"}]
    err = world.create_network({"com.docker.network.driver.mtu": "1279"}, IPv6Data=v6)["Err"]
    assert err.startswith("com.docker.network.driver.mtu='1279' is below 1280")
    assert world.vswitch.bridges == {}
    assert world.create_network({"com.docker.network.driver.mtu": "1280"}, IPv6Data=v6) == {}
    v4 = [{"AddressSpace": "LocalDefault", "Pool": "10.31.0.0/24", "Gateway": "10.31.0.1/24"}]
    ipv4_only = world.create_network(
        {"com.docker.network.driver.mtu": "576"}, "5f" * 32, IPv4Data=v4
    )
    assert ipv4_only == {}


def test_the_bridge_drivers_icc_and_masquerade_options_are_honoured(world):
    world.create_network(
        {
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.enable_ip_masquerade": "false",
        }
    )
    world.create_endpoint()
    (bridge,) = world.vswitch.bridges.values()
    endpoints = [ep for ep in bridge.ports.values() if ep is not None]
    assert [ep.protected for ep in endpoints] == [True]  # its port talks to no other's
    assert world.firewall.network(NET).nat is False


def test_endpoint_lifecycle(world):
    world.create_network({"com.docker.network.driver.mtu": "1400"})
    reply = world.create_endpoint()
    mac = reply["Interface"]["MacAddress"]
    assert mac == "02:42:0a:1e:00:02"  # from 10.30.0.2, as Docker's bridge driver does
    assert set(reply["Interface"]) == {"MacAddress"}  # only what the engine left empty
    port = "oep-" + EP[:11]
    assert world.kernel.state(port).mtu == 1400

    join = world.post("NetworkDriver.Join", dict(world.ids(), SandboxKey="/var/run/docker/netns/x"))
    assert join["InterfaceName"] == {"SrcName": port, "DstPrefix": "eth"}
    assert join["Gateway"] == "10.30.0.1"
    assert join["DisableGatewayService"] is True

    info = world.post("NetworkDriver.EndpointOperInfo", world.ids())["Value"]
    assert info["port"] == port and info["mac"] == mac and info["mtu"] == 1400

    assert world.post("NetworkDriver.ProgramExternalConnectivity", world.ids()) == {}
    assert world.post("NetworkDriver.RevokeExternalConnectivity", world.ids()) == {}
    assert world.post("NetworkDriver.Leave", world.ids()) == {}
    assert world.vswitch.port_exists(port)  # Leave keeps the port
    assert world.post("NetworkDriver.DeleteEndpoint", world.ids()) == {}
    assert not world.vswitch.port_exists(port)
    assert world.kernel.state(port) is None


def test_the_engines_mac_is_used_and_not_returned(world):
    world.create_network()
    assert world.create_endpoint(MacAddress="02:42:0a:1e:00:05") == {}
    assert world.post("NetworkDriver.EndpointOperInfo", world.ids())["Value"]["mac"] == (
        "02:42:0a:1e:00:05"
    )


def test_an_endpoint_without_an_ipv4_address_gets_a_random_local_unicast_mac(world):
    world.create_network()
    first = world.create_endpoint(Address="", AddressIPv6="fd00::2/64")
    second = world.create_endpoint("f" * 64, Address="", AddressIPv6="fd00::3/64")
    macs = [reply["Interface"]["MacAddress"] for reply in (first, second)]
    assert macs[0] != macs[1]
    assert all(int(mac.split(":")[0], 16) & 0b11 == 0b10 for mac in macs)  # local, unicast


def test_an_ovs_driver_opt_of_an_endpoint_is_refused_by_name_and_makes_no_port(world):
    world.create_network()
    body = dict(world.ids(), Interface={"Address": "10.30.0.2/24"})
    body["Options"] = {"com.docker.network.portmap": [], "ovs.vlan": "7", "other": "1"}
    err = world.post("NetworkDriver.CreateEndpoint", body)["Err"]
    assert "unknown endpoint option 'ovs.vlan' (--driver-opt)" in err
    assert not world.vswitch.port_exists(port_name(EP))
    del body["Options"]["ovs.vlan"]  # other drivers' options are theirs
    assert "Err" not in world.post("NetworkDriver.CreateEndpoint", body)


def test_a_bad_mac_is_refused(world):
    world.create_network()
    assert "MacAddress" in world.create_endpoint(MacAddress="zz:zz")["Err"]


def test_a_subnet_overlapping_another_networks_is_refused_with_what_to_do(world):
    world.create_network()  # 10.30.0.0/24, gateway 10.30.0.1
    body = {
        "NetworkID": "b2" * 32,
        "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"Pool": "10.30.0.128/25", "Gateway": "10.30.0.129/25"}],
    }
    err = world.post("NetworkDriver.CreateNetwork", body)["Err"]
    assert "overlaps subnet 10.30.0.0/24 of network " + NET[:12] in err
    assert "ovs-vsctl del-br obr-" + NET[:11] in err
    assert list(world.vswitch.bridges) == ["obr-" + NET[:11]]
    # Without a gateway on the host (internal) nothing is routed: it is fine.
    body["Options"]["com.docker.network.internal"] = True
    assert world.post("NetworkDriver.CreateNetwork", body) == {}


def _overlapping(space="LocalDefault"):
    pool = {"Pool": "10.30.0.128/25", "Gateway": "10.30.0.129/25", "AddressSpace": space}
    return {"NetworkID": "b2" * 32, "Options": {}, "IPv4Data": [pool], "IPv6Data": []}


def test_a_network_the_engine_no_longer_has_gives_way_to_a_subnet_its_ipam_gave_again(world):
    # Docker's default IPAM gave both subnets: it never gives overlapping
    # ones to two networks the engine has, so the older one is left over
    # (removed while the driver was down, or its CreateNetwork's answer lost).
    world.create_network()  # 10.30.0.0/24, gateway 10.30.0.1
    assert world.post("NetworkDriver.CreateNetwork", _overlapping()) == {}
    assert list(world.vswitch.bridges) == ["obr-" + "b2" * 5 + "b"]
    assert [rules.network_id for rules in world.firewall.networks] == ["b2" * 32]
    assert world.kernel.state("obr-" + "b2" * 5 + "b").addresses == {"10.30.0.129/25"}


@pytest.mark.parametrize("space", ["OtherIPAM", None])
def test_a_network_from_another_address_space_is_never_taken_for_left_over(world, space):
    world.create_network()
    err = world.post("NetworkDriver.CreateNetwork", _overlapping(space))["Err"]
    assert "overlaps subnet 10.30.0.0/24 of network " + NET[:12] in err
    assert list(world.vswitch.bridges) == ["obr-" + NET[:11]]


def test_a_network_with_endpoints_is_never_taken_for_left_over(world):
    world.create_network()
    world.create_endpoint()
    err = world.post("NetworkDriver.CreateNetwork", _overlapping())["Err"]
    assert "overlaps subnet 10.30.0.0/24 of network " + NET[:12] in err
    assert world.vswitch.port_exists(port_name(EP))


def test_a_subnet_of_one_of_the_hosts_interfaces_is_refused_by_name(world):
    world.kernel.add_link("eth9")
    world.kernel.add_addresses("eth9", ["10.30.0.200/16"])  # the host's LAN
    err = world.create_network()["Err"]
    assert "subnet 10.30.0.0/24 overlaps 10.30.0.0/16" in err
    assert "interface eth9 (address 10.30.0.200/16)" in err
    assert world.vswitch.bridges == {} and world.firewall.networks == ()
    # The host keeps nothing of the network's, and internal networks are fine.
    assert world.create_network(options={"com.docker.network.internal": True}) == {}


def test_a_subnet_inside_a_broader_one_of_the_host_without_its_address_is_fine(world):
    world.kernel.add_link("eth9")
    world.kernel.add_addresses("eth9", ["10.5.0.7/8"])  # the more specific route wins
    assert world.create_network() == {}


def test_endpoint_on_unknown_network_fails_clearly(world):
    err = world.create_endpoint()["Err"]
    assert "not known" in err and "remove the network and create it again" in err


def test_deletes_and_leave_of_unknown_ids_succeed(world):
    assert world.post("NetworkDriver.Leave", world.ids()) == {}
    assert world.post("NetworkDriver.DeleteEndpoint", world.ids()) == {}
    assert world.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}


def test_delete_network_removes_bridge_and_address(world):
    world.create_network()
    assert world.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}
    assert world.vswitch.bridges == {}
    assert world.kernel.state("obr-" + NET[:11]) is None


def test_internal_network_has_no_gateway(world):
    world.create_network(options={"com.docker.network.internal": True})
    assert world.kernel.state("obr-" + NET[:11]).addresses == set()
    world.create_endpoint()
    join = world.post("NetworkDriver.Join", dict(world.ids(), SandboxKey="/x"))
    assert "Gateway" not in join and join["DisableGatewayService"] is True


@pytest.mark.parametrize("datapath, offload", [("netdev", False), ("system", True)])
def test_a_veths_container_end_checksums_itself_only_on_the_userspace_datapath(
    world, tmp_path, datapath, offload
):
    world.driver.kernel_module = str(tmp_path)  # loaded
    world.create_network({"ovs.port_type": "veth", "ovs.datapath_type": datapath})
    world.create_endpoint()
    world.post("NetworkDriver.Join", dict(world.ids(), SandboxKey="/x"))
    assert world.kernel.state("oep-" + EP[:11]).tx_checksum is offload


def test_a_system_datapath_without_its_kernel_module_is_refused_at_once(world, tmp_path):
    world.driver.kernel_module = str(tmp_path / "openvswitch")  # not loaded
    reply = world.create_network({"ovs.datapath_type": "system"})
    assert reply["Err"].startswith(
        "ovs.datapath_type=system needs Open vSwitch's kernel module, which is not loaded"
    )
    assert "modprobe openvswitch" in reply["Err"]
    assert world.vswitch.bridges == {}
    world.driver.datapath_type = "system"  # twistd ovsdriver --datapath-type system
    assert "--datapath-type system needs" in world.create_network()["Err"]
    assert world.vswitch.bridges == {}
    world.driver.kernel_module = str(tmp_path)  # loaded
    assert "Err" not in world.create_network()


def test_a_port_ovs_refuses_fails_join_and_goes_with_the_endpoint(world):
    world.create_network({"ovs.port_type": "veth"})
    world.vswitch.break_port("ove-" + EP[:11])
    assert "Err" not in world.create_endpoint()  # answered before ovs-vswitchd acts
    join = world.post("NetworkDriver.Join", dict(world.ids(), SandboxKey="/x"))
    assert "could not add port ove-" + EP[:11] in join["Err"]
    # The engine deletes the endpoint of a failed Join.
    assert world.post("NetworkDriver.DeleteEndpoint", world.ids()) == {}
    assert not world.vswitch.port_exists("ove-" + EP[:11])
    assert world.kernel.state("ove-" + EP[:11]) is None
    assert world.kernel.state("oep-" + EP[:11]) is None


def test_a_network_deletes_the_veth_of_a_port_whose_deletion_was_pending(world):
    # A DeleteNetwork right after DeleteEndpoint, or after a restart, finds
    # the port marked but not deleted yet: its veth goes with the bridge.
    world.create_network({"ovs.port_type": "veth"})
    world.create_endpoint()
    world.vswitch.mark_removed(EP)  # what DeleteEndpoint did, before the deletion
    world.settle()
    assert world.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}
    assert world.kernel.state("ove-" + EP[:11]) is None
    assert world.kernel.state("oep-" + EP[:11]) is None


def test_a_veth_that_cannot_be_deleted_does_not_fail_the_networks_deletion(world):
    world.create_network({"ovs.port_type": "veth"})
    world.create_endpoint()
    world.vswitch.mark_removed(EP)
    world.settle()
    world.kernel.delete_link = lambda name: defer.fail(OSError("simulated: busy"))
    assert world.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}
    assert world.firewall.network(NET) is None  # its rules went all the same
    assert world.kernel.state("ove-" + EP[:11]) is not None  # the reconciler's now


def test_swarm_only_methods_answer(world):
    assert world.post("NetworkDriver.AllocateNetwork", {}) == {"Options": {}}
    assert world.post("NetworkDriver.FreeNetwork", {}) == {}
    assert world.post("NetworkDriver.DiscoverNew", {}) == {}
    assert world.post("NetworkDriver.DiscoverDelete", {}) == {}


class _Down(FakeVSwitch):
    def network(self, network_id):
        from twisted.internet import defer

        return defer.fail(OVSDBUnavailable("cannot reach OVSDB at unix:/x/db.sock"))


def test_ovsdb_outage_is_an_error_naming_ovsdb_and_capabilities_still_answer(world):
    world.driver.vswitch = _Down()
    assert "OVSDB at unix:/x/db.sock" in world.create_network()["Err"]
    assert world.post("NetworkDriver.GetCapabilities")["Scope"] == "local"


def test_an_unexpected_error_is_a_sentence_without_traceback(world):
    world.create_network()

    def boom(*args):
        raise RuntimeError("kaboom")

    world.driver.vswitch.endpoint = boom
    err = world.post("NetworkDriver.EndpointOperInfo", world.ids())["Err"]
    assert "kaboom" in err and "Traceback" not in err


def program(world, endpoint_id, *portmap):
    options = {"com.docker.network.portmap": list(portmap)}
    body = dict(world.ids(endpoint_id), Options=options)
    return world.post("NetworkDriver.ProgramExternalConnectivity", body)


def test_published_ports_reach_the_firewall_and_go_with_revoke(world):
    world.create_network()
    world.create_endpoint()
    assert program(world, EP, {"Proto": 6, "Port": 80, "HostPort": 8080}) == {}
    (rules,) = world.firewall.networks
    assert [(p.proto, p.host_port, p.container_ip, p.container_port) for p in rules.published] == [
        ("tcp", 8080, "10.30.0.2", 80)
    ]
    world.post("NetworkDriver.RevokeExternalConnectivity", world.ids())
    assert world.firewall.networks[0].published == ()


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"Proto": 6, "Port": 80, "HostPort": 0}, "-p 8080:80/tcp"),
        ({"Proto": 1, "Port": 80, "HostPort": 80}, "protocol"),
        ({"Proto": 6, "Port": 80, "HostPort": 80, "HostIP": "::1"}, "publish on 127.0.0.1"),
    ],
)
def test_unpublishable_ports_are_refused(world, entry, message):
    world.create_network()
    world.create_endpoint()
    assert message in program(world, EP, entry)["Err"]
    assert world.firewall.networks[0].published == ()


def test_a_host_port_is_published_once(world):
    world.create_network()
    world.create_endpoint()
    world.create_endpoint(EP2, Address="10.30.0.3/24")
    program(world, EP, {"Proto": 17, "Port": 53, "HostPort": 5353})
    err = program(world, EP2, {"Proto": 17, "Port": 53, "HostPort": 5353, "HostIP": "10.0.0.1"})
    assert "5353/udp is already published" in err["Err"]
    assert program(world, EP2, {"Proto": 6, "Port": 53, "HostPort": 5353}) == {}


def test_a_host_port_an_orphan_holds_is_freed_by_a_recheck_before_being_refused(world):
    world.create_network()
    world.create_endpoint()
    world.create_endpoint(EP2, Address="10.30.0.3/24")
    program(world, EP, {"Proto": 6, "Port": 80, "HostPort": 8080})
    rechecks = []

    def recheck():  # as the reconciler's: it finds EP an orphan and removes it
        rechecks.append(True)
        return world.vswitch.remove_endpoint(EP)

    world.driver.recheck = recheck
    assert program(world, EP2, {"Proto": 6, "Port": 80, "HostPort": 8080}) == {}
    assert rechecks == [True]
    (published,) = world.firewall.networks[0].published
    assert (published.host_port, published.container_ip) == (8080, "10.30.0.3")
    world.driver.recheck = lambda: defer.succeed(rechecks.append(True))  # finds nothing
    world.create_endpoint("c" * 64, Address="10.30.0.4/24")
    err = program(world, "c" * 64, {"Proto": 6, "Port": 80, "HostPort": 8080})
    assert "8080/tcp is already published" in err["Err"]
    assert rechecks == [True, True]


def test_a_repeated_create_endpoint_gives_the_same_answer(world):
    world.create_network()
    first = world.create_endpoint()
    assert world.create_endpoint() == first


@pytest.mark.parametrize("bad", ["4e" * 32 + "\n", "4e" * 31 + "4g", "4E" * 32])
def test_ids_are_exactly_hex(world, bad):
    assert "hexadecimal" in world.post("NetworkDriver.CreateNetwork", {"NetworkID": bad})["Err"]


def test_two_containers_publishing_one_host_port_at_the_same_moment(world):
    """Both requests are in flight together (the fakes answer later, as the
    real ports do): exactly one gets the port, the other a clear refusal."""
    world.create_network()
    world.create_endpoint(EP)
    world.create_endpoint(EP2, Address="10.30.0.3/24")
    options = {"com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 8080}]}
    connections = []
    for endpoint_id in (EP, EP2):
        body = dict(world.ids(endpoint_id), Options=options)
        connections.append(Connection(world.plugin))
        connections[-1].send(
            request("NetworkDriver.ProgramExternalConnectivity", json.dumps(body).encode())
        )
    world.settle()
    replies = [json.loads(c.answers()[0][2]) for c in connections]
    errors = [reply.get("Err") for reply in replies]
    assert len(replies) == 2 and errors.count(None) == 1, replies
    assert "8080" in next(e for e in errors if e)
    published = [p for n in world.firewall.networks for p in n.published]
    assert [p.host_port for p in published] == [8080]
