"""The twistd dropin: ``twistd ovsdriver`` (imports ovsdriver.tap lazily)."""

from twisted.application.service import ServiceMaker

ovsdriver = ServiceMaker(
    "ovsdriver",
    "ovsdriver.tap",
    "Docker network driver backed by Open vSwitch",
    "ovsdriver",
)
