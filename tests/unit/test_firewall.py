"""The real Firewall's logic without iptables: the rules it writes, what it
reads back, the commands it runs, and the service that restores the rules at
startup. (Its behaviour on real iptables is ``tests/integration/test_firewall_real.py``.)"""

import attr
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ovsdriver import firewall
from ovsdriver.firewall import (
    Firewall,
    FirewallError,
    FirewallRestorer,
    Present,
    check_networks,
    parse_save,
    restore_script,
    rules,
)
from tests.contract_firewall import network, tcp, udp


def result_of(deferred):
    box = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def script(networks, family=4, present=None):
    present = present or Present()
    return restore_script(check_networks(networks), family, present).splitlines()


# -- the rules ---------------------------------------------------------------------


def test_a_nat_network_with_a_published_port_gets_exactly_these_rules():
    net = network(1, published=[tcp(8080, "10.91.0.2", 80, "192.0.2.1")])
    c = "-m comment --comment ovsdriver:111111111111"
    assert script([net]) == [
        "*filter",
        ":OVSDRIVER-FORWARD - [0:0]",
        ":OVSDRIVER-ISOLATION-1 - [0:0]",
        ":OVSDRIVER-ISOLATION-2 - [0:0]",
        ":OVSDRIVER-INPUT - [0:0]",
        "-A OVSDRIVER-FORWARD -j OVSDRIVER-ISOLATION-1",
        f"-A OVSDRIVER-FORWARD -o fwc-1 -m conntrack --ctstate RELATED,ESTABLISHED {c} -j ACCEPT",
        f"-A OVSDRIVER-FORWARD -i fwc-1 {c} -j ACCEPT",
        "-A OVSDRIVER-FORWARD -d 10.91.0.2/32 -o fwc-1 -p tcp -m tcp --dport 80"
        f" -m conntrack --ctstate DNAT {c} -j ACCEPT",
        f"-A OVSDRIVER-FORWARD -o fwc-1 {c} -j DROP",
        f"-A OVSDRIVER-ISOLATION-1 -i fwc-1 ! -o fwc-1 {c} -j OVSDRIVER-ISOLATION-2",
        "-A OVSDRIVER-ISOLATION-2 -m conntrack --ctstate DNAT -j RETURN",
        f"-A OVSDRIVER-ISOLATION-2 -o fwc-1 {c} -j DROP",
        "-A OVSDRIVER-INPUT -i fwc-1 -d 127.0.0.0/8 -m conntrack ! --ctstate"
        f" RELATED,ESTABLISHED,DNAT {c} -j DROP",
        "-I FORWARD 1 -j OVSDRIVER-FORWARD",
        "-I INPUT 1 -j OVSDRIVER-INPUT",
        "COMMIT",
        "*nat",
        ":OVSDRIVER-DNAT - [0:0]",
        ":OVSDRIVER-POSTROUTING - [0:0]",
        f"-A OVSDRIVER-DNAT -d 192.0.2.1/32 -p tcp -m tcp --dport 8080 {c}"
        " -j DNAT --to-destination 10.91.0.2:80",
        f"-A OVSDRIVER-POSTROUTING -s 10.91.0.0/24 ! -o fwc-1 {c} -j MASQUERADE",
        f"-A OVSDRIVER-POSTROUTING -s 10.91.0.0/24 -o fwc-1 -m conntrack --ctstate DNAT {c}"
        " -j MASQUERADE",
        f"-A OVSDRIVER-POSTROUTING -s 127.0.0.0/8 -o fwc-1 {c} -j MASQUERADE",
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I OUTPUT 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I POSTROUTING 1 -j OVSDRIVER-POSTROUTING",
        "COMMIT",
    ]


def test_loopback_is_dnated_from_output_and_masqueraded_into_the_network():
    # What makes -p 127.0.0.1:8080:80 reachable: the OUTPUT jump does not
    # skip 127.0.0.0/8 and traffic from it into the bridge is masqueraded.
    lines = script([network(1, published=[tcp(8080, "10.91.0.2", 80, "127.0.0.1")])])
    assert "-I OUTPUT 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT" in lines
    assert any(line.startswith("-A OVSDRIVER-DNAT -d 127.0.0.1/32 -p tcp") for line in lines)
    assert any(
        line.startswith("-A OVSDRIVER-POSTROUTING -s 127.0.0.0/8 -o fwc-1") for line in lines
    )


def test_localnet_is_wanted_where_a_port_is_published_on_loopback():
    nets = check_networks(
        [
            network(1, published=[tcp(8080, "10.91.0.2", 80, "127.0.0.1")]),
            network(2, published=[tcp(8081, "10.92.0.2", 80)]),
            network(3, published=[tcp(8082, "10.93.0.2", 80, "192.0.2.1")]),
            network(4, ipv6=["fd00:94::/64"], published=[tcp(8083, "fd00:94::2", 80)]),
        ]
    )
    assert firewall.localnet_interfaces(nets) == {"fwc-1", "fwc-2"}


