#!/usr/bin/env python3
"""Hand every inbound Open Lines (WhatsApp) customer message to your bot; post its answer back.

Usage examples::

    python3 b24_ol_bridge.py                 # with BOT_HTTP_URL and B24_WEBHOOK_BASE set
    python3 b24_ol_bridge.py --take          # also take dialogs waiting in the queue to answer them
    python3 b24_ol_bridge.py --replay-dead   # re-deliver the dead letters, then run as usual
    python3 b24_ol_bridge.py --demo          # built-in emulator + echo bot, no portal needed

For each customer message the bot gets one JSON POST (``BOT_HTTP_URL``, with
``Authorization: $BOT_HTTP_AUTH`` when set)::

    {"platform": "bitrix24", "direction": "inbound", "dialog_id": "chat1778",
     "sender": "chat1778", "message_id": 88213, "event_id": "...", "attempt": 1,
     "text": "hello", "attachments": [], "session_id": 3310, "new_dialog": false,
     "customer_phone": "+1...", "customer_name": "...", "metadata": {...}, ...}

and may answer ``{"reply_text": ...}``, ``{"response": ...}``, ``{"text": ...}``,
``{"replies": [...]}``, ``{"messages": [...]}``, Rasa's list, a string,
nothing, or ``{"handoff": true}``.

What it promises: messages of one dialog are handled in order, dialogs side
by side; a message is written to the state database before the portal's
cursor moves past it; the bot's answer is written there before any of it is
posted, and each part carries its own ``TEMPLATE_ID``, so a restart posts the
rest of the *same* answer and never a part twice.  A bot outage is waited out
(``BRIDGE_RETRY_HOURS``); what cannot be delivered goes to the dead-letter
file, from which ``--replay-dead`` re-delivers it.
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import heapq
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

import b24common as bc
import b24push as push
import olbridge.bot as botlib

log = logging.getLogger("b24_ol_bridge")

STOP_GRACE_SEC = 20.0       # on SIGTERM, how long replies in progress may still finish
STATUS_EVERY_SEC = 10.0     # systemd's status line is refreshed this often (watchdog or not)
BACKOFF_FIRST_SEC = 1.0     # a dialog's first wait after a failure ...
BACKOFF_CAP_SEC = 300.0     # ... doubling up to this
UNUSABLE_TRIES = 3          # an unusable bot answer is asked again this often before a dead letter
MAX_PARTS = 10              # messages one answer may become
PRUNE_EVERY_SEC = 3600.0    # how often dialogs idle for BRIDGE_FORGET_DAYS are forgotten
FALLBACK_INDEX = 1000       # TEMPLATE_ID index of the fallback text (replies use 0..MAX_PARTS-1)


# ===========================================================================
# Settings
# ===========================================================================

class Settings:
    """The bridge's own settings (the shared ones live in :class:`b24common.Config`)."""

    def __init__(self, env: Mapping[str, str]):
        self.retry_hours = bc.env_number(env, "BRIDGE_RETRY_HOURS", 24.0, 0.0001, 24 * 30)
        self.fallback_text = (env.get("BRIDGE_FALLBACK_TEXT") or "").strip()
        self.max_chars = int(bc.env_number(env, "BRIDGE_MAX_REPLY_CHARS", 4096, 100, bc.MESSAGE_MAX_CHARS,
                                           integer=True))
        self.forget_days = bc.env_number(env, "BRIDGE_FORGET_DAYS", 7.0, 0.00001, 3650)
        listen = (env.get("BRIDGE_HTTP_LISTEN") or "").strip()
        self.http_listen = bc.parse_listen(listen, "BRIDGE_HTTP_LISTEN") if listen else None
        self.stuck_sec = bc.env_number(env, "BRIDGE_STUCK_SEC", 0, 0, 86400)   # 0: from the timeouts
        self.human_pause_min = bc.env_number(env, "BRIDGE_HUMAN_PAUSE_MIN", 30, 0, 7 * 24 * 60)
        self.handoff_to = (env.get("BRIDGE_HANDOFF_TO") or "").strip().lower()
        if self.handoff_to not in ("", "queue"):
            raise bc.ConfigError("BRIDGE_HANDOFF_TO=%s: expected queue (or nothing)" % self.handoff_to)
        self.debounce = bc.env_number(env, "BRIDGE_DEBOUNCE_SEC", 0, 0, 600)
        self.concurrency = int(bc.env_number(env, "BRIDGE_MAX_CONCURRENCY", 8, 1, 64, integer=True))
        self.take = (env.get("BRIDGE_TAKE") or "").strip().lower()
        if self.take not in ("", "answer", "join", "off", "no"):
            raise bc.ConfigError("BRIDGE_TAKE=%s: expected answer (take queued dialogs) or join" % self.take)
        self.take = "" if self.take in ("off", "no") else self.take
        self.reply_batch = int(bc.env_number(env, "BRIDGE_REPLY_BATCH", 50, 1, bc.BATCH_MAX, integer=True))


def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_ol_bridge.py",
        description="Forward inbound Open Lines customer messages to your bot over HTTP and post its "
                    "replies back into Bitrix24.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  b24_ol_bridge.py                  run (settings from .env / the environment)\n"
               "  b24_ol_bridge.py --take           take queued dialogs so the bot can answer them\n"
               "  b24_ol_bridge.py --replay-dead    re-deliver dead letters, then run\n"
               "  b24_ol_bridge.py --demo           built-in emulator and echo bot, no portal\n"
               "\nsettings: B24_WEBHOOK_BASE, BOT_HTTP_URL (required); BOT_HTTP_AUTH, "
               "BOT_HTTP_TIMEOUT_SEC (120),\nBOT_MAX_REPLY_BYTES (1 MiB), BRIDGE_RETRY_HOURS (24), "
               "BRIDGE_FALLBACK_TEXT, BRIDGE_MAX_REPLY_CHARS (4096),\nBRIDGE_FORGET_DAYS (7), "
               "B24_BUSINESS_PHONE, B24_POLL_SEC (2), B24_STATE_DIR,\nB24_SOURCE (auto|poll|events), "
               "B24_RECONCILE_SEC (60), B24_LISTEN, B24_APP_TOKEN")
    parser.add_argument("--take", action="store_true",
                        help="when a dialog waits in the queue, take it (imopenlines.operator.answer) "
                             "so the reply can be posted")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="dialogs handled side by side (default: BRIDGE_MAX_CONCURRENCY or 8)")
    parser.add_argument("--state", metavar="FILE",
                        help="state database (default: bridge.db in $B24_STATE_DIR, systemd's "
                             "$STATE_DIRECTORY, or the XDG state folder)")
    parser.add_argument("--replay-dead", action="store_true",
                        help="put the dead letters back in line (all, or those of --dialog), then run")
    parser.add_argument("--dialog", metavar="chatN", help="with --replay-dead: only this dialog's")
    parser.add_argument("--once", action="store_true",
                        help="one poll cycle, handle what is ready, exit (retries wait for the next run)")
    parser.add_argument("--demo", action="store_true",
                        help="run against a built-in emulator and echo bot with simulated customers")
    parser.add_argument("--register-bot", metavar="URL",
                        help="register the bridge as an Open Lines chat bot whose events go to URL (the public "
                             "https:// address of B24_LISTEN's receiver), then exit")
    parser.add_argument("--unregister-bot", action="store_true",
                        help="remove the chat bot registered with --register-bot, then exit")
    bc.add_common_arguments(parser, poll=True)
    args = parser.parse_args(argv)
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers: expected 1 to 64")
    if args.register_bot and args.unregister_bot:
        parser.error("--register-bot and --unregister-bot: one at a time")
    if args.dialog and not args.replay_dead:
        parser.error("--dialog goes with --replay-dead")
    if args.dialog:
        try:
            args.dialog = bc.parse_dialog_id(args.dialog)
        except bc.UsageError as exc:
            parser.error("--dialog: %s" % exc)
    return args


