"""Packet filtering and NAT for the driver's networks, with iptables.

Why iptables (and not nft directly): dockerd programs the host firewall with
the ``iptables`` binaries, and on Debian 12 those are iptables-nft, which
keep their own nftables tables. Rules made with the same binaries land in the
same tables and chains as the engine's, so both see each other's rules, in a
well-defined order, and ``iptables-save`` shows an operator everything. Where
the engine writes with the other kind (iptables-legacy: a host whose
``iptables`` is that kind, while the driver's file system, a managed plugin's,
has iptables-nft), the driver follows it (`pick_kind`): the kernel applies
both kinds' rules to every packet, and the engine's FORWARD policy DROP in
one would overrule the driver's ACCEPTs in the other.

The driver calls `Firewall.apply` with the *complete* desired state after
every change (and once at startup: `FirewallRestorer`). The firewall keeps
what it last wrote: the same state again costs nothing (no child process on
a container start that publishes nothing); a change rewrites only the chains
that differ, in one ``iptables-restore --noflush`` per address family (a
chain declared as ``:CHAIN - [0:0]`` is flushed and refilled atomically,
every other rule, the engine's and the user's, stays as it is). The first
apply, and any apply after the rules were found changed from outside, reads
``iptables-save`` first to place the jumps into our chains exactly once.
`FirewallHealer` compares ``iptables-save`` with what was written after the
kernel announces a change (every few seconds where it cannot) and rewrites
only when something of ours is missing or duplicated (``iptables -F``, a
firewalld reload, a dockerd restart). Nothing is ever
built as a shell string: every value that reaches a rule is validated
(interface names, networks, ports, addresses, ids) and the commands run as
argument lists.

Chains (IPv4 and IPv6 alike unless said otherwise):

``filter OVSDRIVER-FORWARD`` (jumped to from FORWARD, right after
DOCKER-USER when that comes first, so users' rules there still win)
    first ``-j OVSDRIVER-ISOLATION-1``; then per non-internal network with
    interface IF: replies in (``-o IF`` RELATED,ESTABLISHED), everything out
    (``-i IF``, also back into IF for hairpin), DNATed traffic to each
    published port, and last, for a NAT network ``-o IF -j DROP`` (only
    replies and published ports come in, even if FORWARD's policy is
    ACCEPT) or, for a routed network (``ovs.nat=false``) ``-o IF -j ACCEPT``.
    When dockerd manages iptables (its ``DOCKER-ISOLATION-STAGE-1/2``
    exist), traffic from IF into Docker's bridges goes through Docker's
    stage 2 (which drops it), traffic from Docker's bridges into a routed
    network through Docker's stage 1, and Docker's stage 2 jumps to ours:
    like between two of Docker's bridge networks, nothing crosses unless
    ``DOCKER-USER`` allows it (published ports stay reachable).
``filter OVSDRIVER-ISOLATION-1`` / ``OVSDRIVER-ISOLATION-2``
    Docker's two-stage isolation, so rules stay O(networks): stage 1 sends
    traffic leaving a network (``-i IF ! -o IF``) to stage 2, which drops it
    if it enters another of the driver's networks (``-o IF2``), unless it
    was DNATed (a published port, reached through the host's address, and
    its replies). An internal network drops everything in or out through
    the host, by interface and by pool.
``filter OVSDRIVER-INPUT`` (IPv4; from INPUT)
    drops what a container sends to the host's 127.0.0.0/8: publishing on
    127.0.0.1 needs ``route_localnet`` on the network's interface, which
    would otherwise let containers reach the host's loopback services.
``nat OVSDRIVER-POSTROUTING``
    ``-s POOL ! -o IF -j MASQUERADE`` for NAT networks; hairpin: traffic
    from a network DNATed back into it is masqueraded, so that the reply
    comes back through the host instead of straight over the bridge; and
    (IPv4) traffic from 127.0.0.0/8 DNATed into IF is masqueraded, so that
    a port published on the host's loopback answers.
``nat OVSDRIVER-DNAT`` (from PREROUTING for local destinations, and from
    OUTPUT for locally originated traffic, 127.0.0.0/8 included; IPv6
    except ``::1``, which the kernel cannot route to a container)
    one ``DNAT --to-destination CIP:CPORT`` per published port.

With no network left, the chains and the jumps to them are removed.
"""

import collections
import difflib
import functools
import ipaddress
import os
import re
import shutil
import subprocess

import attr
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from ovsdriver import nftwatch
from ovsdriver.deferreds import call_hook
from ovsdriver.metrics import NO_METRICS
from ovsdriver.values import HEX_ID, IFNAME, PROTOCOLS, NetworkRules

log = Logger()