def test_ipv6_ports_are_dnated_in_ip6tables_only():
    ports = [tcp(8080, "fd00:91::2", 80), udp(53, "10.91.0.2", 53)]
    net = network(1, ipv6=["fd00:91::/64"], published=ports)
    c = "-m comment --comment ovsdriver:111111111111"
    six = script([net], 6)
    assert [line for line in six if "DNAT" in line and line.startswith("-A")] == [
        "-A OVSDRIVER-FORWARD -d fd00:91::2/128 -o fwc-1 -p tcp -m tcp --dport 80"
        f" -m conntrack --ctstate DNAT {c} -j ACCEPT",
        "-A OVSDRIVER-ISOLATION-2 -m conntrack --ctstate DNAT -j RETURN",
        f"-A OVSDRIVER-DNAT -p tcp -m tcp --dport 8080 {c}"
        " -j DNAT --to-destination [fd00:91::2]:80",
        f"-A OVSDRIVER-POSTROUTING -s fd00:91::/64 -o fwc-1 -m conntrack --ctstate DNAT {c}"
        " -j MASQUERADE",
    ]
    assert "-I OUTPUT 1 ! -d ::1/128 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT" in six
    assert "INPUT" not in "\n".join(six) and "127.0.0.0/8" not in "\n".join(six)
    four = "\n".join(script([net], 4))
    assert "fd00:91::2" not in four and "--dport 53" in four


def test_docker_bridges_are_isolated_when_dockerd_manages_iptables():
    present = Present(docker=True)
    lines = script([network(1), network(2, nat=False)], 4, present)
    c1, c2 = ("-m comment --comment ovsdriver:" + f"{n}" * 12 for n in (1, 2))
    # Out of a network into Docker's bridges: Docker's stage 2 drops it
    # (not DNATed traffic: published ports stay reachable, as with docker-proxy).
    assert (
        f"-A OVSDRIVER-FORWARD -i fwc-1 ! -o fwc-1 -m conntrack ! --ctstate DNAT {c1}"
        " -j DOCKER-ISOLATION-STAGE-2"
    ) in lines
    # Into a routed network from Docker's bridges: Docker's stage 1, whose
    # stage 2 jumps to ours; a NAT network drops new traffic in anyway.
    assert f"-A OVSDRIVER-FORWARD -o fwc-2 {c2} -j DOCKER-ISOLATION-STAGE-1" in lines
    assert f"-A OVSDRIVER-FORWARD -o fwc-1 {c1} -j DOCKER-ISOLATION-STAGE-1" not in lines
    assert "-I DOCKER-ISOLATION-STAGE-2 1 -j OVSDRIVER-ISOLATION-2" in lines
    assert "DOCKER-ISOLATION" not in "\n".join(script([network(1)], 4))


def test_an_internal_network_only_drops():
    lines = script([network(1, internal=True)])
    ours = [line for line in lines if line.startswith("-A")]
    assert all(line.endswith("-j DROP") for line in ours[1:])
    assert len(ours) == 5  # the jump to stage 1, in, out, from pool, to pool


def test_rules_grow_linearly_with_networks():
    for count in (1, 10, 40):
        nets = check_networks(
            [
                attr.evolve(
                    network(1), network_id=f"{n:012x}", ifname=f"n{n}", ipv4=[f"10.{n}.0.0/16"]
                )
                for n in range(count)
            ]
        )
        chains = rules(nets, 4)
        assert len(chains["filter", "OVSDRIVER-ISOLATION-1"]) == count
        assert len(chains["filter", "OVSDRIVER-ISOLATION-2"]) == 1 + count
        assert len(chains["filter", "OVSDRIVER-FORWARD"]) == 1 + 3 * count


def test_a_routed_network_accepts_new_traffic_in_and_is_not_masqueraded():
    lines = script([network(1, nat=False)])
    assert any(
        line.startswith("-A OVSDRIVER-FORWARD -o fwc-1 -m comment") and line.endswith("-j ACCEPT")
        for line in lines
    )
    assert not any("! -o fwc-1" in line and "MASQUERADE" in line for line in lines)


def test_the_forward_jump_goes_after_docker_user():
    present = Present(forward=("-A FORWARD -j DOCKER-USER",))
    assert "-I FORWARD 2 -j OVSDRIVER-FORWARD" in script([network(1)], 4, present)