# ===========================================================================
# Durable state: SQLite (WAL), one row per dialog and per message in flight
# ===========================================================================

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
"""


class Row:
    """One message in flight (a row of ``inbox``)."""

    __slots__ = ("dialog", "message_id", "payload", "state", "answer", "posted", "handoff", "attempts",
                 "first_try", "next_try", "error", "arrived")

    def __init__(self, values: tuple):
        (self.dialog, self.message_id, payload, self.state, answer, self.posted, handoff, self.attempts,
         self.first_try, self.next_try, self.error, self.arrived) = values
        self.payload = json.loads(payload)
        self.answer = json.loads(answer) if answer else []
        self.handoff = bool(handoff)

    @property
    def where(self) -> str:
        return "%s #%d" % (bc.display_dialog_id(self.dialog), self.message_id)


class Store:
    """The bridge's state database.  Every thread has its own connection; every change is one
    short transaction, so one message's bookkeeping costs the same at 50k dialogs as at 100."""

    COLUMNS = ("dialog, message_id, payload, state, answer, posted, handoff, attempts, first_try, next_try, "
               "error, arrived")

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._local = threading.local()
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            # 0600 before SQLite opens it: its -wal and -shm files take the same mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db.executescript(SCHEMA)
            self._add_missing_columns()
        except (OSError, sqlite3.Error) as exc:
            raise bc.ConfigError("%s: cannot open the state database (%s)" % (self.path, exc)) from None

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
        values = [json.dumps(v, ensure_ascii=False) if k == "answer" else v for k, v in fields.items()]
        self._tx([("UPDATE inbox SET %s WHERE dialog = ? AND message_id = ?" % cols,
                   values + [row.dialog, row.message_id])])

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


# ===========================================================================
# One bridge per state: a lock file naming its holder
# ===========================================================================

