"""``twistd ovsdriver``: command-line options and the service tree.

`makeService` only wires services together; all I/O starts when twistd starts
them. The HTTP listener is added last so it stops first.
"""

import os
import re

from twisted.application import internet, service
from twisted.internet import defer, endpoints, fdesc, tcp, unix
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from ovsdriver.api import Handlers, Plugin
from ovsdriver.driver import Driver
from ovsdriver.firewall import Firewall, FirewallHealer, FirewallRestorer
from ovsdriver.hostports import HostPorts, raise_open_files_limit
from ovsdriver.ipam import Ipam
from ovsdriver.netlink import Netlink
from ovsdriver.northbound import NB_TABLES, Northbound
from ovsdriver.options import KERNEL_MODULE
from ovsdriver.ovn import OVN, ClaimCollector
from ovsdriver.ovsdb import OVSDB, REMOTE_FORMS, SSL_FILES, check_remote, configure_ssl
from ovsdriver.plugin_http import PluginFactory
from ovsdriver.reconcile import Reconciler
from ovsdriver.vswitch import VSwitch

log = Logger()

DEFAULT_LISTEN = "unix:/run/docker/plugins/ovs.sock:mode=660"
DEFAULT_OVSDB = "unix:/var/run/openvswitch/db.sock"


def detect_datapath_type(module_dir=KERNEL_MODULE):
    """The kernel datapath when its module is loaded, else the userspace one."""
    return "system" if os.path.isdir(module_dir) else "netdev"


class Options(usage.Options):
    """Options of ``twistd ovsdriver``."""

    synopsis = "[options]"
    longdesc = (
        "Serve the Docker network driver backed by Open vSwitch. Use it with "
        "'docker network create -d NAME', where NAME is the socket's base name."
    )
    optParameters = [
        [
            "listen",
            "l",
            DEFAULT_LISTEN,
            "Twisted server endpoint string to listen on; systemd:domain=UNIX:index=0 "
            "serves the socket of ovsdriver.socket.",
        ],
        ["ovsdb", None, DEFAULT_OVSDB, f"OVSDB remote: {REMOTE_FORMS}."],
        [
            "ovn-nb",
            None,
            None,
            f"OVN Northbound database ({REMOTE_FORMS}): enables multi-host "
            "OVN networks (--ipam-driver ovs --ipam-opt ovs.ovn.switch=NAME). Off by default.",
        ],
        ["private-key", None, None, "PEM private key of the driver, for ssl: remotes."],
        ["certificate", None, None, "PEM certificate of that key, for ssl: remotes."],
        ["ca-cert", None, None, "PEM CA certificate that ssl: servers are checked against."],
        [
            "datapath-type",
            None,
            "auto",
            "Datapath of the bridges the driver creates: system, netdev or auto "
            "(system when the openvswitch kernel module is loaded, else netdev).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on this Twisted server endpoint, e.g. "
            "tcp:9478:interface=127.0.0.1 (off by default).",
        ],
    ]

    def postOptions(self):
        self["listen"] = private_listen(self["listen"])
        kind = self["datapath-type"]
        if kind == "auto":
            self["datapath-type"] = detect_datapath_type()
        elif kind not in ("system", "netdev"):
            raise usage.UsageError("--datapath-type must be system, netdev or auto")
        self["ssl"] = ssl_files(self, ["ovsdb", "ovn-nb"], usage.UsageError)


def ssl_files(options, remotes, error):
    """Check the remote options named in `remotes`; the SSL files ({name:
    path}) when one of them is ``ssl:``, loaded into python-ovs, else None.
    Raises `error` naming the option that is wrong."""
    secure = []
    for name in remotes:
        remote = options[name]
        if remote is None:
            continue
        try:
            check_remote(remote)
        except ValueError:
            raise error(f"--{name} must look like {REMOTE_FORMS}, not {remote!r}") from None
        if remote.startswith("ssl:"):
            secure.append(f"--{name} {remote}")
    files = {name: options[name] for name in SSL_FILES if options[name]}
    if not secure:
        return None
    missing = [f"--{name}" for name in SSL_FILES if name not in files]
    if missing:
        raise error(f"{secure[0]} needs {', '.join(missing)} (the files of its TLS connection)")
    try:
        configure_ssl(files)
    except ValueError as e:
        raise error(str(e)) from None
    return files


