"""The OVSDB IDL of python-ovs, driven by the Twisted reactor.

One `Idl` replica serves every request. Operations are idempotent transaction
builders queued with `OVSDB.transact`; each reactor tick folds all queued
builders into one OVSDB transaction (so concurrent requests share one
ovs-vswitchd reconfiguration), commits it without blocking, and fires each
operation's Deferred once ovs-vswitchd has applied it (``cur_cfg`` caught up
with ``next_cfg``), or for an operation queued with ``applied=False`` once
OVSDB has committed it; `OVSDB.applied` waits for ovs-vswitchd then.
Each operation is all or nothing: a builder that raises has already written
into the shared transaction, so that transaction is thrown away and built
again without it. A TRY_AGAIN rebuilds the operations; a failed shared
transaction is retried one operation at a time so one bad operation cannot
fail its neighbours. While OVSDB is unreachable, operations fail within
``unavailable_timeout`` seconds with an error naming OVSDB and its address.

Background operations (deletions) never delay the others: ovs-vswitchd
applies changes one after another, and closing a port's tap costs it ~20 ms,
so a deletion committed just before an addition makes the addition wait for
it. A background operation is committed, in batches of its own, only once no
other operation has been queued, committing or waiting for ovs-vswitchd for
``background_quiet`` seconds. Under constant load, once it has waited
``background_limit`` seconds, it joins the next batch (sharing the
reconfiguration, which with many ports costs far more than closing a tap).
Background batches are small (`background_batch`) and go one at a time, the
next once ovs-vswitchd has applied the one before (or `background_limit`
after it was queued): an addition then waits for one batch at most.
"""

import errno
import os
import ssl
import time

import ovs.db.idl
import ovs.json
import ovs.jsonrpc
import ovs.poller
import ovs.stream
from ovs.poller import POLLIN, POLLOUT
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from ovsdriver.metrics import NO_METRICS

log = Logger()

#: What the driver reads and writes; nothing else is replicated.
TABLES = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg", "external_ids"],
    "Bridge": ["name", "ports", "datapath_type", "external_ids"],
    "Port": ["name", "interfaces", "tag", "protected", "external_ids"],
    "Interface": [
        "name",
        "type",
        "options",
        "mtu_request",
        "mac",
        "ofport",
        "error",
        "external_ids",
    ],
}


class OVSDBUnavailable(Exception):
    """OVSDB (or ovs-vswitchd behind it) could not carry out an operation."""


REMOTE_FORMS = "unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT"
#: What python-ovs is given for ``ssl:`` remotes (the same three files as
#: ovs-vsctl's and ovn-nbctl's --private-key, --certificate and --ca-cert).
SSL_FILES = ("private-key", "certificate", "ca-cert")
TLS_FAILED = "TLS handshake failed"


def check_remote(remote):
    """`remote` if it is an OVSDB remote the driver can connect to; else
    ValueError naming the forms it can."""
    kind, _, rest = remote.partition(":")
    host, _, port = rest.rpartition(":")
    if (kind == "unix" and rest) or (kind in ("tcp", "ssl") and host and port.isdigit()):
        return remote
    raise ValueError(f"unsupported OVSDB remote {remote!r}: use {REMOTE_FORMS}")


