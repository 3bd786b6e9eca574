"""``ssl:`` remotes: the certificate options, checked at start; the driver
(serving OVN's IPAM from a Northbound database, managing Open vSwitch) and
``ovsdriver status`` against real ovsdb-servers over TLS, and what they say
when a server's certificate is not one their CA vouches for.

The ovsdb-servers run in the world's namespace, listening on ``pssl`` on the
namespace's own loopback, and on a UNIX socket the tests read through."""

import sys

import ovs.stream
import pytest
from twisted.python import usage

from ovsdriver.tap import Options
from tests import world
from tests.tls import CA, SecureOVSDB
from tests.world import run

NB_SSL = "ssl:127.0.0.1:6641"
SWITCH = "secure"


@pytest.fixture
def pki(ovs_world):
    return CA(ovs_world.directory / "pki")


@pytest.fixture
def northbound(ovs_world, pki):
    directory = ovs_world.directory / "nb"
    directory.mkdir()
    server = SecureOVSDB(ovs_world.netns, directory, pki)
    try:
        yield server
    finally:
        server.stop()


def ssl_driver(ovs_world, key, cert, ca_cert):
    ovs_world.ovs.vsctl("set", "Open_vSwitch", ".", "external_ids:system-id=host-a")
    files = ["--private-key", str(key), "--certificate", str(cert), "--ca-cert", str(ca_cert)]
    return ovs_world.start_driver(extra_args=["--ovn-nb", NB_SSL, *files])


def request_pool(driver):
    return driver.post(
        "IpamDriver.RequestPool",
        {"AddressSpace": "ovs", "Pool": "10.81.0.0/24", "Options": {"ovs.ovn.switch": SWITCH}},
    )


def test_the_driver_allocates_in_a_northbound_database_over_tls(ovs_world, pki, northbound):
    driver = ssl_driver(ovs_world, *pki.issue("driver"), pki.cert)
    status, pool = request_pool(driver)
    assert status == 200 and "Error" not in pool, pool
    status, reply = driver.post(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}}
    )
    assert status == 200 and reply.get("Address", "").startswith("10.81.0."), reply
    assert northbound.nbctl("--bare", "--columns=name", "list", "Logical_Switch") == SWITCH
    claims = northbound.nbctl("--bare", "--columns=name", "list", "Logical_Switch_Port").split()
    assert f"{SWITCH}/{reply['Address'].split('/')[0]}" in claims


def test_a_server_the_ca_does_not_vouch_for_is_named_with_why(ovs_world, pki, northbound):
    stranger = CA(ovs_world.directory / "other-pki", "stranger")
    driver = ssl_driver(ovs_world, *stranger.issue("driver"), stranger.cert)
    status, reply = request_pool(driver)
    assert status == 200, reply
    assert reply["Error"].startswith(f"cannot reach the OVN Northbound database at {NB_SSL} ("), (
        reply
    )
    assert "certificate verify failed" in reply["Error"], reply
    assert reply["Error"].endswith(
        "check --private-key, --certificate and --ca-cert against the server's"
    )
    # Said once in the log, though the driver tried again every second since.
    assert driver.log().count("cannot fetch the schema") == 1, driver.log()
    assert northbound.nbctl("--bare", "--columns=name", "list", "Logical_Switch") == ""


def test_a_server_that_comes_back_with_a_certificate_not_vouched_for_is_named(
    ovs_world, pki, northbound
):
    """The replica's own connection (not the schema's) meets the bad handshake."""
    driver = ssl_driver(ovs_world, *pki.issue("driver"), pki.cert)
    status, pool = request_pool(driver)
    assert status == 200 and "Error" not in pool, pool
    northbound.stop()
    stranger = CA(ovs_world.directory / "other-pki", "stranger")
    impostor = SecureOVSDB(ovs_world.netns, northbound.directory, pki, server_ca=stranger)
    try:
        body = {"PoolID": pool["PoolID"], "Address": "", "Options": {}}
        status, reply = driver.post("IpamDriver.RequestAddress", body)
        assert status == 200, reply
        assert "TLS handshake failed" in reply["Error"], reply
        assert "certificate verify failed" in reply["Error"], reply
        assert "tick failed" not in driver.log(), driver.log()
    finally:
        impostor.stop()