class InstanceLock:
    """``flock`` on ``<state>.lock``; the file holds the pid of the bridge that has it."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ===========================================================================
# Dead letters: JSON Lines beside the database
# ===========================================================================

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
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return taken


# ===========================================================================
# The bridge: poll -> inbox -> workers (bot, then replies)
# ===========================================================================

class Bridge:
    """The main thread polls and writes new customer messages to the inbox; workers take one
    dialog at a time, oldest message first: ask the bot, keep its answer, post it part by part."""

    def __init__(self, client: bc.Client, bot: botlib.BotClient, args: argparse.Namespace, settings: Settings,
                 interval: float, environ: Mapping[str, str] | None = None):
        self.client = client
        self.poller: bc.Poller = None      # type: ignore[assignment]  -- see attach()
        self.store: Store = None           # type: ignore[assignment]
        self.dead: DeadLetters = None      # type: ignore[assignment]
        self.args, self.settings, self.interval = args, settings, interval
        self.base_environ = dict(os.environ if environ is None else environ)   # SIGHUP re-reads on top of it
        self.cfg = client.config
        self.stop = threading.Event()
        self.lock = threading.Lock()          # guards the scheduling sets below; no I/O under it
        self.ready: queue.Queue = queue.Queue()
        self.queued: set = set()              # dialogs in `ready`
        self.held: set = set()                # dialogs a worker is on
        self.delayed: list = []               # heap of (monotonic due, dialog)
        self.busy = 0
        self.stats = collections.Counter()
        self.cannot_post: dict = {}           # dialog -> session id in which posting was refused
        self.uncommitted: list = []           # rows whose save failed; retried before polling on
        self.activity: dict = {}              # dialog -> portal time of its newest message (not saved yet)
        self.fresh: set = set()               # (dialog, id) written by this process: no crash behind them
        self.save_error = ""
        self.watchdog = bc.watchdog_seconds()
        self.last_ping = 0.0
        self.last_prune = time.monotonic()
        self.rng = random.Random()
        self.live = Liveness(settings.stuck_sec or max(self.cfg.bot_timeout, self.cfg.http_timeout) + 60)
        client.on_progress = self.live.beat
        self.trouble: tuple = ()             # (since, what) while the portal cannot be reached
        self.phase = "starting"
        self.last_poll_ok = 0.0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.reload_requested = False
        self.told_stuck = False
        self.http: HealthServer | None = None
        self.workers = args.workers or settings.concurrency
        self.take = "answer" if getattr(args, "take", False) else settings.take
        self._use_bots(self.cfg, bot)
        self.pauses: dict = {}                # dialog -> (until, session, id of the last human message)
        self.handed: dict = {}                # dialog -> session the bot handed over
        self.pause_changes: dict = {}         # pauses not saved yet
        self.told_paused: dict = {}
        self.told_unrouted: set = set()
        self.posting: set = set()             # dialogs whose answer the poster is posting
        self.rewake: set = set()              # woken while held or posting: wake again when released
        self.outbox: queue.Queue = queue.Queue()
        self.inbound: push.Inbound | None = None     # the sources (see choose_sources); None: scans only
        self.pending: list = []               # batches not handled yet (an outage, a full disk)
        self.positions: dict = {}             # the sources' positions to save with the next commit (cycle())
        self.chat_bot: dict | None = None      # the registered Open Lines chat bot (--register-bot)
        self.told_bot: set = set()
        self.scans = 0                        # scans done (--once waits for one)

    def _use_bots(self, cfg: bc.Config, bot: botlib.BotClient | None) -> None:
        self.cfg_for_bots = cfg
        self.cfg_routes = dict(cfg.bot_routes)
        self.bot_url = cfg.bot_url
        self.bots = {bot.url: bot} if bot is not None else {}

    def attach(self, poller: bc.Poller, store: Store, dead: DeadLetters) -> None:
        self.poller, self.store, self.dead = poller, store, dead
        self.pauses, self.handed = store.pauses()

    # -- scheduling ------------------------------------------------------------------
    def wake(self, dialog: str, at: float | None = None) -> None:
        with self.lock:
            if at is not None and at > time.monotonic():
                heapq.heappush(self.delayed, (at, dialog))
            elif dialog in self.held or dialog in self.posting:
                self.rewake.add(dialog)      # whoever has it now wakes it again when it lets go
            elif dialog not in self.queued:
                self.queued.add(dialog)
                self.ready.put(dialog)

    def release_due(self) -> float:
        """Move dialogs whose wait is over to the ready queue; seconds until the next one."""
        now = time.monotonic()
        due = []
        with self.lock:
            while self.delayed and self.delayed[0][0] <= now:
                due.append(heapq.heappop(self.delayed)[1])
            wait = self.delayed[0][0] - now if self.delayed else 3600.0
        for dialog in due:
            self.wake(dialog)
        return wait

    def start_workers(self) -> None:
        for n in range(self.workers):
            threading.Thread(target=self._worker, name="bridge-worker-%d" % n, daemon=True).start()
        threading.Thread(target=self._poster, name="bridge-poster", daemon=True).start()

    def _worker(self) -> None:
        while True:
            self.live.beat("waiting for work")
            try:
                dialog = self.ready.get(timeout=1.0)
            except queue.Empty:
                continue
            with self.lock:
                self.queued.discard(dialog)
                if dialog in self.held:
                    continue
                self.held.add(dialog)
            retry_at = None
            try:
                retry_at = self._serve(dialog)
            except Exception as exc:  # noqa: BLE001 - a worker survives everything; the work waits
                log.exception("%s: unexpected failure (%s); trying this dialog again in 30 s",
                              bc.display_dialog_id(dialog), exc)
                retry_at = time.monotonic() + 30
            finally:
                with self.lock:
                    self.held.discard(dialog)
                    again = dialog in self.rewake and dialog not in self.posting
                    if again:
                        self.rewake.discard(dialog)
            if retry_at is not None:
                self.wake(dialog, retry_at)
            if again:
                self.wake(dialog)

    def _serve(self, dialog: str) -> float | None:
        """Handle *dialog*'s messages in order; return when to come back (None: nothing left)."""
        while not self.stop.is_set():
            try:
                row = self.store.head(dialog)
            except sqlite3.Error as exc:
                self._note_save_error(exc)
                return time.monotonic() + 5
            if row is None:
                return None
            wait = row.next_try - time.time()
            if wait > 0:
                return time.monotonic() + wait
            with self.lock:
                self.busy += 1
            self.live.beat("handling %s" % row.where)
            try:
                if self.step(row) == "posting":
                    return None      # the poster has the dialog now; it wakes it when done
            except sqlite3.Error as exc:
                self._note_save_error(exc)
                return time.monotonic() + 5
            finally:
                with self.lock:
                    self.busy -= 1
        return None

    # -- one message -------------------------------------------------------------------
    def payload(self, msg: bc.Message, new_dialog: bool) -> dict:
        did = bc.display_dialog_id(msg.dialog_id)
        return {"platform": "bitrix24", "direction": "inbound", "dialog_id": did, "sender": did,
                "chat_id": msg.chat_id, "message_id": msg.id, "date": msg.date, "text": msg.text,
                "message": msg.text, "attachments": list(msg.attachments),
                "phone": msg.customer_phone or None, "customer_phone": msg.customer_phone or None,
                "customer_name": msg.customer_name or msg.author_name, "author_id": msg.author_id,
                "line_id": msg.line_id, "session_id": msg.session_id or None,
                "business_phone": self.cfg.business_phone or None, "new_dialog": new_dialog,
                "event_id": botlib.reply_template_id(self.client.host, msg.dialog_id, msg.id, -1),
                "message_ids": [msg.id], "crm": {k: msg.crm.get(k) for k in ("lead", "contact", "deal", "company")},
                "waiting": msg.waiting,
                "metadata": {"dialog_id": did, "message_id": msg.id, "line_id": msg.line_id,
                             "session_id": msg.session_id or None, "customer_name": msg.customer_name or None,
                             "customer_phone": msg.customer_phone or None, "portal": self.client.host}}

    def step(self, row: Row) -> str | None:
        if not self._reconcile(row):
            return None
        if row.state == "new":
            return self.ask(row)
        if row.state == "answered":
            return self.to_poster(row)
        self.store.finish(row)
        return None

    def _backoff(self, row: Row) -> float:
        base = min(BACKOFF_CAP_SEC, BACKOFF_FIRST_SEC * (2 ** min(row.attempts, 20)))
        return base * self.rng.uniform(0.8, 1.0)

    def _retry_later(self, row: Row, error: str, *, unusable: bool = False) -> bool:
        """Schedule another try; False when this message's time (or patience) is up."""
        first = row.first_try or time.time()
        attempts = row.attempts + 1
        over = time.time() - first >= self.settings.retry_hours * 3600 or (unusable and attempts >= UNUSABLE_TRIES)
        if over:
            return False
        delay = self._backoff(row)
        self.stats["retries"] += 1
        self.store.update(row, attempts=attempts, first_try=first, next_try=time.time() + delay, error=error)
        log.warning("%s: %s; trying again in %.0f s (attempt %d)", row.where, error, delay, attempts + 1)
        return True

    def _template(self, row: Row, index: int) -> str:
        """The ``TEMPLATE_ID`` of part *index* of this message's answer (the same on every try)."""
        return botlib.reply_template_id(self.client.host, row.dialog, row.message_id, index)

    def _dead_letter(self, row: Row, reason: str, stage: str) -> None:
        self.dead.add(row, reason, stage)
        self.stats["dead_letters"] += 1

    def _bury(self, row: Row, reason: str, stage: str) -> None:
        """Dead letter, fallback text (if set), and the row is done."""
        self._dead_letter(row, reason, stage)
        log.error("%s: %s -- moved to the dead letters (%s); b24_ol_bridge.py --replay-dead re-delivers it",
                  row.where, reason, self.dead.path)
        if stage == "bot" and self.settings.fallback_text and row.dialog not in self.cannot_post:
            try:
                bc.send_text(self.client, row.dialog, self.settings.fallback_text,
                             template_id=self._template(row, FALLBACK_INDEX))
                log.info("%s: posted BRIDGE_FALLBACK_TEXT instead", row.where)
            except bc.B24Error as exc:
                log.error("%s: BRIDGE_FALLBACK_TEXT not posted: %s", row.where, bc.format_error(exc))
        self.store.finish(row)

    def _can_answer(self, row: Row) -> bool:
        """The bot is not asked for a dialog we cannot post to (logged once per dialog)."""
        dialog, session = row.dialog, row.payload.get("session_id") or 0
        if dialog in self.cannot_post and self.cannot_post[dialog] == session:
            return False
        if row.payload.get("waiting") and not self.take and not self.chat_bot:
            self._cannot_post(row, "it waits in the queue and the webhook user has not taken it "
                                   "(--take or BRIDGE_TAKE=answer lets the bridge take queued dialogs)")
            return False
        return True

    def _paused(self, row: Row) -> str:
        """Why the bot stays out of this message's dialog now ("" if it does not)."""
        session = row.payload.get("session_id") or 0
        with self.lock:
            handed = self.handed.get(row.dialog)
            pause = self.pauses.get(row.dialog)
        if handed and handed == session:
            return "the bot handed this conversation over to a person"
        if pause:
            until, paused_session, _human = pause
            if session and paused_session and session != paused_session:
                with self.lock:
                    self.pauses.pop(row.dialog, None)     # a new session: the bot is back
                return ""
            if time.time() < until:
                return "a person wrote in this dialog; the bot pauses until %s" % time.strftime(
                    "%H:%M", time.localtime(until))
        return ""

    def _human_after(self, row: Row) -> bool:
        """Did a person write in the dialog after this customer message (its answer is stale)?"""
        with self.lock:
            pause = self.pauses.get(row.dialog)
        return bool(pause and pause[2] > row.message_id)

    def _bot_for(self, row: Row) -> botlib.BotClient | None:
        line = row.payload.get("line_id")
        url = self.cfg_routes.get(line) or self.bot_url
        if not url:
            if line not in self.told_unrouted:
                self.told_unrouted.add(line)
                log.warning("%s: line %s has no bot (no BOT_ROUTES entry, no BOT_HTTP_URL): its messages are "
                            "not forwarded", row.where, line)
            return None
        with self.lock:
            bot = self.bots.get(url)
            if bot is None:
                bot = self.bots[url] = botlib.BotClient(self.cfg_for_bots, url)
        return bot

    def _cannot_post(self, row: Row, why: str) -> None:
        session = row.payload.get("session_id") or 0
        if self.cannot_post.get(row.dialog) != session:
            log.warning("%s: the bot is not asked while the webhook user cannot post in %s: %s", row.where,
                        bc.display_dialog_id(row.dialog), why)
        self.cannot_post[row.dialog] = session

    def _posted_parts(self, row: Row) -> int:
        """How many parts of this message's answer are already in the dialog (by their TEMPLATE_IDs, or the
        chat bot's texts: imbot.message.add takes no TEMPLATE_ID).

        Asked once for a message left over from an earlier run: a crash between posting a part and
        recording it must not post it twice, even on a portal that has forgotten the uuid."""
        ours = {self._template(row, i): i for i in range(MAX_PARTS)}
        found, after = -1, row.message_id
        for _page in range(4):
            res = self.client.call("im.dialog.messages.get", {"DIALOG_ID": row.dialog, "FIRST_ID": after,
                                                              "LIMIT": bc.MESSAGES_PAGE})
            msgs = [m for m in bc.as_map(res).get("messages") or [] if isinstance(m, Mapping)]
            for m in msgs:
                if m.get("uuid") in ours:
                    found = max(found, ours[m["uuid"]])
                elif self.chat_bot and bc.as_int(m.get("author_id")) == bc.as_int(self.chat_bot["bot_id"]) \
                        and row.answer and m.get("text") in row.answer[found + 1:]:
                    found = row.answer.index(m.get("text"), found + 1)   # the bot's parts carry no uuid
            if len(msgs) < bc.MESSAGES_PAGE:
                break
            after = max(bc.as_int(m.get("id")) for m in msgs)
        return found + 1

    def _reconcile(self, row: Row) -> bool:
        """For a message left over from an earlier run: False if it needs nothing more."""
        key = (row.dialog, row.message_id)
        if key in self.fresh:
            return True
        try:
            done = self._posted_parts(row)
        except bc.B24Error as exc:
            log.warning("%s: cannot check the dialog for replies already posted (%s); trying later", row.where, exc)
            self._retry_later(row, "dialog check failed")
            return False
        self.fresh.add(key)
        if row.state == "new" and done:
            log.info("%s: its replies are already in the dialog; not asking the bot again", row.where)
            self.store.finish(row)
            return False
        if row.state == "answered" and done > row.posted:
            log.info("%s: replies 1-%d are already in the dialog; posting the rest", row.where, done)
            self.store.update(row, posted=done)
        return True

    def ask(self, row: Row) -> str | None:
        if not self._can_answer(row):
            self.stats["skipped"] += 1
            self.store.finish(row)
            return None
        why = self._paused(row)
        if why:
            if self.told_paused.get(row.dialog) != why:
                log.info("%s: not forwarded: %s", row.where, why)
                self.told_paused[row.dialog] = why
            self.stats["paused"] += 1
            self.store.finish(row)
            return None
        self.told_paused.pop(row.dialog, None)
        bot = self._bot_for(row)
        if bot is None:
            self.stats["skipped"] += 1
            self.store.finish(row)
            return None
        if self.settings.debounce and not row.attempts:
            group = self.store.waiting_rows(row.dialog)
            newest = max(r.arrived for r in group) if group else 0
            if time.time() - newest < self.settings.debounce:
                self.store.update(row, next_try=newest + self.settings.debounce)
                return None
            if len(group) > 1:
                row = self._fold(group)
        if row.payload.get("waiting") and self.take and not self.chat_bot:
            try:
                bc.take_dialog(self.client, row.dialog, self.take)
                log.info("%s: %s the dialog from the queue to answer it", row.where,
                         "joined" if self.take == "join" else "took")
                row.payload["waiting"] = False
            except (bc.RateLimitError, bc.ServerError, bc.TransportError) as exc:
                if not self._retry_later(row, "could not take the dialog yet (%s)" % exc):
                    self._bury(row, "could not take the dialog: %s" % exc, "bot")
                return None
            except bc.B24Error as exc:
                log.info("%s: not taken (%s); answering if we can", row.where, exc)
        payload = dict(row.payload, attempt=row.attempts + 1)
        payload.pop("waiting", None)
        started = time.monotonic()
        self.stats["forwarded"] += 1
        self.live.beat("asking the bot about %s" % row.where)
        try:
            answer = bot.ask(payload, headers={"Idempotency-Key": row.payload.get("event_id") or ""})
        except botlib.BotError as exc:
            self.live.beat("handling %s" % row.where)
            self.stats["bot_failures"] += 1
            if not self._retry_later(row, str(exc), unusable=not exc.retryable):
                why = ("the bot's answer stayed unusable after %d tries: %s" % (UNUSABLE_TRIES, exc)
                       if not exc.retryable else "the bot did not answer for %g hours: %s"
                       % (self.settings.retry_hours, exc))
                self._bury(row, why, "bot")
            return None
        self.live.beat("handling %s" % row.where)
        took = time.monotonic() - started
        self.stats["bot_seconds"] += took
        with self.lock:
            self.latency[next((i for i, b in enumerate(LATENCY_BUCKETS) if took <= b), len(LATENCY_BUCKETS))] += 1
        parts: list = []
        for text in answer.texts:
            parts.extend(bc.split_text(text, self.settings.max_chars))
        if len(parts) > MAX_PARTS:
            log.warning("%s: the answer makes %d messages; posting the first %d, the rest is cut", row.where,
                        len(parts), MAX_PARTS)
            parts = parts[:MAX_PARTS]
        log.info("%s: bot answered in %.1f s with %d message%s%s", row.where, took,
                 len(parts), "" if len(parts) == 1 else "s", " and hands over to a person" if answer.handoff else "")
        if self.args.demo:      # a demo shows the conversation; a real journal keeps texts out
            log.info("  customer %s: %s", row.payload.get("customer_name"), row.payload.get("text"))
            for text in parts:
                log.info("  bot: %s", text)
        # the answer is kept before any of it is posted: a restart posts the rest of the same answer
        self.store.update(row, state="answered", answer=parts, posted=0, handoff=int(answer.handoff),
                          attempts=0, first_try=None, next_try=0, error=None)
        return self.to_poster(row)

    def _fold(self, group: list) -> Row:
        """Messages of one burst become one bot turn on the last of them."""
        last = group[-1]
        texts = [r.payload.get("text") or "" for r in group]
        last.payload.update(text="\n".join(texts), message="\n".join(texts),
                            message_ids=[r.message_id for r in group],
                            attachments=[a for r in group for a in r.payload.get("attachments") or []],
                            new_dialog=any(r.payload.get("new_dialog") for r in group))
        self.store.fold(group, last)
        log.info("%s: %d messages within BRIDGE_DEBOUNCE_SEC=%g s go to the bot as one turn", last.where,
                 len(group), self.settings.debounce)
        return last

    # -- posting: replies of many dialogs in one batch ---------------------------------------
    def to_poster(self, row: Row) -> str | None:
        if self._human_after(row):
            log.info("%s: a person wrote in the dialog meanwhile; the bot's answer is not posted", row.where)
            self.stats["dropped_late"] += 1
            self.store.finish(row)
            return None
        with self.lock:
            self.posting.add(row.dialog)
            self.busy += 1
        self.outbox.put(row)
        return "posting"

    def _release(self, row: Row, *, again_at: float | None = None) -> None:
        """The poster is done with this row (for now): the dialog goes back to the workers."""
        with self.lock:
            self.posting.discard(row.dialog)
            self.rewake.discard(row.dialog)
            self.busy -= 1
        self.wake(row.dialog, again_at)

    def _poster(self) -> None:
        while True:
            self.live.beat("waiting for replies to post")
            try:
                first = self.outbox.get(timeout=1.0)
            except queue.Empty:
                continue
            time.sleep(0.02)             # let a burst gather
            jobs = {first.dialog: first}
            while len(jobs) < self.settings.reply_batch:
                try:
                    row = self.outbox.get_nowait()
                except queue.Empty:
                    break
                if row.dialog in jobs:   # never two parts of one dialog in one batch: order first
                    self.outbox.put(row)
                    break
                jobs[row.dialog] = row
            try:
                self._post_batch(list(jobs.values()))
            except Exception as exc:  # noqa: BLE001 - the poster survives everything; the rows wait
                log.exception("posting replies failed unexpectedly (%s); they are retried in 30 s", exc)
                for row in jobs.values():
                    self._release(row, again_at=time.monotonic() + 30)

    def _post_batch(self, rows: list) -> None:
        live = []
        for row in rows:
            if self._human_after(row):
                log.info("%s: a person wrote in the dialog meanwhile; the rest of the answer is not posted", row.where)
                self.stats["dropped_late"] += 1
                self.store.finish(row)
                self._release(row)
            elif row.posted >= len(row.answer):
                self._done(row)
            else:
                live.append(row)
        if not live:
            return
        if len(live) == 1 or self.chat_bot:   # one reply (or the chat bot's): one request each
            for row in live:
                self.live.beat("posting a reply of %s" % row.where)
                self._after_post(row, self._post_one(row))
            return
        names = {"r%d" % i: row for i, row in enumerate(live)}
        commands = {name: ("im.message.add", {
            "DIALOG_ID": row.dialog, "MESSAGE": row.answer[row.posted],
            "TEMPLATE_ID": self._template(row, row.posted)})
            for name, row in names.items()}
        self.live.beat("posting %d repl%s" % (len(live), "y" if len(live) == 1 else "ies"))
        try:
            result = self.client.batch(commands)
            outcomes = {name: result.errors.get(name) for name in names}
            missing = [n for n in names if n not in result.results and n not in result.errors]
        except (bc.RateLimitError, bc.ServerError, bc.TransportError) as exc:
            # the answer to the whole batch was lost or refused: find out, reply by reply
            outcomes, missing = {}, list(names)
            log.info("replies not confirmed (%s); looking for them in their dialogs", exc)
        if missing:
            found = self._find_posted({n: names[n] for n in missing})
            for n in missing:
                outcomes[n] = None if found.get(n) else bc.UnknownOutcomeError("not confirmed", "not in the dialog yet")
        for name, row in names.items():
            self._after_post(row, outcomes.get(name))

    def _post_one(self, row: Row) -> Exception | None:
        """Post the next part of *row*'s answer: as the chat bot when one is registered (falling back to
        the webhook user where the bot is not in the chat), else with ``im.message.add``."""
        text = row.answer[row.posted]
        if self.chat_bot:
            try:
                self.client.call("imbot.message.add", {
                    "BOT_ID": self.chat_bot["bot_id"], "CLIENT_ID": self.chat_bot["client_id"],
                    "DIALOG_ID": row.dialog, "MESSAGE": text}, write=True)
                return None
            except bc.UnknownOutcomeError as exc:
                # imbot.message.add has no TEMPLATE_ID: _posted_parts() looks for the bot's texts instead
                try:
                    return None if self._posted_parts(row) > row.posted else exc
                except bc.B24Error:
                    return exc
            except (bc.RateLimitError, bc.ServerError, bc.TransportError, bc.AuthError) as exc:
                return exc
            except bc.APIError as exc:
                if row.dialog not in self.told_bot:
                    self.told_bot.add(row.dialog)
                    log.warning("%s: the chat bot cannot post in %s (%s): answering as the webhook user",
                                row.where, bc.display_dialog_id(row.dialog), exc)
        try:
            bc.send_text(self.client, row.dialog, text, template_id=self._template(row, row.posted), patience=0)
            return None
        except bc.B24Error as exc:
            return exc

    def _find_posted(self, rows: dict) -> dict:
        try:
            br = self.client.batch({n: ("im.dialog.messages.get", {"DIALOG_ID": r.dialog, "LAST_ID": 0,
                                                                   "LIMIT": bc.MESSAGES_PAGE})
                                    for n, r in rows.items()})
        except bc.B24Error:
            return {}
        out = {}
        for n, r in rows.items():
            template = self._template(r, r.posted)
            msgs = bc.as_map(br.results.get(n)).get("messages") or []
            out[n] = any(isinstance(m, Mapping) and m.get("uuid") == template for m in msgs)
        return out

    def _after_post(self, row: Row, error: Exception | None) -> None:
        index, total = row.posted, len(row.answer)
        if error is None:
            self.stats["replies"] += 1
            self.store.update(row, posted=index + 1, attempts=0, first_try=None)
            if row.posted < total:
                self.outbox.put(row)      # the next part, in a later batch
            else:
                self._done(row)
            return
        if isinstance(error, bc.NotMemberError):
            self._cannot_post(row, "the portal says it is not a member (CANCELED): the dialog waits in "
                                   "the queue or its session was closed")
            self._bury(row, "not posted: the webhook user is not a member of the dialog", "post")
            self._release(row)
            return
        if isinstance(error, (bc.RateLimitError, bc.ServerError, bc.TransportError, bc.DuplicateUuidError)):
            if self._retry_later(row, "reply %d/%d not posted yet (%s)" % (index + 1, total, error)):
                self._release(row, again_at=time.monotonic() + max(0.0, row.next_try - time.time()))
            else:
                self._bury(row, "reply %d/%d not posted for %g hours: %s" % (
                    index + 1, total, self.settings.retry_hours, error), "post")
                self._release(row)
            return
        # this part is refused for good: a dead letter for it, the rest goes on
        self.stats["send_failures"] += 1
        self._dead_letter(row, "reply %d/%d refused: %s" % (index + 1, total, bc.format_error(error)), "post")
        log.error("%s: reply %d/%d refused (%s); it is in the dead letters, the rest goes on",
                  row.where, index + 1, total, error)
        self.store.update(row, posted=index + 1)
        if row.posted < total:
            self.outbox.put(row)
        else:
            self._done(row)

    def _done(self, row: Row) -> None:
        if row.handoff:
            self._hand_over(row)
        self.store.finish(row)
        self._release(row)

    def _hand_over(self, row: Row) -> None:
        session = row.payload.get("session_id") or 0
        with self.lock:
            self.handed[row.dialog] = session
        self.store.set_handed_off(row.dialog, session)
        log.info("%s: the bot handed the dialog over to a person; it stays out of this conversation", row.where)
        line = row.payload.get("line_id")
        if self.settings.handoff_to == "queue" and line and row.dialog.startswith("chat"):
            try:
                self.client.call("imopenlines.operator.transfer", {"CHAT_ID": int(row.dialog[4:]),
                                                                    "TRANSFER_ID": "queue%d" % line}, write=True)
                log.info("%s: transferred to the queue of line %s", row.where, line)
            except bc.B24Error as exc:
                log.error("%s: could not transfer the dialog to the queue: %s", row.where, bc.format_error(exc))

    # -- the main loop -----------------------------------------------------------------
    def dispatch(self, msgs: list) -> list:
        """Customer messages -> inbox rows (new session = new_dialog); the rest needs nothing."""
        rows = []
        sessions: dict = {}
        for msg in msgs:
            if msg.author_kind == "operator" or (
                    msg.author_kind == "self" and not botlib.is_bridge_uuid(self.client.host, msg.uuid)):
                self._human_wrote(msg)
                continue
            if msg.author_kind != "customer":
                continue
            seen = sessions.get(msg.dialog_id)
            if seen is None:
                seen = self.store.session_seen(msg.dialog_id)
            new = msg.new_dialog or bool(msg.session_id and msg.session_id != seen)
            sessions[msg.dialog_id] = msg.session_id or seen
            rows.append({"dialog": msg.dialog_id, "message_id": msg.id, "payload": self.payload(msg, new),
                         "session": msg.session_id})
        return rows

    def _human_wrote(self, msg: bc.Message) -> None:
        """A person wrote (another operator, or someone typing as the webhook user): the bot pauses."""
        minutes = self.settings.human_pause_min
        if not minutes:
            return
        until = time.time() + minutes * 60
        with self.lock:
            before = self.pauses.get(msg.dialog_id)
            self.pauses[msg.dialog_id] = (until, msg.session_id, max(msg.id, before[2] if before else 0))
            self.pause_changes[msg.dialog_id] = self.pauses[msg.dialog_id]
        if not before or before[0] < time.time():
            log.info("%s #%d: %s wrote in the dialog; the bot pauses here until %s (or a new session)",
                     bc.display_dialog_id(msg.dialog_id), msg.id,
                     "someone as the webhook user" if msg.author_kind == "self" else "operator " + msg.author_name,
                     time.strftime("%H:%M", time.localtime(until)))

    def commit(self) -> bool:
        """Write what the last polls found; False (and nothing lost) if the disk said no."""
        rows = self.uncommitted
        changes = self.poller.take_dirty()
        meta = dict(self.poller.meta(), portal=self.client.host, user_id=self.poller.self_id)
        if self.positions:
            meta["sources"] = dict(self.positions)
        with self.lock:
            pauses, self.pause_changes = self.pause_changes, {}
        try:
            self.store.commit_cycle(rows, changes, meta, self.activity, pauses)
        except sqlite3.Error as exc:
            with self.lock:
                self.pause_changes = dict(pauses, **self.pause_changes)
            self.poller.mark_dirty(changes)
            self._note_save_error(exc)
            return False
        self.uncommitted = []
        self.activity = {}
        self.fresh.update((r["dialog"], r["message_id"]) for r in rows)
        if self.save_error:
            log.info("the state database is writable again")
            self.save_error = ""
        self.stats["received"] += len(rows)
        for dialog in {r["dialog"] for r in rows}:
            self.wake(dialog)
        return True

    def commit_or_raise(self) -> None:
        if not self.commit():
            raise bc.StateWriteError(self.save_error)

    def _note_save_error(self, exc: Exception) -> None:
        text = "cannot write the state database %s (%s); the work waits and is retried" % (self.store.path, exc)
        if text != self.save_error:
            log.error(text)
        self.save_error = text

    def cycle(self, batches: list | None = None) -> bool:
        """One round: a scan (*batches* None), or what the sources' batches point at.  False when what
        was read is not safe on disk yet (the batches are then not acknowledged)."""
        if self.uncommitted and not self.commit():
            return False        # do not read further while what we read is not safe yet
        for b in batches or ():
            if b.error is not None:
                raise b.error
        if batches and self.inbound is not None:
            self.positions = self.inbound.positions(after=batches)   # saved with the work they led to
        hints = None if batches is None else push.hints_of(batches)
        msgs = self.poller.poll(auto_ack=True, hints=hints)
        if hints is None or push.SCAN in hints:
            self.scans += 1
        for m in msgs:
            ts = m.timestamp
            if ts is not None:
                self.activity[m.dialog_id] = max(self.activity.get(m.dialog_id, 0.0), ts)
        self.uncommitted.extend(self.dispatch(msgs))
        return self.commit()

    def prune(self) -> None:
        """Forget dialogs idle for BRIDGE_FORGET_DAYS (they come back as first seen, from then on).

        Only dialogs whose last message is well before the last scan: one that comes back is read
        from that scan on, and must have nothing newer that we already handled."""
        watermark = self.poller.meta().get("watermark")
        if watermark is None:
            return
        try:
            idle = self.store.idle_dialogs(time.time() - self.settings.forget_days * 86400,
                                           watermark - 3 * bc.SYNC_MARGIN_SEC)
        except sqlite3.Error as exc:
            self._note_save_error(exc)
            return
        # a dialog waiting in the queue comes with every scan: forgetting it would only churn
        idle = [d for d in idle if not getattr(self.poller.dialogs.get(d), "waiting", False)]
        for dialog in idle:
            self.poller.forget(dialog)
            self.cannot_post.pop(dialog, None)
        if idle:
            names = ", ".join(bc.display_dialog_id(d) for d in idle[:5]) + (", ..." if len(idle) > 5 else "")
            log.info("forgot %d dialog(s) idle for %g days: %s", len(idle), self.settings.forget_days, names)

    # -- health ----------------------------------------------------------------------
    def problem(self) -> str:
        """Why the bridge is not healthy right now ("" when it is)."""
        stuck = self.live.stuck()
        if stuck:
            name, age, doing = stuck[0]
            return "%s made no progress for %.0f s (%s)" % (name, age, doing or "?")
        if self.save_error:
            return self.save_error
        if self.trouble:
            return "portal unreachable since %s: %s" % (time.strftime("%H:%M:%S", time.localtime(self.trouble[0])),
                                                       self.trouble[1])
        if self.phase != "running":
            return self.phase
        return ""

    def status(self) -> str:
        """systemd's status line: what it is doing, the counts, and what is wrong since when."""
        problem = self.problem()
        if self.phase != "running":
            return self.phase + ("; " + problem if problem and problem != self.phase else "")
        with self.lock:
            delayed = len(self.delayed)
        text = "polling %s; %d forwarded, %d replies, %d bot failures, %d dead letters, %d dialogs waiting to retry" % (
            self.client.host, self.stats["forwarded"], self.stats["replies"], self.stats["bot_failures"],
            self.stats["dead_letters"], delayed)
        return text + ("; " + problem if problem else "")

    def metrics(self) -> str:
        out: list = []
        counters = [("messages_received", "received", "Customer messages written to the inbox."),
                    ("bot_requests", "forwarded", "Requests made to the bot."),
                    ("bot_failures", "bot_failures", "Bot requests that failed or gave an unusable answer."),
                    ("replies_posted", "replies", "Replies posted into Bitrix24."),
                    ("retries", "retries", "Messages scheduled for another try."),
                    ("dead_letters", "dead_letters", "Messages or parts moved to the dead letters."),
                    ("skipped", "skipped", "Messages not forwarded because the dialog cannot be answered.")]
        for name, key, help_ in counters:
            _metric(out, "b24_bridge_%s_total" % name, "counter", help_, [("", self.stats[key])])
        with self.lock:
            buckets = list(self.latency)
        cumulative, samples = 0, []
        for bound, n in zip(list(LATENCY_BUCKETS) + ["+Inf"], buckets):
            cumulative += n
            samples.append(('{le="%s"}' % bound, cumulative))
        out.append("# HELP b24_bridge_bot_latency_seconds Time the bot took to answer.")
        out.append("# TYPE b24_bridge_bot_latency_seconds histogram")
        out.extend("b24_bridge_bot_latency_seconds_bucket%s %d" % (lab, v) for lab, v in samples)
        out.append("b24_bridge_bot_latency_seconds_sum %r" % float(self.stats["bot_seconds"]))
        out.append("b24_bridge_bot_latency_seconds_count %d" % cumulative)
        try:
            backlog = self.store.backlog() if self.store is not None else {}
        except sqlite3.Error:
            backlog = {}
        _metric(out, "b24_bridge_backlog", "gauge", "Messages in flight per dialog.",
                [('{dialog="%s"}' % bc.display_dialog_id(d), n) for d, n in sorted(backlog.items())])
        _metric(out, "b24_bridge_backlog_messages", "gauge", "Messages in flight, all dialogs.",
                [("", sum(backlog.values()))])
        _metric(out, "b24_bridge_portal_requests_total", "counter", "HTTP requests made to the portal.",
                [("", self.client.requests)])
        _metric(out, "b24_bridge_portal_limit_hits_total", "counter", "Portal answers refused by a rate limit.",
                [("", self.client.limit_hits)])
        _metric(out, "b24_bridge_last_poll_success_timestamp_seconds", "gauge",
                "Unix time of the last successful poll.", [("", self.last_poll_ok)])
        _metric(out, "b24_bridge_healthy", "gauge", "1 when /healthz says ok.", [("", 0 if self.problem() else 1)])
        return "\n".join(out) + "\n"

    def _supervise(self) -> None:
        """Feed systemd's watchdog while every thread makes progress; keep the status line fresh."""
        while True:
            stuck = self.live.stuck()
            now = time.monotonic()
            if stuck and not self.told_stuck:
                name, age, doing = stuck[0]
                log.error("%s made no progress for %.0f s (%s): no more watchdog pings%s", name, age, doing or "?",
                          "; systemd will restart the bridge" if self.watchdog else "")
                self.told_stuck = True
            elif not stuck and self.told_stuck:
                log.info("every thread makes progress again")
                self.told_stuck = False
            if now - self.last_ping >= (self.watchdog or STATUS_EVERY_SEC):
                fields = {"WATCHDOG": 1} if self.watchdog and not stuck else {}
                bc.sd_notify(**fields, STATUS=self.status())
                self.last_ping = now
            time.sleep(min(0.5, (self.watchdog or 1.0) / 2))

    def start_supervisor(self) -> None:
        threading.Thread(target=self._supervise, name="bridge-watchdog", daemon=True).start()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        bc.sd_notify(STATUS=self.status())

    # -- start-up, reload ------------------------------------------------------------------
    def wait_out(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run *attempt* until the portal answers: outages are waited out with capped backoff while
        the status line says what is wrong since when; credential and setting errors are raised."""
        failures = 0
        while True:
            self.live.beat(what)
            try:
                result = attempt()
                if self.trouble:
                    log.info("the portal answers again")
                self.trouble = ()
                return result
            except (bc.RateLimitError, bc.ServerError, bc.TransportError, bc.StateWriteError,
                    sqlite3.OperationalError) as exc:
                failures += 1
                if not self.trouble:
                    self.trouble = (time.time(), str(exc))
                delay = bc.poll_backoff(1.0, failures)
                log.warning("%s: %s -- trying again in %.0f s", what, exc, delay)
                bc.sd_notify(STATUS="%s; %s" % (self.phase, self.problem()))
                if self.stop.wait(delay):
                    raise KeyboardInterrupt from None

    def reload(self) -> None:
        """SIGHUP: read the settings file again; take the bot, its auth and the tuning from it.
        An invalid file changes nothing; in-flight work is untouched."""
        environ = dict(self.base_environ)
        try:
            bc.apply_env_file(self.args, environ)
            cfg = bc.Config.from_env(environ, require_bot=True)
            settings = Settings(environ)
            bot = botlib.BotClient(cfg) if cfg.bot_url else None
        except bc.B24Error as exc:
            log.error("reload refused, the running settings stay: %s", bc.format_error(exc))
            return
        if cfg.webhook_base != self.cfg.webhook_base:
            log.warning("reload: B24_WEBHOOK_BASE changed -- that needs a restart; the rest is applied")
        if settings.http_listen != self.settings.http_listen:
            log.warning("reload: BRIDGE_HTTP_LISTEN changed -- that needs a restart; the rest is applied")
        if (cfg.source, cfg.listen, cfg.app_token) != (self.cfg.source, self.cfg.listen, self.cfg.app_token):
            log.warning("reload: B24_SOURCE, B24_LISTEN or B24_APP_TOKEN changed -- that needs a restart; "
                        "the rest is applied")
        with self.lock:
            self._use_bots(cfg, bot)
        if settings.concurrency != self.settings.concurrency and not self.args.workers:
            log.warning("reload: BRIDGE_MAX_CONCURRENCY changed -- that needs a restart; the rest is applied")
        self.take = "answer" if getattr(self.args, "take", False) else settings.take
        self.settings = settings
        self.interval = self.args.interval or cfg.poll_sec
        if self.inbound is not None:
            self.inbound.retune(self.interval, cfg.reconcile_sec)
        self.live.stuck_after = settings.stuck_sec or max(cfg.bot_timeout, cfg.http_timeout) + 60
        if bot is not None and bot.insecure_remote:
            log.warning("BOT_HTTP_URL is plain http:// to %s: the bot's token and your customers' messages "
                        "cross the network unencrypted -- use https://", bot.host)
        log.info("reloaded the settings: bot on %s, polling every %g s",
                 bot.host if bot is not None else "(routes only)", self.interval)

    # -- the loop ------------------------------------------------------------------------
    def housekeeping(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        now = time.monotonic()
        if now - self.last_prune >= min(PRUNE_EVERY_SEC, self.settings.forget_days * 86400 / 4):
            self.last_prune = now
            self.prune()

    def idle(self) -> bool:
        """Nothing ready and nothing being handled (delayed retries may remain)."""
        with self.lock:
            return not self.queued and not self.held and not self.posting and self.ready.empty()

    def run(self) -> int:
        self.start_workers()
        try:
            for dialog, _due in self.store.dialogs_with_work():
                self.wake(dialog)
        except sqlite3.Error as exc:
            self._note_save_error(exc)
        self.phase = "running"
        bc.sd_notify(STATUS=self.status())
        log.info("bridging Open Lines on %s to the bot on %s (%d dialogs side by side)",
                 self.client.host, ", ".join(sorted({b.host for b in self.bots.values()} or {"(routes)"})),
                 self.workers)
        failures = 0
        next_poll = 0.0
        if self.inbound is None:
            self.inbound = push.Inbound([push.ScanSource(self.interval)])
        if not self.inbound.started:
            self.inbound.start()
        while not self.stop.is_set():
            self.live.beat("polling")
            now = time.monotonic()
            batches: list = []
            if now >= next_poll:
                batches, self.pending = self.pending or self.inbound.get(0), []
            if batches:
                try:
                    if self.cycle(batches):
                        self.inbound.done(batches)
                        next_poll = now
                    else:
                        self.pending = batches
                        next_poll = now + min(self.interval, 5.0)
                    failures = 0
                    self.last_poll_ok = time.time()
                    if self.trouble:
                        log.info("the portal answers again (unreachable since %s)",
                                 time.strftime("%H:%M:%S", time.localtime(self.trouble[0])))
                    self.trouble = ()
                except (bc.RateLimitError, bc.ServerError, bc.TransportError) as exc:
                    failures += 1
                    if not self.trouble:
                        self.trouble = (time.time(), str(exc))
                    delay = bc.poll_backoff(self.interval, failures)
                    log.warning("%s -- trying again in %.0f s", exc, delay)
                    next_poll = now + delay
                    self.pending = batches
            wait = self.release_due()
            self.housekeeping()
            if self.args.once:
                time.sleep(0.05)
                if self.scans and self.idle() and self.busy == 0:
                    break
                continue
            timeout = max(0.02, min(next_poll - time.monotonic(), wait, 1.0))
            if time.monotonic() >= next_poll and not self.pending:
                self.inbound.wait(timeout)       # wakes at once when a source has something
            else:
                self.stop.wait(timeout)
        self.inbound.close()
        self.phase = "stopping"
        bc.sd_notify(STOPPING=1, STATUS="stopping")
        self.stop.set()
        deadline = time.monotonic() + STOP_GRACE_SEC
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy:
            log.warning("leaving with replies still in progress; they are redone at the next start")
        if self.uncommitted:
            self.commit()
        self.phase = "running"
        log.info(self.status().replace("polling", "stopped; was polling", 1))
        return bc.EXIT_OK


# ===========================================================================
# Alive means alive: every thread shows progress, or the watchdog goes quiet
# ===========================================================================

class Liveness:
    """Heartbeats of the main loop and every worker.

    A thread beats when it waits for work, before and after every request
    (the REST client's progress hook) and around every bot exchange.  One
    that has not beaten for *stuck_after* seconds is stuck: systemd's
    watchdog is no longer fed, so a bridge that only looks alive gets
    restarted.  Outages do not count -- waiting them out is progress.
    """

    def __init__(self, stuck_after: float):
        self.stuck_after = stuck_after
        self.beats: dict = {}
        self.doing: dict = {}
        self.lock = threading.Lock()

    def beat(self, doing: str | None = None) -> None:
        name = threading.current_thread().name
        with self.lock:
            self.beats[name] = time.monotonic()
            if doing is not None:
                self.doing[name] = doing

    def stuck(self) -> list:
        """``[(thread, seconds since its last beat, what it was doing)]`` for the stuck ones."""
        now = time.monotonic()
        with self.lock:
            return [(name, now - t, self.doing.get(name, "")) for name, t in self.beats.items()
                    if now - t > self.stuck_after]


class HealthServer(ThreadingHTTPServer):
    """``GET /healthz`` and ``GET /metrics`` (Prometheus text format); nothing else, no secret."""

    daemon_threads = True

    def __init__(self, address: tuple, bridge: Bridge):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _HealthHandler)
        self.bridge = bridge

    def start(self) -> HealthServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="bridge-http",
                         daemon=True).start()
        return self

    def handle_error(self, request, client_address) -> None:   # a scraper that hung up: fine
        pass


class _HealthHandler(BaseHTTPRequestHandler):
    server: HealthServer

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
        raw = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        bridge = self.server.bridge
        if path == "/healthz":
            problem = bridge.problem()
            self._send(503 if problem else 200, (problem or "ok") + "\n")
        elif path == "/metrics":
            self._send(200, bridge.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, "not found: only /healthz and /metrics\n")

    def _refuse(self) -> None:
        self._send(405, "only GET\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _metric(out: list, name: str, kind: str, help_: str, samples: list) -> None:
    out.append("# HELP %s %s" % (name, help_))
    out.append("# TYPE %s %s" % (name, kind))
    for labels, value in samples:
        out.append("%s%s %s" % (name, labels, repr(float(value)) if isinstance(value, float) else value))


# ===========================================================================
# The Open Lines chat bot (--register-bot): events to the receiver, replies as the bot
# ===========================================================================

BOT_CODE = "b24_ol_bridge"


def chat_bot_path(folder: str) -> str:
    return os.path.join(folder, "chat-bot.json")


def load_chat_bot(folder: str, host: str) -> dict | None:
    """The bot registered with --register-bot for this portal (None if there is none)."""
    path = chat_bot_path(folder)
    try:
        with open(path, encoding="utf-8") as fh:
            reg = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise bc.ConfigError("%s: cannot read the chat bot registration (%s); run --register-bot again "
                             "or delete the file" % (path, exc)) from None
    if not isinstance(reg, dict) or not reg.get("bot_id") or not reg.get("client_id"):
        raise bc.ConfigError("%s: not a chat bot registration; run --register-bot again or delete the file" % path)
    if reg.get("portal") != host:
        raise bc.ConfigError("%s: the chat bot was registered on %s, not on %s" % (path, reg.get("portal"), host))
    bc.register_secret(str(reg["client_id"]))
    return reg


def register_chat_bot(client: bc.Client, folder: str, url: str, name: str) -> int:
    """``imbot.register`` an Open Lines bot (TYPE=O) whose events go to *url*; keep its CLIENT_ID."""
    parts = bc.split_url(url, "--register-bot", "the public https:// URL of the receiver (B24_LISTEN)")
    if parts.scheme != "https":
        log.warning("--register-bot %s: Bitrix24 posts events only to https:// addresses with a valid "
                    "certificate (plain http:// is fine for the local emulator only)", parts.hostname)
    old = load_chat_bot(folder, client.host) or {}
    client_id = old.get("client_id") or "b24olb" + secrets.token_hex(16)
    bc.register_secret(client_id)
    if "imbot" not in client.scopes():
        raise bc.ConfigError("--register-bot: the webhook has no imbot scope; add it to the incoming webhook "
                             "(Developer resources > Other > Inbound webhook) and try again")
    bot_id = bc.as_int(client.call("imbot.register", {
        "CODE": BOT_CODE, "TYPE": "O", "OPENLINE": "Y", "CLIENT_ID": client_id,
        "EVENT_MESSAGE_ADD": url, "EVENT_WELCOME_MESSAGE": url, "EVENT_BOT_DELETE": url,
        "PROPERTIES": {"NAME": name, "WORK_POSITION": "answers through b24_ol_bridge"}}, write=True))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = chat_bot_path(folder)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"portal": client.host, "bot_id": bot_id, "client_id": client_id, "url": url, "name": name}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)
    return bot_id


def unregister_chat_bot(client: bc.Client, folder: str) -> int | None:
    reg = load_chat_bot(folder, client.host)
    if reg is None:
        return None
    try:
        client.call("imbot.unregister", {"BOT_ID": reg["bot_id"], "CLIENT_ID": reg["client_id"]}, write=True)
    except bc.APIError as exc:
        if "BOT_ID_ERROR" not in str(exc):
            raise
        log.info("the portal no longer knows chat bot %s; forgetting it here too", reg["bot_id"])
    os.unlink(chat_bot_path(folder))
    return bc.as_int(reg["bot_id"])


def bot_command(args: argparse.Namespace, client: bc.Client, folder: str, environ: Mapping[str, str]) -> int:
    if args.unregister_bot:
        gone = unregister_chat_bot(client, folder)
        print("no chat bot is registered for %s (nothing in %s)" % (client.host, chat_bot_path(folder))
              if gone is None else "chat bot %d removed from %s" % (gone, client.host))
        return bc.EXIT_OK
    name = (environ.get("BRIDGE_BOT_NAME") or "Assistant").strip() or "Assistant"
    bot_id = register_chat_bot(client, folder, args.register_bot, name)
    print("chat bot %r registered on %s (id %d); its events go to %s" % (
        name, client.host, bot_id, bc.split_url(args.register_bot, "--register-bot", "").hostname))
    print("next: choose it as the chat bot of your Open Line (Contact Center > the line > Chat bots), and run "
          "the bridge with B24_LISTEN set so the receiver hears it")
    return bc.EXIT_OK


# ===========================================================================
# Start-up
# ===========================================================================

def all_bots(cfg: bc.Config) -> list:
    """``[(what, BotClient)]``: BOT_HTTP_URL's bot and each BOT_ROUTES bot."""
    out = [("BOT_HTTP_URL", botlib.BotClient(cfg))] if cfg.bot_url else []
    out += [("BOT_ROUTES line %d" % line, botlib.BotClient(cfg, url)) for line, url in sorted(cfg.bot_routes.items())]
    return out


def _banner(client: bc.Client, bot: botlib.BotClient | None) -> int:
    me = client.whoami()
    bc.check_scopes(client)
    log.info("signed in as %s (id %s) on %s", me["name"], me["id"], client.host)
    for what, each in all_bots(client.config):
        if each.insecure_remote:
            log.warning("%s is plain http:// to %s: the bot's token and your customers' messages "
                        "cross the network unencrypted -- use https://", what, each.host)
    return me["id"]


def replay_dead(store: Store, dead: DeadLetters, dialog: str | None) -> int:
    entries = dead.take(dialog)
    for entry in entries:
        store.requeue(entry)
    log.info("put %d dead letter(s)%s back in line", len(entries),
             " of %s" % bc.display_dialog_id(dialog) if dialog else "")
    return len(entries)


def _state_paths(args: argparse.Namespace, cfg: bc.Config, environ: Mapping[str, str]) -> tuple:
    folder = cfg.state_dir or bc.default_state_dir(environ)
    path = args.state or os.path.join(folder, "bridge.db")
    return folder, path, (path[:-3] if path.endswith(".db") else path)


def check(args: argparse.Namespace) -> int:
    """``--check``: the shared portal checks, then the state folder and the bot."""
    def extra(doctor: bc.Doctor, environ: dict, client: bc.Client | None) -> None:
        try:
            cfg = bc.Config.from_env(environ, require_bot=True)
            settings = Settings(environ)
        except bc.ConfigError as exc:
            doctor.fail("bridge settings: %s" % exc, "fix the setting")
            return
        doctor.ok("bridge settings: retry for %g h, replies up to %d characters%s" % (
            settings.retry_hours, settings.max_chars,
            ", health on %s:%d" % settings.http_listen if settings.http_listen else ""))
        folder, path, _base = _state_paths(args, cfg, environ)
        doctor.state_dir(os.path.dirname(os.path.abspath(path)))
        try:
            reg = load_chat_bot(folder, cfg.portal_host)
        except bc.ConfigError as exc:
            doctor.fail(str(exc), "run --register-bot again")
            reg = None
        if reg:
            doctor.ok("chat bot %s registered; replies go as the bot, its events to %s" % (
                reg["bot_id"], bc.split_url(str(reg.get("url") or "http://unknown/"), "url", "").hostname))
            if not cfg.listen:
                doctor.warn("a chat bot is registered but B24_LISTEN is not set: its events are not heard "
                            "(the scan still finds what the webhook user can see)")
        doctor.receiver_token(cfg, chat_bot=bool(reg))
        for what, bot in all_bots(cfg):
            if bot.insecure_remote:
                doctor.warn("bot (%s): plain http:// to %s -- the token and messages cross the network "
                            "unencrypted" % (what, bot.host))
            status, text = bot.probe()
            if status is None:
                doctor.fail("bot: %s" % text, "check %s and that the bot is running" % what.split(" line")[0])
                continue
            if status in (401, 403):
                doctor.fail("bot on %s answers HTTP %d to a probe" % (bot.host, status), "check BOT_HTTP_AUTH")
                continue
            if status >= 500:
                doctor.fail("bot on %s answers HTTP %d to a probe" % (bot.host, status), "look at the bot's logs")
                continue
            doctor.ok("bot on %s (%s) answers (HTTP %d to a GET probe)" % (bot.host, what, status))
            if cfg.bot_secret:
                status, text = bot.probe_signature()
                if status in (401, 403):
                    doctor.ok("bot on %s refuses a request with a wrong signature (HTTP %d)" % (bot.host, status))
                else:
                    doctor.warn("bot on %s accepted a request with a wrong signature (%s): does it check "
                                "X-B24-Signature with BOT_HTTP_SECRET?" % (bot.host, status or text))
    return bc.run_doctor(args, require_bot=True, extra=extra)


def main(argv: list | None = None) -> int:
    args = _parse_args(argv)
    bc.setup_logging(-1 if args.quiet else args.verbose, json_lines=args.log_json)

    def body() -> int:
        if args.check:
            return check(args)
        environ, demo = bc.environment_or_demo(args)
        servers: list = []
        scratch = None
        if demo:
            import mock_bot_server
            bot_server = mock_bot_server.BotServer().start()
            servers = [bc.start_demo_portal(environ), bot_server]
            environ["BOT_HTTP_URL"] = bot_server.url
            environ.pop("BOT_HTTP_AUTH", None)
            # the demo keeps its state in a throwaway folder, never in B24_STATE_DIR
            scratch = tempfile.mkdtemp(prefix="b24-bridge-demo-")
            args.state = os.path.join(scratch, "bridge.db")
            args.demo = args.take = True
            log.info("demo: an emulator stands in for the portal and an echo bot for yours; simulated "
                     "customers write every few seconds and get answers (Ctrl-C to stop)")
        lock = None
        bridge = None
        stopped_by: list = []
        try:
            cfg = bc.Config.from_env(environ, require_bot=True)
            settings = Settings(environ)
            client = bc.Client(cfg)
            bot_client = botlib.BotClient(cfg) if cfg.bot_url else None
            folder, path, base = _state_paths(args, cfg, environ)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise bc.ConfigError("%s: cannot create the state folder (%s)" % (path, exc.strerror)) from None
            if args.register_bot or args.unregister_bot:
                return bot_command(args, client, folder, environ)
            lock = InstanceLock(base + ".lock")
            lock.acquire()
            bridge = Bridge(client, bot_client, args, settings, args.interval or cfg.poll_sec,
                            environ=os.environ if not demo else environ)

            def on_signal(signum: int, frame: Any) -> None:
                stopped_by.append(signum)
                bridge.stop.set()

            def on_hup(signum: int, frame: Any) -> None:
                bridge.reload_requested = True
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
            signal.signal(signal.SIGHUP, on_hup)
            if settings.http_listen:
                try:
                    bridge.http = HealthServer(settings.http_listen, bridge).start()
                except OSError as exc:
                    raise bc.ConfigError("BRIDGE_HTTP_LISTEN=%s:%d: cannot listen (%s)" % (
                        settings.http_listen + (exc.strerror or exc,))) from None
                log.info("health and metrics on http://%s:%d/healthz and /metrics", *settings.http_listen)
            # systemd hears READY at once: from here on, outages are waited out, not fatal
            bc.sd_notify(READY=1, STATUS="starting: signing in to %s" % client.host)
            bridge.start_supervisor()
            bridge.phase = "signing in to %s" % client.host
            me = bridge.wait_out("signing in", lambda: _banner(client, bot_client))
            bridge.phase = "opening the state database"

            def open_store() -> Store:
                store = Store(path)
                if not args.state:
                    migrate_json_state(store, os.path.join(folder, "bridge.json"))
                return store
            store = bridge.wait_out("opening the state database", open_store)
            dead = DeadLetters(base + ".dead-letters.jsonl")
            saved = store.poller_state()
            if saved.get("portal") is not None and (saved["portal"], saved["user_id"]) != (client.host, me):
                raise bc.ConfigError("%s belongs to user %s on %s, not to user %s on %s: use another --state"
                                     % (store.path, saved["user_id"], saved["portal"], me, client.host))
            poller = bc.Poller(client, self_id=me)
            poller.load_state(saved)
            if not poller.started:
                bridge.phase = "reading where every dialog stands"
                bridge.wait_out("reading the dialogs", poller.start)
                log.info("starting from now: messages already in the dialogs are not forwarded")
            bridge.attach(poller, store, dead)
            bridge.chat_bot = load_chat_bot(folder, client.host)
            if bridge.chat_bot:
                log.info("replies go as the chat bot %s (id %s); where it is not in a dialog, as the webhook user",
                         bridge.chat_bot.get("name") or "", bridge.chat_bot["bot_id"])
            bridge.wait_out("writing the state", bridge.commit_or_raise)
            if not args.once:
                bridge.phase = "choosing the sources of inbound messages"
                sources = bridge.wait_out("choosing the sources", lambda: push.choose_sources(
                    client, self_id=me, interval=bridge.interval,
                    spool_path=base + ".receiver.sqlite",
                    client_id=(bridge.chat_bot or {}).get("client_id", ""),
                    waiting=poller.has_waiting,
                    skip=lambda m: bc.as_int(m.get("authorId")) == me and botlib.is_bridge_uuid(client.host, m.get("uuid"))))
                bridge.inbound = push.Inbound(sources)
                bridge.inbound.restore(bc.as_map(store.get_meta().get("sources")))
            if args.replay_dead:
                replay_dead(store, dead, args.dialog)
            code = bridge.run()
            return bc.EXIT_INTERRUPTED if signal.SIGINT in stopped_by else code
        except KeyboardInterrupt:
            bc.sd_notify(STOPPING=1, STATUS="stopping")
            log.info("stopped while starting")
            return bc.EXIT_INTERRUPTED if signal.SIGINT in stopped_by or bridge is None else bc.EXIT_OK
        finally:
            if bridge is not None and bridge.http is not None:
                bridge.http.shutdown()
                bridge.http.server_close()
            if lock is not None:
                lock.release()
            for server in servers:
                server.stop()
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
