"""``ovsdriver status`` over made-up observations: the health rules, the text
and JSON it prints, its exit status, and reading hand-edited OVSDB records."""

import io
import json
import types

import attr
import pytest

from ovsdriver import observe, status
from ovsdriver.cli import parser
from ovsdriver.health import (
    EndpointFacts,
    EngineEndpoint,
    EngineNetwork,
    Facts,
    InterfaceFacts,
    NetworkFacts,
    SandboxFacts,
    assess,
)
from ovsdriver.netlink import LinkInfo
from ovsdriver.sandboxes import MISSING, MOUNTED
from ovsdriver.sandboxes import PLAIN as UNMOUNTED
from ovsdriver.values import Endpoint, Network, PublishedPort, Subnet

NET = "4e" * 32
EP = "e9" * 32
EP2 = "f1" * 32
BRIDGE = "obr-" + NET[:11]
MAC = "02:42:0a:1e:00:02"
SANDBOX = "/var/run/docker/netns/0123456789ab"
NOW = 1_700_000_000.0
TAG = "ovsdriver:" + NET[:12]

SAVE_V4 = f"""*filter
:FORWARD DROP [0:0]
:OVSDRIVER-FORWARD - [0:0]
:OVSDRIVER-ISOLATION-1 - [0:0]
:OVSDRIVER-ISOLATION-2 - [0:0]
:OVSDRIVER-INPUT - [0:0]
-A INPUT -j OVSDRIVER-INPUT
-A FORWARD -j OVSDRIVER-FORWARD
-A OVSDRIVER-FORWARD -i {BRIDGE} -m comment --comment {TAG} -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:OVSDRIVER-DNAT - [0:0]
:OVSDRIVER-POSTROUTING - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT
-A POSTROUTING -j OVSDRIVER-POSTROUTING
-A OVSDRIVER-DNAT -p tcp -m tcp --dport 8080 -m comment --comment "{TAG}" \
-j DNAT --to-destination 10.30.0.2:80
-A OVSDRIVER-POSTROUTING -s 10.30.0.0/24 ! -o {BRIDGE} -m comment --comment {TAG} -j MASQUERADE
COMMIT
"""

NETWORK = Network(network_id=NET, bridge=BRIDGE, ipv4=[Subnet("10.30.0.0/24", "10.30.0.1/24")])
ENDPOINT = Endpoint(
    endpoint_id=EP,
    network_id=NET,
    bridge=BRIDGE,
    port="oep-" + EP[:11],
    ifname="oep-" + EP[:11],
    mac=MAC,
    ipv4="10.30.0.2/24",
    sandbox=SANDBOX,
    created=NOW - 60,
    published=[PublishedPort("tcp", 8080, "10.30.0.2", 80)],
)


def link(name, mac=None, up=True, carrier=True, addresses=()):
    return LinkInfo(name=name, mac=mac, mtu=1500, up=up, carrier=carrier, addresses=addresses)


def healthy_facts(**changes):
    """One network with one joined endpoint, all as it should be."""
    facts = Facts(
        networks=[
            NetworkFacts(
                NET, BRIDGE, network=NETWORK, ports={BRIDGE: InterfaceFacts(BRIDGE, ofport=65534)}
            )
        ],
        endpoints=[endpoint_facts()],
        now=NOW,
        links={BRIDGE: link(BRIDGE, addresses=["10.30.0.1/24"]), "lo": link("lo")},
        sandboxes={SANDBOX: SandboxFacts(MOUNTED, links=(link("lo"), link("eth0", MAC)))},
        firewall={4: SAVE_V4},
        engine={
            NET: EngineNetwork(NET, "blue", "ovs", [EngineEndpoint(EP, "web", MAC, "10.30.0.2/24")])
        },
    )
    return attr.evolve(facts, **changes)


def endpoint_facts(endpoint=ENDPOINT, **changes):
    facts = EndpointFacts(
        endpoint_id=endpoint.endpoint_id,
        network_id=endpoint.network_id,
        bridge=endpoint.bridge,
        interface=InterfaceFacts(endpoint.port, ofport=3),
        endpoint=endpoint,
    )
    return attr.evolve(facts, **changes)


def problems(report):
    """Every problem of the report, wherever it is."""
    found = list(report.problems)
    for network in report.networks:
        found += network.problems
        for endpoint in network.endpoints:
            found += endpoint.problems
    return found


