"""The firewall contract, run against the real Firewall on iptables.

Each test gets a fresh network namespace (``ovsw-fw-<random>``: the prefix
``.ci/run`` sweeps) whose iptables and sysctls the firewall manages through
``nsenter``; it is deleted afterwards, also when a test fails, and takes every
rule along. The `FirewallView` is read back from ``iptables-save`` and
``ip6tables-save``: a fact counts only when every rule it needs is there, in
a chain that is reachable from the built-in one.
"""

import ipaddress
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time

import pytest
from twisted.internet import defer

from ovsdriver.firewall import (
    DNAT,
    DOCKER_STAGE_1,
    DOCKER_STAGE_2,
    FORWARD,
    INPUT,
    ISOLATION_1,
    ISOLATION_2,
    POSTROUTING,
    Firewall,
    FirewallError,
)
from tests.contract_firewall import (
    INTERNAL,
    NAT,
    ROUTED,
    FirewallContract,
    FirewallView,
    network,
    tcp,
)
from tests.reactor_thread import get_reactor, run_in_reactor
from tests.world import wait_until

pytestmark = pytest.mark.integration


def in_ns(namespace, *argv, check=True, input=None):
    """Run *argv* inside *namespace*; its stdout, or raise with its stderr."""
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{namespace}", "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        input=input,
    )
    if check and done.returncode:
        raise AssertionError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def namespace():
    """A fresh network namespace's name, deleted after the test."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    for tool in ("ip", "nsenter", "iptables-save", "iptables-restore", "ip6tables-save"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed")
    name = f"ovsw-fw-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        # A new namespace may inherit forwarding from the host's: start from off.
        in_ns(name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
        # The networks' interfaces (route_localnet is set on them; no dummy
        # interfaces in every kernel, veths are).
        for n in range(1, 8):
            link = ["ip", "-n", name, "link", "add", f"fwc-{n}", "type", "veth"]
            subprocess.run([*link, "peer", "name", f"fwp-{n}"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=30)


# -- reading iptables-save ------------------------------------------------------


def parse_save(text):
    """{table: [(chain, {option: value})]} of every rule, in order.

    Options keep their leading dashes; a negated one's value starts with
    ``!``; ``-m MODULE`` and comments are dropped, so rules compare by meaning.
    """
    tables, table = {}, None
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:].strip(), [])
        elif line.startswith("-A "):
            tokens = shlex.split(line)
            options, negate, i = {}, False, 2
            while i < len(tokens):
                token = tokens[i]
                if token == "!":
                    negate = True
                    i += 1
                    continue
                if token == "-m":
                    i += 2
                    continue
                value = tokens[i + 1]
                if token != "--comment":
                    options[token] = f"!{value}" if negate else value
                negate = False
                i += 2
            table.append((tokens[1], options))
    return tables


def chain(tables, table, name):
    """The rules (option dicts) of one chain, in order."""
    return [options for c, options in tables.get(table, []) if c == name]


def index(rules, **expected):
    """Where the rule with exactly these options is, or None."""
    want = {
        "-" + k.replace("_", "-") if len(k) == 1 else "--" + k.replace("_", "-"): v
        for k, v in expected.items()
    }
    return next((i for i, rule in enumerate(rules) if rule == want), None)


def jumped_once(tables, table, builtin, target, **match):
    """Whether *builtin* jumps to *target* exactly once, with *match*."""
    jumps = [r for r in chain(tables, table, builtin) if r.get("-j") == target]
    return len(jumps) == 1 and all(jumps[0].get(k) == v for k, v in match.items())


def family_view(tables, family):
    """The facts of one family: (networks, masqueraded, blocked, published)."""
    networks, masqueraded, blocked, published = set(), set(), set(), set()
    forward = chain(tables, "filter", FORWARD)
    iso1 = chain(tables, "filter", ISOLATION_1)
    iso2 = chain(tables, "filter", ISOLATION_2)
    post = chain(tables, "nat", POSTROUTING)
    filtering = jumped_once(tables, "filter", "FORWARD", FORWARD) and forward[:1] == [
        {"-j": ISOLATION_1}
    ]
    nat = jumped_once(tables, "nat", "POSTROUTING", POSTROUTING)
    rules = forward + iso1 + iso2 + post
    ifnames = {r[k].lstrip("!") for r in rules for k in ("-i", "-o") if k in r}
    modes = {}
    for x in sorted(ifnames) if filtering else ():
        isolated = (
            index(iso1, i=x, o=f"!{x}", j=ISOLATION_2) is not None
            and index(iso2, o=x, j="DROP") is not None
        )
        out = (
            index(forward, o=x, ctstate="RELATED,ESTABLISHED", j="ACCEPT") is not None
            and index(forward, i=x, j="ACCEPT") is not None
        )
        drop_in = index(forward, o=x, j="DROP")
        accept_in = index(forward, o=x, j="ACCEPT")
        internal = index(iso1, i=x, j="DROP") is not None and index(iso1, o=x, j="DROP") is not None
        if isolated and out and drop_in is not None and accept_in is None and not internal:
            modes[x] = NAT
        elif isolated and out and accept_in is not None and drop_in is None and not internal:
            modes[x] = ROUTED
        elif internal and not isolated and not out and drop_in is None and accept_in is None:
            modes[x] = INTERNAL
        else:
            modes[x] = "broken"
        networks.add((family, x, modes[x]))
    for rule in iso1 if filtering else ():
        pool = rule.get("-s")
        if rule == {"-s": pool, "-j": "DROP"} and index(iso1, d=pool, j="DROP") is not None:
            blocked.add(pool)
    for rule in post if nat else ():
        out = rule.get("-o", "")
        masquerade = rule == {"-s": rule.get("-s"), "-o": out, "-j": "MASQUERADE"}
        if masquerade and out.startswith("!") and modes.get(out[1:]) == NAT:
            masqueraded.add((rule["-s"], out[1:]))
    output_jump = {"--dst-type": "LOCAL"} if family == 4 else {"-d": "!::1/128"}
    dnat = (
        filtering
        and nat
        and jumped_once(tables, "nat", "PREROUTING", DNAT, **{"--dst-type": "LOCAL"})
        and jumped_once(tables, "nat", "OUTPUT", DNAT, **output_jump)
        and (family == 6 or "-d" not in chain(tables, "nat", "OUTPUT")[0])
    )
    host = "/32" if family == 4 else "/128"
    # From the driver's other networks too: stage 2 lets DNATed traffic by.
    across = iso2[:1] == [{"--ctstate": "DNAT", "-j": "RETURN"}]
    for rule in chain(tables, "nat", DNAT) if dnat else ():
        cip, _, cport = rule["--to-destination"].rpartition(":")
        cip = cip.strip("[]")
        proto, host_ip = rule["-p"], rule.get("-d")
        if host_ip is not None:
            host_ip = str(ipaddress.ip_interface(host_ip).ip)
        for x, mode in modes.items():
            allowed = index(
                forward,
                d=f"{cip}{host}",
                o=x,
                p=proto,
                dport=cport,
                ctstate="DNAT",
                j="ACCEPT",
            )
            pools = [r["-s"] for r in post if r.get("-o") == x and r.get("--ctstate") == "DNAT"]
            hairpin = any(ipaddress.ip_address(cip) in ipaddress.ip_network(p) for p in pools)
            before_drop = (
                mode == ROUTED
                or allowed is not None
                and allowed < (index(forward, o=x, j="DROP") or 0)
            )
            if allowed is not None and hairpin and before_drop and across:
                published.add((proto, host_ip, int(rule["--dport"]), cip, int(cport)))
    return networks, masqueraded, blocked, published, docker_view(tables, family, modes)


def docker_view(tables, family, modes):
    """{(family, ifname)} isolated from Docker's bridges: out of the network
    through Docker's stage 2 (which jumps to ours), and into a routed one
    through Docker's stage 1."""
    forward = chain(tables, "filter", FORWARD)
    stage2 = chain(tables, "filter", DOCKER_STAGE_2)
    if [r.get("-j") for r in stage2].count(ISOLATION_2) != 1:
        return set()
    isolated = set()
    for x, mode in modes.items():
        out = index(forward, i=x, o=f"!{x}", ctstate="!DNAT", j=DOCKER_STAGE_2)
        into = index(forward, o=x, j=DOCKER_STAGE_1)
        accept = index(forward, i=x, j="ACCEPT")
        if out is not None and out < accept and (mode == NAT or into is not None):
            isolated.add((family, x))
    return isolated


