"""The bridge's durable state: the SQLite inbox and cursors, the dead letters, one bridge per state."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
from typing import Any, Mapping

import b24common as bc

log = logging.getLogger("b24_ol_bridge")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dialogs (
    dialog TEXT PRIMARY KEY, cursor INTEGER NOT NULL, info TEXT NOT NULL DEFAULT '{}',
    session_seen INTEGER NOT NULL DEFAULT 0, touched REAL NOT NULL, active REAL NOT NULL DEFAULT 0,
    paused_until REAL NOT NULL DEFAULT 0, paused_session INTEGER NOT NULL DEFAULT 0,
    human_id INTEGER NOT NULL DEFAULT 0, handed_off INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS dialogs_touched ON dialogs (touched);
CREATE TABLE IF NOT EXISTS inbox (
    dialog TEXT NOT NULL, message_id INTEGER NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'new', answer TEXT, posted INTEGER NOT NULL DEFAULT 0,
    handoff INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    first_try REAL, next_try REAL NOT NULL DEFAULT 0, error TEXT, arrived REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (dialog, message_id));
CREATE TABLE IF NOT EXISTS sent (
    message_id INTEGER PRIMARY KEY, dialog TEXT NOT NULL, source INTEGER NOT NULL, part INTEGER NOT NULL,
    sent_at REAL NOT NULL, payload TEXT NOT NULL);
"""


class Row:
    """One message in flight (a row of ``inbox``)."""

    __slots__ = ("dialog", "message_id", "payload", "state", "answer", "posted", "handoff", "attempts",
                 "first_try", "next_try", "error", "arrived", "present")

    def __init__(self, values: tuple):
        (self.dialog, self.message_id, payload, self.state, answer, self.posted, handoff, self.attempts,
         self.first_try, self.next_try, self.error, self.arrived) = values
        self.payload = json.loads(payload)
        self.answer = json.loads(answer) if answer else []
        self.handoff = bool(handoff)
        self.present: dict = {}        # part index -> message id, found in the dialog already (looked up again)

    @property
    def where(self) -> str:
        return "%s #%d" % (bc.display_dialog_id(self.dialog), self.message_id)


CACHE_KIB = 256          # SQLite page cache per connection (one per thread; the default is 2 MB each)