def configure_ssl(files):
    """Give python-ovs the files of ``ssl:`` remotes ({name in `SSL_FILES`:
    path}), once loaded here: a wrong one is named now, not at each
    reconnection. python-ovs keeps them process-wide, for every connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(files["certificate"], files["private-key"])
    except (OSError, ssl.SSLError) as e:
        raise ValueError(
            f"cannot load the certificate {files['certificate']} with the private key "
            f"{files['private-key']}: {e}"
        ) from None
    try:
        context.load_verify_locations(files["ca-cert"])
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the CA certificate {files['ca-cert']}: {e}") from None
    ovs.stream.Stream.ssl_set_private_key_file(files["private-key"])
    ovs.stream.Stream.ssl_set_certificate_file(files["certificate"])
    ovs.stream.Stream.ssl_set_ca_cert_file(files["ca-cert"])
    ovs.stream.Stream.register_method("ssl", _TLSStream)


class _TLSStream(ovs.stream.SSLStream):
    """python-ovs's ``ssl:`` stream, whose failed handshake is a failed
    connection with its reason kept in `failures` (python-ovs 3.1 lets the
    exception out of the IDL, 4.0 turns it into EPERM, losing the reason)."""

    failures = {}  # remote -> why its last handshake failed

    def connect(self):
        error = ovs.stream.Stream.connect(self)
        if error:
            if error != errno.EAGAIN:
                self.failures.pop(self.name, None)  # not even TCP: no TLS to blame
            return error
        try:
            self.socket.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return errno.EAGAIN
        except OSError as e:
            self.failures[self.name] = f"{TLS_FAILED}: {e}"
            return errno.EPROTO
        self.failures.pop(self.name, None)
        return 0


def remedy(error, otherwise):
    """What to check after a connection failed with `error` (a message)."""
    if error.startswith(TLS_FAILED):
        return "check --private-key, --certificate and --ca-cert against the server's"
    return otherwise


def fetch_schema(remote, database="Open_vSwitch", timeout=5.0):
    """The schema of `database` at `remote`, as JSON; blocks (in a thread for
    the driver) for at most `timeout` seconds, with python-ovs's own streams,
    so ``ssl:`` works as it does for the IDL."""
    deadline = time.monotonic() + timeout

    def block(poller):
        left = deadline - time.monotonic()
        if left <= 0:
            raise OVSDBUnavailable("no answer in time")
        poller.timer_wait(int(left * 1000) + 1)
        poller.block()

    left_ms = max(int(timeout * 1000), 1)
    error, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(remote), left_ms)
    if error:
        raise OVSDBUnavailable(_TLSStream.failures.get(remote) or os.strerror(error))
    rpc = ovs.jsonrpc.Connection(stream)
    try:
        request = ovs.jsonrpc.Message.create_request("get_schema", [database])
        error = rpc.send(request)
        while not error:
            rpc.run()
            error, reply = rpc.recv()
            if error == errno.EAGAIN:
                poller = ovs.poller.Poller()
                rpc.wait(poller)
                rpc.recv_wait(poller)
                block(poller)
                error = 0
            elif not error and reply.id == request.id:
                if reply.type != ovs.jsonrpc.Message.T_REPLY:
                    raise OVSDBUnavailable(f"it has no {database} database: {reply.error}")
                return reply.result
        raise OVSDBUnavailable(os.strerror(error) if error > 0 else "connection closed")
    finally:
        rpc.close()


class _Wishes:
    """A stand-in for ``ovs.poller.Poller`` that records what the IDL waits for,
    so the reactor can watch those sockets and timers instead of blocking."""

    def __init__(self):
        self.fds = []
        self.timeout = None  # milliseconds

    def fd_wait(self, fd, events):
        self.fds.append((fd, events))

    def timer_wait(self, msec):
        if self.timeout is None or msec < self.timeout:
            self.timeout = max(msec, 0)

    def timer_wait_until(self, msec):
        self.timer_wait(msec - int(time.monotonic() * 1000))

    def immediate_wake(self):
        self.timeout = 0


class _Watch:
    """A socket of the IDL registered with the reactor for as long as the IDL
    waits on it (registering it anew on every tick costs two system calls).

    It watches its own duplicate of the socket's descriptor: python-ovs
    closes a socket without telling, and the reactor must never be left
    watching a number that is closed, or reused by the next socket."""

    def __init__(self, fd, tick):
        self.fd = os.dup(fd if isinstance(fd, int) else fd.fileno())
        self.tick = tick
        self.reading = self.writing = False

    def close(self, reactor):
        self.want(reactor, False, False)
        os.close(self.fd)

    def want(self, reactor, reading, writing):
        """Make the reactor watch for exactly these events."""
        for wanted, now, add, remove in (
            (reading, self.reading, reactor.addReader, reactor.removeReader),
            (writing, self.writing, reactor.addWriter, reactor.removeWriter),
        ):
            if wanted and not now:
                add(self)
            elif now and not wanted:
                remove(self)
        self.reading, self.writing = reading, writing

    def fileno(self):
        return self.fd

    def doRead(self):
        self.tick()

    doWrite = doRead

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "ovsdb"


def _root(idl):
    """The Open_vSwitch table's one row, or None."""
    return next(iter(idl.tables["Open_vSwitch"].rows.values()), None)