def localnet_view(tables, sysctl):
    """{ifname} that routes 127.0.0.0/8 (``sysctl(ifname)``), where loopback
    traffic is masqueraded into it and containers are kept off the host's."""
    if not jumped_once(tables, "filter", "INPUT", INPUT):
        return set()
    guarded = set()
    for rule in chain(tables, "filter", INPUT):
        x = rule.get("-i")
        guard = {
            "-i": x,
            "-d": "127.0.0.0/8",
            "--ctstate": "!RELATED,ESTABLISHED,DNAT",
            "-j": "DROP",
        }
        masquerade = {"-s": "127.0.0.0/8", "-o": x, "-j": "MASQUERADE"}
        if rule == guard and masquerade in chain(tables, "nat", POSTROUTING) and sysctl(x):
            guarded.add(x)
    return guarded


_OURS = re.compile(r"OVSDRIVER-")


class TestRealFirewall(FirewallContract):
    @pytest.fixture(autouse=True)
    def _real(self, namespace):
        self.namespace = namespace
        self.firewall = Firewall(get_reactor(), netns=namespace)
        self.planted = []

    def call(self, method, *args):
        return run_in_reactor(method, *args, timeout=60)

    def save(self, family):
        return in_ns(self.namespace, "iptables-save" if family == 4 else "ip6tables-save")

    def view(self):
        facts = [set(), set(), set(), set(), set()]
        owned, localnet = False, set()
        for family in (4, 6):
            text = self.save(family)
            owned = owned or bool(_OURS.search(text))
            for whole, part in zip(facts, family_view(parse_save(text), family)):
                whole |= part
            if family == 4:
                localnet = localnet_view(parse_save(text), self.route_localnet)
        forwarding = set()
        for family, key in ((4, "net.ipv4.ip_forward"), (6, "net.ipv6.conf.all.forwarding")):
            if in_ns(self.namespace, "sysctl", "-n", key).strip() == "1":
                forwarding.add(family)
        *facts, docker = map(frozenset, facts)
        return FirewallView(
            *facts, frozenset(forwarding), owned, frozenset(localnet), docker_isolated=docker
        )

    def route_localnet(self, ifname):
        key = f"net/ipv4/conf/{ifname}/route_localnet"
        return in_ns(self.namespace, "sysctl", "-n", key).strip() == "1"

    def plant_docker_chains(self):
        for tool in ("iptables", "ip6tables"):
            for argv in (
                ["-N", DOCKER_STAGE_1],
                ["-N", DOCKER_STAGE_2],
                ["-A", DOCKER_STAGE_1, "-i", "br-d0", "!", "-o", "br-d0", "-j", DOCKER_STAGE_2],
                ["-A", DOCKER_STAGE_2, "-o", "br-d0", "-j", "DROP"],
                ["-A", "FORWARD", "-j", DOCKER_STAGE_1],
            ):
                in_ns(self.namespace, tool, *argv)

    def flush_from_outside(self):
        for tool in ("iptables", "ip6tables"):
            in_ns(self.namespace, tool, "-F")
            in_ns(self.namespace, tool, "-t", "nat", "-F")

    def plant_foreign_rules(self):
        ns = self.namespace
        for argv in (
            ["iptables", "-P", "FORWARD", "DROP"],
            ["iptables", "-N", "DOCKER-USER"],
            ["iptables", "-A", "FORWARD", "-j", "DOCKER-USER"],
            ["iptables", "-A", "FORWARD", "-i", "fgn0", "-o", "fgn1", "-j", "ACCEPT"],
            ["iptables", "-N", "FOREIGN"],
            ["iptables", "-A", "FOREIGN", "-s", "198.51.100.0/24", "-j", "DROP"],
            ["iptables", "-A", "FORWARD", "-j", "FOREIGN"],
            ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "198.51.100.0/24"]
            + ["!", "-o", "fgn0", "-j", "MASQUERADE"],
            ["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8080"]
            + ["-j", "DNAT", "--to-destination", "198.51.100.9:80"],
            ["ip6tables", "-A", "FORWARD", "-i", "fgn0", "-j", "ACCEPT"],
            ["ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", "2001:db8::/64"]
            + ["-j", "MASQUERADE"],
        ):
            in_ns(ns, *argv)
        self.planted = self.foreign_lines()
        assert len(self.planted) == 11, self.planted

    def foreign_lines(self):
        """Every line of iptables-save that is not ours, in order."""
        lines = []
        for family in (4, 6):
            for line in self.save(family).splitlines():
                if line.startswith("#") or _OURS.search(line):
                    continue
                if line.startswith(("-A", ":DOCKER", ":FOREIGN")) or "DROP" in line:
                    lines.append(line)
        return lines

    def foreign_rules_intact(self):
        return self.foreign_lines() == self.planted

    def snapshot(self):
        def clean(text):
            lines = [line for line in text.splitlines() if not line.startswith("#")]
            return [re.sub(r"\[\d+:\d+\]", "", line) for line in lines]

        return clean(self.save(4)), clean(self.save(6)), self.view().forwarding

    # -- what only the real one shows ----------------------------------------

    def rules_of(self, family, table, name):
        return chain(parse_save(self.save(family)), table, name)

    def test_jumps_go_after_docker_user_and_exist_once(self):
        self.plant_foreign_rules()
        for _ in range(3):
            self.apply(network(1, published=[tcp(8080, "10.91.0.2", 80)]))
        forward = self.rules_of(4, "filter", "FORWARD")
        assert forward[:2] == [{"-j": "DOCKER-USER"}, {"-j": FORWARD}]
        assert [r.get("-j") for r in forward].count(FORWARD) == 1
        for builtin in ("PREROUTING", "OUTPUT", "POSTROUTING"):
            rules = self.rules_of(4, "nat", builtin)
            assert rules[0]["-j"] in (DNAT, POSTROUTING)
            assert [r.get("-j") for r in rules].count(rules[0]["-j"]) == 1

    def test_jumps_go_first_without_docker_user(self):
        in_ns(self.namespace, "iptables", "-A", "FORWARD", "-i", "fgn0", "-j", "ACCEPT")
        self.apply(network(1))
        assert self.rules_of(4, "filter", "FORWARD")[0] == {"-j": FORWARD}

    def test_rules_changed_from_outside_come_back_on_the_next_check(self):
        networks = [network(1, published=[tcp(8080, "10.91.0.2", 80)]), network(2)]
        self.apply(*networks)
        before, view = self.snapshot(), self.view()
        in_ns(self.namespace, "iptables", "-D", "FORWARD", "-j", FORWARD)
        in_ns(self.namespace, "iptables", "-F", ISOLATION_2)
        in_ns(self.namespace, "iptables", "-t", "nat", "-F", "POSTROUTING")
        broken = self.view()
        assert broken.networks == set() and broken.masqueraded == set()
        assert broken.published == set()
        self.apply(*networks)  # the same state: not even looked at
        assert self.view() == broken
        problems = self.call(self.firewall.check)
        assert "IPv4: chain filter OVSDRIVER-ISOLATION-2 has 0 rules instead of 3" in problems
        assert self.snapshot() == before
        assert self.view() == view

    def test_a_dockerd_restart_that_puts_its_jumps_first_is_repaired(self):
        self.plant_foreign_rules()  # DOCKER-USER first, then ours
        self.apply(network(1))
        before = self.snapshot()
        ns = self.namespace
        in_ns(ns, "iptables", "-N", "DOCKER-FORWARD")
        in_ns(ns, "iptables", "-D", "FORWARD", "-j", "DOCKER-USER")
        in_ns(ns, "iptables", "-I", "FORWARD", "1", "-j", "DOCKER-FORWARD")
        in_ns(ns, "iptables", "-I", "FORWARD", "1", "-j", "DOCKER-USER")
        in_ns(ns, "iptables", "-A", "INPUT", "-j", INPUT)  # and a duplicate
        assert self.call(self.firewall.check)
        forward = self.rules_of(4, "filter", "FORWARD")
        assert forward[:3] == [{"-j": "DOCKER-USER"}, {"-j": FORWARD}, {"-j": "DOCKER-FORWARD"}]
        assert [r.get("-j") for r in self.rules_of(4, "filter", "INPUT")] == [INPUT]
        assert self.call(self.firewall.check) == []
        in_ns(ns, "iptables", "-D", "FORWARD", "-j", "DOCKER-FORWARD")
        in_ns(ns, "iptables", "-X", "DOCKER-FORWARD")
        assert self.snapshot() == before

    def test_the_same_state_again_runs_no_command_and_a_change_one_restore(self):
        calls = []
        run = self.firewall.run

        def counted(argv, stdin=None):
            calls.append(plain(os.path.basename(argv[0])))
            return run(argv, stdin)

        self.firewall.run = counted
        state = [network(1, ipv6=["fd00:91::/64"], published=[tcp(8080, "10.91.0.2", 80)])]
        self.apply(*state)
        calls.clear()
        self.apply(*state)
        assert calls == []
        state.append(network(2))
        self.apply(*state)
        assert calls == ["iptables-restore"]  # IPv6 did not change
        calls.clear()
        state.append(network(3, ipv6=["fd00:93::/64"]))
        self.apply(*state)
        assert calls == ["iptables-restore", "ip6tables-restore"]
        assert self.view().networks == {
            (4, "fwc-1", NAT),
            (6, "fwc-1", NAT),
            (4, "fwc-2", NAT),
            (4, "fwc-3", NAT),
            (6, "fwc-3", NAT),
        }

    def test_a_long_chain_is_edited_in_place_and_ends_as_a_refill_would(self):
        scripts = []
        run = self.firewall.run

        def recorded(argv, stdin=None):
            if stdin:
                scripts.append(stdin.decode())
            return run(argv, stdin)

        self.firewall.run = recorded
        wide = [tcp(20000 + n, "10.91.0.2", 20000 + n) for n in range(100)]
        self.apply(network(1, published=wide), network(2))
        for published in (
            wide + [tcp(8080, "10.91.0.3", 80)],  # one more
            wide[:50] + wide[51:] + [tcp(8080, "10.91.0.3", 80)],  # one gone from the middle
            wide[:50] + [tcp(8081, "10.91.0.4", 80)] + wide[51:],  # one replaced
        ):
            scripts.clear()
            self.apply(network(1, published=published), network(2))
            assert ":OVSDRIVER-DNAT - [0:0]" not in scripts[-1]  # not refilled...
            assert "-I OVSDRIVER-DNAT " in scripts[-1] or "-D OVSDRIVER-DNAT " in scripts[-1]
            # ...yet the kernel holds exactly what a refill writes, in order.
            assert self.call(self.firewall.check) == []
            dnat = [r["--dport"] for r in self.rules_of(4, "nat", DNAT) if "--dport" in r]
            assert dnat == [str(p.host_port) for p in published]

    def test_iptables_failure_names_the_command_and_keeps_the_rules(self):
        self.apply(network(1))
        before = self.snapshot()
        # A foreign rule pointing into our chains: they cannot be deleted.
        in_ns(self.namespace, "iptables", "-A", "FORWARD", "-j", ISOLATION_2)
        with pytest.raises(FirewallError) as caught:
            self.apply()
        message = str(caught.value)
        assert "iptables-nft-restore failed" in message and ISOLATION_2 in message
        assert "IPv4" in message
        in_ns(self.namespace, "iptables", "-D", "FORWARD", "-j", ISOLATION_2)
        assert self.snapshot() == before
        self.apply()
        assert not self.view().owned

    def test_missing_namespace_fails_clearly(self):
        firewall = Firewall(get_reactor(), netns="ovsw-fw-does-not-exist")
        with pytest.raises(FirewallError, match="iptables-save failed: .*does-not-exist"):
            self.call(firewall.apply, [network(1)])
        # With nothing to do, a missing tool or namespace is not an error.
        self.call(firewall.apply, [])

    def test_concurrent_applies_are_serialised_and_the_last_one_wins(self):
        states = [[network(n), network(n % 3 + 4, internal=True)] for n in (1, 2, 3, 1, 2)]

        def all_at_once():
            return defer.gatherResults([self.firewall.apply(s) for s in states])

        self.call(all_at_once)
        assert self.view().networks == {(4, "fwc-2", NAT), (4, "fwc-6", INTERNAL)}
        forward = self.rules_of(4, "filter", "FORWARD")
        assert [r.get("-j") for r in forward].count(FORWARD) == 1

    def test_forwarding_already_on_is_left_alone(self):
        in_ns(self.namespace, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.apply(network(1))
        assert self.view().forwarding == {4}

    def test_a_hanging_command_is_ended_and_named(self):
        self.firewall.timeout = 0.5
        with pytest.raises(FirewallError, match="sleep did not finish within 0.5 seconds"):
            self.call(self.firewall.run, ["sleep", "10"])


def test_the_kernel_announces_changes_but_not_reads_nor_the_firewalls_own(namespace):
    firewall = Firewall(get_reactor(), netns=namespace)
    watch = firewall.watch()
    changes = []
    run_in_reactor(watch.start, lambda: changes.append("changed"), changes.append)
    try:
        in_ns(namespace, "iptables-save")
        in_ns(namespace, "iptables", "-F")  # nothing to flush: nothing written
        run_in_reactor(firewall.run, ["iptables", "-N", "OVSW-OWN"])
        run_in_reactor(firewall.run, ["ip6tables", "-t", "nat", "-N", "OVSW-OWN"])
        time.sleep(0.5)
        assert changes == []
        assert "OVSW-OWN" in in_ns(namespace, "iptables-save")
        in_ns(namespace, "ip6tables", "-t", "nat", "-N", "OVSW-TEST")
        wait_until(lambda: changes, timeout=5, message="no announcement of a new chain")
        assert changes[0] == "changed"
        del changes[:]
        in_ns(namespace, "iptables", "-X", "OVSW-OWN")
        wait_until(lambda: changes, timeout=5, message="no announcement of a deleted chain")
    finally:
        run_in_reactor(watch.stop)


def test_the_rules_go_where_the_engines_chains_are_and_move_with_them(namespace):
    firewall = Firewall(get_reactor(), netns=namespace)
    run_in_reactor(firewall.apply, [network(1)])
    assert "-j OVSDRIVER-FORWARD" in in_ns(namespace, "iptables-nft-save")  # iptables' kind
    # The engine (re)starts writing with iptables-legacy.
    for rule in (["-N", "DOCKER-USER"], ["-A", "FORWARD", "-j", "DOCKER-USER"]):
        in_ns(namespace, "iptables-legacy", *rule)
    in_ns(namespace, "iptables-legacy", "-P", "FORWARD", "DROP")
    assert run_in_reactor(firewall.check) == ["the rules moved to iptables-legacy"]
    assert "OVSDRIVER" not in in_ns(namespace, "iptables-nft-save")
    legacy = in_ns(namespace, "iptables-legacy-save")
    forward = [line for line in legacy.splitlines() if line.startswith("-A FORWARD")]
    assert forward == ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j OVSDRIVER-FORWARD"]
    assert run_in_reactor(firewall.check) == []
    restarted = Firewall(get_reactor(), netns=namespace)  # a driver started again
    run_in_reactor(restarted.apply, [network(1), network(2)])
    legacy = in_ns(namespace, "iptables-legacy-save")
    assert legacy.count("-A FORWARD -j OVSDRIVER-FORWARD") == 1 and "fwc-2" in legacy
    assert "OVSDRIVER" not in in_ns(namespace, "iptables-nft-save")


# -- the driver's path: no child process unless a published port changes (issue 9) ------

WRAPPED = (
    *(
        f"{ip}{kind}-{tool}"
        for ip in ("iptables", "ip6tables")
        for kind in ("", "-nft", "-legacy")
        for tool in ("save", "restore")
    ),
    "sysctl",
)


def plain(tool):
    """The name of an iptables tool without its kind: iptables-nft-save -> iptables-save."""
    return re.sub(r"-(nft|legacy)-", "-", tool)


def wrap_tools(tmp_path, monkeypatch, calls, fail=()):
    """Put logging wrappers of the firewall's tools first on the driver's
    PATH; those in *fail* print a kernel-like error and fail instead."""
    from tests import world

    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for tool in WRAPPED:
        body = f'exec {world.which(tool)} "$@"'
        if plain(tool) in fail:
            body = f'echo "{tool}: {fail[plain(tool)]}" >&2; exit 1'
        script = wrappers / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{body}\n')
        script.chmod(0o755)
    monkeypatch.setattr(world, "_SEARCH_PATH", f"{wrappers}{os.pathsep}{world._SEARCH_PATH}")


def test_container_lifecycles_without_ports_run_no_firewall_command(
    ovs_world, tmp_path, monkeypatch
):
    calls = tmp_path / "calls"
    wrap_tools(tmp_path, monkeypatch, calls)
    driver = ovs_world.start_driver()
    net, ep = "7b" * 32, "5d" * 32
    ids = {"NetworkID": net, "EndpointID": ep}

    def ok(method, body):
        status, reply = driver.post(method, body)
        assert status == 200 and not reply.get("Err"), reply
        return reply

    def restores():
        lines = calls.read_text().splitlines() if calls.exists() else []
        names = [plain(line.split()[0]) for line in lines]
        return [name for name in names if not name.startswith(("iptables-save", "ip6"))]

    ok(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": net,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}],
        },
    )
    assert "iptables-restore" in restores()
    before = restores()
    for n in range(3):
        endpoint = dict(ids, EndpointID=f"{n}" * 64)
        ok(
            "NetworkDriver.CreateEndpoint",
            dict(endpoint, Interface={"Address": f"10.41.0.{n + 2}/24"}),
        )
        ok("NetworkDriver.Join", dict(endpoint, SandboxKey="/var/run/docker/netns/x"))
        ok("NetworkDriver.ProgramExternalConnectivity", dict(endpoint, Options={}))
        ok("NetworkDriver.EndpointOperInfo", endpoint)
        ok("NetworkDriver.RevokeExternalConnectivity", endpoint)
        ok("NetworkDriver.Leave", endpoint)
        ok("NetworkDriver.DeleteEndpoint", endpoint)
    assert restores() == before
    # A published port: one iptables-restore (IPv4 only: no IPv6 in use; the
    # bridge's route_localnet is written through /proc, not by a child).
    ok("NetworkDriver.CreateEndpoint", dict(ids, Interface={"Address": "10.41.0.9/24"}))
    portmap = [{"Proto": 6, "Port": 80, "HostPort": 8080}]
    ok(
        "NetworkDriver.ProgramExternalConnectivity",
        dict(ids, Options={"com.docker.network.portmap": portmap}),
    )
    assert restores()[len(before) :] == ["iptables-restore"]
    rules = ovs_world.netns.run(["iptables-save", "-t", "nat"]).stdout
    assert "--to-destination 10.41.0.9:80" in rules


