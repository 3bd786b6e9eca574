"""End to end: the network features of issue 3 through the docker CLI: VLANs on
a shared bridge, uplinks, IPv6, internal networks, static addresses, veth ports
and option errors."""

import contextlib
import re
import secrets

import pytest

from tests.world import Netns, wait_until


def test_vlan_networks_share_a_bridge_and_are_isolated(e2e):
    e2e.network("v10", "10.61.0.0/24", "ovs.bridge=vlanbr", "ovs.vlan=10")
    e2e.network("v20", "10.62.0.0/24", "ovs.bridge=vlanbr", "ovs.vlan=20")
    assert e2e.vsctl("list-br").split().count("vlanbr") == 1
    e2e.run("x1", "v10", "--cap-add", "NET_ADMIN")
    e2e.run("x2", "v10")
    e2e.run("y1", "v20")
    assert e2e.vsctl("get", "Port", e2e.port_of("x1", "v10"), "tag") == "10"
    assert e2e.vsctl("get", "Port", e2e.port_of("y1", "v20"), "tag") == "20"
    assert e2e.ping("x1", e2e.container_net("x2", "v10")["IPAddress"])
    assert e2e.ping("x1", "10.61.0.1")
    assert e2e.ping("y1", "10.62.0.1")
    # Layer 2 across VLANs: make y1's address on-link for x1; ARP must fail.
    y1 = e2e.container_net("y1", "v20")["IPAddress"]
    e2e.exec("x1", "ip", "route", "add", y1 + "/32", "dev", "eth0")
    assert not e2e.ping("x1", y1, count=1)


