"""Hostile input: every method gets random JSON shapes, types and sizes.

Never a 5xx, never a traceback or an internal error in a response, and a
rejected request never changes what the driver holds.
"""

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsdriver.api import METHODS
from tests.unit.test_api import EP, NET, SUBNET, World

NAMES = sorted(METHODS)
IDS = st.sampled_from([NET, EP, "", "zz", "../../etc/passwd", "a" * 65, NET.upper()])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | IDS
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = sorted(
    {name for _, fields in METHODS.values() for name in fields}
    | {"Interface", "Address", "MacAddress", "com.docker.network.generic", "ovs.vlan"}
)
BODIES = st.dictionaries(st.sampled_from(FIELD_NAMES), JSON, max_size=6)
RAW = st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode())


def state(world):
    return copy.deepcopy((world.vswitch.bridges, world.kernel._links, world.firewall.networks))


def prepared_world():
    """A world with one network and one endpoint, so ids can hit real things."""
    world = World()
    world.create_network()
    world.create_endpoint()
    return world


def check(world, method, data):
    before = state(world)
    code, content = world.raw(method, data)
    assert code in (200, 400, 404, 413), (code, content)
    reply = json.loads(content)
    assert isinstance(reply, dict)
    err = reply.get("Err")
    if err is not None:
        assert isinstance(err, str) and err
        assert "Traceback" not in err and "internal error" not in err, err
    if code != 200 or err:
        assert state(world) == before, f"{method} changed state but failed: {err}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(NAMES), body=BODIES)
def test_random_fields(method, body):
    check(prepared_world(), method, json.dumps(body).encode())


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(NAMES), data=RAW)
def test_random_bytes(method, data):
    check(prepared_world(), method, data)


@settings(max_examples=200, deadline=None)
@given(
    generic=st.dictionaries(
        st.sampled_from(
            [
                "ovs.vlan",
                "ovs.bridge",
                "ovs.uplink",
                "ovs.port_type",
                "ovs.nat",
                "ovs.datapath_type",
                "com.docker.network.driver.mtu",
                "ovs.x",
            ]
        ),
        JSON,
        max_size=4,
    ),
    ipv4=JSON,
)
def test_random_network_options(generic, ipv4):
    world = World()
    body = {
        "NetworkID": NET,
        "Options": {"com.docker.network.generic": generic},
        "IPv4Data": ipv4 if isinstance(ipv4, list) else SUBNET,
    }
    check(world, "NetworkDriver.CreateNetwork", json.dumps(body).encode())


@settings(max_examples=200, deadline=None)
@given(interface=st.dictionaries(st.sampled_from(["Address", "AddressIPv6", "MacAddress"]), JSON))
def test_random_endpoint_interfaces(interface):
    world = World()
    world.create_network()
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": interface}
    check(world, "NetworkDriver.CreateEndpoint", json.dumps(body).encode())