def test_a_misplaced_or_duplicated_jump_is_put_back_once():
    # A dockerd restart puts its own jumps first; a second copy of ours must go.
    saved = "\n".join(
        [
            "*filter",
            ":OVSDRIVER-FORWARD - [0:0]",
            "-A FORWARD -j DOCKER-USER",
            "-A FORWARD -j DOCKER-FORWARD",
            "-A FORWARD -j OVSDRIVER-FORWARD",
            "-A INPUT -j OVSDRIVER-INPUT",
            "-A INPUT -j OVSDRIVER-INPUT",
            "COMMIT",
            "*nat",
            "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
            "COMMIT",
        ]
    )
    lines = script([network(1)], 4, parse_save(saved, 4))
    changes = [line for line in lines if line.startswith(("-I", "-D"))]
    assert changes == [
        "-D FORWARD -j OVSDRIVER-FORWARD",
        "-D INPUT -j OVSDRIVER-INPUT",
        "-I FORWARD 2 -j OVSDRIVER-FORWARD",
        # an older driver's OUTPUT jump that skipped loopback is replaced
        "-D OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I OUTPUT 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I POSTROUTING 1 -j OVSDRIVER-POSTROUTING",
    ]


def test_existing_jumps_are_not_added_again():
    saved = "\n".join(
        [
            "*filter",
            ":FORWARD DROP [0:0]",
            ":OVSDRIVER-FORWARD - [0:0]",
            "-A FORWARD -j DOCKER-USER",
            "-A FORWARD -j OVSDRIVER-FORWARD",
            "COMMIT",
            "*nat",
            "-A POSTROUTING -j OVSDRIVER-POSTROUTING",
            "COMMIT",
        ]
    )
    lines = script([network(1)], 4, parse_save(saved, 4))
    assert [line for line in lines if line.startswith("-I")] == [
        "-I INPUT 1 -j OVSDRIVER-INPUT",
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I OUTPUT 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
    ]


def test_parse_save_counts_only_our_own_jumps():
    saved = "\n".join(
        [
            "*filter",
            ":OVSDRIVER-ISOLATION-2 - [0:0]",
            "-A FORWARD -i x -j ACCEPT",
            "-A FORWARD -j OVSDRIVER-ISOLATION-2",  # foreign, into our chain
            "-A FORWARD -j OVSDRIVER-FORWARD",
            "-A USERCHAIN -j OVSDRIVER-FORWARD",
            "COMMIT",
        ]
    )
    present = parse_save(saved, 4)
    assert present.jumps == (("filter", "FORWARD", "-A FORWARD -j OVSDRIVER-FORWARD"),)
    assert present.chains == {("filter", "OVSDRIVER-ISOLATION-2")}
    assert present.forward_first == "-A FORWARD -i x -j ACCEPT"


def test_nothing_left_removes_our_jumps_and_chains():
    saved = "\n".join(
        [
            "*filter",
            ":OVSDRIVER-FORWARD - [0:0]",
            "-A FORWARD -j OVSDRIVER-FORWARD",
            "COMMIT",
            "*nat",
            "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
            "COMMIT",
        ]
    )
    lines = script([], 4, parse_save(saved, 4))
    assert "-D FORWARD -j OVSDRIVER-FORWARD" in lines
    assert "-D OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT" in lines
    assert [line for line in lines if line.startswith("-X")] == [
        "-X OVSDRIVER-FORWARD",
        "-X OVSDRIVER-ISOLATION-1",
        "-X OVSDRIVER-ISOLATION-2",
        "-X OVSDRIVER-INPUT",
        "-X OVSDRIVER-DNAT",
        "-X OVSDRIVER-POSTROUTING",
    ]
    assert not any(line.startswith(("-A", "-I")) for line in lines)


def test_check_networks_makes_internal_networks_plain():
    [net] = check_networks([network(1, internal=True, nat=True, published=[tcp(1, "10.0.0.1", 1)])])
    assert net.nat is False and net.published == ()


def test_check_networks_refuses_a_port_given_as_bool_or_text():
    with pytest.raises(FirewallError, match="host port"):
        check_networks([network(1, published=[tcp(True, "10.91.0.2", 80)])])
    with pytest.raises(FirewallError, match="host port '80'"):
        check_networks([network(1, published=[tcp("80", "10.91.0.2", 80)])])


def test_forwarding_families():
    nets = check_networks(
        [network(1, internal=True, ipv6=["fd00::/64"]), network(2, ipv4=[], ipv6=["fd01::/64"])]
    )
    assert firewall.forwarding_families(nets) == {6}


# -- the commands --------------------------------------------------------------------


class Recording(Firewall):
    """A Firewall whose commands are recorded and answered by the test."""

    def __init__(self, saved=("", "")):
        super().__init__(reactor=None)
        self.saved = {"iptables-save": saved[0], "ip6tables-save": saved[1]}
        self.commands = []
        self.pending = []  # Deferreds of commands when hold is True
        self.hold = False
        self.failures = {}  # tool name -> message
        self.forwarded = []
        self.localnet = []

    def run(self, argv, stdin=None):
        name = argv[0].rsplit("/", 1)[-1]
        self.commands.append((name, argv[1:], stdin))
        if name in self.failures:
            return defer.fail(FirewallError(f"{name} failed: {self.failures[name]}"))
        out = self.saved.get(name, "").encode()
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, out))
            return d
        return defer.succeed(out)

    async def enable_forwarding(self, family):
        self.forwarded.append(family)

    async def enable_route_localnet(self, ifname):
        self.localnet.append(ifname)


