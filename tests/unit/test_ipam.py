"""The IPAM driver and the OVN network kind: pure allocation logic, pool ids,
option checks, MTU, and the IPAM API's own error shape."""

import ipaddress
import random

import pytest

from ovsdriver import ipam
from ovsdriver.netlink import LinkInfo
from ovsdriver.northbound import (
    NorthboundError,
    check_address,
    check_switch_name,
    choose_address,
    gateway_mac,
)
from ovsdriver.options import OptionError, ovn_request
from ovsdriver.ovn import ADDRESS_SPACE, encap_mtu
from tests.unit.test_api import World


def test_choose_address_takes_the_first_free_host_address_but_never_the_gateway():
    taken = {ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("10.0.0.3")}
    assert str(choose_address("10.0.0.0/24", "10.0.0.1/24", taken.__contains__)) == "10.0.0.4"
    assert str(choose_address("10.0.0.0/24", None, taken.__contains__)) == "10.0.0.1"


def test_choose_address_goes_on_after_the_last_one_and_wraps_around():
    taken = {ipaddress.ip_address("10.0.0.7")}
    pick = choose_address("10.0.0.0/24", "10.0.0.1/24", taken.__contains__, "10.0.0.6")
    assert str(pick) == "10.0.0.8"
    assert str(choose_address("10.0.0.0/24", None, taken.__contains__, "10.0.0.254")) == "10.0.0.1"
    assert str(choose_address("10.0.0.0/24", "10.0.0.1/24", set().__contains__, "10.0.0.254")) == (
        "10.0.0.2"
    )


def test_choose_address_spreads_out_after_a_lost_race():
    picks = {
        str(choose_address("10.0.0.0/16", None, set().__contains__, None, random.Random(seed)))
        for seed in range(20)
    }
    assert len(picks) > 15 and "10.0.0.1" not in picks
    # A full subnet is still found full, and a nearly full one its last address.
    assert choose_address("10.0.0.0/24", None, lambda ip: True, None, random.Random(1)) is None
    last = ipaddress.ip_address("10.0.0.200")
    assert (
        choose_address("10.0.0.0/24", None, lambda ip: ip != last, None, random.Random(1)) == last
    )


def test_choose_address_keeps_within_the_range():
    taken = {ipaddress.ip_address("10.0.0.128")}.__contains__
    pick = choose_address("10.0.0.0/24", "10.0.0.1/24", taken, within="10.0.0.128/25")
    assert str(pick) == "10.0.0.129"
    # Wrapping around stays inside it, the subnet's broadcast address stays out.
    after = "10.0.0.254"
    assert str(choose_address("10.0.0.0/24", None, taken, after, within="10.0.0.128/25")) == (
        "10.0.0.129"
    )
    full = choose_address(
        "10.0.0.0/24", None, lambda ip: ip.packed[3] < 255, within="10.0.0.128/25"
    )
    assert full is None
    spread = random.Random(1)
    for _ in range(20):
        ip = choose_address("10.0.0.0/16", None, set().__contains__, None, spread, "10.0.9.0/24")
        assert ip in ipaddress.ip_network("10.0.9.0/24")


def test_choose_address_says_when_the_subnet_is_full():
    assert choose_address("10.0.0.0/30", "10.0.0.1/30", lambda ip: True) is None
    assert str(choose_address("10.0.0.0/30", "10.0.0.1/30", lambda ip: False)) == "10.0.0.2"


@pytest.mark.parametrize(
    "address, message",
    [
        ("10.1.0.5", "not a host address of subnet 10.0.0.0/24"),
        ("10.0.0.0", "not a host address"),
        ("10.0.0.255", "not a host address"),
        ("10.0.0.1", "is the gateway of OVN switch blue"),
        ("nonsense", "is not an IP address"),
    ],
)
def test_check_address_refuses_what_a_container_cannot_hold(address, message):
    with pytest.raises(NorthboundError, match=message):
        check_address("blue", "10.0.0.0/24", "10.0.0.1/24", address)


def test_check_address_accepts_plain_and_cidr():
    assert str(check_address("blue", "10.0.0.0/24", "10.0.0.1/24", "10.0.0.9/24")) == "10.0.0.9"
    assert str(check_address("blue", "10.0.0.0/24", None, "10.0.0.1")) == "10.0.0.1"


def test_pool_ids_carry_the_switch_and_the_range():
    pool = ipam.pool_id("blue", "10.0.0.0/24")
    assert ipam.parse_pool_id(pool) == ("blue", "10.0.0.0/24", None)
    pool = ipam.pool_id("blue", "fd00::/64", "fd00::80/121")
    assert ipam.parse_pool_id(pool) == ("blue", "fd00::/64", "fd00::80/121")
    for bad in (
        *("LocalDefault/10.0.0.0/24", "ovn/bl ue/10.0.0.0/24", "ovn/blue/x", None),
        *("ovn/blue/10.0.0.0/24@10.1.0.0/25", "ovn/blue/10.0.0.0/24@fd00::/64"),
    ):
        with pytest.raises(ipam.IpamError, match="was not made by the ovs IPAM"):
            ipam.parse_pool_id(bad)


def test_switch_names_are_checked():
    assert check_switch_name("blue_1.a-b") == "blue_1.a-b"
    for bad in ("", "a/b", "x" * 65, "a b"):
        with pytest.raises(NorthboundError, match="ovs.ovn.switch="):
            check_switch_name(bad)


