"""A scripted stand-in for python-ovs's `Idl` and `Transaction`, so the OVSDB
engine's paths (TRY_AGAIN, a failed shared transaction, a builder that raises,
a reconnect while committing, each phase's timeout) run deterministically in
unit tests over a `Clock`.

It keeps the real IDL's rules that the engine relies on (checked against the
real one in tests/integration/test_ovsdb.py's contract tests):
- writes go into the open transaction and are visible to reads until
  `commit()`, which sends them and rolls the replica back; they show up in the
  replica only when the server's answer arrives in `run()`;
- `abort()` throws the writes away, inserted rows vanish and deleted ones return;
- an answer arrives only inside `run()`; until then `commit()` says INCOMPLETE.
The test plays the server: `answer()` decides how the oldest outstanding
transaction ends, `catch_up()` plays ovs-vswitchd applying ``next_cfg``.
"""

import itertools
import uuid as uuidlib

import ovs.db.idl

Txn = ovs.db.idl.Transaction


class _Index:
    def __init__(self, rows):
        self.rows = rows

    def irange(self, low, high):
        return (row for row in list(self.rows.values()) if row.name == low.name)


class _Entry:
    def __init__(self, name):
        self.name = name


class _Rows(dict):
    """A table's rows, with the name index `ovsdriver.ovsdb.by_name` uses."""

    def __init__(self):
        super().__init__()
        self.indexes = {"name": _Index(self)}

    @staticmethod
    def IndexEntry(name):  # noqa: N802 - python-ovs's spelling
        return _Entry(name)


class _Table:
    def __init__(self, name):
        self.name = name
        self.rows = _Rows()


class Row:
    """A row: committed `_data`, plus `_changes` while a transaction is open."""

    def __init__(self, idl, table, uuid, data):
        self.__dict__.update(_idl=idl, _table=table, uuid=uuid, _data=data, _changes={})

    def __getattr__(self, column):
        changes = self.__dict__["_changes"]
        if column in changes:
            value = changes[column]
        else:
            try:
                value = self.__dict__["_data"][column]
            except KeyError:
                raise AttributeError(column) from None
        if column in REFERENCES:  # references read as rows, as in python-ovs
            rows = (self._idl._find(u) for u in value)
            return [row for row in rows if row is not None]
        return value

    def __setattr__(self, column, value):
        txn = self._idl.txn
        assert txn is not None, "a write outside a transaction"
        if column in REFERENCES:
            value = [getattr(v, "uuid", v) for v in value]
        self._changes[column] = value
        txn.touched[self.uuid] = self

    def setkey(self, column, key, value):
        setattr(self, column, dict(getattr(self, column), **{key: value}))

    def delkey(self, column, key):
        setattr(self, column, {k: v for k, v in getattr(self, column).items() if k != key})

    def _uuids(self, column):
        return self._changes.get(column, self._data[column])

    def addvalue(self, column, value):
        setattr(self, column, [*self._uuids(column), getattr(value, "uuid", value)])

    def delvalue(self, column, value):
        value = getattr(value, "uuid", value)
        setattr(self, column, [v for v in self._uuids(column) if v != value])

    def increment(self, column):
        self._idl.txn.increment = (self, column)

    def verify(self, column):
        self._idl.txn.verified.add((self.uuid, column))

    def delete(self):
        txn = self._idl.txn
        txn.deleted[self.uuid] = self
        self._table.rows.pop(self.uuid, None)


#: Columns that refer to other rows (stored as uuids, read as rows).
REFERENCES = ("bridges", "ports", "interfaces")
#: Default column values of new rows, per table.
DEFAULTS = {
    "Open_vSwitch": {"bridges": [], "next_cfg": 0, "cur_cfg": 0},
    "Bridge": {"name": "", "ports": [], "datapath_type": "", "external_ids": {}},
    "Port": {"name": "", "interfaces": [], "tag": [], "protected": False, "external_ids": {}},
    "Interface": {
        "name": "",
        "type": "",
        "options": {},
        "mtu_request": [],
        "mac": [],
        "ofport": [],
        "error": [],
        "external_ids": {},
    },
    # The OVN Northbound tables of ovsdriver.northbound.
    "Logical_Switch": {"name": "", "ports": [], "external_ids": {}},
    "Logical_Switch_Port": {
        "name": "",
        "type": "",
        "addresses": [],
        "port_security": [],
        "options": {},
        "external_ids": {},
    },
}