@pytest.fixture(autouse=True)
def _tools(monkeypatch):
    """Plain ``iptables-save``... only, unless a test installs both kinds."""
    monkeypatch.setattr(
        firewall,
        "which",
        lambda name: None if "-nft-" in name or "-legacy-" in name else f"/usr/sbin/{name}",
    )


@pytest.fixture
def both_kinds(monkeypatch):
    """iptables-nft and iptables-legacy installed, ``iptables`` the former."""
    monkeypatch.setattr(firewall, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(firewall, "kind_of", lambda path: "nft")


ENGINE_CHAINS = (
    "*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n"
)


@pytest.mark.parametrize(
    "nft, legacy, kind",
    [
        ("", ENGINE_CHAINS, "legacy"),  # the engine's chains decide
        (ENGINE_CHAINS, "", "nft"),
        ("", "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n", "legacy"),  # others' rules
        ("", "", "nft"),  # nothing anywhere: what iptables is
        (ENGINE_CHAINS, ENGINE_CHAINS, "nft"),
    ],
)
def test_the_rules_go_where_the_engines_or_others_rules_are(both_kinds, nft, legacy, kind):
    fw = Recording()
    fw.saved = {"iptables-nft-save": nft, "iptables-legacy-save": legacy}
    result_of(fw.apply([network(1, ipv6=["fd00::/64"])]))
    restores = [name for name, _, _ in fw.commands if name.endswith("-restore")]
    assert restores == [f"iptables-{kind}-restore", f"ip6tables-{kind}-restore"]


def test_a_kind_that_cannot_be_read_is_not_chosen(both_kinds):
    fw = Recording()
    fw.saved = {"iptables-nft-save": "", "iptables-legacy-save": ENGINE_CHAINS}
    fw.failures["iptables-legacy-save"] = "can't initialize iptables table `filter'"
    result_of(fw.apply([network(1)]))
    assert "iptables-nft-restore" in names(fw)


def test_the_rules_move_when_the_engines_chains_appear_in_the_other_kind(both_kinds):
    fw = Recording()
    fw.saved = {"iptables-nft-save": "", "iptables-legacy-save": ""}
    result_of(fw.apply([network(1)]))
    assert "iptables-nft-restore" in names(fw)
    ours = kernel_text([network(1)])
    fw.saved = {"iptables-nft-save": ours, "iptables-legacy-save": ENGINE_CHAINS}
    del fw.commands[:]
    assert result_of(fw.check()) == ["the rules moved to iptables-legacy"]
    restores = [(name, stdin) for name, _, stdin in fw.commands if name.endswith("-restore")]
    assert [name for name, _ in restores] == ["iptables-nft-restore", "iptables-legacy-restore"]
    assert b"-X OVSDRIVER-FORWARD" in restores[0][1]  # taken out of nftables
    assert b":OVSDRIVER-FORWARD - [0:0]" in restores[1][1]
    fw.saved["iptables-legacy-save"] = ENGINE_CHAINS + kernel_text([network(1)])
    fw.saved["iptables-nft-save"] = ""
    del fw.commands[:]
    assert result_of(fw.check()) == []  # settled there
    assert [name for name, _, _ in fw.commands] == ["iptables-nft-save", "iptables-legacy-save"]


def test_apply_reads_then_restores_each_family_with_argument_lists():
    fw = Recording()
    result_of(fw.apply([network(1, ipv6=["fd00::/64"])]))
    assert [(name, args) for name, args, _ in fw.commands] == [
        ("iptables-save", []),
        ("iptables-restore", ["--noflush", "-w"]),
        ("ip6tables-save", []),
        ("ip6tables-restore", ["--noflush", "-w"]),
    ]
    assert fw.commands[1][2].startswith(b"*filter\n:OVSDRIVER-FORWARD - [0:0]\n")
    assert fw.forwarded == [4, 6]


def test_apply_nothing_with_nothing_in_place_only_reads():
    fw = Recording()
    result_of(fw.apply([]))
    assert [name for name, _, _ in fw.commands] == ["iptables-save", "ip6tables-save"]
    assert fw.forwarded == []


def test_a_family_that_is_not_needed_may_be_unavailable():
    fw = Recording()
    fw.failures["ip6tables-save"] = "ip6tables: no IPv6 here"
    result_of(fw.apply([network(1)]))
    assert fw.forwarded == [4]


def test_a_failed_restore_is_an_error_that_names_the_family_and_the_tool():
    fw = Recording()
    fw.failures["iptables-restore"] = "line 3: RULE_APPEND failed"
    with pytest.raises(FirewallError) as caught:
        result_of(fw.apply([network(1)]))
    assert str(caught.value) == (
        "cannot update the IPv4 firewall rules: iptables-restore failed: line 3: RULE_APPEND failed"
        " (see the driver's log and iptables-save for the conflicting rule)"
    )
    assert fw.forwarded == []  # never forwarding without the rules in place


def test_a_missing_iptables_is_named(monkeypatch):
    monkeypatch.setattr(firewall, "which", lambda name: None)
    fw = Recording()
    with pytest.raises(FirewallError, match="iptables-save is not installed"):
        result_of(fw.apply([network(1)]))
    result_of(fw.apply([]))  # nothing wanted: nothing to complain about


def test_invalid_state_fails_before_running_anything():
    fw = Recording()
    with pytest.raises(FirewallError, match="interface"):
        result_of(fw.apply([attr.evolve(network(1), ifname="a b")]))
    assert fw.commands == []


def test_applies_run_one_after_the_other():
    fw = Recording()
    fw.hold = True
    first = fw.apply([network(1)])
    second = fw.apply([network(2)])
    assert [name for name, _, _ in fw.commands] == ["iptables-save"]
    while fw.pending:
        d, out = fw.pending.pop(0)
        d.callback(out)
    result_of(first)
    result_of(second)
    restores = [stdin for name, _, stdin in fw.commands if name == "iptables-restore"]
    assert [b"fwc-1" in s for s in restores] == [True, False]
    assert [b"fwc-2" in s for s in restores] == [False, True]


def test_netns_runs_commands_through_nsenter(monkeypatch):
    seen = []
    fw = Firewall(reactor=None, netns="blue")
    monkeypatch.setattr(fw, "_in_thread", lambda fn, *args: seen.append(args) or defer.succeed(b""))
    result_of(fw.run(["/usr/sbin/iptables-save"]))
    name, argv, stdin, _env, _timeout, _started = seen[0]
    assert name == "iptables-save"
    assert argv == ["/usr/sbin/nsenter", "--net=/run/netns/blue", "--", "/usr/sbin/iptables-save"]
    assert Firewall(reactor=None, netns="/proc/1/ns/net").netns == "/proc/1/ns/net"


def test_enable_writes_one_only_when_needed(tmp_path):
    path = tmp_path / "ip_forward"
    path.write_text("0\n")
    assert firewall._enable(str(path)) is True
    assert path.read_text() == "1\n"
    assert firewall._enable(str(path)) is False
    with pytest.raises(
        FirewallError, match="cannot turn on IP forwarding: .* run the driver as root"
    ):
        firewall._enable(str(tmp_path / "missing" / "ip_forward"))


# -- restoring at startup -----------------------------------------------------------


def test_restorer_syncs_once_at_start():
    clock, calls = Clock(), []
    restorer = FirewallRestorer(clock, lambda: calls.append(1))
    restorer.startService()
    assert calls == []  # not inside startService: OVSDB is not connected yet
    clock.advance(0)
    assert calls == [1] and restorer.done
    clock.advance(100)
    assert calls == [1]


def test_restorer_retries_with_growing_delays_until_it_works():
    clock, calls = Clock(), []

    def sync():
        calls.append(clock.seconds())
        if len(calls) < 4:
            raise FirewallError("not yet")

    restorer = FirewallRestorer(clock, sync)
    restorer.startService()
    clock.pump([0] + [0.5] * 20)
    assert calls == [0, 1, 3, 7]
    assert restorer.done


def test_restorer_stops_retrying_when_stopped():
    clock, calls = Clock(), []
    restorer = FirewallRestorer(clock, lambda: calls.append(1) or defer.fail(FirewallError("x")))
    restorer.startService()
    clock.advance(0)
    restorer.stopService()
    clock.advance(100)
    assert calls == [1] and not clock.getDelayedCalls()


# -- doing nothing when nothing changed (issue 9), healing (issue 7) -------------------


def kernel_text(networks, family=4, docker=False):
    """``iptables-save`` of a kernel holding exactly our rules for *networks*."""
    chains = firewall.written(check_networks(networks), family, docker)
    lines = []
    for table, names in firewall.CHAINS[family].items():
        lines.append(f"*{table}")
        lines += [f":{name} - [0:0]" for name in names]
        lines += [line for t, _, line in firewall.jumps(family, docker) if t == table]
        for name in names:
            lines += chains[table, name]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def names(fw):
    return [name for name, _, _ in fw.commands]


def test_the_same_state_again_runs_no_command():
    fw = Recording()
    state = [network(1, published=[tcp(8080, "10.91.0.2", 80)])]
    result_of(fw.apply(state))
    before = len(fw.commands)
    for _ in range(3):
        result_of(fw.apply(list(state)))
    assert len(fw.commands) == before
    assert fw.forwarded == [4]  # forwarding checked once, not on every apply


def test_a_change_rewrites_only_the_changed_chains_in_one_restore():
    fw = Recording()
    result_of(fw.apply([network(1), network(2)]))
    fw.commands.clear()
    result_of(fw.apply([network(1, published=[tcp(8080, "10.91.0.2", 80)]), network(2)]))
    assert names(fw) == ["iptables-restore"]  # no save, no IPv6 at all
    script = fw.commands[0][2].decode().splitlines()
    declared = [line for line in script if line.startswith(":")]
    assert declared == [":OVSDRIVER-FORWARD - [0:0]", ":OVSDRIVER-DNAT - [0:0]"]
    assert not any(line.startswith(("-I", "-D", "-X")) for line in script)
    assert "fwc-2" in "\n".join(script)  # the whole chain is refilled


def test_publishing_nothing_new_on_a_running_network_runs_nothing():
    fw = Recording()
    result_of(fw.apply([network(1, ipv6=["fd00:91::/64"])]))
    fw.commands.clear()
    result_of(fw.apply([network(1, ipv6=["fd00:91::/64"], published=[])]))
    assert fw.commands == []


def test_a_failed_partial_update_falls_back_to_a_full_rewrite():
    fw = Recording()
    result_of(fw.apply([network(1)]))
    fw.commands.clear()
    failures = iter(["line 2: RULE_APPEND failed"])

    def run(argv, stdin=None):
        name = argv[0].rsplit("/", 1)[-1]
        fw.commands.append((name, argv[1:], stdin))
        if name == "iptables-restore" and (message := next(failures, None)):
            return defer.fail(FirewallError(f"{name} failed: {message}"))
        return defer.succeed(b"")

    fw.run = run
    result_of(fw.apply([network(2)]))
    assert names(fw) == ["iptables-restore", "iptables-save", "iptables-restore"]
    fw.commands.clear()
    result_of(fw.apply([network(2)]))
    assert fw.commands == []


def test_route_localnet_is_set_once_per_interface_that_publishes_on_loopback():
    fw = Recording()
    localnet = fw.localnet
    result_of(fw.apply([network(1, published=[tcp(8080, "10.91.0.2", 80, "192.0.2.1")])]))
    assert localnet == []
    result_of(fw.apply([network(1, published=[tcp(8080, "10.91.0.2", 80, "127.0.0.1")])]))
    result_of(fw.apply([network(1, published=[tcp(8080, "10.91.0.2", 80)])]))
    assert localnet == ["fwc-1"]
    result_of(fw.apply([]))
    result_of(fw.apply([network(1, published=[tcp(8080, "10.91.0.2", 80)])]))
    assert localnet == ["fwc-1", "fwc-1"]  # the interface may be a new one


def test_an_interface_made_anew_gets_route_localnet_again_if_it_needs_it():
    fw = Recording()
    result_of(fw.interface_made_anew("fwc-1"))  # before any rules: nothing to do
    on_loopback = network(1, published=[tcp(8080, "10.91.0.2", 80)])
    result_of(fw.apply([on_loopback, network(2)]))
    assert fw.localnet == ["fwc-1"]
    fw.commands.clear()
    result_of(fw.interface_made_anew("fwc-1"))
    result_of(fw.interface_made_anew("fwc-2"))  # publishes nothing on loopback
    assert fw.localnet == ["fwc-1", "fwc-1"]
    assert fw.commands == []  # the rules are untouched


def test_check_with_everything_in_place_only_reads():
    state = [network(1, published=[tcp(8080, "10.91.0.2", 80)])]
    fw = Recording(saved=(kernel_text(state), ""))
    result_of(fw.apply(state))
    fw.commands.clear()
    assert result_of(fw.check()) == []
    assert names(fw) == ["iptables-save"]  # no IPv6 in use: not even read
    assert fw.heals == 0


def test_check_before_any_apply_does_nothing():
    fw = Recording()
    assert result_of(fw.check()) == [] and fw.commands == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda t: "", "chain filter OVSDRIVER-FORWARD is missing"),
        (
            lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("-A OVSDRIVER-DNAT")),
            "chain nat OVSDRIVER-DNAT has 0 rules instead of 1",
        ),
        (
            lambda t: t.replace("-A FORWARD -j OVSDRIVER-FORWARD", ""),
            "the jump '-A FORWARD -j OVSDRIVER-FORWARD' is there 0 times",
        ),
        (
            lambda t: t.replace("*filter\n", "*filter\n-A FORWARD -j DOCKER-FORWARD\n"),
            "the jump '-A FORWARD -j OVSDRIVER-FORWARD' is not first",
        ),
        (
            lambda t: t.replace(
                "-A POSTROUTING -j OVSDRIVER-POSTROUTING",
                "-A POSTROUTING -j OVSDRIVER-POSTROUTING\n-A POSTROUTING -j OVSDRIVER-POSTROUTING",
            ),
            "the jump '-A POSTROUTING -j OVSDRIVER-POSTROUTING' is there 2 times",
        ),
        (
            lambda t: t.replace(
                "*filter\n",
                "*filter\n:DOCKER-ISOLATION-STAGE-1 - [0:0]\n:DOCKER-ISOLATION-STAGE-2 - [0:0]\n",
            ),
            "Docker's isolation chains appeared",
        ),
    ],
)
def test_check_rewrites_what_was_changed_from_outside(damage, problem):
    state = [network(1, published=[tcp(8080, "10.91.0.2", 80)])]
    fw = Recording(saved=(kernel_text(state), ""))
    result_of(fw.apply(state))
    fw.saved["iptables-save"] = damage(kernel_text(state))
    fw.commands.clear()
    found = result_of(fw.check())
    assert any(f.startswith(f"IPv4: {problem}") for f in found), found
    assert names(fw) == ["iptables-save", "iptables-save", "iptables-restore"]
    restored = fw.commands[-1][2].decode().splitlines()
    # What the rewrite puts back is what a first apply on that kernel would.
    assert restored == script(state, 4, parse_save(fw.saved["iptables-save"], 4))
    assert fw.heals == 1


