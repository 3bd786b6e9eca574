"""Packet filtering and NAT for the driver's networks, with iptables.

Why iptables (and not nft directly): dockerd programs the host firewall with
the ``iptables`` binaries, and on Debian 12 those are iptables-nft, which
keep their own nftables tables. Rules made with the same binaries land in the
same tables and chains as the engine's, so both see each other's rules, in a
well-defined order, and ``iptables-save`` shows an operator everything.

The driver calls `Firewall.apply` with the *complete* desired state after
every change (and once at startup: `FirewallRestorer`). The firewall then
rewrites its own chains in one ``iptables-restore --noflush`` per address
family, which replaces each table atomically: a chain declared as
``:CHAIN - [0:0]`` is flushed and refilled, every other rule (the engine's,
the user's) stays as it is. Nothing is ever built as a shell string: every
value that reaches a rule is validated (interface names, networks, ports,
addresses, ids) and the commands run as argument lists.

Chains (IPv4; IPv6 has the same filter chains and the POSTROUTING one):

``filter OVSDRIVER-FORWARD`` (jumped to from FORWARD, right after
DOCKER-USER when that comes first, so users' rules there still win)
    first ``-j OVSDRIVER-ISOLATION-1``; then per non-internal network with
    interface IF: replies in (``-o IF`` RELATED,ESTABLISHED), everything out
    (``-i IF``, also back into IF for hairpin), DNATed traffic to each
    published port, and last, for a NAT network ``-o IF -j DROP`` (only
    replies and published ports come in, even if FORWARD's policy is
    ACCEPT) or, for a routed network (``ovs.nat=false``) ``-o IF -j ACCEPT``.
``filter OVSDRIVER-ISOLATION-1`` / ``OVSDRIVER-ISOLATION-2``
    Docker's two-stage isolation, so rules stay O(networks): stage 1 sends
    traffic leaving a network (``-i IF ! -o IF``) to stage 2, which drops it
    if it enters another of the driver's networks (``-o IF2``). An internal
    network drops everything in or out through the host, by interface and
    by pool.
``nat OVSDRIVER-POSTROUTING``
    ``-s POOL ! -o IF -j MASQUERADE`` for NAT networks; and hairpin: traffic
    from a network DNATed back into it is masqueraded, so that the reply
    comes back through the host instead of straight over the bridge.
``nat OVSDRIVER-DNAT`` (IPv4 only; from PREROUTING for local destinations,
    and from OUTPUT for locally originated traffic, except to loopback)
    one ``DNAT --to-destination CIP:CPORT`` per published port.

With no network left, the chains and the jumps to them are removed.
"""

import inspect
import ipaddress
import os
import re
import shutil
import subprocess

import attr
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from ovsdriver.metrics import NO_METRICS
from ovsdriver.values import HEX_ID, IFNAME, PROTOCOLS, NetworkRules

log = Logger()

FORWARD = "OVSDRIVER-FORWARD"
ISOLATION_1 = "OVSDRIVER-ISOLATION-1"
ISOLATION_2 = "OVSDRIVER-ISOLATION-2"
POSTROUTING = "OVSDRIVER-POSTROUTING"
DNAT = "OVSDRIVER-DNAT"

#: The chains of each family, by table, in the order they are declared.
CHAINS = {
    4: {"filter": (FORWARD, ISOLATION_1, ISOLATION_2), "nat": (DNAT, POSTROUTING)},
    6: {"filter": (FORWARD, ISOLATION_1, ISOLATION_2), "nat": (POSTROUTING,)},
}
#: The jumps from built-in chains: (table, chain, match and target).
JUMPS = {
    4: (
        ("filter", "FORWARD", ("-j", FORWARD)),
        ("nat", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT)),
        (
            "nat",
            "OUTPUT",
            ("!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT),
        ),
        ("nat", "POSTROUTING", ("-j", POSTROUTING)),
    ),
    6: (
        ("filter", "FORWARD", ("-j", FORWARD)),
        ("nat", "POSTROUTING", ("-j", POSTROUTING)),
    ),
}
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
#: Users' rules go in DOCKER-USER, which the engine keeps first in FORWARD.
DOCKER_USER = "DOCKER-USER"

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
#: What a token of a rule may look like; everything else is refused.
_TOKEN = re.compile(r"^[A-Za-z0-9_.:/@!,-]+$")


class FirewallError(Exception):
    """The firewall could not be set up; the message says what failed."""


# ---------------------------------------------------------------------------
# Validation: nothing unchecked ever reaches a rule.
# ---------------------------------------------------------------------------