class ScriptedTransaction:
    """What the engine sees of a transaction; the test decides its fate."""

    def __init__(self, idl):
        assert idl.txn is None, "one transaction at a time"
        self.idl = idl
        idl.txn = self
        self.touched = {}  # uuid -> row written
        self.inserted = {}
        self.deleted = {}
        self.increment = None
        self.verified = set()  # (uuid, column) the transaction verifies
        self.status = Txn.UNCOMMITTED
        self.writes = None  # what commit() sent
        self.new_cfg = None
        self.error = None

    def insert(self, table):
        row = Row(self.idl, table, uuidlib.uuid4(), dict(DEFAULTS[table.name]))
        table.rows[row.uuid] = row
        self.inserted[row.uuid] = row
        self.touched[row.uuid] = row
        return row

    def commit(self):
        if self.status != Txn.UNCOMMITTED:
            return self.status
        changes = {u: dict(r._changes) for u, r in self.touched.items() if u not in self.deleted}
        self.writes = {
            "inserted": {u: (r._table, changes.pop(u)) for u, r in self.inserted.items()},
            "changed": changes,
            "deleted": set(self.deleted) - set(self.inserted),
            "increment": self.increment,
        }
        empty = not any(self.writes[k] for k in ("inserted", "changed", "deleted", "increment"))
        self._disassemble()
        if empty:
            self.status = Txn.UNCHANGED
        else:
            self.status = Txn.INCOMPLETE
            self.idl.outstanding.append(self)
        return self.status

    def abort(self):
        self._disassemble()
        if self.status in (Txn.UNCOMMITTED, Txn.INCOMPLETE):
            self.status = Txn.ABORTED

    def _disassemble(self):
        """Roll the replica back to what the server last said."""
        for row in self.deleted.values():
            if row.uuid not in self.inserted:
                row._table.rows[row.uuid] = row
        for row in self.inserted.values():
            row._table.rows.pop(row.uuid, None)
        for row in self.touched.values():
            row.__dict__["_changes"] = {}
        if self.idl.txn is self:
            self.idl.txn = None

    def get_increment_new_value(self):
        if self.new_cfg is None:  # python-ovs sets the attribute only for an increment
            raise AttributeError("'Transaction' object has no attribute '_inc_new_value'")
        return self.new_cfg

    def get_error(self):
        return self.error

    def wait(self, poller):
        pass


class _Session:
    def __init__(self):
        self.connected = True

    def is_connected(self):
        return self.connected


class ScriptedIdl:
    """The replica and the server, played by the test."""

    IDL_S_MONITORING = "monitoring"

    def __init__(self):
        self.state = self.IDL_S_MONITORING
        self._session = _Session()
        self.change_seqno = 0
        self.txn = None
        self.outstanding = []  # committed transactions awaiting an answer
        self.answers = []  # (status, applied, error) for the oldest outstanding
        self.committed = []  # the writes of every transaction that took effect
        self.tables = {name: _Table(name) for name in DEFAULTS}
        self._load("Open_vSwitch", {})
        self._seq = itertools.count(1)

    def _load(self, table, data):
        row = Row(self, self.tables[table], uuidlib.uuid4(), dict(DEFAULTS[table], **data))
        self.tables[table].rows[row.uuid] = row
        return row

    @property
    def root(self):
        return next(iter(self.tables["Open_vSwitch"].rows.values()))

    def rows(self, table):
        return list(self.tables[table].rows.values())

    # -- the test plays the server --------------------------------------------

    def answer(self, status=Txn.SUCCESS, applied=None, error=None):
        """How the oldest outstanding transaction ends, at the next `run()`.
        *applied*: whether its writes took effect (default: on SUCCESS only;
        a TRY_AGAIN after a reconnect may hide a commit that went through)."""
        self.answers.append((status, status == Txn.SUCCESS if applied is None else applied, error))

    def disconnect(self):
        self._session.connected = False

    def reconnect(self):
        """Back online: what was outstanding ends as answered, else TRY_AGAIN."""
        self._session.connected = True
        while len(self.answers) < len(self.outstanding):
            self.answers.append((Txn.TRY_AGAIN, False, None))

    def catch_up(self):
        """ovs-vswitchd applied everything up to ``next_cfg``."""
        self.root._data["cur_cfg"] = self.root._data["next_cfg"]
        self.change_seqno += 1

    # -- what the engine calls ------------------------------------------------

    def run(self):
        assert self.txn is None, "run() with a transaction open"
        if not self._session.connected:
            return False
        changed = False
        while self.outstanding and self.answers:
            txn = self.outstanding.pop(0)
            status, applied, error = self.answers.pop(0)
            if applied:
                self._apply(txn)
                changed = True
            txn.status, txn.error = status, error
        if changed:
            self.change_seqno += 1
        return changed

    def _apply(self, txn):
        writes = txn.writes
        self.committed.append(writes)
        for uuid, (table, data) in writes["inserted"].items():
            row = Row(self, table, uuid, dict(DEFAULTS[table.name], **data))
            table.rows[uuid] = row
        for uuid, data in writes["changed"].items():
            row = self._find(uuid)
            if row is not None:
                row._data.update(data)
        for uuid in writes["deleted"]:
            row = self._find(uuid)
            if row is not None:
                row._table.rows.pop(uuid)
        if writes["increment"] is not None:
            row, column = writes["increment"]
            row._data[column] += 1
            txn.new_cfg = row._data[column]

    def _find(self, uuid):
        for table in self.tables.values():
            if uuid in table.rows:
                return table.rows[uuid]
        return None

    def wait(self, poller):
        pass

    def close(self):
        pass


def scripted_engine(clock, idl, remote="unix:/scripted/db.sock", **options):
    """An `ovsdriver.ovsdb.OVSDB` engine running over *idl*, ticking on *clock*
    (set ``running`` to False when done)."""
    from ovsdriver.ovsdb import OVSDB

    engine = OVSDB(clock, remote, **options)
    engine.transaction_class = ScriptedTransaction
    engine.idl = idl
    engine.running = True  # started, with the scripted replica connected
    return engine