FORWARD = "OVSDRIVER-FORWARD"
ISOLATION_1 = "OVSDRIVER-ISOLATION-1"
ISOLATION_2 = "OVSDRIVER-ISOLATION-2"
INPUT = "OVSDRIVER-INPUT"
POSTROUTING = "OVSDRIVER-POSTROUTING"
DNAT = "OVSDRIVER-DNAT"
#: Docker's isolation chains between its bridge networks (when dockerd
#: manages iptables): stage 1 matches traffic leaving one of its bridges,
#: stage 2 drops it when it enters another.
DOCKER_STAGE_1 = "DOCKER-ISOLATION-STAGE-1"
DOCKER_STAGE_2 = "DOCKER-ISOLATION-STAGE-2"

#: The chains of each family, by table, in the order they are declared.
CHAINS = {
    4: {"filter": (FORWARD, ISOLATION_1, ISOLATION_2, INPUT), "nat": (DNAT, POSTROUTING)},
    6: {"filter": (FORWARD, ISOLATION_1, ISOLATION_2), "nat": (DNAT, POSTROUTING)},
}
_LOCAL = ("-m", "addrtype", "--dst-type", "LOCAL")
#: The jumps into our chains: (table, chain, match and target). The last
#: one exists only when dockerd manages iptables (see `jumps`).
JUMPS = {
    4: (
        ("filter", "FORWARD", ("-j", FORWARD)),
        ("filter", "INPUT", ("-j", INPUT)),
        ("nat", "PREROUTING", (*_LOCAL, "-j", DNAT)),
        ("nat", "OUTPUT", (*_LOCAL, "-j", DNAT)),
        ("nat", "POSTROUTING", ("-j", POSTROUTING)),
        ("filter", DOCKER_STAGE_2, ("-j", ISOLATION_2)),
    ),
    6: (
        ("filter", "FORWARD", ("-j", FORWARD)),
        ("nat", "PREROUTING", (*_LOCAL, "-j", DNAT)),
        ("nat", "OUTPUT", ("!", "-d", "::1/128", *_LOCAL, "-j", DNAT)),
        ("nat", "POSTROUTING", ("-j", POSTROUTING)),
        ("filter", DOCKER_STAGE_2, ("-j", ISOLATION_2)),
    ),
}
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
#: The two kinds of iptables: nftables, or the older x_tables ("legacy").
#: Debian's iptables package ships both (``iptables-nft-save``,
#: ``iptables-legacy-save``...); ``iptables`` is whichever the alternatives
#: system points to, in the driver's file system, which for a managed plugin
#: is not the host's.
KINDS = ("nft", "legacy")
_ENGINE_CHAIN = re.compile(r"^:(DOCKER|DOCKER-USER|DOCKER-ISOLATION-STAGE-1) ", re.MULTILINE)
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
#: Users' rules go in DOCKER-USER, which the engine keeps first in FORWARD.
DOCKER_USER = "DOCKER-USER"
_USER_JUMP = f"-A FORWARD -j {DOCKER_USER}"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
#: What a token of a rule may look like; everything else is refused.
_WORD = r"[A-Za-z0-9_.:/@!,\[\]-]+"
_TOKEN = re.compile(rf"^{_WORD}$")
_LINE = re.compile(rf"{_WORD}(?: {_WORD})*")  # tokens joined by single spaces


class FirewallError(Exception):
    """The firewall could not be set up; the message says what failed."""


# ---------------------------------------------------------------------------
# Validation: nothing unchecked ever reaches a rule.
# ---------------------------------------------------------------------------