def test_a_failing_check_is_reported_and_the_next_one_tries_again():
    fw = Recording()
    result_of(fw.apply([network(1)]))
    fw.failures["iptables-save"] = "iptables: permission denied"
    with pytest.raises(FirewallError, match="permission denied"):
        result_of(fw.check())


def test_failures_name_the_fix():
    assert "root" in firewall._hint("iptables-restore failed: Permission denied (you must be root)")
    assert "modprobe" in firewall._hint("iptables-restore: Couldn't load match `conntrack'")
    assert "xtables lock" in firewall._hint("Another app is currently holding the xtables lock")


def test_healer_checks_every_interval_and_survives_failures():
    clock = Clock()

    class Checked:
        calls = 0

        def check(self):
            self.calls += 1
            if self.calls == 2:
                return defer.fail(FirewallError("iptables-save failed: boom"))
            return defer.succeed([])

    checked = Checked()
    healer = firewall.FirewallHealer(clock, checked, interval=3)
    healer.startService()
    clock.advance(2.9)
    assert checked.calls == 0
    for _ in range(3):
        clock.advance(3)
    assert checked.calls == 3
    healer.stopService()
    clock.advance(30)
    assert checked.calls == 3 and not clock.getDelayedCalls()


class Watched:
    """A firewall whose checks are counted (each one's Deferred kept), and
    a watch of it whose announcements the test makes."""

    def __init__(self, watching=True):
        self.checks = []
        self.settled = True
        self.announced = True
        self.watching = watching
        self.stopped = False

    def check(self):
        self.checks.append(defer.Deferred())
        return self.checks[-1]

    def finish(self):
        self.checks[-1].callback([])

    # the watch
    def start(self, changed, lost):
        self.changed, self.lost = changed, lost
        return defer.succeed(None) if self.watching else defer.fail(OSError("not permitted"))

    def stop(self):
        self.stopped = True