class NetlinkService(service.Service):
    """Runs the netlink worker thread for as long as the driver runs."""

    def __init__(self, netlink):
        self.netlink = netlink

    def startService(self):
        super().startService()
        self.netlink.start()

    def stopService(self):
        super().stopService()
        self.netlink.stop()


class ListenerService(internet.StreamServerEndpointService):
    """The plugin socket; its directory is made first and a failed listen is
    fatal instead of a log line."""

    _raiseSynchronously = True

    def __init__(self, description, factory, reactor):
        self.socket_path = _unix_path(description)
        super().__init__(listen_endpoint(reactor, description), factory)

    def privilegedStartService(self):
        if self.socket_path:
            os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        super().privilegedStartService()


def private_listen(description):
    """A ``unix:`` or ``systemd:domain=UNIX`` endpoint description with a mode
    that keeps others out (660 when none is given); refuse a mode that lets
    others in."""
    if not (description.startswith("unix:") or _inherited_unix(description)):
        return description
    mode = re.search(r":mode=([0-7]+)(?::|$)", description)
    if mode is None:
        return description + ":mode=660"
    if int(mode.group(1), 8) & 0o007:
        raise usage.UsageError(
            f"--listen mode={mode.group(1)} lets every user drive the network "
            "driver; use a mode without access for others, such as 660"
        )
    return description


def _inherited_unix(description):
    """Whether the description names a UNIX socket passed by systemd."""
    return description.startswith("systemd:") and re.search(r":domain=UNIX(?::|$)", description)


def listen_endpoint(reactor, description):
    """The server endpoint of ``--listen``.

    A UNIX socket passed by systemd (``systemd:domain=UNIX:index=0``, plus
    the ``mode=`` that `private_listen` adds) becomes an
    `InheritedUNIXEndpoint`: Twisted would otherwise chmod it to 0666 and
    delete its file on stop, leaving systemd's socket unreachable.
    """
    if not _inherited_unix(description):
        return endpoints.serverFromString(reactor, description)
    mode = re.search(r":mode=([0-7]+)(?=:|$)", description)
    rest = description.replace(mode.group(0), "", 1) if mode else description
    try:
        adopted = endpoints.serverFromString(reactor, rest)
    except (IndexError, KeyError):
        names = os.environ.get("LISTEN_FDNAMES")
        raise usage.UsageError(
            f"--listen {rest}: this process was passed no such socket "
            f"(LISTEN_FDNAMES={names!r}); start it from ovsdriver.socket, or with "
            "'systemd-socket-activate --fdname=NAME' (Twisted 23 and later ignore "
            "passed sockets that have no names)"
        ) from None
    except TypeError:  # name= before Twisted 23
        raise usage.UsageError(
            f"--listen {rest}: this Twisted selects a passed socket by index only; use index=0"
        ) from None
    return InheritedUNIXEndpoint(reactor, adopted.fileno, int(mode.group(1), 8) if mode else 0o660)


@implementer(IStreamServerEndpoint)
class InheritedUNIXEndpoint:
    """A listening UNIX socket passed by systemd, served with *mode*.

    The socket's file belongs to whoever made it (systemd keeps listening
    while the driver restarts), so stopping leaves it in place. The mode is
    set whoever made the socket: ``systemd-socket-activate`` makes it 0644,
    Twisted's adoption would make it 0666.
    """

    def __init__(self, reactor, fileno, mode):
        self.reactor = reactor
        self.fileno = fileno
        self.mode = mode

    def listen(self, factory):
        try:
            fdesc.setNonBlocking(self.fileno)
            port = _InheritedUNIXPort._fromListeningDescriptor(self.reactor, self.fileno, factory)
            port.mode = self.mode  # the mode Twisted sets while adopting
            port.startListening()
            os.close(self.fileno)
            path = port.getHost().name
            path = os.fsdecode(path) if isinstance(path, bytes) else path
            if path and not path.startswith("\0"):
                os.chmod(path, self.mode)  # whatever this Twisted did
                found = os.stat(path).st_mode & 0o7777
                if found != self.mode:
                    raise OSError(f"{path} has mode {found:o}, not {self.mode:o}")
        except BaseException:
            return defer.fail()
        return defer.succeed(port)


