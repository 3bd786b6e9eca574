"""The behaviour every implementation of the netlink port must have.

`NetlinkContract` is mixed into one test class per implementation (the real
`ovsdriver.netlink.Netlink` in a throwaway network namespace, and
`ovsdriver.testing.FakeNetlink`), so the fake cannot drift from the real thing.
"""

import ipaddress
import time

import attr
import pytest
from twisted.internet import defer

from ovsdriver.netlink import LinkError


@attr.s(frozen=True, slots=True)
class LinkView:
    """What a test can see of a link from outside the port."""

    mtu = attr.ib()
    mac = attr.ib()
    up = attr.ib()  # administratively up
    addresses = attr.ib()  # frozenset of normalized CIDR strings
    tx_checksum = attr.ib()  # TX checksum offload on? None: cannot tell


def cidr(text):
    """Normalized CIDR text, as `LinkView.addresses` holds it."""
    return str(ipaddress.ip_interface(text))


class NetlinkContract:
    """Contract tests; a subclass provides ``self.netlink`` and the hooks."""

    netlink = None

    def call(self, method, *args, **kwargs):
        """Call ``method(*args, **kwargs)`` and return its Deferred's result.

        Raises the Deferred's failure. The method is passed, not its Deferred,
        so a real implementation can call it on the reactor thread.
        """
        raise NotImplementedError

    def make_link(self, name):
        """Make a link called *name* appear, outside the port (like OVS would)."""
        raise NotImplementedError

    def make_link_while_waiting(self, name):
        """Make *name* appear a little later, while wait_for_link waits for it."""
        raise NotImplementedError

    def observe(self, name):
        """A `LinkView` of *name*, or None if there is no such link."""
        raise NotImplementedError

    # -- hooks for sandboxes (containers' network namespaces) ------------------

    def make_sandbox(self):
        """Make an empty sandbox (``lo`` only); return its path."""
        raise NotImplementedError

    def make_tap(self, name, mac):
        """Make a tap called *name* with *mac* in the port's namespace, down,
        as ovs-vswitchd makes an internal port with the userspace datapath."""
        raise NotImplementedError

    def make_sandbox_link(self, sandbox, name, mac, addresses=(), live=False):
        """Put a link *name* in *sandbox*: up, with *mac* and *addresses*.

        ``live=False``: a tap without carrier (the dead copy an ovs-vswitchd
        restart leaves in a container); ``live=True``: a link with carrier.
        """
        raise NotImplementedError

    def add_sandbox_route(self, sandbox, dst, gateway, dev):
        """Add a route to *dst* (CIDR or "default") via *gateway* on *dev*."""
        raise NotImplementedError

    def observe_in_sandbox(self, sandbox, name):
        """A `LinkView` of link *name* in *sandbox*, or None."""
        raise NotImplementedError

    def sandbox_routes(self, sandbox):
        """The routes in *sandbox* the kernel did not make itself: a frozenset
        of (dst, gateway, dev) with dst a normalized CIDR or "default"."""
        raise NotImplementedError

    def remove_sandbox(self, sandbox):
        """The sandbox goes, as when its container's last process ends and
        the engine unmounts it."""
        raise NotImplementedError

    def fails(self, method, *args, **kwargs):
        """Call like `call`; return the LinkError the call must fail with."""
        with pytest.raises(LinkError) as caught:
            self.call(method, *args, **kwargs)
        return caught.value

    # -- link_exists, links ----------------------------------------------------

    def test_link_exists_is_true_for_an_existing_link(self):
        self.make_link("nlc-a")
        assert self.call(self.netlink.link_exists, "nlc-a") is True

    def test_link_exists_is_false_for_a_missing_link(self):
        assert self.call(self.netlink.link_exists, "nlc-none") is False

    def test_link_mac_is_a_links_mac_in_lower_case_or_none(self):
        self.make_tap("nlc-a", "02:AB:00:00:00:07")
        assert self.call(self.netlink.link_mac, "nlc-a") == "02:ab:00:00:00:07"
        assert self.call(self.netlink.link_mac, "nlc-none") is None

    def test_links_lists_every_link_including_loopback(self):
        self.make_link("nlc-a")
        self.make_link("nlc-b")
        links = self.call(self.netlink.links)
        assert {"lo", "nlc-a", "nlc-b"} <= set(links)
        assert "nlc-none" not in links
        assert len({links["lo"], links["nlc-a"], links["nlc-b"]}) == 3

    def test_a_link_made_anew_has_another_index(self):
        self.make_link("nlc-a")
        before = self.call(self.netlink.links)["nlc-a"]
        self.call(self.netlink.delete_link, "nlc-a")
        self.make_link("nlc-a")
        assert self.call(self.netlink.links)["nlc-a"] != before

    def test_host_links_tell_each_links_addresses_loopback_included(self):
        self.make_link("nlc-a")
        self.call(self.netlink.add_addresses, "nlc-a", ["10.9.0.1/24"])
        links = {link.name: link for link in self.call(self.netlink.host_links)}
        assert cidr("10.9.0.1/24") in set(map(cidr, links["nlc-a"].addresses))
        assert {cidr("127.0.0.1/8"), cidr("::1/128")} <= set(map(cidr, links["lo"].addresses))

    # -- add_addresses / remove_addresses ------------------------------------

    def test_add_addresses_assigns_each_address_and_sets_the_link_up(self):
        self.make_link("nlc-a")
        self.call(self.netlink.add_addresses, "nlc-a", ["10.9.0.1/24", "fd09::1/64"])
        view = self.observe("nlc-a")
        assert {cidr("10.9.0.1/24"), cidr("fd09::1/64")} <= view.addresses
        assert view.up is True

    def test_add_addresses_twice_is_fine_and_says_what_it_added(self):
        self.make_link("nlc-a")
        addresses = ["10.9.0.1/24", "fd09::1/64"]
        assert self.call(self.netlink.add_addresses, "nlc-a", addresses[:1]) == addresses[:1]
        assert self.call(self.netlink.add_addresses, "nlc-a", addresses) == addresses[1:]
        assert self.call(self.netlink.add_addresses, "nlc-a", addresses) == []
        view = self.observe("nlc-a")
        assert {cidr("10.9.0.1/24"), cidr("fd09::1/64")} <= view.addresses
        assert view.up is True

    def test_add_addresses_to_a_missing_link_fails_naming_it(self):
        error = self.fails(self.netlink.add_addresses, "nlc-none", ["10.9.0.1/24"])
        assert "nlc-none" in str(error)

    def test_add_addresses_refuses_a_malformed_address_naming_it(self):
        self.make_link("nlc-a")
        error = self.fails(self.netlink.add_addresses, "nlc-a", ["10.9.0.300/24"])
        assert "10.9.0.300/24" in str(error)
        assert "nlc-a" in str(error)

    def test_remove_addresses_removes_only_the_given_addresses(self):
        self.make_link("nlc-a")
        self.call(self.netlink.add_addresses, "nlc-a", ["10.9.0.1/24", "10.9.1.1/24"])
        self.call(self.netlink.remove_addresses, "nlc-a", ["10.9.0.1/24"])
        addresses = self.observe("nlc-a").addresses
        assert cidr("10.9.0.1/24") not in addresses
        assert cidr("10.9.1.1/24") in addresses

    def test_remove_addresses_twice_is_fine(self):
        self.make_link("nlc-a")
        self.call(self.netlink.add_addresses, "nlc-a", ["10.9.0.1/24", "fd09::1/64"])
        for _ in range(2):
            self.call(self.netlink.remove_addresses, "nlc-a", ["10.9.0.1/24", "fd09::1/64"])
        addresses = self.observe("nlc-a").addresses
        assert not {cidr("10.9.0.1/24"), cidr("fd09::1/64")} & addresses

    def test_remove_addresses_from_a_link_without_ipv6_is_fine(self):
        # Below an MTU of 1280 the kernel turns IPv6 off on a link: an undo
        # then finds no IPv6 address to remove, and removes the others.
        self.make_link("nlc-a")
        self.call(self.netlink.set_link, "nlc-a", mtu=1000)
        self.call(self.netlink.add_addresses, "nlc-a", ["10.9.0.1/24"])
        self.call(self.netlink.remove_addresses, "nlc-a", ["fd09::1/64", "10.9.0.1/24"])
        assert cidr("10.9.0.1/24") not in self.observe("nlc-a").addresses

    def test_remove_addresses_from_a_missing_link_is_fine(self):
        self.call(self.netlink.remove_addresses, "nlc-none", ["10.9.0.1/24"])

    # -- set_link -----------------------------------------------------------------

    def test_set_link_changes_mtu_and_mac(self):
        self.make_link("nlc-a")
        self.call(self.netlink.set_link, "nlc-a", mtu=1400, mac="02:00:5e:10:20:30")
        view = self.observe("nlc-a")
        assert (view.mtu, view.mac) == (1400, "02:00:5e:10:20:30")

    def test_set_link_twice_is_fine(self):
        self.make_link("nlc-a")
        for _ in range(2):
            self.call(self.netlink.set_link, "nlc-a", mtu=1400, up=True)
        view = self.observe("nlc-a")
        assert (view.mtu, view.up) == (1400, True)

    def test_set_link_sets_the_link_up_and_down(self):
        self.make_link("nlc-a")
        self.call(self.netlink.set_link, "nlc-a", up=True)
        assert self.observe("nlc-a").up is True
        self.call(self.netlink.set_link, "nlc-a", up=False)
        assert self.observe("nlc-a").up is False

    def test_set_link_leaves_what_is_not_given_alone(self):
        self.make_link("nlc-a")
        before = self.observe("nlc-a")
        self.call(self.netlink.set_link, "nlc-a", mtu=1400)
        after = self.observe("nlc-a")
        assert (after.mac, after.up) == (before.mac, before.up)

    def test_set_link_on_a_missing_link_fails_naming_it(self):
        error = self.fails(self.netlink.set_link, "nlc-none", mtu=1400)
        assert "nlc-none" in str(error)

    def test_set_link_refuses_an_impossible_mtu_naming_the_link(self):
        self.make_link("nlc-a")
        error = self.fails(self.netlink.set_link, "nlc-a", mtu=10)
        assert "nlc-a" in str(error)
        assert "MTU 10" in str(error)

    def test_set_link_refuses_a_malformed_mac_naming_it(self):
        self.make_link("nlc-a")
        error = self.fails(self.netlink.set_link, "nlc-a", mac="02:00:5e:10:20")
        assert "02:00:5e:10:20" in str(error)
        assert "nlc-a" in str(error)

    # -- create_veth / delete_link -------------------------------------------------

    def test_create_veth_makes_both_ends_with_the_mtu(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1450)
        assert {"nlc-h", "nlc-p"} <= set(self.call(self.netlink.links))
        assert self.observe("nlc-h").mtu == 1450
        assert self.observe("nlc-p").mtu == 1450

    def test_create_veth_sets_the_host_end_up(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        assert self.observe("nlc-h").up is True

    def test_create_veth_gives_the_peer_its_mac(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500, peer_mac="02:42:0a:00:00:07")
        assert self.observe("nlc-p").mac == "02:42:0a:00:00:07"

    def test_create_veth_turns_tx_checksum_offload_off_on_the_peer(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        assert self.observe("nlc-p").tx_checksum in (False, None)

    def test_create_veth_can_leave_tx_checksum_offload_on(self):
        # The kernel datapath fills checksums in: offloads (and TSO) stay on.
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500, tx_checksum=True)
        assert self.observe("nlc-p").tx_checksum in (True, None)

    def test_create_veth_again_sets_tx_checksum_offload_as_asked(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500, tx_checksum=True)
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        assert self.observe("nlc-p").tx_checksum in (False, None)

    def test_create_veth_for_an_existing_pair_is_fine(self):
        for _ in range(2):
            self.call(
                self.netlink.create_veth, "nlc-h", "nlc-p", 1400, peer_mac="02:42:0a:00:00:07"
            )
        host, peer = self.observe("nlc-h"), self.observe("nlc-p")
        assert (host.mtu, host.up) == (1400, True)
        assert (peer.mtu, peer.mac) == (1400, "02:42:0a:00:00:07")

    def test_create_veth_when_only_one_end_exists_fails_naming_both(self):
        self.make_link("nlc-h")
        error = self.fails(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        assert "nlc-h" in str(error)
        assert "nlc-p" in str(error)

    def test_create_veth_with_an_impossible_mtu_fails_and_leaves_no_link(self):
        error = self.fails(self.netlink.create_veth, "nlc-h", "nlc-p", 10)
        assert "MTU 10" in str(error)
        assert not {"nlc-h", "nlc-p"} & set(self.call(self.netlink.links))

    def test_create_veth_refuses_a_name_longer_than_the_kernel_allows(self):
        error = self.fails(self.netlink.create_veth, "nlc-h", "x" * 16, 1500)
        assert "x" * 16 in str(error)

    def test_delete_link_removes_both_ends_of_a_veth(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        self.call(self.netlink.delete_link, "nlc-h")
        links = self.call(self.netlink.links)
        assert not {"nlc-h", "nlc-p"} & set(links)
        assert self.call(self.netlink.link_exists, "nlc-p") is False

    def test_delete_link_removes_a_link(self):
        self.make_link("nlc-a")
        self.call(self.netlink.delete_link, "nlc-a")
        assert self.observe("nlc-a") is None

    def test_delete_link_of_a_missing_link_is_fine(self):
        self.call(self.netlink.delete_link, "nlc-none")

    def test_a_pair_made_again_as_it_is_deleted_is_made_after_the_deletion(self):
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)

        def both():
            deleted = self.netlink.delete_link("nlc-h")
            return defer.gatherResults([deleted, self.netlink.create_veth("nlc-h", "nlc-p", 1400)])

        self.call(both)
        assert {"nlc-h", "nlc-p"} <= set(self.call(self.netlink.links))
        assert self.observe("nlc-p").mtu == 1400

    # -- wait_for_link ------------------------------------------------------------

    def test_wait_for_link_succeeds_at_once_for_an_existing_link(self):
        self.make_link("nlc-a")
        started = time.monotonic()
        assert self.call(self.netlink.wait_for_link, "nlc-a", timeout=5.0) is None
        assert time.monotonic() - started < 1.0

    def test_wait_for_link_succeeds_when_the_link_appears_meanwhile(self):
        self.make_link_while_waiting("nlc-late")
        assert self.call(self.netlink.wait_for_link, "nlc-late", timeout=5.0) is None
        assert self.observe("nlc-late") is not None

    def test_wait_for_link_fails_within_its_timeout_naming_the_link(self):
        started = time.monotonic()
        error = self.fails(self.netlink.wait_for_link, "nlc-none", timeout=0.3)
        assert time.monotonic() - started < 0.3 + 1.0
        assert "nlc-none" in str(error)

    # -- sandbox_links ----------------------------------------------------------

    def test_sandbox_links_lists_the_links_inside_a_sandbox(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", "02:00:5e:00:00:01", ["10.9.0.2/24"])
        links = {link.name: link for link in self.call(self.netlink.sandbox_links, sandbox)}
        assert {"lo", "eth0"} <= set(links)
        eth0 = links["eth0"]
        assert (eth0.mac, eth0.mtu, eth0.up, eth0.carrier) == (
            "02:00:5e:00:00:01",
            1500,
            True,
            False,
        )
        assert cidr("10.9.0.2/24") in eth0.addresses
        assert "eth0" not in self.call(self.netlink.links)

    def test_sandbox_links_tells_a_live_link_by_its_carrier(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth1", "02:00:5e:00:00:02", live=True)
        links = {link.name: link for link in self.call(self.netlink.sandbox_links, sandbox)}
        assert links["eth1"].carrier is True

    def test_sandbox_links_of_a_missing_sandbox_fails_naming_it(self):
        missing = self.make_sandbox() + "-gone"
        error = self.fails(self.netlink.sandbox_links, missing)
        assert missing in str(error)

    # -- the primitives of a repair, inside sandboxes -------------------------------

    MAC = "02:00:5e:10:20:30"

    def links_in(self, sandbox):
        """name -> LinkInfo of the links in *sandbox*, through the port."""
        return {link.name: link for link in self.call(self.netlink.sandbox_links, sandbox)}

    def test_sandbox_links_tell_each_links_index_and_routes(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC, ["10.9.0.2/24", "fd09::2/64"])
        self.add_sandbox_route(sandbox, "10.77.0.0/16", "10.9.0.1", "eth0")
        self.add_sandbox_route(sandbox, "default", "10.9.0.1", "eth0")
        self.add_sandbox_route(sandbox, "default", "fd09::1", "eth0")
        links = self.links_in(sandbox)
        assert links["eth0"].index != links["lo"].index
        routes = {(r.family, r.dst, r.gateway) for r in links["eth0"].routes}
        assert routes == {
            (4, "10.77.0.0/16", "10.9.0.1"),
            (4, "default", "10.9.0.1"),
            (6, "default", "fd09::1"),
        }
        assert links["lo"].routes == ()

    def test_move_link_to_netns_moves_a_link_into_a_sandbox(self):
        sandbox = self.make_sandbox()
        self.make_tap("nlc-f", self.MAC)
        self.call(self.netlink.move_link_to_netns, "nlc-f", sandbox)
        assert "nlc-f" not in self.call(self.netlink.links)
        assert self.links_in(sandbox)["nlc-f"].mac == self.MAC
        self.call(self.netlink.move_link_to_netns, "nlc-f", sandbox)  # again: fine

    def test_a_veth_whose_sandbox_went_leaves_no_host_end(self):
        """What makes OVS report a veth port without a host end."""
        sandbox = self.make_sandbox()
        self.call(self.netlink.create_veth, "nlc-h", "nlc-p", 1500)
        self.call(self.netlink.move_link_to_netns, "nlc-p", sandbox)
        self.remove_sandbox(sandbox)
        deadline = time.monotonic() + 10  # the kernel frees a namespace lazily
        while self.call(self.netlink.link_exists, "nlc-h") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.call(self.netlink.link_exists, "nlc-h") is False

    def test_move_link_to_netns_of_a_missing_link_fails_naming_it(self):
        sandbox = self.make_sandbox()
        error = self.fails(self.netlink.move_link_to_netns, "nlc-none", sandbox)
        assert "nlc-none" in str(error)

    def test_move_link_to_netns_into_a_missing_sandbox_fails_naming_it(self):
        missing = self.make_sandbox() + "-gone"
        self.make_tap("nlc-f", self.MAC)
        error = self.fails(self.netlink.move_link_to_netns, "nlc-f", missing)
        assert missing in str(error)
        assert "nlc-f" in self.call(self.netlink.links)

    def test_delete_link_in_deletes_one_link_and_its_routes(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC, ["10.9.0.2/24"])
        self.make_sandbox_link(sandbox, "eth1", "02:00:5e:10:20:31", ["10.8.0.2/24"])
        self.add_sandbox_route(sandbox, "default", "10.9.0.1", "eth0")
        index = self.links_in(sandbox)["eth0"].index
        self.call(self.netlink.delete_link_in, sandbox, index)
        assert set(self.links_in(sandbox)) == {"lo", "eth1"}
        assert self.sandbox_routes(sandbox) == frozenset()
        self.call(self.netlink.delete_link_in, sandbox, index)  # again: fine

    def test_set_link_in_renames_and_configures_a_link(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "nlc-f", "02:00:5e:10:20:31")
        index = self.links_in(sandbox)["nlc-f"].index
        self.call(
            self.netlink.set_link_in, sandbox, index, name="eth3", mac=self.MAC, mtu=1400, up=False
        )
        view = self.observe_in_sandbox(sandbox, "eth3")
        assert (view.mac, view.mtu, view.up) == (self.MAC, 1400, False)
        assert self.observe_in_sandbox(sandbox, "nlc-f") is None
        self.call(self.netlink.set_link_in, sandbox, index, up=True)
        assert self.observe_in_sandbox(sandbox, "eth3").up is True

    def test_set_link_in_to_a_name_in_use_fails_naming_it(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC)
        self.make_sandbox_link(sandbox, "nlc-f", "02:00:5e:10:20:31")
        index = self.links_in(sandbox)["nlc-f"].index
        error = self.fails(self.netlink.set_link_in, sandbox, index, name="eth0")
        assert "eth0" in str(error)

    def test_set_link_in_refuses_a_malformed_mac_naming_it(self):
        sandbox = self.make_sandbox()
        error = self.fails(self.netlink.set_link_in, sandbox, 1, mac="02:00")
        assert "02:00" in str(error)

    def test_add_address_in_adds_an_address_once(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC)
        index = self.links_in(sandbox)["eth0"].index
        for _ in range(2):
            self.call(self.netlink.add_address_in, sandbox, index, "10.9.0.3/24")
            self.call(self.netlink.add_address_in, sandbox, index, "fd09::3/64")
        addresses = self.observe_in_sandbox(sandbox, "eth0").addresses
        assert {cidr("10.9.0.3/24"), cidr("fd09::3/64")} <= addresses

    def test_add_address_in_refuses_a_malformed_address_naming_it(self):
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC)
        index = self.links_in(sandbox)["eth0"].index
        error = self.fails(self.netlink.add_address_in, sandbox, index, "10.9.0.300/24")
        assert "10.9.0.300/24" in str(error)

    def test_add_route_in_gives_back_a_listed_route(self):
        """What sandbox_links lists, add_route_in takes back (after the link
        that held it is gone), also twice."""
        sandbox = self.make_sandbox()
        self.make_sandbox_link(sandbox, "eth0", self.MAC, ["10.9.0.2/24"])
        self.add_sandbox_route(sandbox, "10.77.0.0/16", "10.9.0.1", "eth0")
        self.add_sandbox_route(sandbox, "default", "10.9.0.1", "eth0")
        before = self.sandbox_routes(sandbox)
        dead = self.links_in(sandbox)["eth0"]
        self.make_sandbox_link(sandbox, "eth1", "02:00:5e:10:20:31", live=True)
        self.call(self.netlink.delete_link_in, sandbox, dead.index)
        fresh = self.links_in(sandbox)["eth1"]
        self.call(self.netlink.set_link_in, sandbox, fresh.index, name="eth0", up=True)
        self.call(self.netlink.add_address_in, sandbox, fresh.index, "10.9.0.2/24")
        for _ in range(2):
            for route in dead.routes:
                self.call(self.netlink.add_route_in, sandbox, fresh.index, route)
        assert self.sandbox_routes(sandbox) == before

    def test_primitives_in_a_missing_sandbox_fail_naming_it(self):
        missing = self.make_sandbox() + "-gone"
        for method, args in (
            (self.netlink.delete_link_in, (1,)),
            (self.netlink.set_link_in, (1, None, 1400)),
            (self.netlink.add_address_in, (1, "10.9.0.3/24")),
        ):
            assert missing in str(self.fails(method, missing, *args))
