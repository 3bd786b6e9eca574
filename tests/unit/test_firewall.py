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
        "-A OVSDRIVER-FORWARD -j OVSDRIVER-ISOLATION-1",
        f"-A OVSDRIVER-FORWARD -o fwc-1 -m conntrack --ctstate RELATED,ESTABLISHED {c} -j ACCEPT",
        f"-A OVSDRIVER-FORWARD -i fwc-1 {c} -j ACCEPT",
        "-A OVSDRIVER-FORWARD -d 10.91.0.2/32 -o fwc-1 -p tcp -m tcp --dport 80"
        f" -m conntrack --ctstate DNAT {c} -j ACCEPT",
        f"-A OVSDRIVER-FORWARD -o fwc-1 {c} -j DROP",
        f"-A OVSDRIVER-ISOLATION-1 -i fwc-1 ! -o fwc-1 {c} -j OVSDRIVER-ISOLATION-2",
        f"-A OVSDRIVER-ISOLATION-2 -o fwc-1 {c} -j DROP",
        "-I FORWARD 1 -j OVSDRIVER-FORWARD",
        "COMMIT",
        "*nat",
        ":OVSDRIVER-DNAT - [0:0]",
        ":OVSDRIVER-POSTROUTING - [0:0]",
        f"-A OVSDRIVER-DNAT -d 192.0.2.1/32 -p tcp -m tcp --dport 8080 {c}"
        " -j DNAT --to-destination 10.91.0.2:80",
        f"-A OVSDRIVER-POSTROUTING -s 10.91.0.0/24 ! -o fwc-1 {c} -j MASQUERADE",
        f"-A OVSDRIVER-POSTROUTING -s 10.91.0.0/24 -o fwc-1 -m conntrack --ctstate DNAT {c}"
        " -j MASQUERADE",
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I OUTPUT 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I POSTROUTING 1 -j OVSDRIVER-POSTROUTING",
        "COMMIT",
    ]


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
        assert len(chains["filter", "OVSDRIVER-ISOLATION-2"]) == count
        assert len(chains["filter", "OVSDRIVER-FORWARD"]) == 1 + 3 * count


def test_a_routed_network_accepts_new_traffic_in_and_is_not_masqueraded():
    lines = script([network(1, nat=False)])
    assert any(
        line.startswith("-A OVSDRIVER-FORWARD -o fwc-1 -m comment") and line.endswith("-j ACCEPT")
        for line in lines
    )
    assert not any("! -o fwc-1" in line and "MASQUERADE" in line for line in lines)


def test_ipv6_has_no_dnat_chain_and_no_hairpin():
    lines = script([network(1, ipv6=["fd00:91::/64"], published=[udp(53, "10.91.0.2", 53)])], 6)
    text = "\n".join(lines)
    assert "DNAT" not in text and "10.91" not in text
    assert "-A OVSDRIVER-POSTROUTING -s fd00:91::/64 ! -o fwc-1" in text


def test_the_forward_jump_goes_after_docker_user():
    present = Present(forward_first="-A FORWARD -j DOCKER-USER")
    assert "-I FORWARD 2 -j OVSDRIVER-FORWARD" in script([network(1)], 4, present)


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
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
        "-I OUTPUT 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j OVSDRIVER-DNAT",
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


@pytest.fixture(autouse=True)
def _tools(monkeypatch):
    monkeypatch.setattr(firewall, "which", lambda name: f"/usr/sbin/{name}")


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
    name, argv, stdin, _env, _timeout = seen[0]
    assert name == "iptables-save"
    assert argv == ["/usr/sbin/nsenter", "--net=/run/netns/blue", "--", "/usr/sbin/iptables-save"]
    assert Firewall(reactor=None, netns="/proc/1/ns/net").netns == "/proc/1/ns/net"


def test_enable_writes_one_only_when_needed(tmp_path):
    path = tmp_path / "ip_forward"
    path.write_text("0\n")
    assert firewall._enable(str(path)) is True
    assert path.read_text() == "1\n"
    assert firewall._enable(str(path)) is False
    with pytest.raises(FirewallError, match="cannot turn on forwarding"):
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
