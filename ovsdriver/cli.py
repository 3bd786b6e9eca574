"""The ``ovsdriver`` command: tools for operators next to ``twistd ovsdriver``.

``ovsdriver status`` shows Docker's view of Open vSwitch and whether it is
healthy (see ovsdriver.status). The driver itself runs as ``twistd ovsdriver``.
"""

import argparse
import logging
import sys

from ovsdriver import status


def parser():
    top = argparse.ArgumentParser(
        prog="ovsdriver",
        description="Tools for the Docker network driver backed by Open vSwitch "
        "(the driver itself runs as 'twistd ovsdriver').",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    show = commands.add_parser(
        "status",
        help="show the driver's networks and endpoints and whether they are healthy",
        description="Show the driver's networks and endpoints as OVSDB, the kernel, the "
        "firewall and the engine see them. Exits 0 when healthy, 1 when something is "
        "unhealthy, 2 when OVSDB cannot be read.",
    )
    status.add_arguments(show)
    show.set_defaults(run=status.run)
    return top


def main(argv=None):
    options = parser().parse_args(argv)
    # python-ovs logs through `logging`; a one-shot tool says what matters itself.
    logging.getLogger().addHandler(logging.NullHandler())
    return options.run(options, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
