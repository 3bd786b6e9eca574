"""Operators edit OVSDB with ovs-vsctl: a value the driver cannot read concerns
that one network or endpoint only. The real driver, over its socket, against a
private Open vSwitch whose records are edited by hand."""

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.world import CommandError, OVSWorld, require, wait_until

NET_A, NET_B = "a7" * 32, "b8" * 32
EP_A, EP_B, EP_B2 = "1e" * 32, "2e" * 32, "3e" * 32
RECORD = "external_ids:ovsdriver-network-"


def create_network(driver, network_id, subnet):
    return driver.post(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": network_id,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"Pool": f"{subnet}.0/24", "Gateway": f"{subnet}.1/24"}],
            "IPv6Data": [],
        },
    )


def create_endpoint(driver, network_id, endpoint_id, address):
    return driver.post(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": network_id, "EndpointID": endpoint_id, "Interface": {"Address": address}},
    )


def ok(reply):
    status, body = reply
    assert status == 200 and not body.get("Err"), body
    return body


def refused(reply):
    """A clear refusal: a sentence, never an internal error or a traceback."""
    status, body = reply
    assert status == 200 and body.get("Err"), body
    assert "internal error" not in body["Err"] and "Traceback" not in body["Err"], body
    return body["Err"]


def bridge(network_id):
    return "obr-" + network_id[:11]


def port(endpoint_id):
    return "oep-" + endpoint_id[:11]


def set_key(world, table, row, key, value):
    world.ovs.vsctl("set", table, row, f"{key}={json.dumps(value)}")


def test_an_unreadable_network_record_concerns_only_its_network(ovs_world, driver):
    ok(create_network(driver, NET_A, "10.71.0"))
    ok(create_network(driver, NET_B, "10.72.0"))
    ok(create_endpoint(driver, NET_A, EP_A, "10.71.0.2/24"))
    set_key(ovs_world, "Bridge", bridge(NET_A), RECORD + NET_A, "{bad json")

    ok(create_endpoint(driver, NET_B, EP_B, "10.72.0.2/24"))
    ids = {"NetworkID": NET_B, "EndpointID": EP_B}
    ok(driver.post("NetworkDriver.Join", dict(ids, SandboxKey="/var/run/docker/netns/x")))
    published = {"Proto": 6, "Port": 80, "HostPort": 8080}
    options = {"com.docker.network.portmap": [published]}
    ok(driver.post("NetworkDriver.ProgramExternalConnectivity", dict(ids, Options=options)))

    err = refused(create_endpoint(driver, NET_A, EP_B2, "10.71.0.3/24"))
    assert f"network {NET_A[:12]}" in err and "cannot be read" in err
    assert f"ovsdriver-network-{NET_A}" in err
    # The way out works: the endpoint and the network can still be removed.
    ok(driver.post("NetworkDriver.DeleteEndpoint", {"NetworkID": NET_A, "EndpointID": EP_A}))
    ok(driver.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET_A}))
    assert bridge(NET_A) not in ovs_world.ovs.bridges()
    assert bridge(NET_B) in ovs_world.ovs.bridges()
    # Logged once, with the way to fix it, however often it was read.
    log = driver.logfile.read_text()
    assert log.count(f"cannot read external_ids:ovsdriver-network-{NET_A}") == 1
    assert "ovs-vsctl remove Bridge" in log


