"""Two small Deferred helpers shared by the driver's services."""

import inspect

from twisted.internet import defer


def follow(d):
    """A new Deferred that fires with what *d* fires with (*d* keeps it)."""
    follower = defer.Deferred()
    d.addBoth(lambda outcome: follower.callback(outcome) or outcome)
    return follower


async def call_hook(hook, *args):
    """Call *hook*, which may return a value, a Deferred or a coroutine, and
    wait for it (Twisted 22.4's `maybeDeferred` leaves a coroutine unrun)."""
    result = hook(*args)
    if inspect.isawaitable(result):
        await result