def _next_cfg(idl):
    root = _root(idl)
    return root.next_cfg if root is not None else 0


def column(row, name):
    """``row.<name>``, read straight from the replica when no open transaction
    changes the row: python-ovs's attribute turns a set or map column into
    Python, back into OVSDB data (checking every constraint) and into Python
    again, three times the work where the reconciler reads 1000 ports."""
    state = row.__dict__
    if isinstance(row, ovs.db.idl.Row) and not state["_changes"] and not state["_mutations"]:
        datum = (state["_data"] or {}).get(name)
        if datum is not None:
            return datum.to_python(row._uuid_to_row)
    return getattr(row, name)


def by_name(idl, table, name):
    """The row of `table` called `name`, from the replica's name index."""
    rows = idl.tables[table].rows
    index = rows.indexes.get("name")
    if index is None:
        # python-ovs 3.1 (Debian 12) replaces a table's rows, and so drops its
        # indexes, whenever it resyncs after a reconnect: index them again.
        index = rows.index_create("name")
        index.add_column("name")
        for row in rows.values():
            index.add(row)
    entry = rows.IndexEntry(name=name)
    return next(iter(index.irange(entry, entry)), None)


class Context:
    """What a transaction builder gets: the open transaction and the replica."""

    def __init__(self, txn, idl):
        self.txn = txn
        self.idl = idl
        self.wait_for_vswitchd = False
        self._inserted = {}  # (table, name) -> row, not yet in the index

    def rows(self, table):
        return self.idl.tables[table].rows.values()

    def find(self, table, name):
        """The row of `table` called `name` (including rows inserted earlier
        in this transaction), or None."""
        return self._inserted.get((table, name)) or by_name(self.idl, table, name)

    def insert(self, table, name):
        self.wait_for_vswitchd = True
        row = self.txn.insert(self.idl.tables[table])
        row.name = name
        self._inserted[(table, name)] = row
        return row

    def delete(self, row):
        self.wait_for_vswitchd = True
        self._inserted.pop((row._table.name, row.name), None)
        row.delete()