def the_endpoint(report):
    (network,) = report.networks
    (endpoint,) = network.endpoints
    return endpoint


# -- the rules ---------------------------------------------------------------------


def test_a_world_as_it_should_be_is_healthy_and_shown_in_the_engines_terms():
    report = assess(healthy_facts())
    assert report.healthy, problems(report)
    (network,) = report.networks
    assert (network.name, network.bridge, network.subnets) == (
        "blue",
        BRIDGE,
        ("10.30.0.0/24 gateway 10.30.0.1",),
    )
    endpoint = the_endpoint(report)
    assert endpoint.container == "web"
    assert endpoint.link == "eth0 up"
    assert endpoint.published == ("8080->10.30.0.2:80/tcp",)
    assert endpoint.sandbox_state == MOUNTED


@pytest.mark.parametrize("state", [UNMOUNTED, MISSING])
def test_a_sandbox_that_is_gone_is_a_problem_of_its_endpoint(state):
    report = assess(healthy_facts(sandboxes={SANDBOX: SandboxFacts(state)}))
    assert not report.healthy
    assert the_endpoint(report).problems == (
        f"its sandbox {SANDBOX} is gone: the container no longer exists "
        "(the running driver removes the endpoint)",
    )


@pytest.mark.parametrize(
    "interface, problem",
    [
        (InterfaceFacts("oep-x", ofport=-1), "ovs-vswitchd could not add port oep-x (ofport -1)"),
        (InterfaceFacts("oep-x", ofport=None), "ovs-vswitchd has not set up port oep-x"),
        (
            InterfaceFacts("oep-x", ofport=-1, error="could not open network device oep-x"),
            "Open vSwitch reports an error on port oep-x: could not open network device oep-x",
        ),
    ],
)
def test_what_open_vswitch_reports_about_a_port_is_a_problem(interface, problem):
    report = assess(healthy_facts(endpoints=[endpoint_facts(interface=interface)]))
    (found,) = the_endpoint(report).problems
    assert found.startswith(problem)


def test_a_link_down_in_the_container_is_a_problem():
    dead = SandboxFacts(MOUNTED, links=(link("eth0", MAC, carrier=False),))
    report = assess(healthy_facts(sandboxes={SANDBOX: dead}))
    endpoint = the_endpoint(report)
    assert endpoint.link == "eth0 up, no carrier"
    (problem,) = endpoint.problems
    assert problem.startswith("its link eth0 in the container is up, no carrier")


def test_a_link_left_in_the_host_is_named():
    facts = healthy_facts()
    links = dict(facts.links, **{ENDPOINT.ifname: link(ENDPOINT.ifname, MAC)})
    report = assess(
        attr.evolve(facts, links=links, sandboxes={SANDBOX: SandboxFacts(MOUNTED, links=())})
    )
    (problem,) = the_endpoint(report).problems
    assert problem.startswith(f"its link {ENDPOINT.ifname} is in the host, not in its container")


def test_an_endpoint_the_engine_has_but_open_vswitch_lost_is_shown_as_missing():
    report = assess(healthy_facts(endpoints=[]))
    endpoint = the_endpoint(report)
    assert (endpoint.container, endpoint.port, endpoint.mac) == ("web", ENDPOINT.port, MAC)
    (problem,) = endpoint.problems
    assert problem.startswith(f"its port {ENDPOINT.port} is missing from Open vSwitch")


def test_a_network_the_engine_has_but_no_bridge_records_is_a_problem():
    report = assess(healthy_facts(networks=[], endpoints=[]))
    (network,) = report.networks
    assert network.name == "blue" and network.bridge is None
    assert network.problems[0].startswith("the engine has this network but no bridge")
    assert not report.healthy


def test_a_network_the_engine_does_not_know_is_left_over():
    report = assess(healthy_facts(engine={}))
    (network,) = report.networks
    assert network.problems == (
        "the engine has no such network: it is left over in Open vSwitch "
        f"(the driver may have missed its DeleteNetwork); remove what is left of it: "
        f"ovs-vsctl del-br {network.bridge}",
    )


def test_without_the_engine_only_open_vswitchs_view_is_judged():
    report = assess(healthy_facts(engine=None))
    assert report.healthy
    assert the_endpoint(report).container is None


