"""For tests of ``ssl:`` remotes: certificates made with the openssl tool (a
CA and certificates it signs, as ovs-pki would make them: OVS checks the
chain, not host names), and an ovsdb-server that takes TLS clients."""

import subprocess
from pathlib import Path

from tests.world import OVN_NB_SCHEMA, _tool, read_pidfile, run, stop_process


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class CA:
    """A certificate authority in `directory`, named `name`."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = self.directory / f"{name}-key.pem"
        self.cert = self.directory / f"{name}-cert.pem"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
            "-subj", f"/CN={name}",
        )  # fmt: skip

    def issue(self, name: str) -> tuple[Path, Path]:
        """(private key, certificate) of `name`, signed by this CA."""
        key = self.directory / f"{name}-privkey.pem"
        request = self.directory / f"{name}-req.pem"
        cert = self.directory / f"{name}-cert.pem"
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", "2",
        )  # fmt: skip
        return key, cert


class SecureOVSDB:
    """An ovsdb-server in `netns` with a database of `schema`, that takes TLS
    clients on `port` whose certificate `ca` signed, and UNIX ones; its own
    certificate is signed by `server_ca` (default `ca`). Its database stays
    for the next one in `directory`."""

    def __init__(self, netns, directory, ca, server_ca=None, schema=OVN_NB_SCHEMA, port=6641):
        self.directory = directory
        self.socket = directory / "db.sock"
        self.pidfile = directory / "db.pid"
        key, cert = (server_ca or ca).issue("server")
        db = directory / "db"
        if not db.exists():
            run([_tool("ovsdb-tool"), "create", db, schema])
        self.netns = netns
        netns.run(
            [
                _tool("ovsdb-server"), db,
                f"--remote=punix:{self.socket}", f"--remote=pssl:{port}:127.0.0.1",
                f"--private-key={key}", f"--certificate={cert}", f"--ca-cert={ca.cert}",
                f"--unixctl={directory / 'db.ctl'}", f"--pidfile={self.pidfile}",
                f"--log-file={directory / 'db.log'}", "--detach",
            ],
            timeout=30,
        )  # fmt: skip

    def nbctl(self, *args):
        argv = [_tool("ovn-nbctl"), f"--db=unix:{self.socket}", "--timeout=10", *args]
        return run(argv, timeout=20).stdout.strip()

    def stop(self):
        pid = read_pidfile(self.pidfile)
        if self.netns.owns(pid):
            stop_process(pid)