class _Idl(ovs.db.idl.Idl):
    """python-ovs's Idl, counting the changes of each row, so that what is
    read from a row can be kept until it changes (`row_versions`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_versions = {}  # uuid -> changes seen

    def notify(self, event, row, updates=None):
        if event == ovs.db.idl.ROW_DELETE:
            self.row_versions.pop(row.uuid, None)
        else:
            self.row_versions[row.uuid] = self.row_versions.get(row.uuid, 0) + 1


class _Operation:
    def __init__(self, build, deferred, queued_at):
        self.build = build
        self.deferred = deferred
        self.queued_at = queued_at
        self.phase = "queued"
        self.after = None
        self.wait = False  # ovs-vswitchd has something to apply
        self.until_applied = True  # the Deferred fires once it has, not at the commit
        self.alone = False
        self.timer = None
        self.background = False

    @property
    def done(self):
        return self.deferred.called


def _shutting_down():
    return OVSDBUnavailable("the driver is shutting down")


class OVSDB(service.Service):
    """The driver's one connection to OVSDB, shared by every request."""

    fallback_tick = 0.1  # python-ovs does not always ask to be woken up
    idle_tick = 1.0  # the same while no operation waits: an idle driver sleeps
    transaction_class = ovs.db.idl.Transaction  # unit tests script their own
    metrics = NO_METRICS
    background_quiet = 0.05  # seconds without other operations before a background batch
    background_limit = 1.0  # seconds a background operation waits at most for quiet
    #: A background batch holds at most 1 + (ports in OVSDB) / this many
    #: operations (deletions): closing a tap costs ovs-vswitchd ~17 ms, a
    #: transaction of its own ~10 ms more with 20 ports, ~60 ms with 300 and
    #: ~280 ms with 1000, so a batch costs it about twice what its taps do.
    ports_per_background_op = 100

    def __init__(
        self,
        reactor,
        remote,
        tables=TABLES,
        unavailable_timeout=3.0,
        apply_timeout=15.0,
        database="Open_vSwitch",
        name="OVSDB",
        wait_for_vswitchd=True,
    ):
        self.reactor = reactor
        self.remote = remote
        self.tables = tables
        # Another database (OVN Northbound) has no ovs-vswitchd to wait for:
        # its operations finish when the server confirms the commit.
        self.database = database
        self.name = name
        self.wait_for_vswitchd = wait_for_vswitchd
        self.unavailable_timeout = unavailable_timeout
        self.apply_timeout = apply_timeout
        self.idl = None
        self._queue = []
        self._background = []  # background operations not yet taken into a batch
        self._busy_until = 0.0  # when the last foreground operation was queued or ended
        self._background_cfg = None  # the next_cfg of the latest background batch
        self._counting = False  # whether the transaction in flight increments next_cfg
        self._txn = None
        self._in_flight = []
        self._waiting_cfg = []  # (cfg, operation)
        #: the highest ``next_cfg`` this process committed since it (re)connected
        self._committed_cfg = None
        self._watches = {}  # what the IDL waits on (a socket) -> _Watch
        self._timer = None
        self._seqno = None
        self._last_error = "not connected yet"
        self._down_since = None
        self._ticking = False
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------

    def startService(self):
        super().startService()
        self._stopped = False
        self._fetch_schema()
        self._schedule(0)

    def stopService(self):
        super().stopService()
        # What still asks (another service finishing its work) fails at
        # once, rather than after apply_timeout: nothing will connect now.
        self._stopped = True
        self._unwatch()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        error = _shutting_down()
        pending = self._queue + self._background + self._in_flight
        for op in pending + [op for _, op in self._waiting_cfg]:
            self._fail(op, error)
        self._queue, self._background, self._in_flight, self._waiting_cfg = [], [], [], []
        if self.idl is not None:
            self.idl.close()
            self.idl = None

    def _fetch_schema(self):
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), fetch_schema, self.remote, self.database
        )
        d.addCallbacks(self._start_idl, self._schema_failed)

    def _schema_failed(self, failure):
        if not self.running:
            return
        error = failure.getErrorMessage() or failure.type.__name__
        if error != self._last_error:  # say it once, not every second
            log.warn(
                "cannot fetch the schema from {name} at {remote}: {error}; retrying",
                name=self.name,
                remote=self.remote,
                error=error,
            )
        self._last_error = error
        self.reactor.callLater(1.0, self._fetch_schema)

    def _start_idl(self, schema):
        if not self.running:
            return
        helper = ovs.db.idl.SchemaHelper(schema_json=schema)
        for table, columns in self.tables.items():
            helper.register_columns(table, columns)
        self.idl = _Idl(self.remote, helper)
        log.info("connecting to {name} at {remote}", name=self.name, remote=self.remote)
        if ovs.json.PARSER != ovs.json.PARSER_C:
            log.info(
                "this python-ovs reads JSON in pure Python (PyPI's build has no C "
                "extension): every OVSDB update costs several times the CPU; "
                "Debian's python3-openvswitch has the C parser"
            )
        self._schedule(0)

    @property
    def connected(self):
        """True while the replica is live (monitoring), so reads are current."""
        idl = self.idl
        # The IDL's state stays "monitoring" while its session is down.
        return idl is not None and idl.state == idl.IDL_S_MONITORING and idl._session.is_connected()

    def unavailable(self):
        error = _TLSStream.failures.get(self.remote, self._last_error)
        hint = remedy(error, "is ovsdb-server running?")
        return OVSDBUnavailable(f"cannot reach {self.name} at {self.remote} ({error}); {hint}")

    # -- the public operations ---------------------------------------------

    def transact(self, build, background=False, applied=True):
        """Queue `build(context)`; it may write through ``context`` and returns
        None or a callable that computes the result once ovs-vswitchd has
        applied the transaction (it may raise to fail the operation). With
        `applied` False it is computed once OVSDB has committed it, and
        `OVSDB.applied` waits for ovs-vswitchd (`committed_cfg`, read then,
        says what to wait for).

        A `background` operation (a deletion nothing waits for) is committed
        when no other operation has been around for a while, in a transaction
        of background operations only, or under constant load with the next
        batch (see the module's docstring). Operations are sent from the next
        reactor turn on, so a request's answer goes out before what it queued.
        """
        if self._stopped:
            return defer.fail(_shutting_down())
        op = _Operation(build, defer.Deferred(), self.reactor.seconds())
        op.timer = self.reactor.callLater(self.apply_timeout, self._expire, op)
        op.background = background
        op.until_applied = applied
        if background:
            self._background.append(op)
        else:
            self._queue.append(op)
            self._busy_until = max(self._busy_until, op.queued_at)
            op.deferred.addBoth(self._foreground_ended)
        self._schedule(0)
        return op.deferred

    def _foreground_ended(self, result):
        self._busy_until = self.reactor.seconds()
        if self._background:
            self._schedule(self.background_quiet)
        return result

    @property
    def committed_cfg(self):
        """The ``next_cfg`` of the latest transaction this process committed
        since it (re)connected, or None."""
        return self._committed_cfg

    def applied(self, read=None, cfg=None):
        """Fire (with `read(idl)`, if given) once ovs-vswitchd has applied
        `cfg`, or every change this process has committed (after a restart or
        a reconnect: every change OVSDB holds); fail like an operation whose
        change ovs-vswitchd does not apply in time."""
        cfg = cfg if cfg is not None else self._committed_cfg
        wanted = defer.succeed(cfg) if cfg is not None else self.query(_next_cfg)
        return wanted.addCallback(self._wait_applied, read)

    def _wait_applied(self, cfg, read):
        if self._stopped:
            return defer.fail(_shutting_down())
        op = _Operation(None, defer.Deferred(), self.reactor.seconds())
        op.after, op.wait, op.phase = read, True, "applying"
        op.timer = self.reactor.callLater(self.apply_timeout, self._expire, op)
        self._waiting_cfg.append((cfg, op))
        self._check_applied()
        self._schedule(self.fallback_tick)  # not the idle tick: something waits
        return op.deferred

    def query(self, read):
        """Call `read(idl)` on a live replica (waiting for one briefly)."""
        if self.connected:
            return defer.maybeDeferred(read, self.idl)
        return self.transact(lambda ctx: lambda idl: read(idl))

    # -- the reactor side ----------------------------------------------------

    def _schedule(self, delay):
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._tick)

    def _unwatch(self):
        self._set_watches([])

    def _set_watches(self, fds):
        """Watch the sockets in `fds` ((socket, poll events) pairs), changing
        only what differs from the last tick; stale ones go first, as a new
        socket may have the number of a closed one."""
        wanted = {}
        for fd, events in fds:
            reading, writing = wanted.get(fd, (False, False))
            wanted[fd] = (reading or bool(events & POLLIN), writing or bool(events & POLLOUT))
        for fd in [fd for fd in self._watches if fd not in wanted]:
            self._watches.pop(fd).close(self.reactor)
        for fd, (reading, writing) in wanted.items():
            if fd not in self._watches:
                self._watches[fd] = _Watch(fd, self._tick)
            self._watches[fd].want(self.reactor, reading, writing)

    def _tick(self):
        """Run the IDL, advance transactions, then wait for its next event."""
        if self._ticking or not self.running:
            return
        self._ticking = True
        try:
            if self.idl is not None:
                self._run_idl()
            self._expire_unconnected()
        except Exception:
            log.failure("OVSDB tick failed; carrying on")
        finally:
            self._ticking = False
            if self.running:
                self._watch()

    def _run_idl(self):
        idl = self.idl
        idl.run()
        if self.connected:
            if self._down_since is not None:  # OVSDB may have been replaced
                self._committed_cfg = self._background_cfg = None
            self._down_since = None
        else:
            if self._down_since is None:
                self._down_since = self.reactor.seconds()
                self._last_error = "connection lost or not established"
            if self._txn is not None:
                # python-ovs only gives up on it once it reconnects: rebuild it
                # then (builders are idempotent), or fail it if that takes long.
                for op in self._in_flight:
                    op.phase = "queued"
                self._queue[:0] = self._in_flight
                self._txn, self._in_flight = None, []
        if self._txn is not None:
            self._advance(self._txn.commit())
        if idl.change_seqno != self._seqno:
            self._seqno = idl.change_seqno
            self._check_applied()
        if self._txn is None and (self._queue or self._background) and self.connected:
            self._start_transaction()

    def _watch(self):
        wishes = _Wishes()
        if self.idl is not None:
            self.idl.wait(wishes)
            if self._txn is not None:
                self._txn.wait(wishes)
        self._set_watches(wishes.fds)
        delay = self.fallback_tick if self._waiting() else self.idle_tick
        if wishes.timeout is not None:
            delay = min(delay, wishes.timeout / 1000.0)
        self._schedule(delay)

    def _waiting(self):
        """Whether an operation waits for OVSDB or ovs-vswitchd."""
        return bool(self._queue or self._background or self._in_flight or self._waiting_cfg)

    def _take_batch(self):
        """The queued operations that go into the next transaction: foreground
        ones first; background ones in a batch of their own when quiet, or
        with the foreground ones once overdue."""
        live = [op for op in self._queue if not op.done]
        # Background operations put back (TRY_AGAIN, retry alone) wait again.
        self._background[:0] = [op for op in live if op.background]
        live = [op for op in live if not op.background]
        waiting = self._background = [op for op in self._background if not op.done]
        overdue = waiting and self.reactor.seconds() >= waiting[0].queued_at + self.background_limit
        if live and overdue and not any(op.alone for op in live + waiting):
            # Constant load: rather than one more reconfiguration of their
            # own, overdue background operations join the next batch.
            self._background = []
            live = live + waiting
        if not live:
            self._queue = []
            live = waiting
            if not live or not self._quiet(live[0]):
                return []
        if live[0].alone:
            batch, rest = live[:1], live[1:]
        else:
            count = next((i for i, op in enumerate(live) if op.alone), len(live))
            batch, rest = live[:count], live[count:]
        if batch[0].background:
            size = self.background_batch()
            batch, rest = batch[:size], batch[size:] + rest
            self._background = rest
        else:
            self._queue = rest
        return batch

    def background_batch(self):
        """How many background operations the next batch may hold."""
        ports = self.idl.tables.get("Port")
        return 1 + (len(ports.rows) if ports is not None else 0) // self.ports_per_background_op

    def _applying_background(self):
        """Whether ovs-vswitchd is still applying the latest background batch."""
        if self._background_cfg is None:
            return False
        root = _root(self.idl)
        return root is not None and root.cur_cfg < self._background_cfg

    def _quiet(self, oldest):
        """Whether a background batch may go now; if not, tick again when it may."""
        now = self.reactor.seconds()
        limit = oldest.queued_at + self.background_limit
        if limit <= now:
            return True
        if self._applying_background() or any(
            not op.background and not op.done for _, op in self._waiting_cfg
        ):
            self._schedule(limit - now)  # or earlier, when ovs-vswitchd catches up
            return False
        at = min(self._busy_until + self.background_quiet, limit)
        if at <= now:
            return True
        self._schedule(at - now)
        return False

    def _start_transaction(self):
        batch = self._take_batch()
        while batch:
            txn, built = self._build(batch)
            if len(built) == len(batch):
                break
            # A builder raised: its writes are in `txn` too, so throw the
            # whole transaction away and build it again without that one.
            txn.abort()
            batch = built
        if not batch:
            return
        # A background batch others wait behind needs to know when
        # ovs-vswitchd has applied it, as the operations that wait do.
        paced = batch[0].background and bool(self._background)
        self._counting = paced or any(op.wait for op in batch)
        if self._counting:
            root = _root(self.idl)
            if root is None:
                txn.abort()
                error = OVSDBUnavailable(
                    f"OVSDB at {self.remote} has no Open_vSwitch row; "
                    "run 'ovs-vsctl init' or start Open vSwitch properly"
                )
                for op in batch:
                    self._fail(op, error)
                return
            root.increment("next_cfg")
        self._txn, self._in_flight = txn, batch
        self.metrics.ovsdb_commit_started()
        self._advance(txn.commit())

    def _build(self, batch):
        """Run the builders of `batch` into one new transaction: (the
        transaction, the operations whose builders did not raise). A builder
        that raises fails its operation."""
        txn = self.transaction_class(self.idl)
        ctx = Context(txn, self.idl)
        built = []
        for op in batch:
            ctx.wait_for_vswitchd = False
            try:
                op.after = op.build(ctx)
            except Exception as e:
                self._fail(op, e)
                continue
            op.wait = ctx.wait_for_vswitchd and self.wait_for_vswitchd
            op.phase = "committing"
            built.append(op)
        return txn, built

    def _advance(self, status):
        """React to a transaction's commit status."""
        txn, ops = self._txn, self._in_flight
        Txn = ovs.db.idl.Transaction
        if status == Txn.INCOMPLETE:
            return
        self._txn, self._in_flight = None, []
        self.metrics.ovsdb_committed(status, len(ops))
        if status in (Txn.SUCCESS, Txn.UNCHANGED):
            counted = status == Txn.SUCCESS and self._counting
            cfg = txn.get_increment_new_value() if counted else None
            if cfg is not None:
                self._committed_cfg = max(cfg, self._committed_cfg or cfg)
            if ops[0].background:
                self._background_cfg = cfg
            self.metrics.ovsdb_applying(cfg)
            for op in ops:
                if op.wait and op.until_applied and cfg is not None:
                    op.phase = "applying"
                    self._waiting_cfg.append((cfg, op))
                else:
                    self._finish(op)
            self._check_applied()
        elif status == Txn.TRY_AGAIN:
            for op in ops:
                op.phase = "queued"
            self._queue[:0] = ops
        elif len(ops) > 1:
            # One operation may have spoiled the shared transaction: retry alone.
            for op in ops:
                op.phase, op.alone = "queued", True
            self._queue[:0] = ops
        else:
            error = txn.get_error() or status
            for op in ops:
                self._fail(op, OVSDBUnavailable(f"{self.name} refused the change: {error}"))
        if self._queue:
            self._schedule(0)

    def _check_applied(self):
        if not self._waiting_cfg or self.idl is None:
            return
        root = _root(self.idl)
        if root is None:
            return
        cur_cfg = root.cur_cfg
        self.metrics.ovsdb_caught_up(cur_cfg)
        still = []
        for cfg, op in self._waiting_cfg:
            if op.done:
                continue
            if cur_cfg >= cfg:
                self._finish(op)
            else:
                still.append((cfg, op))
        self._waiting_cfg = still

    def _finish(self, op):
        if op.done:
            return
        if op.timer.active():
            op.timer.cancel()
        try:
            result = op.after(self.idl) if op.after is not None else None
        except Exception as e:
            op.deferred.errback(e)
        else:
            op.deferred.callback(result)

    def _fail(self, op, error):
        if op.done:
            return
        if op.timer is not None and op.timer.active():
            op.timer.cancel()
        op.deferred.errback(error)

    def _expire_unconnected(self):
        """Fail what has waited `unavailable_timeout` for a connection."""
        if self.connected:
            return
        now = self.reactor.seconds()
        down_since = self._down_since if self._down_since is not None else 0
        for op in self._queue + [op for _, op in self._waiting_cfg]:
            if now - max(op.queued_at, down_since) >= self.unavailable_timeout:
                self._fail(op, self.unavailable())
        self._queue = [op for op in self._queue if not op.done]

    def _expire(self, op):
        if op.phase == "applying":
            error = OVSDBUnavailable(
                f"ovs-vswitchd did not apply the change within {self.apply_timeout:g} s;"
                " is ovs-vswitchd running?"
            )
        elif op.phase == "committing":
            error = OVSDBUnavailable(
                f"{self.name} at {self.remote} did not confirm the change"
                f" within {self.apply_timeout:g} s"
            )
        else:
            error = self.unavailable()
        self._fail(op, error)