def healer_of(watched, clock):
    healer = firewall.FirewallHealer(clock, watched, interval=3, watch=watched)
    healer.startService()
    clock.advance(3)  # the check after the start
    watched.finish()
    return healer


def test_with_a_watch_the_rules_are_read_only_after_a_change():
    clock, watched = Clock(), Watched()
    healer = healer_of(watched, clock)
    clock.advance(60)
    assert len(watched.checks) == 1  # nothing changed: nothing read
    watched.changed()
    clock.advance(0.2)
    watched.changed()  # the rest of the burst
    clock.advance(0.29)
    assert len(watched.checks) == 1
    clock.advance(0.01)  # settle (0.5 s) after the first announcement
    assert len(watched.checks) == 2
    watched.finish()
    clock.advance(60)
    assert len(watched.checks) == 2
    healer.stopService()
    assert watched.stopped and not clock.getDelayedCalls()


def test_changes_are_read_at_most_once_an_interval():
    clock, watched = Clock(), Watched()
    healer_of(watched, clock)
    for _ in range(35):  # a program that changes rules every 0.1 s
        watched.changed()
        clock.advance(0.1)
        if not watched.checks[-1].called:
            watched.finish()
    assert len(watched.checks) == 2  # 3 s after the first check, not 35
    watched.changed()
    clock.advance(3)
    assert len(watched.checks) == 3