def test_a_firewall_that_refuses_the_rules_is_a_sentence_with_the_fix(
    ovs_world, tmp_path, monkeypatch
):
    denied = "Permission denied (you must be root)"
    wrap_tools(tmp_path, monkeypatch, tmp_path / "calls", fail={"iptables-restore": denied})
    driver = ovs_world.start_driver()
    net = "7c" * 32
    status, reply = driver.post(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": net,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"Pool": "10.42.0.0/24", "Gateway": "10.42.0.1/24"}],
        },
    )
    assert status == 200
    assert reply["Err"] == (
        "cannot update the IPv4 firewall rules: iptables-nft-restore failed: iptables-nft-restore: "
        f"{denied} (run the driver as root, with CAP_NET_ADMIN)"
    )
    assert "obr-" + net[:11] not in ovs_world.ovs.bridges()  # nothing left behind


def test_an_idle_driver_reads_the_rules_only_after_they_change(ovs_world, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    wrap_tools(tmp_path, monkeypatch, calls)
    driver = ovs_world.start_driver()
    status, reply = driver.post(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": "7d" * 32,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"Pool": "10.43.0.0/24", "Gateway": "10.43.0.1/24"}],
        },
    )
    assert status == 200 and not reply.get("Err"), reply

    def saves():
        lines = calls.read_text().splitlines() if calls.exists() else []
        return sum(plain(line.split()[0]) == "iptables-save" for line in lines)

    def forward_rules():
        out = ovs_world.netns.run(["iptables", "-S", FORWARD]).stdout
        return len(out.splitlines())

    time.sleep(4)  # past the check after the start and the one after the write
    idle = saves()
    time.sleep(4)  # without a watch: another check
    assert saves() == idle
    rules = forward_rules()
    ovs_world.netns.run(["iptables", "-F", FORWARD])
    wait_until(lambda: forward_rules() == rules, timeout=10, message="the flush was not healed")
    assert saves() > idle