@pytest.mark.parametrize(
    "options, message",
    [
        (("ovs.bridge=vlanbr",), "give this network its own VLAN"),
        (("ovs.bridge=vlanbr", "ovs.vlan=10"), "VLAN 10 is already used"),
    ],
)
def test_a_shared_bridge_refuses_leaky_networks(e2e, options, message):
    e2e.network("v10", "10.61.0.0/24", "ovs.bridge=vlanbr", "ovs.vlan=10")
    result = e2e.network("leaky", "10.66.0.0/24", *options, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert e2e.docker("network", "ls", "-q", "-f", "name=^leaky$").stdout.strip() == ""


def test_shared_bridge_goes_with_its_last_network_but_a_foreign_one_stays(e2e):
    e2e.network("v10", "10.61.0.0/24", "ovs.bridge=vlanbr", "ovs.vlan=10")
    e2e.network("v20", "10.62.0.0/24", "ovs.bridge=vlanbr", "ovs.vlan=20")
    e2e.docker("network", "rm", "v10")
    assert "vlanbr" in e2e.vsctl("list-br").split()
    e2e.docker("network", "rm", "v20")
    assert "vlanbr" not in e2e.vsctl("list-br").split()
    e2e.vsctl("add-br", "theirs", "--", "set", "bridge", "theirs", "datapath_type=netdev")
    e2e.network("v30", "10.63.0.0/24", "ovs.bridge=theirs", "ovs.vlan=30")
    e2e.docker("network", "rm", "v30")
    assert "theirs" in e2e.vsctl("list-br").split()


@contextlib.contextmanager
def vlan_peer(e2e, uplink, vlan, address):
    """A host behind `uplink` that sits on VLAN `vlan` with `address`.

    This kernel has no 8021q module, so the far end's VLAN sub-interface is an
    OVS access port (on a bridge of its own, not the driver's) moved into a
    namespace of its own; the veth between the bridges carries tagged frames.
    """
    outside = Netns()
    far = uplink + "p"
    access = "acc" + secrets.token_hex(3)
    try:
        e2e.host("ip", "link", "add", uplink, "type", "veth", "peer", "name", far)
        e2e.host("ip", "link", "set", uplink, "up")
        e2e.host("ip", "link", "set", far, "up")
        e2e.vsctl("add-br", "farbr", "--", "set", "bridge", "farbr", "datapath_type=netdev")
        e2e.vsctl("add-port", "farbr", far)
        e2e.vsctl(
            "add-port", "farbr", access, "tag=" + str(vlan), "--",
            "set", "interface", access, "type=internal",
        )  # fmt: skip
        e2e.host("ip", "link", "set", access, "netns", outside.path)
        outside.run(["ip", "addr", "add", address, "dev", access])
        outside.run(["ip", "link", "set", access, "up"])
        yield outside
    finally:
        e2e.vsctl("--if-exists", "del-br", "farbr")
        e2e.world.netns.run(["ip", "link", "del", uplink], check=False)
        outside.close()


def test_uplink_reaches_a_host_on_the_physical_vlan(e2e):
    with vlan_peer(e2e, "upl0", 30, "10.63.0.100/24"):
        e2e.network("v30", "10.63.0.0/24", "ovs.bridge=upbr", "ovs.vlan=30", "ovs.uplink=upl0")
        assert "upl0" in e2e.vsctl("list-ports", "upbr").split()
        assert e2e.vsctl("get", "Port", "upl0", "tag") == "[]"  # a trunk
        e2e.run("u1", "v30")
        assert e2e.ping("u1", "10.63.0.100")
        fdb = e2e.world.ovs.appctl("fdb/show", "farbr")
        assert re.search(r"\s30\s", fdb), fdb  # frames crossed the veth tagged
        e2e.docker("rm", "-f", "u1")
        e2e.docker("network", "rm", "v30")
        assert "upbr" not in e2e.vsctl("list-br").split()
        assert "upl0" in e2e.host("ip", "-o", "link", "show", "upl0")  # never deleted


def test_a_missing_uplink_is_refused_and_leaves_nothing(e2e):
    result = e2e.network("v31", "10.63.0.0/24", "ovs.uplink=nosuchnic", check=False)
    assert result.returncode != 0 and "nosuchnic" in result.stderr, result.stderr
    assert e2e.vsctl("list-br") == ""


def test_ipv6_dual_stack(e2e):
    e2e.docker(
        "network", "create", "-d", e2e.name, "--ipv6",
        "--subnet", "10.64.0.0/24", "--subnet", "fd00:64::/64", "six",
    )  # fmt: skip
    bridge = "obr-" + e2e.network_id("six")[:11]
    assert "fd00:64::1/64" in e2e.host("ip", "-o", "addr", "show", "dev", bridge)
    e2e.run("s1", "six")
    e2e.run("s2", "six")
    s2 = e2e.container_net("s2", "six")["GlobalIPv6Address"]
    assert s2
    ping6 = e2e.exec("s1", "ping6", "-c", "2", "-W", "3", s2, check=False)
    assert ping6.returncode == 0, ping6.stdout + ping6.stderr
    assert e2e.exec("s1", "ping6", "-c", "2", "-W", "3", "fd00:64::1", check=False).returncode == 0
    assert "default via fd00:64::1" in e2e.exec("s1", "ip", "-6", "route").stdout


def test_internal_network_has_no_gateway_but_containers_talk(e2e):
    e2e.docker("network", "create", "-d", e2e.name, "--internal", "--subnet", "10.67.0.0/24", "in")
    bridge = "obr-" + e2e.network_id("in")[:11]
    assert "inet " not in e2e.host("ip", "-o", "addr", "show", "dev", bridge)
    e2e.run("i1", "in")
    e2e.run("i2", "in")
    assert e2e.ping("i1", e2e.container_net("i2", "in")["IPAddress"])
    assert "default" not in e2e.exec("i1", "ip", "route").stdout
    assert "eth1" not in e2e.exec("i1", "ip", "-o", "link").stdout


@pytest.mark.parametrize("port_type", ["internal", "veth"])
def test_without_icc_containers_reach_the_gateway_but_not_each_other(e2e, port_type):
    e2e.network(
        "noicc",
        "10.58.0.0/24",
        "com.docker.network.bridge.enable_icc=false",
        f"ovs.port_type={port_type}",
    )
    e2e.run("n1", "noicc")
    e2e.run("n2", "noicc")
    n2 = e2e.container_net("n2", "noicc")["IPAddress"]
    assert e2e.ping("n1", "10.58.0.1") and e2e.ping("n2", "10.58.0.1")
    assert not e2e.ping("n1", n2, count=1)
    e2e.host("ping", "-c", "1", "-W", "2", n2)  # the host reaches each of them
    protected = e2e.vsctl("--bare", "--columns=name", "find", "Port", "protected=true")
    assert len(protected.split()) == 2
    # On a network with icc (the default) the same containers talk.
    e2e.network("icc", "10.59.0.0/24")
    for name in ("n1", "n2"):
        e2e.docker("network", "connect", "icc", name)
    assert e2e.ping("n1", e2e.container_net("n2", "icc")["IPAddress"])


def test_static_ip_and_mac(e2e):
    e2e.network("fixed", "10.65.0.0/24")
    mac = "02:42:0a:41:00:32"
    e2e.run("f1", "fixed", "--ip", "10.65.0.50", "--mac-address", mac)
    addr = e2e.exec("f1", "ip", "-o", "addr", "show", "eth0").stdout
    assert "10.65.0.50/24" in addr
    assert e2e.exec("f1", "cat", "/sys/class/net/eth0/address").stdout.strip() == mac
    port = e2e.port_of("f1", "fixed")
    assert e2e.vsctl("get", "Interface", port, "external_ids:attached-mac") == f'"{mac}"'


def test_veth_ports_carry_tcp(e2e):
    e2e.network("pairs", "10.68.0.0/24", "ovs.port_type=veth", "com.docker.network.driver.mtu=1450")
    e2e.run("w1", "pairs", command=("httpd", "-f", "-p", "80", "-h", "/etc"))
    e2e.run("w2", "pairs")
    endpoint = e2e.container_net("w1", "pairs")["EndpointID"]
    host_end = "ove-" + endpoint[:11]
    assert host_end in e2e.vsctl("list-ports", "obr-" + e2e.network_id("pairs")[:11]).split()
    assert "mtu 1450" in e2e.host("ip", "-o", "link", "show", host_end)
    assert e2e.exec("w1", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    w1 = e2e.container_net("w1", "pairs")["IPAddress"]
    fetched = e2e.exec("w2", "wget", "-q", "-O", "-", f"http://{w1}/hostname", check=False)
    assert fetched.returncode == 0, fetched.stderr
    e2e.docker("rm", "-f", "w1")
    # DeleteEndpoint deletes the port and the veth in the background, right after.
    wait_until(lambda: host_end not in e2e.host("ip", "-o", "link"), timeout=10)


@pytest.mark.parametrize(
    "option, named",
    [
        ("ovs.vlan=abc", "ovs.vlan"),
        ("ovs.bogus=1", "ovs.bogus"),
        ("ovs.bridge=abridgenamethatistoolong", "ovs.bridge"),
        ("ovs.port_type=tap", "ovs.port_type"),
        ("com.docker.network.driver.mtu=70000", "com.docker.network.driver.mtu"),
    ],
)
def test_bad_options_name_themselves(e2e, option, named):
    result = e2e.network("bad", "10.69.0.0/24", option, check=False)
    assert result.returncode != 0 and named in result.stderr, result.stderr
    assert e2e.vsctl("list-br") == ""
