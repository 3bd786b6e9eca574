"""Pure parts of the OVSDB connection (the rest runs against a real
ovsdb-server in tests/integration/test_ovsdb.py)."""

import pytest
from twisted.internet.task import Clock

from ovsdriver.ovsdb import OVSDB, OVSDBUnavailable, check_remote


@pytest.mark.parametrize(
    "remote",
    [
        "unix:/var/run/openvswitch/db.sock",
        "tcp:127.0.0.1:6640",
        "tcp:[::1]:6640",
        "ssl:10.0.0.1:6641",
    ],
)
def test_remotes_the_driver_connects_to(remote):
    assert check_remote(remote) == remote


@pytest.mark.parametrize("remote", ["unix:", "punix:/x", "tcp:6640", "ssl:central", "tcp:h:p"])
def test_unsupported_remotes_are_named(remote):
    with pytest.raises(ValueError, match="unsupported OVSDB remote .*ssl:HOST:PORT"):
        check_remote(remote)


def test_operations_fail_after_the_unavailable_timeout_without_a_connection():
    clock = Clock()
    ovsdb = OVSDB(clock, "unix:/nonexistent/db.sock", unavailable_timeout=3.0)
    ovsdb.running = True  # as if started, but nothing is ever reached
    failures = []
    ovsdb.query(lambda idl: None).addErrback(failures.append)
    clock.advance(2.9)
    assert failures == []
    clock.advance(0.2)
    (failure,) = failures
    assert failure.check(OVSDBUnavailable)
    assert "cannot reach OVSDB at unix:/nonexistent/db.sock" in str(failure.value)


def test_operations_after_a_stop_fail_at_once():
    # A service still finishing its work at shutdown (the reconciler's pass)
    # must not hold the driver's exit for apply_timeout.
    clock = Clock()
    ovsdb = OVSDB(clock, "unix:/nonexistent/db.sock")
    ovsdb.running = True  # as if started, but nothing is ever reached
    ovsdb.stopService()
    failures = []
    ovsdb.query(lambda idl: None).addErrback(failures.append)
    ovsdb.applied(cfg=1).addErrback(failures.append)
    assert [f.check(OVSDBUnavailable) for f in failures] == [OVSDBUnavailable] * 2
    assert all("shutting down" in str(f.value) for f in failures)
