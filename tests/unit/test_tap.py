"""The twistd command line: options, defaults and their checks."""

import pytest
from twisted.python import usage

from ovsdriver.tap import DEFAULT_LISTEN, Options, detect_datapath_type, private_listen


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    options = parse("--datapath-type", "netdev")
    assert options["listen"] == DEFAULT_LISTEN
    assert options["ovsdb"] == "unix:/var/run/openvswitch/db.sock"


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
    ],
)
def test_the_socket_is_never_world_accessible(given, used):
    assert private_listen(given) == used


def test_a_world_accessible_mode_is_refused():
    with pytest.raises(usage.UsageError, match="mode=666"):
        parse("--listen", "unix:/tmp/x.sock:mode=666")


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--datapath-type", "dpdk"), "--datapath-type"),
        (("--ovsdb", "/var/run/openvswitch/db.sock"), "--ovsdb"),
    ],
)
def test_bad_options_are_named(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)
