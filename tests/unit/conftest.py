"""Fixtures shared by the unit tests of the OVSDB engines over the scripted IDL."""

import pytest
from twisted.internet.task import Clock

from tests.scripted_idl import ScriptedIdl


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def idl():
    return ScriptedIdl()