def test_a_change_while_reading_is_read_again():
    clock, watched = Clock(), Watched()
    healer_of(watched, clock)
    clock.advance(10)
    watched.changed()
    clock.advance(0.5)
    assert len(watched.checks) == 2
    watched.changed()  # while the second check runs (its own rewrite, say)
    watched.finish()
    clock.advance(3)
    assert len(watched.checks) == 3


def test_an_update_that_failed_is_retried_every_interval_with_a_watch_too():
    clock, watched = Clock(), Watched()
    healer_of(watched, clock)
    watched.settled = False  # the driver's last update failed
    clock.advance(3)
    assert len(watched.checks) == 2
    watched.checks[-1].errback(FirewallError("iptables-restore failed: busy"))
    watched.settled = True
    clock.advance(3)
    assert len(watched.checks) == 3  # a check that failed is made again
    watched.finish()
    clock.advance(30)
    assert len(watched.checks) == 3


@pytest.mark.parametrize("how", ["cannot start", "stops later"])
def test_without_a_working_watch_the_rules_are_read_every_interval(how):
    clock, watched = Clock(), Watched(watching=how != "cannot start")
    healer_of(watched, clock)
    if how == "stops later":
        clock.advance(30)
        assert len(watched.checks) == 1
        watched.lost(OSError("No buffer space"))
    for _ in range(3):
        clock.advance(3)
        watched.finish()
    assert len(watched.checks) == 4