def test_unreadable_endpoint_values_concern_only_their_endpoint(ovs_world, driver):
    ok(create_network(driver, NET_B, "10.72.0"))
    ok(create_endpoint(driver, NET_B, EP_A, "10.72.0.2/24"))
    # CreateEndpoint answers before the port is in OVSDB; any later call about
    # the endpoint waits for it, and only a row that exists can be edited.
    ok(driver.post("NetworkDriver.EndpointOperInfo", {"NetworkID": NET_B, "EndpointID": EP_A}))
    for key, value in (
        ("ovsdriver-portmap", "{bad json"),
        ("ovsdriver-created", "yesterday"),
        ("attached-mac", "not-a-mac"),
    ):
        set_key(ovs_world, "Interface", port(EP_A), f"external_ids:{key}", value)
    ok(create_endpoint(driver, NET_B, EP_B, "10.72.0.3/24"))
    ids = {"NetworkID": NET_B, "EndpointID": EP_B}
    options = {"com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 8081}]}
    ok(driver.post("NetworkDriver.ProgramExternalConnectivity", dict(ids, Options=options)))
    ok(driver.post("NetworkDriver.EndpointOperInfo", {"NetworkID": NET_B, "EndpointID": EP_A}))
    set_key(ovs_world, "Interface", port(EP_A), "external_ids:ovsdriver-ipv4", "10.72.0.999/24")
    ids_a = {"NetworkID": NET_B, "EndpointID": EP_A}
    err = refused(
        driver.post("NetworkDriver.ProgramExternalConnectivity", dict(ids_a, Options=options))
    )
    assert "ovsdriver-ipv4" in err
    ok(driver.post("NetworkDriver.DeleteEndpoint", ids_a))
    # The port goes in the background, right after the call.
    wait_until(
        lambda: port(EP_A) not in ovs_world.ovs.vsctl("list-ports", bridge(NET_B)).split(),
        timeout=10,
    )


# -- the hypothesis fuzz, against the real driver, with hand edits among the inputs


KEYS = [
    ("Bridge", bridge(NET_A), RECORD + NET_A),
    ("Interface", port(EP_A), "external_ids:ovsdriver-portmap"),
    ("Interface", port(EP_A), "external_ids:ovsdriver-created"),
    ("Interface", port(EP_A), "external_ids:ovsdriver-ipv4"),
    ("Interface", port(EP_A), "external_ids:attached-mac"),
]
#: Text an operator can type: no surrogates, which no command line carries.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
VALUES = TEXT | JSONISH.map(json.dumps)
EDITS = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3)
CALLS = st.lists(
    st.sampled_from(
        [
            "NetworkDriver.CreateEndpoint",
            "NetworkDriver.Join",
            "NetworkDriver.EndpointOperInfo",
            "NetworkDriver.ProgramExternalConnectivity",
            "NetworkDriver.RevokeExternalConnectivity",
            "NetworkDriver.Leave",
            "NetworkDriver.DeleteEndpoint",
        ]
    ),
    max_size=4,
)


def body(method, network_id, endpoint_id):
    ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
    if method == "NetworkDriver.CreateEndpoint":
        return dict(ids, Interface={"Address": "10.71.0.9/24"})
    if method == "NetworkDriver.Join":
        return dict(ids, SandboxKey="/var/run/docker/netns/fuzz")
    if method == "NetworkDriver.ProgramExternalConnectivity":
        return dict(ids, Options={"com.docker.network.portmap": []})
    return ids


def test_hand_edits_never_break_other_networks_fuzz():
    require()
    with OVSWorld() as world:
        driver = world.start_driver()
        ok(create_network(driver, NET_B, "10.72.0"))

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(edits=EDITS, calls=CALLS)
        def check(edits, calls):
            ok(create_network(driver, NET_A, "10.71.0"))
            ok(create_endpoint(driver, NET_A, EP_A, "10.71.0.2/24"))
            for (table, row, key), value in edits:
                # What ovs-vsctl itself refuses (a NUL...) no operator can write.
                with contextlib.suppress(CommandError):
                    world.ovs.vsctl("set", table, row, f"{key}={json.dumps(value)}")
            for method in calls:
                status, reply = driver.post(method, body(method, NET_A, EP_A))
                assert status == 200, reply
                err = reply.get("Err") or ""
                assert "internal error" not in err and "Traceback" not in err, err
            # The other network is untouched by whatever happened to A.
            ok(create_endpoint(driver, NET_B, EP_B, "10.72.0.5/24"))
            ok(
                driver.post(
                    "NetworkDriver.DeleteEndpoint", {"NetworkID": NET_B, "EndpointID": EP_B}
                )
            )
            # A can always be removed, whatever its records say.
            ids = {"NetworkID": NET_A, "EndpointID": EP_A}
            ok(driver.post("NetworkDriver.DeleteEndpoint", ids))
            ok(driver.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET_A}))
            assert bridge(NET_A) not in world.ovs.bridges()

        check()
