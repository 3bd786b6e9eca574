"""Blocking, read-only looks at what the driver manages, for ``ovsdriver status``.

A command-line tool may block (the driver itself never does), so this reads
OVSDB with the python-ovs IDL run to its first complete snapshot, the kernel
with pyroute2, the firewall with ``iptables-save`` and the engine over its
HTTP API, each bounded in time, and hands `health.Facts` over. Nothing here
writes anything. Values a person edited by hand are reported as unreadable
instead of stopping the look at everything else.
"""

import http.client
import json
import os
import socket
import subprocess
import time
import urllib.parse

import ovs.db.idl
import ovs.poller

from ovsdriver import firewall, netlink, vswitch
from ovsdriver.health import (
    EndpointFacts,
    EngineEndpoint,
    EngineNetwork,
    InterfaceFacts,
    NetworkFacts,
    SandboxFacts,
)
from ovsdriver.ovsdb import TABLES, OVSDBUnavailable, fetch_schema, remedy
from ovsdriver.sandboxes import INVISIBLE, MOUNTED
from ovsdriver.sandboxes import observe as observe_sandboxes
from ovsdriver.values import Network

DEFAULT_DOCKER = "unix:///var/run/docker.sock"


class Unreachable(Exception):
    """OVSDB cannot be read; the message names it and suggests a fix."""


# -- OVSDB -----------------------------------------------------------------------


def read_ovsdb(remote, timeout=5.0):
    """(networks, endpoints, vswitchd_behind) recorded in the OVSDB at `remote`."""
    deadline = time.monotonic() + timeout
    schema = _fetch_schema(remote, deadline)
    helper = ovs.db.idl.SchemaHelper(schema_json=schema)
    for table, columns in TABLES.items():
        helper.register_columns(table, columns)
    idl = ovs.db.idl.Idl(remote, helper)
    try:
        while idl.state != idl.IDL_S_MONITORING:
            idl.run()
            if idl.state == idl.IDL_S_MONITORING:
                break
            poller = ovs.poller.Poller()
            idl.wait(poller)
            _block(poller, remote, deadline)
        return read_replica(idl)
    finally:
        idl.close()