def test_an_unreadable_record_is_a_problem_of_that_object_only():
    unreadable = endpoint_facts(
        endpoint=attr.evolve(ENDPOINT, endpoint_id=EP2, port="oep-" + EP2[:11]),
    )
    unreadable = attr.evolve(
        unreadable, unreadable=["external_ids:ovsdriver-portmap is unreadable"]
    )
    report = assess(healthy_facts(endpoints=[endpoint_facts(), unreadable]))
    (network,) = report.networks
    by_id = {e.endpoint_id: e for e in network.endpoints}
    assert by_id[EP].healthy
    assert by_id[EP2].problems == ("external_ids:ovsdriver-portmap is unreadable",)


def test_a_record_on_the_wrong_bridge_or_an_endpoint_without_mac_is_a_problem():
    report = assess(healthy_facts(endpoints=[endpoint_facts(attr.evolve(ENDPOINT, mac=None))]))
    assert the_endpoint(report).problems == (
        f"interface {ENDPOINT.port} has no external_ids:attached-mac",
    )
    moved = attr.evolve(NETWORK, bridge="br-other")
    facts = healthy_facts()
    report = assess(attr.evolve(facts, networks=[attr.evolve(facts.networks[0], network=moved)]))
    assert report.networks[0].problems == (
        f"its record is on bridge {BRIDGE} but names bridge br-other",
    )


def test_an_unreadable_network_record_is_reported_with_its_bridge():
    facts = healthy_facts()
    broken = NetworkFacts(NET, BRIDGE, unreadable="external_ids:ovsdriver-network-x is unreadable")
    report = assess(attr.evolve(facts, networks=[broken]))
    (network,) = report.networks
    assert network.bridge == BRIDGE
    assert network.problems == ("external_ids:ovsdriver-network-x is unreadable",)
    assert len(network.endpoints) == 1  # its endpoints are still shown


def test_a_missing_firewall_chain_or_jump_is_a_problem_of_the_driver():
    without = SAVE_V4.replace(":OVSDRIVER-ISOLATION-2 - [0:0]\n", "").replace(
        "-A POSTROUTING -j OVSDRIVER-POSTROUTING\n", ""
    )
    report = assess(healthy_facts(firewall={4: without}))
    assert report.problems == (
        "the IPv4 firewall chain filter OVSDRIVER-ISOLATION-2 is missing",
        "the IPv4 firewall has no jump from nat POSTROUTING to OVSDRIVER-POSTROUTING",
    )


def test_a_network_or_a_published_port_without_rules_is_a_problem():
    flushed = "\n".join(line for line in SAVE_V4.splitlines() if TAG not in line)
    report = assess(healthy_facts(firewall={4: flushed}))
    assert report.networks[0].problems == ("the firewall has no IPv4 rules for it (iptables-save)",)
    assert the_endpoint(report).problems == (
        "the firewall has no DNAT rule publishing 8080->10.30.0.2:80/tcp",
    )


def test_an_unreadable_firewall_is_not_judged():
    assert assess(healthy_facts(firewall=None)).healthy
    assert assess(healthy_facts(firewall={})).healthy


@pytest.mark.parametrize(
    "links, problem",
    [
        ({}, f"its gateway interface {BRIDGE} is missing from the kernel"),
        ({BRIDGE: link(BRIDGE, up=False, addresses=["10.30.0.1/24"])}, "is down"),
        ({BRIDGE: link(BRIDGE)}, "lacks the address 10.30.0.1/24"),
    ],
)
def test_the_gateway_interface_must_exist_be_up_and_hold_the_gateway(links, problem):
    report = assess(healthy_facts(links=links))
    (found,) = report.networks[0].problems
    assert problem in found


def test_an_endpoint_nobody_joined_for_long_is_an_orphan():
    young = attr.evolve(ENDPOINT, sandbox=None, created=NOW - 5)
    host = dict(healthy_facts().links, **{ENDPOINT.ifname: link(ENDPOINT.ifname, MAC, up=False)})
    report = assess(healthy_facts(endpoints=[endpoint_facts(young)], links=host))
    assert report.healthy
    assert the_endpoint(report).link == f"{ENDPOINT.ifname} down"
    old = attr.evolve(young, created=NOW - 300)
    report = assess(healthy_facts(endpoints=[endpoint_facts(old)], links=host))
    (problem,) = the_endpoint(report).problems
    assert problem.startswith("not joined to any container 300 s after its creation")


