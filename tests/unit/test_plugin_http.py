"""The plugin socket's HTTP: what the engine's client sends is served in order
on one connection, and anything else is refused by name and closed."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ovsdriver.api import MAX_BODY, Handlers, Plugin
from ovsdriver.driver import Driver
from ovsdriver.plugin_http import MAX_HEAD
from ovsdriver.testing import FakeFirewall, FakeNetlink, FakeVSwitch
from tests.unit.plugin_client import Connection, request

NET = "4e" * 32
CREATE = json.dumps(
    {"NetworkID": NET, "Options": {}, "IPv4Data": [{"Pool": "10.30.0.0/24"}]}
).encode()


def served(clock=None):
    kernel = FakeNetlink(clock=clock)
    vswitch = FakeVSwitch(kernel=kernel, clock=clock)  # with a clock: answers on its next turn
    return Connection(Plugin(Handlers(Driver(vswitch, kernel, FakeFirewall(clock=clock)))))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def connection(clock):
    return served(clock)


def settle(clock):
    for _ in range(100):
        if not clock.getDelayedCalls():
            return
        clock.advance(0)


def replies(connection):
    return [(status, json.loads(body)) for status, _, body in connection.answers()]


def test_the_engines_requests_are_answered_on_one_connection(connection):
    connection.send(request("Plugin.Activate"))
    connection.send(request("NetworkDriver.GetCapabilities"))
    answers = connection.answers()
    assert [status for status, _, _ in answers] == [200, 200]
    assert json.loads(answers[1][2]) == {"Scope": "local", "ConnectivityScope": "local"}
    assert answers[0][1]["Content-Type"] == "application/vnd.docker.plugins.v1.2+json"
    assert answers[0][2].endswith(b"\n") and not connection.closed


def test_a_request_in_pieces_is_answered_once_whole(connection):
    for byte in request("NetworkDriver.GetCapabilities", b"{}"):
        assert connection.answers() == []
        connection.send(bytes([byte]))
    assert replies(connection) == [(200, {"Scope": "local", "ConnectivityScope": "local"})]


def test_requests_sent_together_are_answered_in_their_order(connection, clock):
    """The first waits for Open vSwitch; the second, answerable at once,
    waits behind it, as HTTP/1.1 requires."""
    connection.send(
        request("NetworkDriver.CreateNetwork", CREATE)
        + request("NetworkDriver.GetCapabilities")
        + request("NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": NET}).encode())
    )
    assert connection.answers() == []
    settle(clock)
    assert replies(connection) == [
        (200, {}),
        (200, {"Scope": "local", "ConnectivityScope": "local"}),
        (200, {}),
    ]


@pytest.mark.parametrize(
    "extra, version", [(b"Connection: close\r\n", b"HTTP/1.1"), (b"", b"HTTP/1.0")]
)
def test_a_client_that_closes_gets_its_answer_first(connection, extra, version):
    data = request("Plugin.Activate", extra=extra).replace(b"HTTP/1.1", version, 1)
    connection.send(data + request("Plugin.Activate"))
    ((status, headers, _),) = connection.answers()
    assert status == 200 and headers["Connection"] == "close" and connection.closed


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"GET /Plugin.Activate HTTP/1.1\r\n\r\n", 405, "takes POST requests, not GET"),
        (
            b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "with a Content-Length, not chunked",
        ),
        (
            b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
            % (MAX_BODY + 1),
            413,
            f"larger than {MAX_BODY} bytes",
        ),
        (b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400, "'-3'"),
        (b"POST /Plugin.Activate\r\n\r\n", 400, "malformed HTTP request line"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nNo colon\r\n\r\n", 400, "header line 'No colon'"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nX: " + b"y" * MAX_HEAD, 431, "longer than"),
    ],
)
def test_what_the_engine_never_sends_is_refused_by_name(connection, data, status, message):
    connection.send(data + request("Plugin.Activate"))  # nothing after it is read
    ((got, headers, body),) = connection.answers()
    assert got == status and message in json.loads(body)["Err"]
    assert headers["Connection"] == "close" and connection.closed


def test_an_oversized_body_is_refused_before_it_arrives(connection):
    head = request("NetworkDriver.CreateNetwork", b" " * (MAX_BODY + 1))
    connection.send(head[: head.index(b"\r\n\r\n") + 4])
    assert [status for status, _, _ in connection.answers()] == [413]


def test_an_answer_after_the_engine_hung_up_is_dropped(connection, clock):
    connection.send(request("NetworkDriver.CreateNetwork", CREATE))
    connection.protocol.connectionLost(None)
    settle(clock)
    assert connection.transport.value() == b""


STREAM = (
    request("Plugin.Activate")
    + request("NetworkDriver.CreateNetwork", CREATE)
    + request("NetworkDriver.GetCapabilities", b"{}")
)


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=12, unique=True))
def test_however_the_bytes_arrive_the_answers_are_the_same(cuts):
    clock = Clock()
    connection = served(clock)
    edges = [0, *sorted(cuts), len(STREAM)]
    for start, end in zip(edges, edges[1:]):
        connection.send(STREAM[start:end])
    settle(clock)
    assert [status for status, _ in replies(connection)] == [200, 200, 200]
    assert not connection.closed


PIECES = [
    b"POST ", b"GET ", b"/Plugin.Activate", b" HTTP/1.1", b" HTTP/1.0", b"\r\n",
    b"\r\n\r\n", b"Content-Length: ", b"5", b"-1", b"Transfer-Encoding: chunked",
    b"Connection: close", b":", b" ", b"{}", b"\n",
]  # fmt: skip


@settings(max_examples=300)
@given(data=st.binary(max_size=300) | st.lists(st.sampled_from(PIECES), max_size=20).map(b"".join))
def test_any_bytes_get_answers_or_a_wait_never_an_exception(data):
    connection = served()
    connection.send(data)
    for status, headers, body in connection.answers():
        assert isinstance(json.loads(body), dict)
        if status in (405, 413, 431, 501):  # the rest of the stream cannot be trusted
            assert headers["Connection"] == "close" and connection.closed
