"""Run ``twistd`` with a timestamped trace of what the driver does (profiling aid).

    python -m benchmarks.trace TRACE_FILE [twistd arguments...]

Wraps, before twistd starts, the driver's API handlers (engine calls), the
vswitch operations, the OVSDB engine (each transaction: operations, commit
status, ``cur_cfg`` caught up), the netlink port's calls and every child
process, and appends one JSON line per event to TRACE_FILE:
``{"t": epoch seconds, "what": ..., "ms": duration}``.
Nothing in ``ovsdriver`` changes: the driver runs untraced unless started
through this module (see ``benchmarks/docker_run.py --trace``).
"""

import functools
import inspect
import json
import os
import subprocess
import sys
import threading
import time

_lock = threading.Lock()
_out = None


def emit(what, start, end=None, **extra):
    record = {"t": round(start, 6), "what": what}
    if end is not None:
        record["ms"] = round((end - start) * 1000, 3)
    record.update(extra)
    with _lock:
        _out.write(json.dumps(record) + "\n")
        _out.flush()


def _timed_deferred(what, fn):
    """Wrap a function returning a Deferred (or a coroutine) with start/end events."""
    from twisted.internet import defer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.time()
        if inspect.iscoroutinefunction(fn):
            d = defer.ensureDeferred(fn(*args, **kwargs))
        else:
            d = defer.maybeDeferred(fn, *args, **kwargs)

        def done(result):
            emit(what, start, time.time())
            return result

        return d.addBoth(done)

    return wrapper


def install():
    import ovs.db.idl

    from ovsdriver import api, netlink, ovsdb, vswitch

    for name, (handler, _) in api.METHODS.items():
        original = getattr(api.Handlers, handler)
        setattr(api.Handlers, handler, _timed_deferred("api " + name, original))

    for name in dir(netlink.Netlink):
        original = getattr(netlink.Netlink, name)
        if name.startswith("_") or name in ("start", "stop") or not callable(original):
            continue
        setattr(netlink.Netlink, name, _timed_deferred("netlink " + name, original))
    for name, original in list(vars(vswitch.VSwitch).items()):
        if name.startswith("_") or not inspect.isfunction(original):
            continue
        setattr(vswitch.VSwitch, name, _timed_deferred("vswitch " + name, original))

    engine = ovsdb.OVSDB
    txn_init = ovs.db.idl.Transaction.__init__

    def traced_txn_init(self, *args, **kwargs):
        self._trace_start = time.time()
        txn_init(self, *args, **kwargs)

    ovs.db.idl.Transaction.__init__ = traced_txn_init
    start_transaction = engine._start_transaction
    advance = engine._advance
    check_applied = engine._check_applied

    def traced_start(self):
        start_transaction(self)
        if self._txn is not None:
            waits = sum(op.wait for op in self._in_flight)
            self._txn._trace_commit = time.time()
            emit("ovsdb commit", self._txn._trace_start, ops=len(self._in_flight), wait=waits)

    def traced_advance(self, status):
        txn = self._txn
        advance(self, status)
        if txn is not None and self._txn is None and status != "incomplete":
            start = getattr(txn, "_trace_commit", txn._trace_start)
            emit("ovsdb committed", start, time.time(), status=status)

    def traced_check_applied(self):
        root = None
        if self.idl is not None:
            root = next(iter(self.idl.tables["Open_vSwitch"].rows.values()), None)
        cur = root.cur_cfg if root is not None else None
        if cur is not None and cur != getattr(self, "_trace_cur", None):
            self._trace_cur = cur
            emit("vswitchd cur_cfg", time.time(), cfg=cur)
        check_applied(self)

    engine._start_transaction = traced_start
    engine._advance = traced_advance
    engine._check_applied = traced_check_applied

    popen_init = subprocess.Popen.__init__
    popen_wait = subprocess.Popen.wait
    communicate = subprocess.Popen.communicate

    def traced_init(self, args, *a, **kw):
        self._trace_start = time.time()
        popen_init(self, args, *a, **kw)

    def traced_end(original):
        def wrapper(self, *a, **kw):
            result = original(self, *a, **kw)
            if getattr(self, "_trace_start", None) is not None and self.returncode is not None:
                argv = self.args if isinstance(self.args, (list, tuple)) else [self.args]
                emit(
                    "child " + os.path.basename(str(argv[0])),
                    self._trace_start,
                    time.time(),
                    argv=[str(a) for a in argv[1:6]],
                )
                self._trace_start = None
            return result

        return wrapper

    subprocess.Popen.__init__ = traced_init
    subprocess.Popen.wait = traced_end(popen_wait)
    subprocess.Popen.communicate = traced_end(communicate)


def main():
    global _out
    _out = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    install()
    sys.argv = ["twistd", *sys.argv[2:]]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
