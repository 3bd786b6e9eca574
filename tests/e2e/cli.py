"""The docker CLI and the world's host, as end-to-end tests use them."""

import json

from tests.world import UnixHTTPConnection, engine_call

IMAGE = "ovsdriver-test/busybox"


class E2E:
    """Shortcuts over a docker world with the driver running in it."""

    def __init__(self, world, driver):
        self.world = world
        self.driver = driver
        self.name = driver.name

    def docker(self, *args, check=True):
        return self.world.dockerd.docker(*args, check=check)

    def api(self, method, url, body=None):
        """One call to the engine's API (`engine_call`), on a connection of its own."""
        conn = UnixHTTPConnection(str(self.world.dockerd.socket), timeout=60)
        try:
            return engine_call(conn, method, url, body)
        finally:
            conn.close()

    def vsctl(self, *args):
        return self.world.ovs.vsctl(*args)

    def host(self, *argv):
        return self.world.netns.run(list(argv)).stdout

    def network(self, name, subnet, *options, check=True):
        args = ["network", "create", "-d", self.name, "--subnet", subnet]
        for option in options:
            args += ["-o", option]
        return self.docker(*args, name, check=check)

    def run(self, name, network, *extra, command=("sleep", "600")):
        args = ["run", "-d", "--name", name, "--network", network, *extra]
        return self.docker(*args, IMAGE, *command).stdout.strip()

    def exec(self, container, *argv, check=True):
        return self.docker("exec", container, *argv, check=check)

    def ping(self, container, address, count=2):
        """Whether `container` gets an answer from `address` (bounded: ~2 s a try)."""
        result = self.exec(container, "ping", "-c", str(count), "-W", "2", address, check=False)
        return result.returncode == 0

    def port_of(self, container, network):
        """The OVS port of a container's endpoint on `network`."""
        return "oep-" + self.container_net(container, network)["EndpointID"][:11]

    def network_id(self, name):
        return self.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()

    def container_net(self, container, network):
        out = self.docker("inspect", container).stdout
        return json.loads(out)[0]["NetworkSettings"]["Networks"][network]