class Store:
    """The bridge's state database.  Every thread has its own connection; every change is one
    short transaction, so one message's bookkeeping costs the same at 50k dialogs as at 100."""

    COLUMNS = ("dialog, message_id, payload, state, answer, posted, handoff, attempts, first_try, next_try, "
               "error, arrived")

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._local = threading.local()
        reset = "; b24_ol_bridge.py --reset-state starts over from now (the old file is kept aside)"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            if not os.path.lexists(self.path):
                self._create()
            elif os.path.getsize(self.path) == 0:
                raise bc.ConfigError("%s is empty: the state (every cursor and message in flight) is gone%s"
                                     % (self.path, reset))
            os.close(bc.open_private(self.path, os.O_RDWR))     # 0600 (and never a link) before SQLite opens it
            problem = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise bc.ConfigError("%s is damaged (%s)%s" % (self.path, str(problem)[:100], reset))
            self.db.executescript(SCHEMA)
            self._add_missing_columns()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise                                   # another process is writing: waited out
            raise bc.ConfigError("%s: cannot open the state database (%s)" % (self.path, exc)) from None
        except sqlite3.DatabaseError as exc:
            raise bc.ConfigError("%s is damaged (%s)%s" % (self.path, exc, reset)) from None
        except OSError as exc:
            raise bc.ConfigError("%s: cannot open the state database (%s)" % (self.path, exc.strerror or exc)) from None

    def _create(self) -> None:
        """A new, empty database -- made under a temporary name and renamed, so a crash never leaves a
        file at the real name that looks like lost state."""
        tmp = self.path + ".new"
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            if os.path.lexists(leftover):
                os.unlink(leftover)
        os.close(bc.open_private(tmp, os.O_RDWR))
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        os.replace(tmp, self.path)

    @staticmethod
    def set_aside(path: str) -> str | None:
        """``--reset-state``: move the database (and its -wal and -shm) out of the way; where it went."""
        if not os.path.lexists(path):
            return None
        aside = "%s.reset-%s" % (path, time.strftime("%Y%m%d-%H%M%S"))
        for suffix in ("-wal", "-shm", ""):
            if os.path.lexists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        return aside

    def _add_missing_columns(self) -> None:
        """A database written by an earlier version gains the columns this one uses."""
        for table, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\);", SCHEMA, re.S):
            have = {row[1] for row in self.db.execute("PRAGMA table_info(%s)" % table)}
            for col in re.split(r",\s*(?![^()]*\))", body):
                col = col.strip()
                name = col.split()[0]
                if name not in have and name.upper() not in ("PRIMARY",) and "DEFAULT" in col:
                    self.db.execute("ALTER TABLE %s ADD COLUMN %s" % (table, col))

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA cache_size=-%d" % CACHE_KIB)
            self._local.conn = conn
        return conn

    def _tx(self, statements: list) -> None:
        """Run ``[(sql, params)]`` as one transaction."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    # -- the poller's state ------------------------------------------------------
    def get_meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def poller_state(self) -> dict:
        meta = self.get_meta()
        cursors, dialogs = {}, {}
        for did, cursor, info in self.db.execute("SELECT dialog, cursor, info FROM dialogs"):
            cursors[did] = cursor
            dialogs[did] = json.loads(info)
        return {"cursors": cursors, "dialogs": dialogs, "watermark": meta.get("watermark"),
                "floor_id": meta.get("floor_id", 0), "portal": meta.get("portal"), "user_id": meta.get("user_id")}

    def commit_cycle(self, rows: list, changes: Mapping[str, Any], meta: Mapping[str, Any],
                     active: Mapping[str, float] | None = None, pauses: Mapping[str, tuple] | None = None) -> None:
        """New messages, the dialogs whose cursor moved past them, and the scan watermark: at once.

        A dialog's ``session_seen`` starts at its session when it is first stored and follows the
        session of the customer messages written since (a change means a new conversation)."""
        now = time.time()
        st: list = []
        for r in rows:
            st.append(("INSERT OR IGNORE INTO inbox (dialog, message_id, payload, next_try, arrived) "
                       "VALUES (?, ?, ?, 0, ?)",
                       (r["dialog"], r["message_id"], json.dumps(r["payload"], ensure_ascii=False), now)))
        for did, change in changes.items():
            if change is None:
                st.append(("DELETE FROM dialogs WHERE dialog = ?", (did,)))
            else:
                st.append(("INSERT INTO dialogs (dialog, cursor, info, session_seen, touched) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (dialog) DO UPDATE SET cursor = excluded.cursor, info = excluded.info, "
                           "touched = excluded.touched",
                           (did, change["cursor"], json.dumps(change["info"], ensure_ascii=False),
                            bc.as_int(bc.as_map(change["info"]).get("session_id")), now)))
        for r in rows:
            if r.get("session"):
                st.append(("UPDATE dialogs SET session_seen = ? WHERE dialog = ?", (r["session"], r["dialog"])))
        for did, when in (active or {}).items():
            st.append(("UPDATE dialogs SET active = MAX(active, ?) WHERE dialog = ?", (when, did)))
        for did, (until, session, human) in (pauses or {}).items():
            st.append(("UPDATE dialogs SET paused_until = ?, paused_session = ?, human_id = ? WHERE dialog = ?",
                       (until, session, human, did)))
        for key, value in meta.items():
            st.append(("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                       "value = excluded.value", (key, json.dumps(value))))
        self._tx(st)

    def pauses(self) -> tuple:
        """``({dialog: (until, session, last human message id)}, {dialog: session handed off})``."""
        paused, handed = {}, {}
        for d, until, session, human, off in self.db.execute(
                "SELECT dialog, paused_until, paused_session, human_id, handed_off FROM dialogs "
                "WHERE paused_until > 0 OR handed_off > 0"):
            if until:
                paused[d] = (until, session, human)
            if off:
                handed[d] = off
        return paused, handed

    def set_handed_off(self, dialog: str, session: int) -> None:
        self._tx([("UPDATE dialogs SET handed_off = ? WHERE dialog = ?", (session, dialog))])

    def resume(self, dialog: str | None = None) -> int:
        """Lift the pause and the hand-over of *dialog* (of every dialog: None); how many were lifted."""
        sql = ("UPDATE dialogs SET paused_until = 0, paused_session = 0, handed_off = 0 "
               "WHERE (paused_until > 0 OR handed_off > 0)")
        before = self.db.total_changes
        self._tx([(sql + " AND dialog = ?", (dialog,)) if dialog else (sql, ())])
        return self.db.total_changes - before

    def waiting_rows(self, dialog: str) -> list:
        """Every message of *dialog* the bot has not been asked about yet, oldest first."""
        return [Row(r) for r in self.db.execute(
            "SELECT %s FROM inbox WHERE dialog = ? AND state = 'new' ORDER BY message_id" % self.COLUMNS, (dialog,))]

    def fold(self, rows: list, keep: Row) -> None:
        """Several messages became one bot turn: only *keep* stays (it carries the turn)."""
        self._tx([("DELETE FROM inbox WHERE dialog = ? AND message_id = ?", (r.dialog, r.message_id))
                  for r in rows if r is not keep] +
                 [("UPDATE inbox SET payload = ? WHERE dialog = ? AND message_id = ?",
                   (json.dumps(keep.payload, ensure_ascii=False), keep.dialog, keep.message_id))])

    def session_seen(self, dialog: str) -> int:
        row = self.db.execute("SELECT session_seen FROM dialogs WHERE dialog = ?", (dialog,)).fetchone()
        return row[0] if row else 0

    def idle_dialogs(self, before: float, quiet_since: float) -> list:
        """Dialogs unchanged since *before* (our clock) whose last message is older than
        *quiet_since* (the portal's clock), with nothing in flight."""
        return [d for (d,) in self.db.execute(
            "SELECT dialog FROM dialogs WHERE touched < ? AND active < ? "
            "AND dialog NOT IN (SELECT dialog FROM inbox)", (before, quiet_since))]

    # -- messages in flight --------------------------------------------------------
    def head(self, dialog: str) -> Row | None:
        got = self.db.execute("SELECT %s FROM inbox WHERE dialog = ? ORDER BY message_id LIMIT 1"
                              % self.COLUMNS, (dialog,)).fetchone()
        return Row(got) if got else None

    def dialogs_with_work(self) -> list:
        return [(d, t) for d, t in self.db.execute("SELECT dialog, MIN(next_try) FROM inbox GROUP BY dialog")]

    def update(self, row: Row, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(row, k, v)
        cols = ", ".join("%s = ?" % k for k in fields)
        values = [json.dumps(v, ensure_ascii=False) if k in ("answer", "payload") else v for k, v in fields.items()]
        self._tx([("UPDATE inbox SET %s WHERE dialog = ? AND message_id = ?" % cols,
                   values + [row.dialog, row.message_id])])

    def part_posted(self, row: Row, message_id: int, index: int, **fields: Any) -> tuple:
        """Part *index* of *row*'s answer is in the dialog as *message_id*: recorded, and followed until the
        portal says whether it was delivered -- in one transaction, so a crash loses no verdict.  Returns
        the part in flight as :meth:`sent_in_flight` lists it."""
        for k, v in fields.items():
            setattr(row, k, v)
        cols = ", ".join("%s = ?" % k for k in fields)
        insert, part = self._in_flight(row, message_id, index)
        self._tx([("UPDATE inbox SET %s WHERE dialog = ? AND message_id = ?" % cols,
                   list(fields.values()) + [row.dialog, row.message_id]), insert])
        return part

    def part_found(self, row: Row, message_id: int, index: int) -> tuple:
        """Part *index* was found in the dialog after a crash (posted, never recorded): followed from now."""
        insert, part = self._in_flight(row, message_id, index)
        self._tx([insert])
        return part

    @staticmethod
    def _in_flight(row: Row, message_id: int, index: int) -> tuple:
        """``(the INSERT that keeps a part in flight, the part as sent_in_flight lists it)``."""
        follow = {k: row.payload.get(k) for k in ("event_id", "line_id", "session_id", "dialog_id", "bot_chat")}
        follow["text"] = row.answer[index] if index < len(row.answer) else ""
        sent_at = time.time()
        insert = ("INSERT OR IGNORE INTO sent (message_id, dialog, source, part, sent_at, payload) "
                  "VALUES (?, ?, ?, ?, ?, ?)", (message_id, row.dialog, row.message_id, index, sent_at,
                                                json.dumps(follow, ensure_ascii=False)))
        return insert, (message_id, row.dialog, row.message_id, index, sent_at, follow)

    def sent_in_flight(self) -> list:
        """``[(message id, dialog, source message id, part, sent at, payload)]`` not settled yet."""
        return [(m, d, s, p, t, json.loads(j)) for m, d, s, p, t, j in self.db.execute(
            "SELECT message_id, dialog, source, part, sent_at, payload FROM sent ORDER BY message_id")]

    def sent_part(self, message_id: int) -> tuple | None:
        """``(dialog, source message id, part, payload)`` of a part in flight, or None."""
        got = self.db.execute("SELECT dialog, source, part, payload FROM sent WHERE message_id = ?",
                              (message_id,)).fetchone()
        return None if got is None else (got[0], got[1], got[2], json.loads(got[3]))

    def settled(self, message_ids: list) -> None:
        self._tx([("DELETE FROM sent WHERE message_id = ?", (m,)) for m in message_ids])

    def finish(self, row: Row) -> None:
        self._tx([("DELETE FROM inbox WHERE dialog = ? AND message_id = ?", (row.dialog, row.message_id))])

    def requeue(self, entry: Mapping) -> None:
        answer = entry.get("answer") or []
        self._tx([("INSERT OR REPLACE INTO inbox (dialog, message_id, payload, state, answer, posted, attempts, "
                   "next_try) VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
                   (entry["dialog"], entry["message_id"], json.dumps(entry["payload"], ensure_ascii=False),
                    "answered" if entry.get("stage") == "post" else "new", json.dumps(answer, ensure_ascii=False),
                    int(entry.get("posted") or 0)))])

    def backlog(self) -> dict:
        return dict(self.db.execute("SELECT dialog, COUNT(*) FROM inbox GROUP BY dialog"))

    def oldest_arrival(self) -> float | None:
        """When the oldest message still in flight was written to the inbox (None: none is)."""
        return self.db.execute("SELECT MIN(arrived) FROM inbox").fetchone()[0]


def migrate_json_state(store: Store, json_path: str) -> None:
    """A state file of an earlier version (bridge.json): its cursors move into the database, once."""
    if not os.path.exists(json_path) or store.get_meta():
        return
    doc = bc.StateFile(json_path).load()
    changes = {str(d): {"cursor": bc.as_int(c), "info": bc.as_map(bc.as_map(doc.get("dialogs")).get(d))}
               for d, c in bc.as_map(doc.get("cursors")).items()}
    meta = {"watermark": doc.get("watermark"), "floor_id": bc.as_int(doc.get("floor_id")),
            "portal": doc.get("portal"), "user_id": doc.get("user_id")}
    store.commit_cycle([], changes, meta)
    os.replace(json_path, json_path + ".migrated")
    log.info("moved %d dialog cursors from %s into %s", len(changes), json_path, store.path)



class InstanceLock:
    """``flock`` on ``<state>.lock``; the file holds the pid of the bridge that has it."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = bc.open_private(self.path, os.O_RDWR)
        except OSError as exc:
            raise bc.ConfigError("%s: cannot open the lock file (%s)" % (self.path, exc.strerror or exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise bc.ConfigError("another bridge (pid %s) is already running on this state (%s): stop it "
                                 "first, or give this one its own --state" % (pid, self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def holder(self) -> int:
        """The pid of the bridge holding this lock now (0: none)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return 0                              # nobody holds it
        except OSError:
            return bc.as_int(os.read(fd, 32).decode("ascii", "replace").strip())
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None



class DeadLetters:
    """What could not be delivered, one JSON object per line, with the payload and the reason."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def add(self, row: Row, reason: str, stage: str) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dialog_id": bc.display_dialog_id(row.dialog),
                 "dialog": row.dialog, "message_id": row.message_id, "stage": stage, "reason": reason,
                 "payload": row.payload, "answer": row.answer, "posted": row.posted}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.lock:      # appends from several workers must not interleave
            fd = bc.open_private(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def take(self, dialog: str | None = None) -> list:
        """Remove and return the dead letters (of one dialog); the rest stay in the file."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except FileNotFoundError:
            return []
        taken, kept = [], []
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                ok = isinstance(entry, dict) and "dialog" in entry and "message_id" in entry
            except ValueError:
                ok = False
            if not ok:
                if line.strip():
                    log.warning("%s:%d: not a dead letter; left in the file", self.path, n)
                kept.append(line)
            elif dialog is None or entry["dialog"] == dialog:
                taken.append(entry)
            else:
                kept.append(line)
        bc.write_private(self.path, "".join(kept))
        return taken