def test_a_veth_endpoint_needs_its_host_end():
    veth = attr.evolve(ENDPOINT, port="ove-" + EP[:11], port_type="veth")
    report = assess(healthy_facts(endpoints=[endpoint_facts(veth)]))
    assert the_endpoint(report).problems == (f"the host end ove-{EP[:11]} of its veth is missing",)


def test_problems_are_counted_everywhere():
    report = assess(healthy_facts(sandboxes={SANDBOX: SandboxFacts(MISSING)}, engine={}))
    assert report.count_problems() == 2


# -- the output ----------------------------------------------------------------------


def test_the_text_shows_each_network_and_endpoint_like_ovs_vsctl_show():
    text = status.render(assess(healthy_facts()))
    assert text == (
        f"Network blue ({NET[:12]})\n"
        f"    bridge: {BRIDGE}\n"
        "    subnet: 10.30.0.0/24 gateway 10.30.0.1\n"
        "    options: nat, internal ports\n"
        "    health: ok\n"
        f"    Endpoint {EP[:12]} (container web)\n"
        f"        port: oep-{EP[:11]} (ofport 3)\n"
        f"        mac: {MAC}\n"
        "        addresses: 10.30.0.2/24\n"
        f"        sandbox: {SANDBOX} (mounted)\n"
        "        link: eth0 up\n"
        "        published: 8080->10.30.0.2:80/tcp\n"
        "        health: ok\n"
        "healthy: 1 network, 1 endpoint\n"
    )


def test_the_text_names_each_problem_and_counts_them():
    facts = healthy_facts(sandboxes={SANDBOX: SandboxFacts(UNMOUNTED)}, warnings=["no ip6tables"])
    text = status.render(assess(facts))
    assert f"        PROBLEM: its sandbox {SANDBOX} is gone" in text
    assert "warning: no ip6tables\n" in text
    assert text.endswith("UNHEALTHY: 1 problem in 1 network, 1 endpoint\n")


def test_the_json_has_every_field_and_health_flags():
    facts = healthy_facts(sandboxes={SANDBOX: SandboxFacts(UNMOUNTED)})
    document = json.loads(json.dumps(assess(facts).to_json()))
    assert document["healthy"] is False
    (network,) = document["networks"]
    assert network["healthy"] is False and network["problems"] == []
    (endpoint,) = network["endpoints"]
    assert endpoint["endpoint_id"] == EP and endpoint["container"] == "web"
    assert endpoint["published"] == ["8080->10.30.0.2:80/tcp"]
    assert endpoint["healthy"] is False and len(endpoint["problems"]) == 1


# -- the command ---------------------------------------------------------------------


@pytest.fixture
def observed(monkeypatch):
    """What the readers of ovsdriver.observe return, settable per test."""
    world = types.SimpleNamespace(facts=healthy_facts(), unreachable=None, engine_error=None)

    def read_ovsdb(remote):
        if world.unreachable:
            raise observe.Unreachable(world.unreachable)
        return world.facts.networks, world.facts.endpoints, False

    def read_engine(url, network_ids, driver_name):
        if world.engine_error:
            raise observe.EngineError(world.engine_error)
        return world.facts.engine

    monkeypatch.setattr(observe, "read_ovsdb", read_ovsdb)
    monkeypatch.setattr(
        observe, "read_kernel", lambda eps: (world.facts.links, world.facts.sandboxes, [])
    )
    monkeypatch.setattr(observe, "read_firewall", lambda: (world.facts.firewall, []))
    monkeypatch.setattr(observe, "read_engine", read_engine)
    return world


def run(*argv):
    options = parser().parse_args(["status", *argv])
    out = io.StringIO()
    return options.run(options, out), out.getvalue()


def test_exit_status_is_zero_when_healthy(observed):
    code, text = run()
    assert code == status.HEALTHY and text.endswith("healthy: 1 network, 1 endpoint\n")


def test_exit_status_is_one_when_unhealthy_in_text_and_json(observed):
    observed.facts = healthy_facts(sandboxes={SANDBOX: SandboxFacts(MISSING)})
    assert run()[0] == status.UNHEALTHY
    code, text = run("--json")
    assert code == status.UNHEALTHY and json.loads(text)["healthy"] is False


