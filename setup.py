"""Packaging for ovsdriver, a Docker network driver backed by Open vSwitch."""

from pathlib import Path

from setuptools import setup

setup(
    name="ovsdriver",
    version="0.1.0",
    description="Docker (libnetwork remote) network driver backed by Open vSwitch",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["ovsdriver", "twisted.plugins"],
    package_data={"twisted.plugins": ["ovsdriver_plugin.py"]},
    # The oldest versions are Debian 12's own packages.
    install_requires=[
        "twisted>=22.4",
        "ovs>=3.1",
        "pyroute2>=0.7.2",
        "attrs>=22.2",
        "prometheus_client>=0.16",
    ],
    entry_points={"console_scripts": ["ovsdriver = ovsdriver.cli:main"]},
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "treq>=22.2", "ruff==0.17.6"],
    },
)
