"""A real reactor running in a background thread, for integration tests.

Plain pytest functions cannot wait on a Deferred. This module starts the global
reactor once per test session in a daemon thread and lets a test run a function
on it and block (bounded in time) for the result of the Deferred it returns.
"""

import atexit
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

_lock = threading.Lock()
_thread = None


def get_reactor():
    """The global reactor, started in a daemon thread on first use."""
    global _thread
    from twisted.internet import reactor

    with _lock:
        if _thread is None:
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="test-reactor",
                daemon=True,
            )
            _thread.start()
            atexit.register(_stop, reactor, _thread)
    return reactor


def _stop(reactor, thread):
    """Stop the reactor at exit so its shutdown triggers run (pools join)."""
    if thread.is_alive():
        reactor.callFromThread(reactor.stop)
        thread.join(10)


def run_in_reactor(fn, *args, timeout=30, **kwargs):
    """Call ``fn(*args, **kwargs)`` on the reactor thread and wait for its result.

    *fn* may return a Deferred or a plain value. Returns the result, or raises
    the failure's exception; raises TimeoutError (and cancels the Deferred) if
    nothing came within *timeout* seconds. Must not be called on the reactor
    thread itself, which would wait for itself forever. *timeout* is this
    function's own: to give *fn* a ``timeout`` argument, pass it positionally or
    use ``functools.partial``.
    """
    reactor = get_reactor()
    if threading.current_thread() is _thread:
        raise RuntimeError("run_in_reactor() called on the reactor thread")
    done = threading.Event()
    box = {}

    def start():
        deferred = defer.maybeDeferred(fn, *args, **kwargs)
        box["deferred"] = deferred
        deferred.addBoth(finish)

    def finish(result):
        box["result"] = result
        done.set()  # returning None also consumes a failure: it is raised below

    reactor.callFromThread(start)
    if not done.wait(timeout):
        reactor.callFromThread(_cancel, box)
        raise TimeoutError(f"{fn!r} did not finish within {timeout} seconds")
    result = box["result"]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _cancel(box):
    deferred = box.get("deferred")
    if deferred is not None and not deferred.called:
        deferred.cancel()