def test_exit_status_is_two_without_ovsdb(observed):
    observed.unreachable = "cannot reach OVSDB at unix:/x (No such file or directory)"
    code, text = run("--ovsdb", "unix:/x")
    assert code == status.UNREADABLE
    assert text == "ovsdriver status: cannot reach OVSDB at unix:/x (No such file or directory)\n"
    code, text = run("--json")
    assert code == status.UNREADABLE and json.loads(text)["healthy"] is False


def test_an_unreachable_engine_is_a_warning_not_a_failure(observed):
    observed.engine_error = "cannot ask the engine at unix:///x: [Errno 2] No such file"
    code, text = run()
    assert code == status.HEALTHY
    assert "warning: cannot ask the engine at unix:///x" in text
    assert "(container web)" not in text


# -- reading hand-edited OVSDB records -------------------------------------------------


def row(name, external_ids, **columns):
    return types.SimpleNamespace(name=name, external_ids=external_ids, **columns)


def endpoint_rows(iface_ids):
    ids = {"docker-network-id": NET, "docker-endpoint-id": EP, "owner": "ovsdriver"}
    iface = row(
        "oep-" + EP[:11],
        dict(ids, **iface_ids),
        ofport=[3],
        error=[],
        mtu_request=[1500],
    )
    port = row("oep-" + EP[:11], ids, interfaces=[iface], tag=[], protected=False)
    return port


@pytest.mark.parametrize(
    "key, value",
    [("ovsdriver-portmap", "garbage"), ("ovsdriver-created", "yesterday")],
)
def test_a_hand_edited_endpoint_value_is_named_not_fatal(key, value):
    port = endpoint_rows({"attached-mac": MAC, key: value})
    facts = observe._endpoint_facts(BRIDGE, port)
    assert facts.endpoint_id == EP
    (unreadable,) = facts.unreadable
    assert unreadable.startswith(f"external_ids:{key} of interface oep-{EP[:11]} is unreadable")
    assert unreadable.endswith(f"'ovs-vsctl remove Interface oep-{EP[:11]} external_ids {key}'")
    (endpoint,) = assess(healthy_facts(endpoints=[facts])).networks[0].endpoints
    assert endpoint.mac == MAC and endpoint.problems == (unreadable,)


def test_a_readable_endpoint_is_read_with_the_drivers_reader():
    port = endpoint_rows({"attached-mac": MAC, "ovsdriver-ipv4": "10.30.0.2/24"})
    facts = observe._endpoint_facts(BRIDGE, port)
    assert facts.unreadable == ()
    assert facts.endpoint.ipv4 == "10.30.0.2/24" and facts.interface.ofport == 3


def test_a_hand_edited_network_record_is_named_not_fatal():
    facts = observe._network_facts(BRIDGE, "ovsdriver-network-" + NET, "{not json", {})
    assert facts.network is None and facts.network_id == NET
    assert facts.unreadable.startswith(
        f"the record of network {NET[:12]} in OVSDB (Bridge {BRIDGE} "
        f"external_ids:ovsdriver-network-{NET}) cannot be read"
    )
    good = observe._network_facts(BRIDGE, "ovsdriver-network-" + NET, NETWORK.to_json(), {})
    assert good.network == NETWORK


def test_the_ovsdriver_command_is_declared_for_installers():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ovsdriver"]
    assert script.value == "ovsdriver.cli:main"


def test_the_bridge_drivers_options_show_among_a_networks_options():
    network = attr.evolve(NETWORK, icc=False, host_binding="127.0.0.1")
    (found,) = healthy_facts().networks
    facts = healthy_facts(networks=[attr.evolve(found, network=network)])
    text = status.render(assess(facts))
    assert "no traffic between its containers" in text
    assert "ports published on 127.0.0.1 by default" in text


def test_a_host_interface_that_came_up_with_the_networks_subnet_is_a_problem():
    facts = healthy_facts()
    links = dict(facts.links, eth9=link("eth9", addresses=["10.30.0.200/24"]))
    report = assess(attr.evolve(facts, links=links))
    assert problems(report) == [
        "its subnet 10.30.0.0/24 overlaps 10.30.0.0/24, the subnet of the host's interface "
        "eth9 (address 10.30.0.200/24): the host routes it to one of them only"
    ]
