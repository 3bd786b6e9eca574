"""The twistd command line: options, defaults and their checks."""

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from ovsdriver.tap import (
    DEFAULT_LISTEN,
    Options,
    detect_datapath_type,
    listen_endpoint,
    private_listen,
)


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    options = parse("--datapath-type", "netdev")
    assert options["listen"] == DEFAULT_LISTEN
    assert options["ovsdb"] == "unix:/var/run/openvswitch/db.sock"
    assert options["ovn-nb"] is None  # OVN is off by default


def test_ovn_nb_adds_a_northbound_connection():
    from twisted.internet.task import Clock

    from ovsdriver.ovsdb import OVSDB
    from ovsdriver.tap import makeService

    def databases(*argv):
        top = makeService(parse("--datapath-type", "netdev", *argv), reactor=Clock())
        return [s.database for s in top if isinstance(s, OVSDB)]

    assert databases() == ["Open_vSwitch"]
    assert databases("--ovn-nb", "tcp:10.0.0.1:6641") == ["Open_vSwitch", "OVN_Northbound"]


def test_auto_datapath_follows_the_kernel_module(tmp_path):
    assert detect_datapath_type(str(tmp_path)) == "system"
    assert detect_datapath_type(str(tmp_path / "missing")) == "netdev"
    assert parse()["datapath-type"] in ("system", "netdev")


@pytest.mark.parametrize(
    "given, used",
    [
        ("unix:/run/docker/plugins/x.sock", "unix:/run/docker/plugins/x.sock:mode=660"),
        ("unix:/run/docker/plugins/x.sock:mode=600", "unix:/run/docker/plugins/x.sock:mode=600"),
        ("tcp:9999:interface=127.0.0.1", "tcp:9999:interface=127.0.0.1"),
        ("systemd:domain=UNIX:index=0", "systemd:domain=UNIX:index=0:mode=660"),
        ("systemd:domain=UNIX:index=0:mode=600", "systemd:domain=UNIX:index=0:mode=600"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_the_socket_is_never_world_accessible(given, used):
    assert private_listen(given) == used


@pytest.mark.parametrize(
    "listen", ["unix:/tmp/x.sock:mode=666", "systemd:domain=UNIX:index=0:mode=666"]
)
def test_a_world_accessible_mode_is_refused(listen):
    with pytest.raises(usage.UsageError, match="mode=666"):
        parse("--listen", listen)


def test_a_socket_systemd_did_not_pass_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("LISTEN_FDNAMES", "other.socket")
    with pytest.raises(usage.UsageError, match="--fdname") as error:
        listen_endpoint(MemoryReactor(), "systemd:domain=UNIX:index=5:mode=660")
    assert "index=5" in str(error.value) and "other.socket" in str(error.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--datapath-type", "dpdk"), "--datapath-type"),
        (("--ovsdb", "/var/run/openvswitch/db.sock"), "--ovsdb"),
        (("--ovn-nb", "central:6641"), "--ovn-nb"),
        (("--ovn-nb", "ssl:central"), "--ovn-nb must look like unix:PATH, tcp:HOST:PORT or ssl"),
        (
            ("--ovn-nb", "ssl:10.0.0.1:6641", "--ca-cert", "/etc/ca.pem"),
            "--ovn-nb ssl:10.0.0.1:6641 needs --private-key, --certificate ",
        ),
        (("--ovsdb", "ssl:127.0.0.1:6640"), "--ovsdb ssl:127.0.0.1:6640 needs --private-key"),
    ],
)
def test_bad_options_are_named(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_a_socket_named_where_twisted_cannot_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("LISTEN_FDNAMES", raising=False)
    with pytest.raises(usage.UsageError, match="--fdname|index=0"):
        listen_endpoint(MemoryReactor(), "systemd:domain=UNIX:name=ovsdriver.socket:mode=660")