def _block(poller, remote, deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise Unreachable(f"OVSDB at {remote} did not answer in time; is ovsdb-server running?")
    poller.timer_wait(int(left * 1000) + 1)
    poller.block()


def _fetch_schema(remote, deadline):
    try:
        return fetch_schema(remote, timeout=max(deadline - time.monotonic(), 0.001))
    except OVSDBUnavailable as e:
        hint = remedy(str(e), "is ovsdb-server running? (use --ovsdb to name another remote)")
        raise Unreachable(f"cannot reach OVSDB at {remote} ({e}); {hint}") from None


def read_replica(idl):
    """(network facts, endpoint facts, whether ovs-vswitchd is behind) of a live
    replica; a port DeleteEndpoint marked is no endpoint, as for the driver."""
    networks, endpoints = [], []
    for bridge in idl.tables["Bridge"].rows.values():
        ids = dict(bridge.external_ids)
        made = {}
        for port in bridge.ports:
            port_ids = dict(port.external_ids)
            if vswitch.OWNER not in port_ids:
                continue
            if vswitch.is_endpoint_port(port_ids):
                endpoints.append(_endpoint_facts(bridge.name, port))
            elif vswitch.ENDPOINT_ID not in port_ids:
                made[port.name] = _interface_facts(port.interfaces[0])
        for key, value in ids.items():
            if key.startswith(vswitch.NETWORK_RECORD):
                networks.append(_network_facts(bridge.name, key, value, made))
    root = next(iter(idl.tables["Open_vSwitch"].rows.values()), None)
    behind = root is not None and root.cur_cfg < root.next_cfg
    return networks, endpoints, behind


def _interface_facts(iface):
    return InterfaceFacts(
        name=iface.name,
        ofport=iface.ofport[0] if iface.ofport else None,
        error=iface.error[0] if iface.error else None,
    )


def _network_facts(bridge, key, value, made):
    network_id = key[len(vswitch.NETWORK_RECORD) :]
    try:
        record = vswitch._read_network(bridge, key, network_id, value)
    except Exception as e:  # whatever else a hand edit may provoke
        record = f"external_ids:{key} of bridge {bridge} is unreadable ({e})"
    if isinstance(record, Network):
        return NetworkFacts(network_id, bridge, network=record, ports=made)
    return NetworkFacts(network_id, bridge, unreadable=str(record), ports=made)


def _endpoint_facts(bridge, port):
    iface = port.interfaces[0]
    ids = dict(iface.external_ids)
    port_ids = dict(port.external_ids)
    facts = {
        "endpoint_id": ids.get(vswitch.ENDPOINT_ID) or port_ids[vswitch.ENDPOINT_ID],
        "network_id": ids.get(vswitch.NETWORK_ID) or port_ids.get(vswitch.NETWORK_ID),
        "bridge": bridge,
        "interface": _interface_facts(iface),
        "ids": ids,
    }
    try:
        endpoint = vswitch._endpoint_from_rows(bridge, port, iface)
    except Exception as e:  # e.g. the Interface lost its endpoint id
        why = f"the external_ids of interface {iface.name} are unreadable ({e!r})"
        return EndpointFacts(
            unreadable=[f"{why}; fix them with ovs-vsctl or remove the port"], **facts
        )
    unreadable = [
        f"external_ids:{key} of interface {iface.name} is unreadable ({ids.get(key)!r}: {why}); "
        f"fix it, or remove it with 'ovs-vsctl remove Interface {iface.name} external_ids {key}'"
        for key, why in sorted(endpoint.unreadable.items())
    ]
    return EndpointFacts(endpoint=endpoint, unreadable=unreadable, **facts)


# -- the kernel --------------------------------------------------------------------


def read_kernel(endpoints):
    """(links of this namespace by name, sandboxes by path, warnings)."""
    worker = netlink._Worker(None)
    warnings = []
    try:
        try:
            infos = worker.call("cannot list the network interfaces", netlink._link_infos)
            links = {info.name: info for info in infos}
        except netlink.LinkError as e:
            links = None
            warnings.append(f"cannot check links: {e}")
        paths = sorted({ep.sandbox for ep in endpoints if ep.sandbox})
        observation = observe_sandboxes(paths)
        found = {path: _sandbox(worker, observation, path, warnings) for path in paths}
    finally:
        worker.shutdown()
    return links, found, warnings


def _sandbox(worker, observation, path, warnings):
    """Mounted in any mount view is there, as the driver judges it (a view
    can be a stale copy, see ovsdriver.sandboxes); its links are read
    through a view that has it mounted."""
    sighting = observation.sightings[path]
    views = sighting.mounted_in()
    state = MOUNTED if views else sighting.probes[observation.own_view].kind
    if state == INVISIBLE:
        warnings.append(
            f"cannot see sandbox {path}: run ovsdriver status in the engine's mount namespace"
        )
    if state != MOUNTED:
        return SandboxFacts(state)
    try:
        return SandboxFacts(state, links=worker.sandbox_links(sighting.path_in(views[0])))
    except netlink.LinkError as e:
        warnings.append(str(e))
        return SandboxFacts(state, error=str(e))


# -- the firewall ------------------------------------------------------------------


def read_firewall(timeout=10.0):
    """(family -> iptables-save text, warnings) of the kind of iptables the
    driver's rules are in (see `firewall.pick_kind`); families that cannot be
    read are left out."""
    saved, warnings = {}, []
    kind = None
    kinds = [k for k in firewall.KINDS if firewall.which(firewall.tool_name(k, 4, 0))]
    if len(kinds) == 2:
        saves = {k: _save(firewall.tool_name(k, 4, 0), timeout)[0] or "" for k in kinds}
        ours = [k for k, text in saves.items() if ":OVSDRIVER-" in text]
        kind = ours[0] if len(ours) == 1 else firewall.pick_kind(saves, firewall.default_kind())
    for family in (4, 6):
        text, warning = _save(firewall.tool_name(kind, family, 0), timeout)
        if text is None:
            warnings.append(f"cannot check the IPv{family} firewall: {warning}")
        else:
            saved[family] = text
    return saved, warnings


def _save(tool, timeout):
    """(the output of *tool*, an iptables-save, or None, what went wrong)."""
    path = firewall.which(tool)
    if path is None:
        return None, f"{tool} is not installed"
    env = dict(os.environ, LC_ALL="C")
    try:
        done = subprocess.run(
            [path],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{tool}: {e}"
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        status = message[-1] if message else f"exit status {done.returncode}"
        return None, f"{tool} failed ({status})"
    return done.stdout.decode("utf-8", "replace"), None


# -- the engine --------------------------------------------------------------------


class EngineError(Exception):
    pass


def read_engine(url, network_ids, driver_name, timeout=5.0):
    """The engine's networks that are ours (by id or by driver name), by id."""
    found = {}
    for entry in _engine_get(url, "/networks", timeout):
        network_id = entry.get("Id")
        if network_id in network_ids or entry.get("Driver") == driver_name:
            detail = _engine_get(url, f"/networks/{network_id}", timeout)
            found[network_id] = _engine_network(detail)
    return found


def _engine_network(detail):
    endpoints = []
    for value in (detail.get("Containers") or {}).values():
        endpoints.append(
            EngineEndpoint(
                endpoint_id=value.get("EndpointID"),
                container=value.get("Name"),
                mac=value.get("MacAddress") or None,
                ipv4=value.get("IPv4Address") or None,
                ipv6=value.get("IPv6Address") or None,
            )
        )
    return EngineNetwork(detail.get("Id"), detail.get("Name"), detail.get("Driver"), endpoints)


def _engine_get(url, path, timeout):
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "unix":
        connection = _UnixHTTPConnection(parsed.path, timeout)
    elif parsed.scheme in ("tcp", "http"):
        connection = http.client.HTTPConnection(
            parsed.hostname, parsed.port or 2375, timeout=timeout
        )
    else:
        raise EngineError(
            f"unsupported engine address {url!r}: use unix:///PATH or tcp://HOST:PORT"
        )
    try:
        connection.request("GET", path, headers={"Host": "docker"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise EngineError(f"cannot ask the engine at {url}: {e}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise EngineError(f"the engine at {url} answered {path} with HTTP {response.status}")
    try:
        return json.loads(body)
    except ValueError:
        raise EngineError(f"the engine at {url} answered {path} with something not JSON") from None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
