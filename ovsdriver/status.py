"""``ovsdriver status``: Docker's view of Open vSwitch, and whether it is healthy.

Like ``ovs-vsctl show``, in the engine's terms: per network its bridge, VLAN
and subnets, per endpoint its container, port, MAC, addresses, sandbox and
published ports, and what is wrong with each (see ovsdriver.health). It reads
OVSDB, the kernel and the firewall of the namespace it runs in and, when it
can, the engine; it never changes anything and needs no running driver.

Exit status: 0 healthy, 1 something is unhealthy, 2 OVSDB cannot be read; so
``ovsdriver status`` can serve as a health check.
"""

import json
import os
import time

from ovsdriver import observe
from ovsdriver.health import Facts, assess
from ovsdriver.ovsdb import REMOTE_FORMS, SSL_FILES
from ovsdriver.tap import DEFAULT_OVSDB, ssl_files

HEALTHY, UNHEALTHY, UNREADABLE = 0, 1, 2


def add_arguments(parser):
    """The options of ``ovsdriver status``."""
    parser.add_argument(
        "--ovsdb",
        default=DEFAULT_OVSDB,
        metavar="REMOTE",
        help=f"OVSDB remote: {REMOTE_FORMS} (default {DEFAULT_OVSDB})",
    )
    for name in SSL_FILES:
        parser.add_argument(f"--{name}", metavar="FILE", help="for an ssl: remote, as the driver's")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--docker",
        default=os.environ.get("DOCKER_HOST") or observe.DEFAULT_DOCKER,
        metavar="URL",
        help="the engine to compare with: unix:///PATH or tcp://HOST:PORT "
        "(default $DOCKER_HOST or %(default)s); 'none' to skip it",
    )
    parser.add_argument(
        "--driver",
        default="ovs",
        metavar="NAME",
        help="the driver's name in the engine (its socket's base name; default %(default)s)",
    )
    parser.add_argument(
        "--no-firewall", action="store_true", help="do not look at the firewall (iptables-save)"
    )


def gather(options, clock=time.time):
    """Read everything `assess` needs; raise observe.Unreachable without OVSDB."""
    files = {name: getattr(options, name.replace("-", "_")) for name in SSL_FILES}
    ssl_files({"ovsdb": options.ovsdb, **files}, ["ovsdb"], observe.Unreachable)
    networks, endpoints, behind = observe.read_ovsdb(options.ovsdb)
    warnings = []
    links, sandboxes, kernel_warnings = observe.read_kernel(
        [ep.endpoint for ep in endpoints if ep.endpoint is not None]
    )
    warnings += kernel_warnings
    saved = None
    if not options.no_firewall:
        saved, firewall_warnings = observe.read_firewall()
        warnings += firewall_warnings
    engine = None
    if options.docker != "none":
        try:
            engine = observe.read_engine(
                options.docker, {n.network_id for n in networks}, options.driver
            )
        except observe.EngineError as e:
            warnings.append(f"{e}; showing Open vSwitch's view only (use --docker)")
    return Facts(
        networks=networks,
        endpoints=endpoints,
        now=clock(),
        links=links,
        sandboxes=sandboxes,
        firewall=saved,
        engine=engine,
        driver_name=options.driver,
        vswitchd_behind=behind,
        warnings=warnings,
    )


def run(options, out):
    """Print the status to `out`; return the exit status."""
    try:
        facts = gather(options)
    except observe.Unreachable as e:
        if options.json:
            out.write(json.dumps({"healthy": False, "error": str(e)}) + "\n")
        else:
            out.write(f"ovsdriver status: {e}\n")
        return UNREADABLE
    report = assess(facts)
    if options.json:
        out.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(report))
    return HEALTHY if report.healthy else UNHEALTHY


def render(report):
    """The report as text, one block per network, like ``ovs-vsctl show``."""
    lines = []
    for network in report.networks:
        title = f"Network {network.name} ({network.network_id[:12]})"
        lines.append(title if network.name else f"Network {network.network_id[:12]}")
        _field(lines, 4, "bridge", network.bridge)
        _field(lines, 4, "vlan", network.vlan)
        _field(lines, 4, "uplink", network.uplink)
        for subnet in network.subnets:
            _field(lines, 4, "subnet", subnet)
        ports = f"{network.port_type} ports" if network.port_type else None
        _field(lines, 4, "options", ", ".join(filter(None, (*network.flags, ports))))
        _health(lines, 4, network.problems)
        for endpoint in network.endpoints:
            who = f" (container {endpoint.container})" if endpoint.container else ""
            lines.append(f"    Endpoint {endpoint.endpoint_id[:12]}{who}")
            port = endpoint.port
            if port and endpoint.ofport is not None:
                port = f"{port} (ofport {endpoint.ofport})"
            _field(lines, 8, "port", port)
            _field(lines, 8, "mac", endpoint.mac)
            _field(lines, 8, "addresses", ", ".join(endpoint.addresses))
            sandbox = endpoint.sandbox
            if sandbox and endpoint.sandbox_state:
                sandbox = f"{sandbox} ({endpoint.sandbox_state})"
            _field(lines, 8, "sandbox", sandbox)
            _field(lines, 8, "link", endpoint.link)
            _field(lines, 8, "published", ", ".join(endpoint.published))
            _health(lines, 8, endpoint.problems)
    if report.problems:
        lines.append("Driver")
        _health(lines, 4, report.problems)
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    endpoints = sum(len(n.endpoints) for n in report.networks)
    summary = f"{_count(len(report.networks), 'network')}, {_count(endpoints, 'endpoint')}"
    if report.healthy:
        lines.append(f"healthy: {summary}")
    else:
        lines.append(f"UNHEALTHY: {_count(report.count_problems(), 'problem')} in {summary}")
    return "\n".join(lines) + "\n"


def _field(lines, indent, name, value):
    if value not in (None, ""):
        lines.append(f"{' ' * indent}{name}: {value}")


def _health(lines, indent, problems):
    if not problems:
        lines.append(f"{' ' * indent}health: ok")
        return
    for problem in problems:
        lines.append(f"{' ' * indent}PROBLEM: {problem}")


def _count(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"