def _port(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FirewallError(f"{what} {value!r} is not a port number from 1 to 65535")
    return value


def _ipv4(what, value):
    try:
        address = ipaddress.ip_address(value)
    except (TypeError, ValueError):
        raise FirewallError(f"{what} {value!r} is not an IP address") from None
    if address.version != 4:
        raise FirewallError(
            f"{what} {value} is an IPv6 address: the ovs driver publishes ports on IPv4 only"
        )
    return str(address)


def _published(network_id, port):
    what = f"published port of network {network_id[:12]}"
    if port.proto not in PROTOCOLS.values():
        raise FirewallError(
            f"{what}: protocol {port.proto!r} is not one of {', '.join(PROTOCOLS.values())}"
        )
    host_ip = port.host_ip
    if host_ip is not None:
        host_ip = _ipv4(f"{what}: host address", host_ip)
        if ipaddress.ip_address(host_ip).is_unspecified:
            host_ip = None
    return attr.evolve(
        port,
        host_port=_port(f"{what}: host port", port.host_port),
        container_ip=_ipv4(f"{what}: container address", port.container_ip),
        container_port=_port(f"{what}: container port", port.container_port),
        host_ip=host_ip,
    )


def check_networks(networks):
    """Validate and normalize the desired state; raise FirewallError.

    Returns a list of `NetworkRules` whose pools are normalized CIDR strings
    and whose published ports are checked, normalized and free of duplicates
    (the engine may list one binding twice, e.g. for 0.0.0.0 and ``::``).
    """
    checked = []
    for network in networks:
        if not isinstance(network, NetworkRules):
            raise FirewallError(f"expected NetworkRules, got {network!r}")
        if not isinstance(network.network_id, str) or not HEX_ID.fullmatch(network.network_id):
            raise FirewallError(f"network id {network.network_id!r} is not a Docker id")
        name = network.network_id[:12]
        if not isinstance(network.ifname, str) or not IFNAME.fullmatch(network.ifname):
            raise FirewallError(f"network {name}: {network.ifname!r} is not a valid interface name")
        pools = {}
        for family in (4, 6):
            pools[family] = []
            for pool in network.pools(family):
                try:
                    net = ipaddress.ip_network(pool, strict=False)
                except (TypeError, ValueError):
                    raise FirewallError(f"network {name}: {pool!r} is not a subnet") from None
                if net.version != family:
                    raise FirewallError(f"network {name}: {pool} is not an IPv{family} subnet")
                pools[family].append(str(net))
        if not isinstance(network.nat, bool) or not isinstance(network.internal, bool):
            raise FirewallError(f"network {name}: nat and internal must be true or false")
        published = []
        for port in network.published:
            port = _published(network.network_id, port)
            if port not in published:
                published.append(port)
        checked.append(
            attr.evolve(
                network,
                ipv4=pools[4],
                ipv6=pools[6],
                nat=network.nat and not network.internal,
                published=() if network.internal else published,
            )
        )
    return checked


def needs(networks, family):
    """Whether any network has a pool of *family*: then its rules exist."""
    return any(n.pools(family) for n in networks)


def forwarding_families(networks):
    """The families whose forwarding must be on: those of non-internal pools."""
    return {f for f in (4, 6) for n in networks if not n.internal and n.pools(f)}


# ---------------------------------------------------------------------------
# The rules, as token lists (pure functions: unit-tested without iptables).
# ---------------------------------------------------------------------------


def _comment(network):
    return ("-m", "comment", "--comment", f"ovsdriver:{network.network_id[:12]}")


def rules(networks, family):
    """The rules of our chains for checked *networks*: {(table, chain): [tokens]}."""
    chains = {(t, c): [] for t, names in CHAINS[family].items() for c in names}
    forward = chains["filter", FORWARD]
    iso1 = chains["filter", ISOLATION_1]
    iso2 = chains["filter", ISOLATION_2]
    post = chains["nat", POSTROUTING]
    host = "/32" if family == 4 else "/128"
    forward.append(("-j", ISOLATION_1))
    for n in networks:
        pools = n.pools(family)
        if not pools:
            continue
        c, i, o = _comment(n), ("-i", n.ifname), ("-o", n.ifname)
        if n.internal:
            iso1 += [(*i, *c, "-j", "DROP"), (*o, *c, "-j", "DROP")]
            for pool in pools:
                iso1 += [("-s", pool, *c, "-j", "DROP"), ("-d", pool, *c, "-j", "DROP")]
            continue
        iso1.append((*i, "!", *o, *c, "-j", ISOLATION_2))
        iso2.append((*o, *c, "-j", "DROP"))
        forward.append(
            (*o, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *c, "-j", "ACCEPT")
        )
        forward.append((*i, *c, "-j", "ACCEPT"))
        for p in n.published if family == 4 else ():
            forward.append(
                ("-d", p.container_ip + host, *o, "-p", p.proto, "-m", p.proto)
                + ("--dport", str(p.container_port), "-m", "conntrack", "--ctstate", "DNAT")
                + (*c, "-j", "ACCEPT")
            )
        forward.append((*o, *c, "-j", "DROP" if n.nat else "ACCEPT"))
        for pool in pools:
            if n.nat:
                post.append(("-s", pool, "!", *o, *c, "-j", "MASQUERADE"))
            if family == 4:  # hairpin: published ports are IPv4 only
                post.append(
                    ("-s", pool, *o, "-m", "conntrack", "--ctstate", "DNAT")
                    + (*c, "-j", "MASQUERADE")
                )
        if family == 4:
            for p in n.published:
                where = ("-d", p.host_ip + host) if p.host_ip else ()
                chains["nat", DNAT].append(
                    (*where, "-p", p.proto, "-m", p.proto, "--dport", str(p.host_port), *c)
                    + ("-j", "DNAT", "--to-destination", f"{p.container_ip}:{p.container_port}")
                )
    return chains


@attr.s(frozen=True, slots=True)
class Present:
    """What ``iptables-save`` says exists that concerns us, in one family."""

    chains = attr.ib(factory=frozenset)  # {(table, chain)} of ours
    jumps = attr.ib(factory=tuple)  # ((table, builtin chain, "-A ..." line), ...) to ours
    forward_first = attr.ib(default=None)  # the first rule of filter FORWARD

    @property
    def empty(self):
        return not self.chains and not self.jumps


def parse_save(text, family):
    """Read ``iptables-save`` output into a `Present`."""
    ours = {c for names in CHAINS[family].values() for c in names}
    expected = {(table, chain, spec[-1]) for table, chain, spec in JUMPS[family]}
    table, chains, jumps, first = None, set(), [], None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table:
            name = line[1:].split()[0]
            if name in ours:
                chains.add((table, name))
        elif line.startswith("-A ") and table:
            tokens = line.split()
            chain = tokens[1]
            if table == "filter" and chain == "FORWARD" and first is None:
                first = line.strip()
            if tokens[-2:-1] == ["-j"] and (table, chain, tokens[-1]) in expected:
                jumps.append((table, chain, line.strip()))
    return Present(frozenset(chains), tuple(jumps), first)


def _line(tokens):
    for token in tokens:
        if not _TOKEN.fullmatch(token):
            raise FirewallError(f"refusing to write the unexpected rule token {token!r}")
    return " ".join(tokens)


def restore_script(networks, family, present):
    """The ``iptables-restore --noflush`` input that makes our chains say
    *networks* (or removes them all when no network needs this family)."""
    remove = not needs(networks, family)
    chains = rules(networks, family)
    jumped = {(t, c, line.split()[-1]) for t, c, line in present.jumps}
    lines = []
    for table, names in CHAINS[family].items():
        lines.append(f"*{table}")
        lines += [f":{name} - [0:0]" for name in names]  # creates or flushes
        if remove:
            lines += ["-D" + line[2:] for t, _, line in present.jumps if t == table]
            lines += [f"-X {name}" for name in names]
        else:
            for name in names:
                lines += [_line(("-A", name, *rule)) for rule in chains[table, name]]
            for t, builtin, spec in JUMPS[family]:
                if t == table and (t, builtin, spec[-1]) not in jumped:
                    position = 1
                    if builtin == "FORWARD" and present.forward_first == (
                        f"-A FORWARD -j {DOCKER_USER}"
                    ):
                        position = 2
                    lines.append(_line(("-I", builtin, str(position), *spec)))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Running the tools without blocking the reactor.
# ---------------------------------------------------------------------------


def which(program):
    """Where *program* is, looking in the sbin directories too."""
    return shutil.which(program, path=_SEARCH_PATH)


class Firewall:
    """The driver's iptables chains.

    *netns* (a name under /run/netns or a path) runs every command in that
    network namespace through ``nsenter``; by default they run where the
    driver runs, which is what a driver process inside a namespace needs.

    Commands run to completion in the reactor's thread pool, bounded by
    `timeout`, rather than with ``reactor.spawnProcess``: a reactor without
    signal handlers (one run in a thread, as the integration tests do) never
    learns that a child exited, and Twisted 22.4 cannot feed a child's stdin
    through ``getProcessOutputAndValue``.
    """

    timeout = 30.0
    metrics = NO_METRICS

    def __init__(self, reactor, netns=None):
        self.reactor = reactor
        self.netns = None
        if netns is not None:
            self.netns = netns if "/" in netns else f"/run/netns/{netns}"
        self._lock = defer.DeferredLock()
        self._env = dict(os.environ, PATH=_SEARCH_PATH, LC_ALL="C")

    def apply(self, networks):
        """Make our chains say exactly *networks* (a list of `NetworkRules`).

        Calls are serialised; each one is atomic per table. Fails with
        FirewallError, naming what failed, and then leaves the previous
        rules of the failed table in place.
        """
        try:
            checked = check_networks(networks)
        except FirewallError:
            return defer.fail()
        applied = self._lock.run(lambda: defer.ensureDeferred(self._apply(checked)))
        return self.metrics.firewall_sync(applied)

    async def _apply(self, networks):
        for family in (4, 6):
            wanted = needs(networks, family)
            try:
                save = await self._tool(family, 0, [])
            except FirewallError:
                if wanted:
                    raise
                continue  # e.g. no ip6tables: nothing of ours can be there
            present = parse_save(save, family)
            if not wanted and present.empty:
                continue
            script = restore_script(networks, family, present)
            try:
                await self._tool(family, 1, ["--noflush", "-w"], script.encode())
            except FirewallError as e:
                raise FirewallError(f"cannot update the IPv{family} firewall rules: {e}") from None
        for family in sorted(forwarding_families(networks)):
            await self.enable_forwarding(family)

    async def _tool(self, family, which_tool, args, stdin=None):
        name = TOOLS[family][which_tool]
        path = which(name)
        if path is None:
            raise FirewallError(
                f"{name} is not installed: the ovs driver needs it for NAT, isolation "
                "and published ports (install the iptables package)"
            )
        out = await self.run([path, *args], stdin)
        return out.decode("utf-8", "replace")

    def run(self, argv, stdin=None):
        """Run *argv* (in the namespace) in a thread; its stdout, or
        FirewallError with its stderr."""
        name = os.path.basename(argv[0])
        if self.netns is not None:
            nsenter = which("nsenter") or "nsenter"
            argv = [nsenter, f"--net={self.netns}", "--", *argv]
        return self._in_thread(_run, name, argv, stdin, self._env, self.timeout)

    def _in_thread(self, fn, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    async def enable_forwarding(self, family):
        """Turn on IP forwarding of *family* (4 or 6) if it is off."""
        key = FORWARDING_SYSCTL[family]
        if self.netns is None:
            path = "/proc/sys/" + key.replace(".", "/")
            changed = await self._in_thread(_enable, path)
        else:
            sysctl = which("sysctl") or "sysctl"
            current = await self.run([sysctl, "-n", key])
            changed = current.strip() != b"1"
            if changed:
                await self.run([sysctl, "-q", "-w", f"{key}=1"])
        if changed:
            log.info("turned on IPv{family} forwarding ({key}=1)", family=family, key=key)


def _run(name, argv, stdin, env, timeout):
    """Run a command to completion (in a thread): its stdout, or FirewallError."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FirewallError(f"{name} did not finish within {timeout:g} seconds") from None
    except OSError as e:
        raise FirewallError(f"cannot run {name}: {e.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").splitlines()
        message = " ".join(line.strip() for line in lines if line.strip())
        raise FirewallError(f"{name} failed: {message or f'exit status {done.returncode}'}")
    return done.stdout


def _enable(path):
    """Write 1 to a /proc/sys file unless it holds 1 already (in a thread)."""
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return False
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as e:
        raise FirewallError(f"cannot turn on forwarding in {path}: {e.strerror}") from None
    return True


# ---------------------------------------------------------------------------
# Restoring the rules when the driver starts.
# ---------------------------------------------------------------------------


class FirewallRestorer(service.Service):
    """Re-applies the firewall from OVSDB when the driver starts.

    All state is in OVSDB; after a reboot or a flushed firewall the rules are
    gone. *sync* (the driver's ``sync_firewall``) is called once at start and
    retried with a growing delay until it succeeds or the service stops.
    """

    delays = (1, 2, 4, 8, 15, 30)

    def __init__(self, reactor, sync):
        self.reactor = reactor
        self.sync = sync
        self.attempts = 0
        self.done = False
        self._call = None

    def startService(self):
        super().startService()
        self._call = self.reactor.callLater(0, self._attempt)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _attempt(self):
        self._call = None
        self.attempts += 1
        d = defer.ensureDeferred(self._sync_once())
        d.addCallbacks(self._succeeded, self._failed)

    async def _sync_once(self):
        result = self.sync()  # a coroutine function, or one returning a Deferred
        if inspect.isawaitable(result):
            await result

    def _succeeded(self, _):
        self.done = True
        log.info("firewall rules restored from OVSDB")

    def _failed(self, failure):
        if not self.running:
            return
        delay = self.delays[min(self.attempts, len(self.delays)) - 1]
        log.warn(
            "cannot restore the firewall rules yet ({error}); retrying in {delay} s",
            error=failure.getErrorMessage(),
            delay=delay,
        )
        self._call = self.reactor.callLater(delay, self._attempt)
