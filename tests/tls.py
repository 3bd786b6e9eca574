"""Certificates for tests of ``ssl:`` remotes, made with the openssl tool:
a CA and certificates it signs, as ovs-pki would make them (OVS checks the
chain, not host names)."""

import subprocess
from pathlib import Path


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