def _port(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FirewallError(f"{what} {value!r} is not a port number from 1 to 65535")
    return value


def _address(what, value):
    try:
        return ipaddress.ip_address(value)
    except (TypeError, ValueError):
        raise FirewallError(f"{what} {value!r} is not an IP address") from None


@functools.lru_cache(maxsize=1 << 16)
def check_published(network_id, port):
    """A published port of network *network_id*, checked and normalized; raise
    FirewallError saying what is wrong. Remembered: every apply checks every
    published port again, thousands with a wide ``-p`` range."""
    what = f"published port of network {network_id[:12]}"
    if port.proto not in PROTOCOLS.values():
        raise FirewallError(
            f"{what}: protocol {port.proto!r} is not one of {', '.join(PROTOCOLS.values())}"
        )
    container_ip = _address(f"{what}: container address", port.container_ip)
    host_ip = port.host_ip
    if host_ip is not None:
        address = _address(f"{what}: host address", host_ip)
        if address.version != container_ip.version:
            raise FirewallError(
                f"{what}: host address {address} is IPv{address.version} but the container "
                f"address {container_ip} is IPv{container_ip.version}"
            )
        if address == ipaddress.ip_address("::1"):
            raise FirewallError(
                f"{what}: the kernel cannot forward ::1 to a container: publish on "
                "127.0.0.1 or on an IPv6 address of the host"
            )
        host_ip = None if address.is_unspecified else str(address)
    return attr.evolve(
        port,
        host_port=_port(f"{what}: host port", port.host_port),
        container_ip=str(container_ip),
        container_port=_port(f"{what}: container port", port.container_port),
        host_ip=host_ip,
    )


def check_networks(networks):
    """Validate and normalize the desired state; raise FirewallError.

    Returns a list of `NetworkRules` whose pools are normalized CIDR strings
    and whose published ports are checked, normalized and free of duplicates
    (the engine may list one binding twice, e.g. for 0.0.0.0 and none).
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
        published = list(
            dict.fromkeys(check_published(network.network_id, p) for p in network.published)
        )
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


def family_of(port):
    """The address family (4 or 6) a published port is DNATed in (its
    container address is a checked one)."""
    return 6 if ":" in port.container_ip else 4


def loopback_published(port):
    """Whether *port* (checked) is published on the host's 127.0.0.0/8."""
    if family_of(port) != 4:
        return False
    return port.host_ip is None or ipaddress.ip_address(port.host_ip) in LOOPBACK


def localnet_interfaces(networks):
    """The interfaces that need ``route_localnet=1``: those of networks with
    a port published on the host's loopback (as Docker sets it on its bridge)."""
    return {n.ifname for n in networks if n.ipv4 and any(map(loopback_published, n.published))}


# ---------------------------------------------------------------------------
# The rules, as token lists (pure functions: unit-tested without iptables).
# ---------------------------------------------------------------------------


def _comment(network):
    return ("-m", "comment", "--comment", f"ovsdriver:{network.network_id[:12]}")


def rules(networks, family, docker=False):
    """The rules of our chains for checked *networks*: {(table, chain): [tokens]}.

    *docker*: whether dockerd's isolation chains exist, so that traffic
    between our networks and Docker's bridge networks is dropped as well.
    """
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
        published = [p for p in n.published if family_of(p) == family]
        iso1.append((*i, "!", *o, *c, "-j", ISOLATION_2))
        iso2.append((*o, *c, "-j", "DROP"))
        forward.append(
            (*o, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *c, "-j", "ACCEPT")
        )
        if docker:  # into Docker's bridges: its stage 2 drops (not published ports)
            forward.append(
                (*i, "!", *o, "-m", "conntrack", "!", "--ctstate", "DNAT", *c)
                + ("-j", DOCKER_STAGE_2)
            )
        forward.append((*i, *c, "-j", "ACCEPT"))
        for p in published:
            forward.append(
                ("-d", p.container_ip + host, *o, "-p", p.proto, "-m", p.proto)
                + ("--dport", str(p.container_port), "-m", "conntrack", "--ctstate", "DNAT")
                + (*c, "-j", "ACCEPT")
            )
        if docker and not n.nat:  # from Docker's bridges: its stage 1, then ours, drop
            forward.append((*o, *c, "-j", DOCKER_STAGE_1))
        forward.append((*o, *c, "-j", "DROP" if n.nat else "ACCEPT"))
        for pool in pools:
            if n.nat:
                post.append(("-s", pool, "!", *o, *c, "-j", "MASQUERADE"))
            post.append(
                ("-s", pool, *o, "-m", "conntrack", "--ctstate", "DNAT") + (*c, "-j", "MASQUERADE")
            )
        if family == 4:
            post.append(("-s", str(LOOPBACK), *o, *c, "-j", "MASQUERADE"))
            chains["filter", INPUT].append(
                (*i, "-d", str(LOOPBACK), "-m", "conntrack", "!", "--ctstate")
                + ("RELATED,ESTABLISHED,DNAT", *c, "-j", "DROP")
            )
        for p in published:
            where = ("-d", p.host_ip + host) if p.host_ip else ()
            target = p.container_ip if family == 4 else f"[{p.container_ip}]"
            chains["nat", DNAT].append(
                (*where, "-p", p.proto, "-m", p.proto, "--dport", str(p.host_port), *c)
                + ("-j", "DNAT", "--to-destination", f"{target}:{p.container_port}")
            )
    if iso2:
        # A published port is the host's: the driver's other networks reach
        # it through the host's address too (Docker's userland proxy does so
        # for its bridges), and its replies find their way back.
        iso2.insert(0, ("-m", "conntrack", "--ctstate", "DNAT", "-j", "RETURN"))
    return chains


def jumps(family, docker):
    """The jumps into our chains as ``iptables-save`` prints them:
    [(table, chain, "-A CHAIN ...")]."""
    return [
        (table, chain, " ".join(("-A", chain, *spec)))
        for table, chain, spec in JUMPS[family]
        if docker or chain != DOCKER_STAGE_2
    ]


def written(networks, family, docker):
    """What our chains hold for *networks*: {(table, chain): ("-A ...", ...)},
    or None when no network needs *family* (then nothing of ours exists)."""
    if not needs(networks, family):
        return None
    return {
        key: tuple(_line(("-A", key[1], *rule)) for rule in chain)
        for key, chain in rules(networks, family, docker).items()
    }


@attr.s(frozen=True, slots=True)
class Present:
    """What ``iptables-save`` says exists that concerns us, in one family."""

    chains = attr.ib(factory=frozenset)  # {(table, chain)} of ours
    jumps = attr.ib(factory=tuple)  # ((table, chain, "-A ..." line), ...) into ours
    forward = attr.ib(factory=tuple)  # every rule of filter FORWARD, in order
    counts = attr.ib(factory=dict)  # {(table, chain): number of rules} of ours
    docker = attr.ib(default=False)  # whether Docker's isolation chains exist

    @property
    def empty(self):
        return not self.chains and not self.jumps

    @property
    def forward_first(self):
        """The first rule of filter FORWARD, or None."""
        return self.forward[0] if self.forward else None


def parse_save(text, family):
    """Read ``iptables-save`` output into a `Present`."""
    ours = {c for names in CHAINS[family].values() for c in names}
    targets = {(table, chain, spec[-1]) for table, chain, spec in JUMPS[family]}
    table, chains, found, forward, counts, docker = None, set(), [], [], {}, set()
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table:
            name = line[1:].split()[0]
            if name in ours:
                chains.add((table, name))
            if table == "filter" and name in (DOCKER_STAGE_1, DOCKER_STAGE_2):
                docker.add(name)
        elif line.startswith("-A ") and table:
            line = line.strip()
            tokens = line.split()
            chain = tokens[1]
            if chain in ours:
                counts[table, chain] = counts.get((table, chain), 0) + 1
            if table == "filter" and chain == "FORWARD":
                forward.append(line)
            if tokens[-2:-1] == ["-j"] and (table, chain, tokens[-1]) in targets:
                found.append((table, chain, line))
    return Present(frozenset(chains), tuple(found), tuple(forward), counts, len(docker) == 2)


def tool_name(kind, family, which_tool):
    """The name of a tool (*which_tool* 0: save, 1: restore) of *kind*
    (None: plain ``iptables-save``... whatever kind that is)."""
    name = TOOLS[family][which_tool]
    return name if kind is None else name.replace("tables-", f"tables-{kind}-")


def kind_of(path):
    """The kind of the iptables tool at *path* (its symlinks end in
    ``xtables-nft-multi`` or ``xtables-legacy-multi``)."""
    return "legacy" if "legacy" in os.path.basename(os.path.realpath(path)) else "nft"


def default_kind():
    """The kind plain ``iptables`` is here."""
    path = which(TOOLS[4][1])
    return kind_of(path) if path else KINDS[0]


def pick_kind(saves, default):
    """The kind of iptables the driver's rules belong in, from each kind's
    IPv4 ``iptables-save`` ({kind: text}). The kernel runs a packet through
    the rules of both kinds and a DROP in either wins, so the driver's
    ACCEPTs must sit beside the rules that would drop it: where the engine's
    chains are, else where any other rules are (a host firewall), else
    *default* (the kind ``iptables`` is)."""
    engine = [kind for kind, text in saves.items() if _ENGINE_CHAIN.search(text)]
    if len(engine) == 1:
        return engine[0]
    busy = [kind for kind, text in saves.items() if _others_rules(text)]
    return busy[0] if len(busy) == 1 else default


def _others_rules(text):
    return any(line.startswith("-A ") and "OVSDRIVER-" not in line for line in text.splitlines())


def _line(tokens):
    line = " ".join(tokens)
    # One match per rule (thousands with a wide -p range); the count of
    # spaces keeps a token from holding one.
    if not _LINE.fullmatch(line) or line.count(" ") != len(tokens) - 1:
        bad = next(token for token in tokens if not _TOKEN.fullmatch(token))
        raise FirewallError(f"refusing to write the unexpected rule token {bad!r}")
    return line


def _forward_position(present, line):
    """Where our FORWARD jump *line* belongs (0-based, counting the rules
    other than itself): right after DOCKER-USER when FORWARD jumps there
    (a dockerd restart may put other rules before it), else first."""
    others = [rule for rule in present.forward if rule != line]
    return others.index(_USER_JUMP) + 1 if _USER_JUMP in others else 0


def _forward_jump_placed(present, line):
    """Whether our FORWARD jump *line* is where it belongs, or after further
    copies of the DOCKER-USER jump that follow that place: the engine,
    creating networks at once, deletes and re-inserts its jump for each and
    can leave several."""
    position = _forward_position(present, line)
    while present.forward[position : position + 1] == (_USER_JUMP,):
        position += 1
    return present.forward[position : position + 1] == (line,)


def drift(present, chains, family, docker):
    """How the kernel differs from what we wrote (*chains*, as `written`
    returns it): a list of short descriptions, empty when all is in place."""
    problems = []
    if present.docker != docker:
        problems.append("Docker's isolation chains " + ("appeared" if present.docker else "went"))
    for (table, chain), lines in (chains or {}).items():
        if (table, chain) not in present.chains:
            problems.append(f"chain {table} {chain} is missing")
        elif present.counts.get((table, chain), 0) != len(lines):
            have = present.counts.get((table, chain), 0)
            problems.append(f"chain {table} {chain} has {have} rules instead of {len(lines)}")
    for table, chain, line in jumps(family, docker) if chains is not None else ():
        count = sum(1 for t, _, found in present.jumps if (t, found) == (table, line))
        if count != 1:
            problems.append(f"the jump '{line}' is there {count} times")
        elif chain == "FORWARD" and not _forward_jump_placed(present, line):
            problems.append(f"the jump '{line}' is not first (or right after {DOCKER_USER})")
    return problems


def restore_script(networks, family, present):
    """The ``iptables-restore --noflush`` input that makes our chains say
    *networks* (or removes them all when no network needs this family), and
    puts every jump into them in place exactly once."""
    docker = present.docker
    chains = written(networks, family, docker)
    wanted = jumps(family, docker) if chains is not None else []
    lines = []
    for table, names in CHAINS[family].items():
        lines.append(f"*{table}")
        lines += [f":{name} - [0:0]" for name in names]  # creates or flushes
        if chains is not None:
            for name in names:
                lines += chains[table, name]
        deletions, insertions = [], []
        for t, chain, line in present.jumps:
            if t == table and (t, chain, line) not in wanted:
                deletions.append("-D" + line[2:])  # stale or not wanted any more
        for t, chain, line in wanted:
            if t != table:
                continue
            count = sum(1 for t2, _, found in present.jumps if (t2, found) == (t, line))
            keep = count >= 1 and (chain != "FORWARD" or _forward_jump_placed(present, line))
            deletions += ["-D" + line[2:]] * (count - 1 if keep else count)
            if not keep:
                position = 1
                if chain == "FORWARD":
                    position += _forward_position(present, line)
                insertions.append(f"-I {chain} {position} " + line.split(" ", 2)[2])
        lines += deletions + insertions
        if chains is None:
            lines += [f"-X {name}" for name in names]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def update_script(old, new):
    """The ``iptables-restore --noflush`` input that changes only the chains
    whose rules differ between *old* and *new* (both as `written` returns
    them), or None when nothing differs. A long chain with few changes (a
    container publishing one port next to one publishing thousands) gets
    only those rules deleted and inserted in place; others are refilled."""
    lines = []
    for table in ("filter", "nat"):
        changed = [key for key in new if key[0] == table and old.get(key) != new[key]]
        if not changed:
            continue
        edits = {key: _edits(old.get(key), new[key]) for key in changed}
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for (_, chain), e in edits.items() if e is None]
        for key in changed:
            lines += new[key] if edits[key] is None else edits[key]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else None