def test_the_gateway_mac_is_the_same_everywhere_and_unicast_local():
    mac = gateway_mac("blue")
    assert mac == gateway_mac("blue") != gateway_mac("green")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2


def test_the_mtu_leaves_room_for_geneve():
    links = [
        LinkInfo("lo", None, 65536, True, True, ["127.0.0.1/8"]),
        LinkInfo("br-phy", "02:00:00:00:00:01", 1500, True, True, ["172.31.0.1/24"]),
        LinkInfo("eth6", "02:00:00:00:00:02", 9000, True, True, ["fd00::1/64"]),
    ]
    assert encap_mtu(links, "172.31.0.1") == 1442
    assert encap_mtu(links, "fd00::1") == 9000 - 78
    assert encap_mtu(links, "172.31.0.9") is None


def generic(**options):
    return {"com.docker.network.generic": options}


OVN_POOL = [{"AddressSpace": ADDRESS_SPACE, "Pool": "10.0.0.0/24", "Gateway": "10.0.0.1/24"}]
LOCAL_POOL = [{"AddressSpace": "LocalDefault", "Pool": "10.0.0.0/24"}]


def test_the_address_space_says_a_network_is_an_ovn_one():
    assert ovn_request(generic(), OVN_POOL, ADDRESS_SPACE) == (True, None, False)
    assert ovn_request(generic(), LOCAL_POOL, ADDRESS_SPACE) == (False, None, False)
    mtu = generic(**{"com.docker.network.driver.mtu": "1400", "ovs.ovn.switch": "blue"})
    assert ovn_request(mtu, OVN_POOL, ADDRESS_SPACE) == (True, "blue", True)


def test_an_ovn_switch_without_the_ovs_ipam_is_refused():
    with pytest.raises(OptionError, match="--ipam-driver ovs --ipam-opt ovs.ovn.switch=blue"):
        ovn_request(generic(**{"ovs.ovn.switch": "blue"}), LOCAL_POOL, ADDRESS_SPACE)


@pytest.mark.parametrize(
    "key",
    [
        "ovs.bridge",
        "ovs.vlan",
        "ovs.uplink",
        "ovs.port_type",
        "com.docker.network.bridge.enable_icc",
    ],
)
def test_bridge_options_are_refused_on_ovn_networks(key):
    with pytest.raises(OptionError, match=f"{key} cannot be used on an OVN network"):
        ovn_request(generic(**{key: "1"}), OVN_POOL, ADDRESS_SPACE)


# -- over the API (no --ovn-nb) ------------------------------------------------


@pytest.fixture
def world():
    return World()


def test_the_plugin_is_also_an_ipam_driver(world):
    assert "IpamDriver" in world.post("Plugin.Activate")["Implements"]
    assert world.post("IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": ADDRESS_SPACE,
        "GlobalDefaultAddressSpace": ADDRESS_SPACE,
    }
    caps = world.post("IpamDriver.GetCapabilities")
    assert caps == {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def test_ipam_errors_use_the_ipam_apis_error_key(world):
    reply = world.post("IpamDriver.RequestPool", {"AddressSpace": ADDRESS_SPACE, "Pool": ""})
    assert "Err" not in reply
    assert "--ipam-opt ovs.ovn.switch=NAME" in reply["Error"]
    assert "leave --ipam-driver out for a local network" in reply["Error"]


def test_ovn_networks_without_ovn_nb_say_how_to_enable_them(world):
    body = {"Pool": "10.0.0.0/24", "Options": {"ovs.ovn.switch": "blue"}}
    reply = world.post("IpamDriver.RequestPool", body)
    assert "start the driver with --ovn-nb REMOTE" in reply["Error"]
    reply = world.post("IpamDriver.RequestAddress", {"PoolID": "ovn/blue/10.0.0.0/24"})
    assert "--ovn-nb" in reply["Error"]
    created = world.create_network(IPv4Data=OVN_POOL)
    assert "--ovn-nb" in created["Err"]
    assert world.vswitch.bridges == {}


def test_ipam_options_are_checked(world):
    for options, message in (
        ({"ovs.ovn.switch": "blue", "ovs.other": "x"}, "unknown IPAM option 'ovs.other'"),
        ({"ovs.ovn.switch": "b/c"}, "ovs.ovn.switch='b/c' is invalid"),
    ):
        reply = world.post("IpamDriver.RequestPool", {"Pool": "10.0.0.0/24", "Options": options})
        assert message in reply["Error"]
    for pool, sub_pool, v6, message in (
        ("10.0.0.0/24", "", True, "must be an IPv6 subnet of at most /126"),
        ("fd00::/127", "", True, "must be an IPv6 subnet of at most /126"),
        ("fd00::/64", "", False, "must be an IPv4 subnet of at most /30"),
        ("10.0.0.0/31", "", False, "must be an IPv4 subnet of at most /30"),
        ("10.0.0.0/24", "10.1.0.0/25", False, "--ip-range 10.1.0.0/25 is not inside --subnet"),
        ("10.0.0.0/24", "fd00::/64", False, "--ip-range fd00::/64 is not inside --subnet"),
        ("10.0.0.0/24", "10.0.0.x", False, "--ip-range '10.0.0.x' is not a subnet"),
    ):
        body = {"Pool": pool, "SubPool": sub_pool, "Options": {"ovs.ovn.switch": "blue"}, "V6": v6}
        assert message in world.post("IpamDriver.RequestPool", body)["Error"]