def test_the_driver_manages_open_vswitch_through_a_local_ovsdb_over_tls(ovs_world, pki):
    key, cert = pki.issue("local-ovsdb")
    ovs_world.ovs.stop_ovsdb()  # ovs-vswitchd reconnects over its UNIX socket
    ovs_world.ovs.start_ovsdb(
        extra_args=[
            "--remote=pssl:6640:127.0.0.1",
            f"--private-key={key}",
            f"--certificate={cert}",
            f"--ca-cert={pki.cert}",
        ]  # fmt: skip
    )
    key, cert = pki.issue("driver")
    files = ["--private-key", str(key), "--certificate", str(cert), "--ca-cert", str(pki.cert)]
    name = world.unique_driver_name()
    directory = ovs_world.directory / "ssl-driver"
    with world.Driver(
        ovs_world.netns, name, "ssl:127.0.0.1:6640", directory, extra_args=files
    ) as driver:
        network, endpoint = "5e" * 32, "6f" * 32
        body = {"NetworkID": network, "Options": {}, "IPv6Data": []}
        body["IPv4Data"] = [{"Pool": "10.82.0.0/24", "Gateway": "10.82.0.1/24"}]
        status, reply = driver.post("NetworkDriver.CreateNetwork", body)
        assert (status, reply) == (200, {}), reply
        body = {"NetworkID": network, "EndpointID": endpoint}
        body["Interface"] = {"Address": "10.82.0.2/24"}
        status, reply = driver.post("NetworkDriver.CreateEndpoint", body)
        assert status == 200 and "Err" not in reply, reply
        bridge = "obr-" + network[:11]
        assert ovs_world.ovs.vsctl("list-ports", bridge).split() == ["oep-" + endpoint[:11]]


def test_the_status_tool_reads_an_ovsdb_over_tls(ovs_world, pki):
    directory = ovs_world.directory / "vswitch-db"
    directory.mkdir()
    server = SecureOVSDB(ovs_world.netns, directory, pki, schema=world.OVS_SCHEMA, port=6640)
    try:
        run([world._tool("ovs-vsctl"), f"--db=unix:{server.socket}", "--no-wait", "init"])
        key, cert = pki.issue("operator")
        stranger = CA(ovs_world.directory / "other-pki", "stranger")

        def status(ca_cert):
            argv = [sys.executable, "-m", "ovsdriver", "status", "--docker", "none"]
            argv += ["--no-firewall", "--ovsdb", "ssl:127.0.0.1:6640", "--private-key", key]
            argv += ["--certificate", cert, "--ca-cert", ca_cert]
            return ovs_world.netns.run(argv, check=False, cwd=world.REPO_ROOT, timeout=60)

        result = status(pki.cert)
        assert (result.returncode, result.stdout) == (0, "healthy: 0 networks, 0 endpoints\n")
        result = status(stranger.cert)
        assert result.returncode == 2, result
        assert result.stdout.startswith(
            "ovsdriver status: cannot reach OVSDB at ssl:127.0.0.1:6640 (TLS handshake failed: "
        ), result.stdout
        assert "; check --private-key, --certificate and --ca-cert" in result.stdout
    finally:
        server.stop()


@pytest.fixture
def python_ovs_ssl():
    """python-ovs's process-wide SSL settings, put back after the test."""
    stream = ovs.stream.Stream
    saved = (stream._SSL_private_key_file, stream._SSL_certificate_file, stream._SSL_ca_cert_file)
    yield stream
    stream.ssl_set_private_key_file(saved[0])
    stream.ssl_set_certificate_file(saved[1])
    stream.ssl_set_ca_cert_file(saved[2])


def parse_ssl(key, cert, ca_cert):
    files = ["--private-key", str(key), "--certificate", str(cert), "--ca-cert", str(ca_cert)]
    options = Options()
    options.parseOptions(["--ovn-nb", NB_SSL, *files])
    return options


def test_the_files_are_loaded_into_python_ovs_at_start(tmp_path, python_ovs_ssl):
    ca = CA(tmp_path)
    key, cert = ca.issue("driver")
    options = parse_ssl(key, cert, ca.cert)
    assert options["ssl"] == {
        "private-key": str(key),
        "certificate": str(cert),
        "ca-cert": str(ca.cert),
    }
    stream = python_ovs_ssl
    assert (stream._SSL_private_key_file, stream._SSL_certificate_file) == (str(key), str(cert))
    assert stream._SSL_ca_cert_file == str(ca.cert)


def test_files_that_do_not_load_are_named_at_start(tmp_path, python_ovs_ssl):
    ca = CA(tmp_path)
    key, cert = ca.issue("driver")
    other_key, _ = ca.issue("other")
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        usage.UsageError, match=f"certificate {cert} with the private key {other_key}"
    ):
        parse_ssl(other_key, cert, ca.cert)
    with pytest.raises(usage.UsageError, match=f"CA certificate {missing}: .*No such file"):
        parse_ssl(key, cert, missing)
    assert python_ovs_ssl._SSL_private_key_file != str(key)  # nothing half-set