class _InheritedUNIXPort(unix.Port):
    """A UNIX port that leaves the socket working when it stops: its file
    stays, and the socket is closed without ``shutdown()``, which would stop
    systemd's own copy from accepting (Twisted does this for adopted TCP
    ports, not for UNIX ones)."""

    _shouldShutdown = False

    def connectionLost(self, reason):
        tcp.Port.connectionLost(self, reason)


def _unix_path(description):
    """The socket path of a ``unix:`` endpoint description, else None."""
    if not description.startswith("unix:"):
        return None
    path = description[len("unix:") :].split(":")[0]
    return path[len("address=") :] if path.startswith("address=") else path


def makeService(options, reactor=None):
    """Wire OVSDB, netlink, the driver and the HTTP API into one service."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    soft, raised = raise_open_files_limit()
    if raised != soft:
        log.info("raised the limit of open files from {soft} to {raised}", soft=soft, raised=raised)
    ovsdb = OVSDB(reactor, options["ovsdb"])
    ovsdb.setServiceParent(top)
    netlink = Netlink(reactor)
    NetlinkService(netlink).setServiceParent(top)
    vswitch = VSwitch(ovsdb)
    ovn = None
    if options.get("ovn-nb"):
        nb = OVSDB(
            reactor,
            options["ovn-nb"],
            tables=NB_TABLES,
            database="OVN_Northbound",
            name="the OVN Northbound database",
            wait_for_vswitchd=False,
        )
        nb.setServiceParent(top)
        ovn = OVN(reactor, Northbound(nb), vswitch, netlink)
        ClaimCollector(reactor, ovn).setServiceParent(top)
    firewall = Firewall(reactor)
    driver = Driver(
        vswitch, netlink, firewall, options["datapath-type"], ovn=ovn, host_ports=HostPorts()
    )
    # The firewall lives in the kernel only: rebuild it from OVSDB at start,
    # and put it back when something outside flushes it.
    FirewallRestorer(reactor, driver.sync_firewall).setServiceParent(top)
    FirewallHealer(reactor, firewall, watch=firewall.watch()).setServiceParent(top)
    # Orphan collection and repair after ovs-vswitchd restarts (see ovsdriver.reconcile).
    reconciler = Reconciler(
        reactor,
        driver.vswitch,
        netlink,
        after_collect=driver.sync_firewall,
        after_restore=firewall.interface_made_anew,
    )
    reconciler.setServiceParent(top)
    driver.on_join = reconciler.watch_join
    driver.recheck = reconciler.recheck
    plugin = Plugin(Handlers(driver, Ipam(reactor, ovn)))
    if options["metrics"]:
        hooked = (plugin, reconciler, firewall, driver)
        serve_metrics(options["metrics"], reactor, ovsdb, hooked).setServiceParent(top)
    ListenerService(options["listen"], PluginFactory(plugin), reactor).setServiceParent(top)
    return top


def serve_metrics(description, reactor, ovsdb, hooked):
    """The listener of ``--metrics``: `ovsdb` and the `hooked` objects (each with
    a ``metrics`` attribute) record into one private registry it serves."""
    from prometheus_client import CollectorRegistry

    from ovsdriver.metrics import Metrics, metrics_site

    metrics = Metrics(CollectorRegistry(auto_describe=True), clock=reactor.seconds)
    for hooked_object in (ovsdb, *hooked):
        hooked_object.metrics = metrics
    metrics.watch_replica(ovsdb)
    return ListenerService(description, metrics_site(metrics.registry), reactor)