#: A chain at least this long is edited rule by rule when few rules change.
EDIT_IN_PLACE = 64


def _edits(old, new):
    """``-D``/``-I`` lines turning the chain's rules *old* into *new*, or
    None when refilling it is simpler (a short chain, or many changes).
    Deletions come first; each insertion then goes to its final position."""
    if old is None or len(old) < EDIT_IN_PLACE:
        return None
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    deleted, inserted = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            deleted += ["-D" + line[2:] for line in old[i1:i2]]
        if tag in ("insert", "replace"):
            inserted += [_insert_at(line, j) for j, line in enumerate(new[j1:j2], j1 + 1)]
    if 4 * (len(deleted) + len(inserted)) > len(new):
        return None
    return deleted + inserted


def _insert_at(line, position):
    """``-A CHAIN rule`` as ``-I CHAIN POSITION rule``."""
    _, chain, rule = line.split(" ", 2)
    return f"-I {chain} {position} {rule}"


# ---------------------------------------------------------------------------
# Running the tools without blocking the reactor.
# ---------------------------------------------------------------------------


def which(program):
    """Where *program* is, looking in the sbin directories too."""
    return shutil.which(program, path=_SEARCH_PATH)


@attr.s(slots=True)
class _Family:
    """What we last wrote in one family, and whether the kernel still says so."""

    chains = attr.ib(default=None)  # as `written` returns it; None: nothing of ours
    docker = attr.ib(default=False)  # whether it was written with Docker's chains
    known = attr.ib(default=False)  # False: read iptables-save before writing


