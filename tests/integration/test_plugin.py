"""The driver as twistd runs it, over its real UNIX socket, against a private
Open vSwitch: the command line, the socket, the API and what OVSDB shows."""

import contextlib
import http.client
import json
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from ovsdriver.options import KERNEL_MODULE
from tests.world import REPO_ROOT, plugin_post, twistd_argv, unique_driver_name, wait_until

NET = "7a" * 32
EP = "5c" * 32
IDS = {"NetworkID": NET, "EndpointID": EP}


def twistd(*argv):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [*twistd_argv(), *argv], capture_output=True, text=True, timeout=60, env=env
    ).stdout


def test_twistd_lists_and_documents_the_plugin():
    assert "ovsdriver" in twistd("--help")
    usage = twistd("ovsdriver", "--help")
    for option in ("--listen", "--ovsdb", "--datapath-type", "mode=660"):
        assert option in usage


def ok(driver, method, body=None):
    status, reply = driver.post(method, body)
    assert status == 200 and not reply.get("Err"), reply
    return reply


def vsctl_get(world, *args):
    """A column or key as ovs-vsctl prints it, without its optional quotes."""
    return world.ovs.vsctl("--if-exists", "get", *args).strip('"')


def test_the_api_against_real_open_vswitch(ovs_world, driver):
    assert ok(driver, "Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert driver.post("NetworkDriver.Nonsense", {})[0] == 404
    ok(
        driver,
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {"com.docker.network.generic": {"com.docker.network.driver.mtu": "1400"}},
            "IPv4Data": [{"Pool": "10.40.0.0/24", "Gateway": "10.40.0.1/24"}],
            "IPv6Data": [],
        },
    )
    bridge = "obr-" + NET[:11]
    assert vsctl_get(ovs_world, "Bridge", bridge, "external_ids:docker-network-id") == NET
    assert vsctl_get(ovs_world, "Bridge", bridge, "external_ids:owner") == "ovsdriver"
    assert vsctl_get(ovs_world, "Bridge", bridge, "datapath_type") == "netdev"
    address = ovs_world.netns.run(["ip", "-o", "addr", "show", "dev", bridge]).stdout
    assert "10.40.0.1/24" in address

    reply = ok(
        driver,
        "NetworkDriver.CreateEndpoint",
        dict(IDS, Interface={"Address": "10.40.0.2/24"}),
    )
    mac = reply["Interface"]["MacAddress"]
    port = "oep-" + EP[:11]
    for table in ("Port", "Interface"):
        assert vsctl_get(ovs_world, table, port, "external_ids:docker-network-id") == NET
        assert vsctl_get(ovs_world, table, port, "external_ids:docker-endpoint-id") == EP
    assert vsctl_get(ovs_world, "Interface", port, "external_ids:attached-mac") == mac
    assert vsctl_get(ovs_world, "Interface", port, "external_ids:iface-id") == EP
    link = ovs_world.netns.run(["ip", "-o", "link", "show", port]).stdout
    assert "mtu 1400" in link  # set before the engine takes it (it never touches the MTU)
    # The engine sets the MAC as it moves the port in: OVS must not keep at it.
    assert vsctl_get(ovs_world, "Interface", port, "mac") == "[]"

    join = ok(driver, "NetworkDriver.Join", dict(IDS, SandboxKey="/var/run/docker/netns/1"))
    assert join["InterfaceName"] == {"SrcName": port, "DstPrefix": "eth"}
    assert join["Gateway"] == "10.40.0.1"
    info = ok(driver, "NetworkDriver.EndpointOperInfo", IDS)["Value"]
    assert info["bridge"] == bridge and info["mac"] == mac

    # Killed and restarted, the driver finds everything again in OVSDB; and
    # clears the Interface mac older drivers set.
    driver.kill(signal.SIGKILL)
    ovs_world.ovs.vsctl("set", "Interface", port, f"mac={json.dumps(mac)}")
    driver.start()
    wait_until(lambda: vsctl_get(ovs_world, "Interface", port, "mac") == "[]", timeout=10)
    ok(driver, "NetworkDriver.Leave", IDS)
    ok(driver, "NetworkDriver.DeleteEndpoint", IDS)
    # The port goes in the background, right after the call.
    wait_until(lambda: vsctl_get(ovs_world, "Port", port, "name") == "", timeout=10)
    ok(driver, "NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert bridge not in ovs_world.ovs.bridges()
    wait_until(lambda: bridge not in ovs_world.netns.links(), timeout=10)


def post_ignoring_errors(driver, body):
    """CreateEndpoint from a thread; the driver may be killed meanwhile."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        driver.post("NetworkDriver.CreateEndpoint", body, 20)


def test_a_removal_cut_short_by_a_kill_is_finished_once_the_driver_is_back(ovs_world, driver):
    """DeleteEndpoint returns once the port is marked for deletion; a driver
    killed before the port went deletes it when it is back."""
    ok(
        driver,
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NET, "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}]},
    )
    ok(driver, "NetworkDriver.CreateEndpoint", dict(IDS, Interface={"Address": "10.41.0.2/24"}))
    port = "oep-" + EP[:11]
    other = "3e" * 32
    vswitchd = ovs_world.ovs.vswitchd_pid
    # An addition waiting for a frozen ovs-vswitchd holds the deletion back.
    os.kill(vswitchd, signal.SIGSTOP)
    body = {"NetworkID": NET, "EndpointID": other}
    waiting = threading.Thread(target=lambda: post_ignoring_errors(driver, body))
    try:
        waiting.start()
        wait_until(lambda: vsctl_get(ovs_world, "Port", "oep-" + other[:11], "name"), timeout=20)
        ok(driver, "NetworkDriver.DeleteEndpoint", IDS)
        driver.kill(signal.SIGKILL)
    finally:
        os.kill(vswitchd, signal.SIGCONT)
        waiting.join(30)
    assert vsctl_get(ovs_world, "Port", port, "external_ids:ovsdriver-removing")
    driver.start()
    wait_until(lambda: vsctl_get(ovs_world, "Port", port, "name") == "", timeout=20)
    wait_until(lambda: port not in ovs_world.netns.links(), timeout=10)


def test_a_network_deleted_right_after_its_last_veth_endpoint_leaves_no_veth(ovs_world, driver):
    """The engine deletes a network at once after its last endpoint (docker
    compose down): the port still waiting for its deletion goes with the
    bridge, and its veth pair with it, not 20 s later with the reconciler."""
    ok(
        driver,
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {"com.docker.network.generic": {"ovs.port_type": "veth"}},
            "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}],
        },
    )
    ok(driver, "NetworkDriver.CreateEndpoint", dict(IDS, Interface={"Address": "10.41.0.2/24"}))
    host_end = "ove-" + EP[:11]
    assert host_end in ovs_world.netns.links()
    ok(driver, "NetworkDriver.DeleteEndpoint", IDS)
    ok(driver, "NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    wait_until(lambda: host_end not in ovs_world.netns.links(), timeout=5)


def test_ovsdb_outage_fails_fast_and_capabilities_still_answer(ovs_world, driver):
    ovs_world.ovs.stop_ovsdb()
    began = time.monotonic()
    status, reply = driver.post("NetworkDriver.CreateNetwork", {"NetworkID": NET, "Options": {}})
    assert status == 200 and "OVSDB at " + ovs_world.ovs.remote in reply["Err"]
    assert time.monotonic() - began < 8
    assert ok(driver, "NetworkDriver.GetCapabilities")["Scope"] == "local"
    ovs_world.ovs.start_ovsdb()
    wait_until(
        lambda: not driver.post("NetworkDriver.DeleteNetwork", {"NetworkID": NET})[1].get("Err"),
        timeout=20,
    )


def test_socket_directory_is_made_and_the_socket_is_private(ovs_world, tmp_path):
    name = unique_driver_name()
    directory = f"/run/{name}-plugins"
    socket = f"{directory}/{name}.sock"
    process = ovs_world.netns.popen(
        [*twistd_argv(), "-n", f"--pidfile={tmp_path}/pid", f"--logfile={tmp_path}/log",
         "ovsdriver", "--listen", f"unix:{socket}", "--ovsdb", ovs_world.ovs.remote],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(socket), timeout=20)
        assert stat.S_IMODE(os.stat(socket).st_mode) == 0o660
        assert plugin_post(socket, "NetworkDriver.GetCapabilities")[0] == 200
    finally:
        process.terminate()
        process.wait(10)
        for path in (socket, socket + ".lock"):
            if os.path.lexists(path):
                os.unlink(path)
        os.rmdir(directory)


@pytest.mark.skipif(os.path.isdir(KERNEL_MODULE), reason="the openvswitch kernel module is loaded")
def test_a_system_datapath_without_its_kernel_module_is_refused_at_once(ovs_world, driver):
    start = time.monotonic()
    status, reply = driver.post(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NET,
            "Options": {"com.docker.network.generic": {"ovs.datapath_type": "system"}},
            "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}],
            "IPv6Data": [],
        },
    )
    # Before, ovs-vswitchd only logged that it could not make the datapath,
    # and the driver failed 5 s later: "interface obr-... did not appear".
    assert status == 200 and "kernel module, which is not loaded" in reply["Err"]
    assert time.monotonic() - start < 2
    assert vsctl_get(ovs_world, "Bridge", "obr-" + NET[:11], "name") == ""
