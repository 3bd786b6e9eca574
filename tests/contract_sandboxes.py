"""The behaviour every implementation of the mount-view observer must have.

`MountViewsContract` is mixed into one test class per implementation (the real
`ovsdriver.sandboxes.MountViews` over /proc, with real mount and network
namespaces, and `ovsdriver.testing.FakeMountViews`), so the fake cannot drift
from the real thing. "Here" is the driver's own mount view, where the tests
make files and mounts; "elsewhere" is another process's mount namespace.
"""

from ovsdriver.sandboxes import INVISIBLE, MISSING, MOUNTED, PLAIN


class MountViewsContract:
    """Contract tests; a subclass provides ``self.views`` and the hooks."""

    views = None

    def call(self, method, *args):
        """Call ``method(*args)`` and return its Deferred's result."""
        raise NotImplementedError

    def directory(self):
        """A fresh directory (here and in views made later); its path."""
        raise NotImplementedError

    def make_file(self, path):
        """A plain file at *path*."""
        raise NotImplementedError

    def mount_here(self, path):
        """Mount a fresh network namespace on the file *path*, here; return its inode."""
        raise NotImplementedError

    def unmount_here(self, path):
        raise NotImplementedError

    def other_view(self):
        """A process with a private copy of the mounts as they are now; its view."""
        raise NotImplementedError

    def mount_elsewhere(self, view, path):
        """Mount a fresh network namespace on *path* in *view* only; return its inode."""
        raise NotImplementedError

    def process_in_new_netns(self):
        """A live process in a network namespace of its own; that namespace's inode."""
        raise NotImplementedError

    def look(self, *paths):
        return self.call(self.views.observe, list(paths))

    def test_a_plain_file_is_plain_here(self):
        path = self.directory() + "/plain"
        self.make_file(path)
        observation = self.look(path)
        sighting = observation.sightings[path]
        assert sighting.probes[observation.own_view].kind == PLAIN
        assert sighting.mounted_in() == []

    def test_a_missing_file_is_missing_and_a_missing_directory_invisible(self):
        missing = self.directory() + "/missing"
        invisible = self.directory() + "/no-such-dir/x"
        observation = self.look(missing, invisible)
        own = observation.own_view
        assert observation.sightings[missing].probes[own].kind == MISSING
        assert observation.sightings[invisible].probes[own].kind == INVISIBLE

    def test_a_mounted_namespace_is_mounted_here_with_its_inode(self):
        path = self.directory() + "/mounted"
        self.make_file(path)
        netns = self.mount_here(path)
        observation = self.look(path)
        sighting = observation.sightings[path]
        assert sighting.mounted_in() == [observation.own_view]
        assert sighting.probes[observation.own_view].netns == netns
        assert sighting.path_in(observation.own_view) == path

    def test_a_sandbox_mounted_only_elsewhere_is_seen_there(self):
        path = self.directory() + "/elsewhere"
        self.make_file(path)
        view = self.other_view()
        netns = self.mount_elsewhere(view, path)
        observation = self.look(path)
        sighting = observation.sightings[path]
        assert sighting.probes[observation.own_view].kind == PLAIN
        assert sighting.mounted_in() == [view]
        assert sighting.probes[view].netns == netns
        assert view in observation.views

    def test_a_private_copy_elsewhere_keeps_a_mount_unmounted_here(self):
        path = self.directory() + "/copied"
        self.make_file(path)
        netns = self.mount_here(path)
        view = self.other_view()
        self.unmount_here(path)
        observation = self.look(path)
        sighting = observation.sightings[path]
        assert sighting.probes[observation.own_view].kind == PLAIN
        assert sighting.probes[view].kind == MOUNTED
        assert sighting.probes[view].netns == netns

    def test_a_network_namespace_a_process_is_in_is_held_since_it_started(self):
        netns = self.process_in_new_netns()
        observation = self.look()
        assert netns in observation.held
        assert observation.held[netns] <= observation.now

    def test_the_own_view_is_among_the_views(self):
        observation = self.look()
        assert observation.own_view in observation.views

    def test_the_mounted_files_of_a_directory_are_listed(self):
        directory = self.directory()
        mounted, plain = directory + "/b-mounted", directory + "/a-plain"
        for path in (mounted, plain):
            self.make_file(path)
        self.mount_here(mounted)
        view = self.other_view()
        elsewhere = directory + "/c-elsewhere"
        self.make_file(elsewhere)
        self.mount_elsewhere(view, elsewhere)  # not in the driver's own view
        found = self.call(self.views.mounted_in, [directory, self.directory() + "/none"])
        assert found == [mounted]