def test_the_kind_of_an_iptables_is_where_its_symlinks_end(tmp_path):
    for multi in ("xtables-nft-multi", "xtables-legacy-multi"):
        (tmp_path / multi).touch()
    (tmp_path / "alternative").symlink_to(tmp_path / "xtables-nft-multi")
    (tmp_path / "iptables-restore").symlink_to(tmp_path / "alternative")
    (tmp_path / "iptables-legacy-restore").symlink_to(tmp_path / "xtables-legacy-multi")
    assert firewall.kind_of(str(tmp_path / "iptables-restore")) == "nft"
    assert firewall.kind_of(str(tmp_path / "iptables-legacy-restore")) == "legacy"


def test_with_iptables_legacy_in_use_the_rules_are_read_every_interval():
    clock, watched = Clock(), Watched()
    healer_of(watched, clock)
    watched.announced = False  # x_tables holds a table: its changes go unannounced
    for _ in range(3):
        clock.advance(3)
        watched.finish()
    assert len(watched.checks) == 4


def test_the_forward_jump_follows_docker_user_wherever_that_is():
    # Seen after a dockerd restart: its isolation jump came back before DOCKER-USER.
    present = Present(
        forward=("-A FORWARD -j DOCKER-ISOLATION-STAGE-1", "-A FORWARD -j DOCKER-USER")
    )
    assert "-I FORWARD 3 -j OVSDRIVER-FORWARD" in script([network(1)], 4, present)
    text = kernel_text([network(1)]).replace(
        "-A FORWARD -j OVSDRIVER-FORWARD",
        "-A FORWARD -j OVSDRIVER-FORWARD\n-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n"
        "-A FORWARD -j DOCKER-USER",
    )
    chains = firewall.written(check_networks([network(1)]), 4, False)
    problems = firewall.drift(parse_save(text, 4), chains, 4, False)
    assert problems == [
        "the jump '-A FORWARD -j OVSDRIVER-FORWARD' is not first (or right after DOCKER-USER)"
    ]


@pytest.mark.parametrize("after", [1, 2, 3])
def test_copies_of_the_docker_user_jump_before_ours_are_not_drift(after):
    # Seen with networks created at once: the engine deletes and re-inserts
    # its DOCKER-USER jump for each, and leaves copies of it around ours.
    user = "-A FORWARD -j DOCKER-USER"
    ours = "-A FORWARD -j OVSDRIVER-FORWARD"
    forward = [user] * 3
    forward.insert(after, ours)
    text = kernel_text([network(1)]).replace(ours, "\n".join(forward))
    present = parse_save(text, 4)
    chains = firewall.written(check_networks([network(1)]), 4, False)
    assert firewall.drift(present, chains, 4, False) == []
    assert not [line for line in script([network(1)], 4, present) if line.startswith(("-I", "-D"))]


def test_our_jump_before_the_docker_user_jump_is_drift():
    text = kernel_text([network(1)]).replace(
        "-A FORWARD -j OVSDRIVER-FORWARD",
        "-A FORWARD -j OVSDRIVER-FORWARD\n-A FORWARD -j DOCKER-USER",
    )
    chains = firewall.written(check_networks([network(1)]), 4, False)
    problems = firewall.drift(parse_save(text, 4), chains, 4, False)
    assert problems == [
        "the jump '-A FORWARD -j OVSDRIVER-FORWARD' is not first (or right after DOCKER-USER)"
    ]


@pytest.mark.parametrize("token", ["a b", "", "x;y", '--comment="x"', "é"])
def test_a_rule_token_that_is_not_a_plain_word_is_refused(token):
    with pytest.raises(FirewallError, match="refusing to write the unexpected rule token"):
        firewall._line(("-A", "OVSDRIVER-DNAT", token, "-j", "RETURN"))
    assert firewall._line(("-A", "OVSDRIVER-DNAT", "-j", "RETURN")) == "-A OVSDRIVER-DNAT -j RETURN"