def _hint(message):
    """What to do about an iptables failure, judged from its stderr."""
    text = message.lower()
    if "permission denied" in text or "you must be root" in text:
        return "run the driver as root, with CAP_NET_ADMIN"
    if "xtables lock" in text or "resource temporarily unavailable" in text:
        return "another program holds the xtables lock; the driver retries"
    if "couldn't load" in text or "no chain/target/match" in text or "not supported" in text:
        return (
            "the kernel lacks a netfilter module the rules use (conntrack, addrtype, "
            "comment, MASQUERADE, DNAT): load it with modprobe, e.g. modprobe xt_conntrack"
        )
    if "too many links" in text or "chain_del" in text or "chain_user_del" in text:
        return "another rule jumps into an OVSDRIVER-* chain: remove that rule"
    return "see the driver's log and iptables-save for the conflicting rule"


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
        self._families = {4: _Family(), 6: _Family()}
        self._kind = None  # the kind of iptables written with (None: plain names)
        self._kinds = None  # the kinds installed, once looked for
        self._wanted = None  # the last state applied (checked), for healing
        self._forwarding = set()  # families whose forwarding we saw on
        self._localnet = set()  # interfaces whose route_localnet we saw on
        #: How often the rules were found changed from outside and rewritten.
        self.heals = 0
        self._problems = []  # what the last check found (logged once)
        #: The latest commands' PIDs: the kernel's announcements name the
        #: process that made a change, and the driver's own are no news.
        self._children = collections.deque(maxlen=16)

    def apply(self, networks):
        """Make our chains say exactly *networks* (a list of `NetworkRules`).

        Calls are serialised; each one is atomic per table. The same state
        as last time runs nothing. Fails with FirewallError, naming what
        failed and what to do, and then leaves the previous rules of the
        failed table in place.
        """
        try:
            checked = check_networks(networks)
        except FirewallError:
            return defer.fail()
        applied = self._lock.run(lambda: defer.ensureDeferred(self._apply(checked)))
        return self.metrics.firewall_sync(applied)

    async def _apply(self, networks):
        if self._kinds is None:
            await self._choose_kind()
        for family in (4, 6):
            await self._apply_family(networks, family)
        self._wanted = networks
        for family in sorted(forwarding_families(networks) - self._forwarding):
            await self.enable_forwarding(family)
            self._forwarding.add(family)
        self._localnet &= {n.ifname for n in networks}  # a removed one may come back
        await self._sync_localnet(networks)

    async def _sync_localnet(self, networks):
        for ifname in sorted(localnet_interfaces(networks) - self._localnet):
            await self.enable_route_localnet(ifname)
            self._localnet.add(ifname)

    @property
    def settled(self):
        """Whether the kernel had what was last applied, as of the last
        update or check (else the healer checks again)."""
        wanted = self._wanted
        return wanted is None or all(
            self._families[family].known for family in (4, 6) if needs(wanted, family)
        )

    def watch(self):
        """An `NftablesWatch` of this firewall's namespace."""
        return nftwatch.NftablesWatch(self.reactor, self.netns, own=self._children)

    @property
    def announced(self):
        """Whether the kernel announces every change of the rules: not once
        x_tables (iptables-legacy) holds a table in the namespace (a firewall
        given a namespace, in tests, cannot tell: no)."""
        if self.netns is not None:
            return False
        for name in ("ip_tables_names", "ip6_tables_names"):
            try:
                with open(f"/proc/self/net/{name}") as f:
                    if f.read().strip():
                        return False
            except OSError:  # x_tables is not even loaded
                continue
        return True

    async def _choose_kind(self):
        """Write with the kind of iptables `pick_kind` picks (where both are
        installed), moving the driver's rules from any other kind there:
        (whether they moved, the IPv4 ``iptables-save`` of the kind or None)."""
        if self._kinds is None:
            self._kinds = [kind for kind in KINDS if which(tool_name(kind, 4, 1))]
        if len(self._kinds) < 2:
            return False, None
        saves = {}
        for kind in self._kinds:
            try:
                saves[kind] = await self._tool(tool_name(kind, 4, 0), [])
            except FirewallError as e:  # a kind that cannot be read cannot be used
                log.info("cannot read iptables-{kind}: {e}", kind=kind, e=e)
        if not saves:
            return False, None
        default = default_kind()
        kind = pick_kind(saves, default if default in saves else next(iter(saves)))
        stale = [
            other
            for other in self._kinds
            if other != kind and (other == self._kind or ":OVSDRIVER-" in saves.get(other, ""))
        ]
        try:
            for other in stale:
                log.info(
                    "the engine's (or the host's) firewall rules are in iptables-{kind}: "
                    "moving the ovs driver's rules there from iptables-{other}",
                    kind=kind,
                    other=other,
                )
                await self._clear(other)
        finally:  # a clearing that failed is done again at the next check
            if kind != self._kind:
                self._kind, self._families = kind, {4: _Family(), 6: _Family()}
        return bool(stale), saves[kind]

    async def _clear(self, kind):
        """Remove the driver's chains and jumps from *kind*."""
        self._kind, self._families = kind, {4: _Family(), 6: _Family()}
        for family in (4, 6):
            await self._apply_family([], family)

    def interface_made_anew(self, ifname):
        """*ifname* was made anew, its sysctls back to their defaults: set
        ``route_localnet`` on it again if it needs it."""
        self._localnet.discard(ifname)
        if self._wanted is None:
            return defer.succeed(None)
        return self._lock.run(lambda: defer.ensureDeferred(self._sync_localnet(self._wanted)))

    async def _apply_family(self, networks, family):
        state = self._families[family]
        if state.known:
            new = written(networks, family, state.docker)
            if new == state.chains:
                return  # nothing changed: no child process at all
            if new is not None and state.chains is not None:
                script = update_script(state.chains, new)
                try:
                    await self._restore(family, script)
                except FirewallError as e:
                    log.warn("rewriting the changed chains failed ({e}); rewriting all", e=e)
                    state.known = False
                else:
                    state.chains = new
                    return
        state.known = False
        wanted = needs(networks, family)
        try:
            save = await self._tool(self._tool_name(family, 0), [])
        except FirewallError:
            if wanted:
                raise
            return  # e.g. no ip6tables: nothing of ours can be there
        present = parse_save(save, family)
        if not wanted and present.empty:
            self._families[family] = _Family(None, present.docker, True)
            return
        await self._restore(family, restore_script(networks, family, present))
        self._families[family] = _Family(
            written(networks, family, present.docker), present.docker, True
        )

    async def _restore(self, family, script):
        try:
            await self._tool(self._tool_name(family, 1), ["--noflush", "-w"], script.encode())
        except FirewallError as e:
            self._families[family].known = False
            raise FirewallError(
                f"cannot update the IPv{family} firewall rules: {e} ({_hint(str(e))})"
            ) from None

    def check(self):
        """Compare the kernel's rules with what was last applied; rewrite
        them when something of ours is missing, duplicated or misplaced.

        Reads ``iptables-save`` (only for families in use), writes nothing
        when all is in place. The result: a list of what was found wrong.
        """
        checked = self._lock.run(lambda: defer.ensureDeferred(self._check()))
        return checked.addCallback(self._checked)

    def _checked(self, problems):
        self.metrics.firewall_checked(problems)
        return problems

    async def _check(self):
        if self._wanted is None:
            return []
        moved, saved = await self._choose_kind()
        if moved:
            await self._apply(self._wanted)
            return [f"the rules moved to iptables-{self._kind}"]
        problems = []
        for family in (4, 6):
            state = self._families[family]
            if not needs(self._wanted, family):
                continue
            if family != 4 or saved is None:
                saved = await self._tool(self._tool_name(family, 0), [])
            present = parse_save(saved, family)
            found = drift(present, state.chains if state.known else None, family, state.docker)
            if not state.known:
                found.append("the last update failed")
            if found:
                state.known = False
                problems += [f"IPv{family}: {problem}" for problem in found]
        if problems:
            if problems != self._problems:
                log.warn(
                    "the ovs driver's firewall rules were changed from outside "
                    "({problems}); rewriting them",
                    problems="; ".join(problems),
                )
            self._problems = problems
            self.heals += 1
            self._forwarding.clear()
            self._localnet.clear()
            await self._apply(self._wanted)
        self._problems = problems
        return problems

    def _tool_name(self, family, which_tool):
        return tool_name(self._kind, family, which_tool)

    async def _tool(self, name, args, stdin=None):
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
        started = self._children.append
        return self._in_thread(_run, name, argv, stdin, self._env, self.timeout, started)

    def _in_thread(self, fn, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    async def enable_forwarding(self, family):
        """Turn on IP forwarding of *family* (4 or 6) if it is off."""
        key = FORWARDING_SYSCTL[family]
        if await self._enable_sysctl(key.replace(".", "/"), "IP forwarding"):
            log.info("turned on IPv{family} forwarding ({key}=1)", family=family, key=key)

    async def enable_route_localnet(self, ifname):
        """Let *ifname* route 127.0.0.0/8 (``route_localnet``), as ports
        published on the host's loopback need (Docker does the same)."""
        key = f"net/ipv4/conf/{ifname}/route_localnet"
        if await self._enable_sysctl(key, f"ports published on 127.0.0.1 through {ifname}"):
            log.info("set route_localnet=1 on {ifname}", ifname=ifname)

    async def _enable_sysctl(self, key, what):
        """Write 1 to sysctl *key* (slash-separated) unless it holds 1;
        whether it changed."""
        if self.netns is None:
            return await self._in_thread(_enable, "/proc/sys/" + key, what)
        sysctl = which("sysctl") or "sysctl"
        current = await self.run([sysctl, "-n", key])
        if current.strip() == b"1":
            return False
        await self.run([sysctl, "-q", "-w", f"{key}=1"])
        return True


def _run(name, argv, stdin, env, timeout, started):
    """Run a command to completion (in a thread), telling ``started(pid)``:
    its stdout, or FirewallError."""
    try:
        with subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as process:
            started(process.pid)
            try:
                stdout, stderr = process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise FirewallError(f"{name} did not finish within {timeout:g} seconds") from None
    except OSError as e:
        raise FirewallError(f"cannot run {name}: {e.strerror}") from None
    if process.returncode != 0:
        lines = stderr.decode("utf-8", "replace").splitlines()
        message = " ".join(line.strip() for line in lines if line.strip())
        raise FirewallError(f"{name} failed: {message or f'exit status {process.returncode}'}")
    return stdout


def _enable(path, what="IP forwarding"):
    """Write 1 to a /proc/sys file unless it holds 1 already (in a thread)."""
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return False
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as e:
        raise FirewallError(
            f"cannot turn on {what}: writing 1 to {path} failed ({e.strerror}); "
            "run the driver as root, or set it yourself"
        ) from None
    return True


# ---------------------------------------------------------------------------
# Restoring the rules when the driver starts, and when they are flushed.
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
        d = defer.ensureDeferred(call_hook(self.sync))
        d.addCallbacks(self._succeeded, self._failed)

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


class FirewallHealer(service.Service):
    """Puts the rules back when something outside removed them.

    ``iptables -F``, ``iptables -t nat -F``, a firewalld reload or a dockerd
    restart that rewrites its chains take the driver's rules or jumps away
    without telling anyone. `Firewall.check` reads ``iptables-save`` (in the
    thread pool) and rewrites only when something of ours is missing,
    duplicated or misplaced (or moves the rules to the other kind of
    iptables, see `pick_kind`). With a *watch* (`ovsdriver.nftwatch`) it runs
    only after the kernel announced a change, `settle` seconds after it (the
    rest of a burst, a firewalld reload, lands in the same read) and never
    sooner than `interval` seconds after the previous check: no child process
    while nothing changes. Without one, when watching fails, or while
    x_tables (iptables-legacy, whose changes go unannounced) holds a table,
    it runs every `interval` seconds. Either way a flush is repaired within
    one interval, a failed update is retried every interval, and nothing is
    duplicated.
    """

    interval = 3.0
    settle = 0.5

    def __init__(self, reactor, firewall, interval=None, watch=None):
        self.reactor = reactor
        self.firewall = firewall
        if interval is not None:
            self.interval = interval
        self.watch = watch
        self._dirty = True  # check once after the start
        self._last = None  # when the last check began
        self._call = None
        self._busy = None
        self._last_error = None

    def startService(self):
        super().startService()
        if self.watch is not None:
            self.watch.start(self._changed, self._stopped_watching).addErrback(
                self._stopped_watching
            )
        self._schedule(self.interval)

    def stopService(self):
        super().stopService()
        if self.watch is not None:
            self.watch.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self._busy  # let a check in flight finish

    def _stopped_watching(self, error):
        if self.watch is None:
            return
        self.watch = None
        if not self.running:
            return
        message = error.getErrorMessage() if isinstance(error, Failure) else str(error)
        log.info(
            "cannot watch for firewall changes ({error}); reading the rules every {interval} s",
            error=message,
            interval=self.interval,
        )

    def _changed(self):
        self._dirty = True
        since = self.reactor.seconds() - self._last if self._last is not None else self.interval
        self._schedule(max(self.settle, self.interval - since))

    def _schedule(self, delay):
        """Check in *delay* seconds, unless a check comes sooner or runs."""
        if not self.running or self._busy is not None:
            return
        if self._call is not None:
            if self._call.getTime() <= self.reactor.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self):
        self._call = None
        # Without a watch, or with iptables-legacy in use (unannounced), every tick reads.
        watched = self.watch is not None and self.firewall.announced
        if watched and not self._dirty and self.firewall.settled:
            self._schedule(self.interval)
            return
        self._dirty = False
        self._last = self.reactor.seconds()
        self._busy = defer.ensureDeferred(self._check())
        self._busy.addBoth(self._checked)

    def _checked(self, _):
        self._busy = None
        if self._dirty:  # changed while reading: once more
            self._changed()
        else:
            self._schedule(self.interval)

    async def _check(self):
        try:
            await self.firewall.check()
        except Exception as e:  # logged once per message; checked again next time
            if str(e) != self._last_error:
                log.warn("cannot check the firewall rules: {e}", e=e)
            self._last_error = str(e)
            self._dirty = True
        else:
            self._last_error = None
