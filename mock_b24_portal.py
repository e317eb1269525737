#!/usr/bin/env python3
"""A local Bitrix24 portal emulator for the Open Lines toolkit (stdlib only).

It speaks the REST API of ``docs/bitrix24-api.md`` (our fact sheet of the
real portal) on 127.0.0.1 -- shapes, ordering, errors, both rate limits --
over a small world: an operator who owns the webhook, other operators, a bot,
WhatsApp customers (connector users), several Open Lines with queues, LINES
chats with sessions, an ordinary group chat and a private dialog.

As a script::

    python3 mock_b24_portal.py [--port 0] [--simulate] [--dialogs N]

prints ``B24_WEBHOOK_BASE=<url>`` on its first line of stdout, then serves
until killed.  ``--simulate`` makes customers write every few seconds.

A control API (never under ``/rest/``) drives the world over HTTP, under
``/_control/``; every endpoint maps to a :class:`Portal` method of the same
name, usable directly from Python::

    POST /_control/customer_message   {"chat_id": 1771, "text": "hi"}
    POST /_control/new_conversation   {"line_id": 3, "name": "A", "phone": "+10000000199", "text": "hi"}
    POST /_control/join | /_control/leave   {"chat_id": 1771, "user_id": 7}
    POST /_control/operator_message   {"chat_id": 1771, "user_id": 9, "text": "..."}
    POST /_control/close_session      {"chat_id": 1771}
    GET  /_control/messages?chat_id=1771
    GET  /_control/stats              per-method counts, bytes, request log
    POST /_control/reset_stats
    POST /_control/fault              {"kind": "http500", "count": 2, "method": "im.recent.list"}
    POST /_control/limits             {"rate": 2, "burst": 50, "operating_limit": 420, ...}
    POST /_control/webhook            {"scopes": ["im"], "active": true}
    POST /_control/add_dialogs        {"count": 1000}
    GET  /_control/world
    POST /_control/customer_media     {"chat_id": 1771, "kind": "image", "name": "a.jpg", "size": 1000, "caption": ""}
    POST /_control/pin                {"chat_id": 1771, "user_id": 7, "pinned": true}
    POST /_control/add_line           {"line_id": 8, "name": "Strict", "queue": [9, 7], "offer": "one"}
    POST /_control/offer              {"chat_id": 1771, "user_id": 7}
    POST /_control/behave             {"row_lag": 1.5, "uuid_ttl": 3600, "message_add_delay": 2, "fail_after_uuid": 1}
    POST /_control/forget_uuids
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["Portal", "PortalServer", "RestError", "serve", "php_parse"]

WEBHOOK_USER_ID = 7
TZ = _dt.timezone(_dt.timedelta(hours=3))

# The real default limits (fact sheet §3).
DEFAULT_RATE = 2.0            # leaky bucket drain per second (non-Enterprise)
DEFAULT_BURST = 50            # bucket size
DEFAULT_OPERATING_LIMIT = 420.0   # seconds per method per 10 minutes (box default)
OPERATING_MIN_COUNTED = 0.1   # calls shorter than this are not counted

SESSION_NEW, SESSION_ANSWERED, SESSION_CLIENT, SESSION_CLIENT_AFTER_OPERATOR = 0, 10, 20, 25
SESSION_OPERATOR, SESSION_WAIT_CLIENT, SESSION_CLOSED = 40, 50, 60

HTML_ERROR_PAGE = (b"<html><head><title>502 Bad Gateway</title></head><body>"
                   b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>")


class RestError(Exception):
    """A REST error answer: HTTP status, Bitrix ``error`` and ``error_description``."""

    def __init__(self, status: int, code: str, description: str = ""):
        super().__init__(code)
        self.status, self.code, self.description = status, code, description

    def body(self) -> dict:
        return {"error": self.code, "error_description": self.description}


# ===========================================================================
# PHP-style parameter parsing and JSON encoding
# ===========================================================================

def php_parse(pairs) -> dict:
    """``[("A[]", "1"), ("F[NAME]", "x")]`` -> ``{"A": ["1"], "F": {"NAME": "x"}}``."""
    out: dict = {}
    for key, value in pairs:
        m = re.match(r"^([^\[\]]+)((?:\[[^\]]*\])*)$", key)
        if not m:
            out[key] = value
            continue
        parts = [m.group(1)] + re.findall(r"\[([^\]]*)\]", m.group(2))
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if part == "":
                    if last:
                        node.append(value)
                        break
                    node.append({})
                    node = node[-1]
                    continue
                node = dict(enumerate(node))  # rare: mixed list/map; keep a map
            if part == "" and isinstance(node, dict):
                part = str(len(node))
            if last:
                node[part] = value
            else:
                nxt = parts[i + 1]
                if part not in node or not isinstance(node[part], (dict, list)):
                    node[part] = [] if nxt == "" else {}
                node = node[part]
    return out


def phpify(value: Any) -> Any:
    """Encode like PHP's json_encode of arrays: empty map -> ``[]``, 0..n-1 map -> list."""
    if isinstance(value, dict):
        if not value:
            return []
        keys = list(value.keys())
        if all(str(k) == str(i) for i, k in enumerate(keys)):
            return [phpify(v) for v in value.values()]
        return {str(k): phpify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [phpify(v) for v in value]
    return value


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, TZ).isoformat(timespec="seconds")


def _yes(value: Any) -> bool:
    return isinstance(value, str) and value.upper() == "Y"


def _int_param(value: Any, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        return default


# ===========================================================================
# The world
# ===========================================================================

class Portal:
    """The world model, the REST methods, the limits, the faults and the control API.

    All state is guarded by one lock; REST handlers read and change it under it.
    """

    def __init__(self, *, code: str | None = None, seed: int = 1, world: bool = True,
                 clock: Callable[[], float] = time.time):
        self.lock = threading.RLock()
        self.clock = clock
        self.rng = random.Random(seed)
        self.code = code or secrets.token_hex(8)
        self.webhooks: dict = {(WEBHOOK_USER_ID, self.code): {
            "scopes": ["im", "imopenlines", "user"], "active": True}}
        self.users: dict = {}
        self.lines: dict = {}
        self.chats: dict = {}
        self.messages: dict = {}          # id -> message (global, increasing ids)
        self.sessions: dict = {}
        self.uuids: dict = {}             # TEMPLATE_ID -> {"mid": id or None, "at": time}
        self.files: dict = {}             # file id -> file record (media messages)
        self.next_file_id = 5200
        # portal behaviours a test may tune (fact sheet §7.2, §9)
        self.row_lag = 0.0                # seconds between a message and its recent-list row
        self._rows_due: list = []         # [(due, chat_id, message id, date)] rows not written yet
        self.uuid_ttl = 3600.0            # a uuid record that never got a message blocks this long
        self.message_add_delay = 0.0      # im.message.add processing time (the uuid is recorded first)
        self.fail_after_uuid = 0          # the next N im.message.add die after recording the uuid
        self.public_url = "https://portal.example.invalid"   # set by PortalServer to its own URL
        self.next_message_id = 88000
        self.next_chat_id = 1770
        self.next_session_id = 3300
        self.next_user_id = 2040
        # limits
        self.rate, self.burst = DEFAULT_RATE, DEFAULT_BURST
        self.operating_limit = DEFAULT_OPERATING_LIMIT
        self.method_cost: dict = {}       # method -> simulated processing seconds
        self.bucket: dict = {}            # client ip -> [level, last]
        self.operating: dict = {}         # (user, method) -> {minute: seconds}
        # faults and statistics
        self.faults: list = []
        self.counts: Counter = Counter()
        self.bytes_out: Counter = Counter()
        self.log: deque = deque(maxlen=20000)
        if world:
            self._build_world()

    # -- building -------------------------------------------------------------
    def add_user(self, name: str, last: str = "", *, kind: str = "employee", phone: str | None = None,
                 position: str = "", gender: str = "", uid: int | None = None, admin: bool = False) -> int:
        with self.lock:
            if uid is None:
                self.next_user_id += 1
                uid = self.next_user_id
            self.users[uid] = {"id": uid, "first_name": name, "last_name": last, "kind": kind,
                               "phone": phone, "position": position, "gender": gender,
                               "active": True, "admin": admin,
                               "color": "#%06x" % self.rng.randrange(0x222222, 0xdddddd)}
            return uid

    def add_line(self, line_id: int, name: str, queue: list, connector: str = "whatsappbyedna",
                 offer: str = "all") -> dict:
        """An Open Line; ``offer="one"``: a waiting chat is offered to one queue operator at a
        time (the first one, then whoever :meth:`offer` names), as strict/evenly queues do."""
        with self.lock:
            self.lines[int(line_id)] = {"id": int(line_id), "name": name, "queue": [int(u) for u in queue],
                                        "connector": connector, "active": True, "offer": offer}
            return {"line_id": int(line_id)}

    def _new_chat(self, **fields) -> dict:
        self.next_chat_id += self.rng.randint(1, 9)
        chat = {"id": self.next_chat_id, "type": "chat", "message_type": "C", "title": "",
                "owner": 0, "members": {}, "entity_type": "", "entity_id": "", "line_id": None,
                "customer_id": 0, "session_id": 0, "created": self.clock(), "activity": self.clock(),
                "color": "#%06x" % self.rng.randrange(0x222222, 0xdddddd), "crm_lead": 0,
                "private_pair": None, "message_ids": [], "row_mid": 0, "offered_to": None,
                "offered_at": 0.0}
        chat.update(fields)
        self.chats[chat["id"]] = chat
        return chat

    def _add_member(self, chat: dict, uid: int, role: str = "member", full_history: bool = True) -> None:
        if uid in chat["members"]:
            return
        start = 0 if full_history else self.next_message_id
        chat["members"][uid] = {"role": role, "start_id": start, "last_read": 0, "pinned": False,
                                "joined": self.clock()}
        if full_history:
            chat["members"][uid]["last_read"] = chat["message_ids"][-1] if chat["message_ids"] else 0

    def _post(self, chat: dict, author: int, text: str, *, params: Any = None, uuid: str | None = None,
              when: float | None = None) -> dict:
        self.next_message_id += 1 if self.rng.random() < 0.7 else self.rng.randint(2, 6)
        mid = self.next_message_id
        ts = self.clock() if when is None else when
        msg = {"id": mid, "chat_id": chat["id"], "author_id": author, "date": ts, "text": text,
               "params": params or {}, "uuid": uuid}
        self.messages[mid] = msg
        chat["message_ids"].append(mid)
        if self.row_lag > 0 and when is None:
            # the recent row is written after the message (fact sheet §7.2)
            self._rows_due.append((time.monotonic() + self.row_lag, chat["id"], mid, ts))
        else:
            self._write_row(chat, mid, ts)
        if author in chat["members"]:
            chat["members"][author]["last_read"] = mid
        return msg

    def _write_row(self, chat: dict, mid: int, ts: float) -> None:
        chat["row_mid"] = max(chat["row_mid"], mid)
        chat["activity"] = max(chat["activity"], ts)

    def _apply_rows(self) -> None:
        """Write the recent rows whose lag has passed."""
        now = time.monotonic()
        due = [r for r in self._rows_due if r[0] <= now]
        if due:
            self._rows_due = [r for r in self._rows_due if r[0] > now]
            for _due, chat_id, mid, ts in due:
                if chat_id in self.chats:
                    self._write_row(self.chats[chat_id], mid, ts)

    def _build_world(self) -> None:
        """The standing world: see the module docstring."""
        now = self.clock()
        self.add_user("Olga", "Sidorova", position="Support operator", gender="F", uid=WEBHOOK_USER_ID)
        self.add_user("Pavel", "Orlov", position="Sales operator", gender="M", uid=9)
        self.add_user("Irina", "Volkova", position="Head of support", gender="F", uid=11, admin=True)
        self.add_user("Welcome", "Bot", kind="bot", uid=15)
        self.add_line(1, "WhatsApp Sales", [WEBHOOK_USER_ID, 9])
        self.add_line(3, "WhatsApp Support", [WEBHOOK_USER_ID, 11], connector="olchat_wa_connector_2")
        self.add_line(5, "Telegram", [9], connector="telegrambot")
        t = now - 3 * 3600
        a = self.new_conversation(3, "Ivan Petrov", "10000000101", "Hello, is my order ready?", when=t)
        self._take(a["chat_id"], WEBHOOK_USER_ID, when=t + 60)
        self.operator_message(a["chat_id"], WEBHOOK_USER_ID, "Hi Ivan, let me check.", when=t + 90)
        self.customer_message(a["chat_id"], "Thanks!\nOrder [b]A-1042[/b]", when=t + 120)
        b = self.new_conversation(1, "Maria Lopez", "+10000000102", "Do you deliver on Sundays?", when=t + 600)
        self._take(b["chat_id"], WEBHOOK_USER_ID, when=t + 700)
        self.operator_message(b["chat_id"], WEBHOOK_USER_ID, "Yes, from 10 to 16.", when=t + 760)
        c = self.new_conversation(1, "Chen Wei", "10000000103", "Price list please", when=now - 1800)
        # c stays in the queue (status 0): readable by queue operators, not writable
        d = self.new_conversation(5, "Telegram User", None, "hi from telegram", when=now - 1200,
                                  external="100000001")
        self._take(d["chat_id"], 9, when=now - 1100)
        e = self.new_conversation(3, "Old Customer", "10000000105", "Thanks, bye", when=now - 86400)
        self._take(e["chat_id"], WEBHOOK_USER_ID, when=now - 86300)
        self.close_session(e["chat_id"], when=now - 86000)
        general = self._new_chat(type="chat", message_type="C", title="General", owner=11,
                                 created=now - 90 * 86400, activity=now - 90 * 86400)
        for uid in (WEBHOOK_USER_ID, 9, 11):
            self._add_member(general, uid)
        self._post(general, 11, "Team meeting at 15:00", when=now - 7200)
        self._post(general, 9, "ok", when=now - 7100)
        private = self._private_chat(WEBHOOK_USER_ID, 9, when=now - 60 * 86400)
        self._post(private, 9, "Can you cover my shift tomorrow?", when=now - 5000)
        self.world_ids = {"lines_member": a["chat_id"], "lines_member2": b["chat_id"],
                          "queued": c["chat_id"], "foreign": d["chat_id"], "closed": e["chat_id"],
                          "group": general["id"], "private": private["id"]}

    def _private_chat(self, u1: int, u2: int, when: float | None = None) -> dict:
        pair = tuple(sorted((u1, u2)))
        for chat in self.chats.values():
            if chat["private_pair"] == pair:
                return chat
        ts = self.clock() if when is None else when
        chat = self._new_chat(type="private", message_type="P", private_pair=pair, created=ts, activity=ts)
        for uid in pair:
            self._add_member(chat, uid)
        return chat

    # -- world actions (also the control API) -------------------------------------
    def new_conversation(self, line_id: int, name: str = "", phone: str | None = None,
                         text: str = "Hello", *, when: float | None = None,
                         external: str | None = None) -> dict:
        """A new customer writes to a line: connector user, LINES chat, session in the queue."""
        with self.lock:
            line = self.lines.get(int(line_id))
            if not line:
                raise RestError(400, "LINE_ID", "no such line")
            first, _, last = (name or "Customer %d" % (self.next_user_id + 1)).partition(" ")
            uid = self.add_user(first, last, kind="connector", phone=phone)
            ext = external or ("%s@c.us" % re.sub(r"\D", "", phone) if phone else str(uid))
            ts = self.clock() if when is None else when
            chat = self._new_chat(type="lines", message_type="L", created=ts, activity=ts,
                                  title="%s %s - %s" % (first, last, line["name"]) if last else
                                  "%s - %s" % (first, line["name"]),
                                  entity_type="LINES", line_id=line["id"], customer_id=uid,
                                  entity_id="%s|%d|%s|%d" % (line["connector"], line["id"], ext, uid),
                                  crm_lead=self.rng.randint(100, 999))
            self._add_member(chat, uid, role="member")
            msg = self._start_session(chat, text, when)
            return {"chat_id": chat["id"], "dialog_id": "chat%d" % chat["id"], "user_id": uid,
                    "message_id": msg["id"], "session_id": chat["session_id"]}

    def _start_session(self, chat: dict, text: str, when: float | None) -> dict:
        self.next_session_id += self.rng.randint(1, 5)
        sid = self.next_session_id
        ts = self.clock() if when is None else when
        self.sessions[sid] = {"id": sid, "chat_id": chat["id"], "line_id": chat["line_id"],
                              "status": SESSION_NEW, "operator": 0, "created": ts}
        chat["session_id"] = sid
        line = self.lines.get(chat["line_id"]) or {}
        chat["offered_to"] = (line.get("queue") or [None])[0] if line.get("offer") == "one" else None
        chat["offered_at"] = ts
        self._post(chat, 0, "Conversation started", when=ts)
        return self._post(chat, chat["customer_id"], text, when=ts,
                          params={"CONNECTOR_MID": ["wamid.%s" % secrets.token_hex(6)]})

    def _chat(self, chat_id: Any) -> dict:
        chat = self.chats.get(int(chat_id))
        if not chat:
            raise RestError(400, "CHAT_ID", "Chat not found")
        return chat

    def customer_message(self, chat_id: int, text: str, *, when: float | None = None) -> dict:
        """The customer of a LINES chat writes (a closed session reopens in the queue)."""
        with self.lock:
            chat = self._chat(chat_id)
            if chat["type"] != "lines":
                raise RestError(400, "CHAT_TYPE", "not an Open Lines chat")
            session = self.sessions.get(chat["session_id"])
            if not session or session["status"] >= SESSION_CLOSED:
                msg = self._start_session(chat, text, when)
            else:
                msg = self._post(chat, chat["customer_id"], text, when=when,
                                 params={"CONNECTOR_MID": ["wamid.%s" % secrets.token_hex(6)]})
                session["status"] = SESSION_CLIENT_AFTER_OPERATOR if session["status"] >= SESSION_OPERATOR \
                    else max(session["status"], SESSION_CLIENT) if session["status"] >= SESSION_ANSWERED \
                    else session["status"]
            return {"chat_id": chat["id"], "message_id": msg["id"]}

    def operator_message(self, chat_id: int, user_id: int, text: str, *, when: float | None = None) -> dict:
        """An operator (any user) writes in a chat; joins it first if needed."""
        with self.lock:
            chat = self._chat(chat_id)
            user_id = int(user_id)
            if user_id not in chat["members"]:
                self._add_member(chat, user_id)
            msg = self._post(chat, user_id, text, when=when)
            self._touch_session(chat, user_id)
            return {"chat_id": chat["id"], "message_id": msg["id"]}

    def _touch_session(self, chat: dict, author: int) -> None:
        session = self.sessions.get(chat["session_id"])
        if session and session["status"] < SESSION_CLOSED and author != chat["customer_id"] and author:
            session["status"] = SESSION_OPERATOR

    def _take(self, chat_id: int, user_id: int, *, when: float | None = None) -> None:
        chat = self._chat(chat_id)
        self._add_member(chat, user_id, role="owner")
        chat["owner"] = user_id
        session = self.sessions.get(chat["session_id"])
        if session:
            session["status"] = max(session["status"], SESSION_ANSWERED)
            session["operator"] = user_id

    def join(self, chat_id: int, user_id: int = WEBHOOK_USER_ID) -> dict:
        """A user joins a chat (as after "Join" in the UI); a system message is posted."""
        with self.lock:
            chat = self._chat(chat_id)
            user_id = int(user_id)
            if user_id not in chat["members"]:
                self._add_member(chat, user_id)
                self._post(chat, 0, "%s joined the conversation" % self._full_name(user_id))
            return {"chat_id": chat["id"], "members": sorted(chat["members"])}

    def leave(self, chat_id: int, user_id: int = WEBHOOK_USER_ID) -> dict:
        with self.lock:
            chat = self._chat(chat_id)
            user_id = int(user_id)
            if chat["members"].pop(user_id, None) is not None:
                self._post(chat, 0, "%s left the conversation" % self._full_name(user_id))
                if chat["owner"] == user_id:
                    chat["owner"] = 0
            return {"chat_id": chat["id"], "members": sorted(chat["members"])}

    def close_session(self, chat_id: int, *, when: float | None = None) -> dict:
        """Finish the session: every non-customer participant leaves the chat."""
        with self.lock:
            chat = self._chat(chat_id)
            session = self.sessions.get(chat["session_id"])
            if session:
                session["status"] = SESSION_CLOSED
            self._post(chat, 0, "The conversation was closed", when=when)
            for uid in list(chat["members"]):
                if uid != chat["customer_id"]:
                    del chat["members"][uid]
            chat["owner"] = 0
            chat["session_id"] = 0
            return {"chat_id": chat["id"]}

    def offer(self, chat_id: int, user_id: int) -> dict:
        """Offer a waiting chat of a one-at-a-time line to another queue operator (now)."""
        with self.lock:
            chat = self._chat(chat_id)
            chat["offered_to"] = int(user_id)
            chat["offered_at"] = self.clock()
            return {"chat_id": chat["id"], "offered_to": chat["offered_to"]}

    def pin(self, chat_id: int, user_id: int = WEBHOOK_USER_ID, pinned: bool = True) -> dict:
        """Pin (or unpin) a chat in a member's recent list; bumps its row's date_update."""
        with self.lock:
            member = self._chat(chat_id)["members"].get(int(user_id))
            if not member:
                raise RestError(400, "CHAT_ID", "not a member")
            member["pinned"] = bool(pinned)
            member["bumped"] = self.clock()
            return {"chat_id": int(chat_id), "pinned": member["pinned"]}

    MEDIA_TYPES = {"image": "image/jpeg", "audio": "audio/ogg", "video": "video/mp4", "file": "application/pdf"}

    def customer_media(self, chat_id: int, kind: str = "image", name: str = "photo.jpg",
                       size: int = 235520, caption: str = "") -> dict:
        """The customer sends a photo, voice note, video or document (``text`` = caption or "")."""
        with self.lock:
            if kind not in self.MEDIA_TYPES:
                raise RestError(400, "BAD_KIND", "kind must be one of " + ", ".join(self.MEDIA_TYPES))
            chat = self._chat(chat_id)
            self.next_file_id += 1
            fid = self.next_file_id
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            self.files[fid] = {"id": fid, "chatId": chat["id"], "date": self.clock(), "type": kind,
                               "name": name, "extension": ext, "size": int(size),
                               "authorId": chat["customer_id"], "mime": self.MEDIA_TYPES[kind]}
            msg = self._post(chat, chat["customer_id"], caption, params={
                "FILE_ID": [fid], "CONNECTOR_MID": ["wamid.%s" % secrets.token_hex(6)]})
            return {"chat_id": chat["id"], "message_id": msg["id"], "file_id": fid}

    def behave(self, row_lag: float | None = None, uuid_ttl: float | None = None,
               message_add_delay: float | None = None, fail_after_uuid: int | None = None) -> dict:
        """Tune portal behaviours: recent-row lag, uuid record TTL, slow or dying im.message.add."""
        with self.lock:
            for name, value in (("row_lag", row_lag), ("uuid_ttl", uuid_ttl),
                                ("message_add_delay", message_add_delay)):
                if value is not None:
                    setattr(self, name, float(value))
            if fail_after_uuid is not None:
                self.fail_after_uuid = int(fail_after_uuid)
            return {"row_lag": self.row_lag, "uuid_ttl": self.uuid_ttl,
                    "message_add_delay": self.message_add_delay, "fail_after_uuid": self.fail_after_uuid}

    def forget_uuids(self) -> dict:
        """Drop every uuid record (a portal past the records' lifetime)."""
        with self.lock:
            n = len(self.uuids)
            self.uuids.clear()
            return {"forgotten": n}

    def chat_messages(self, chat_id: int) -> list:
        """Every message of a chat, oldest first (including what the API posted)."""
        with self.lock:
            chat = self._chat(chat_id)
            return [self._message_out(self.messages[i]) for i in chat["message_ids"]]

    def add_dialogs(self, count: int, line_id: int = 3) -> list:
        """*count* more LINES chats taken by the webhook user (for benchmarks)."""
        with self.lock:
            out = []
            base = self.clock() - 10 * 86400
            for i in range(int(count)):
                c = self.new_conversation(line_id, "Bulk Customer%d" % i, "1000000%04d" % (i % 10000),
                                          "hello %d" % i, when=base + i)
                self._take(c["chat_id"], WEBHOOK_USER_ID, when=base + i)
                out.append(c["chat_id"])
            return out

    def set_webhook(self, scopes: list | None = None, active: bool | None = None) -> dict:
        with self.lock:
            hook = self.webhooks[(WEBHOOK_USER_ID, self.code)]
            if scopes is not None:
                hook["scopes"] = list(scopes)
            if active is not None:
                hook["active"] = bool(active)
            return {"scopes": hook["scopes"], "active": hook["active"]}

    def set_limits(self, rate: float | None = None, burst: int | None = None,
                   operating_limit: float | None = None, method_cost: dict | None = None,
                   bucket_level: float | None = None) -> dict:
        """Tighten (or relax) the limits; ``bucket_level`` pre-fills the request bucket."""
        with self.lock:
            if rate is not None:
                self.rate = float(rate)
            if burst is not None:
                self.burst = int(burst)
            if operating_limit is not None:
                self.operating_limit = float(operating_limit)
            if method_cost is not None:
                self.method_cost = {k.lower(): float(v) for k, v in method_cost.items()}
            if bucket_level is not None:
                self.bucket = {"127.0.0.1": [float(bucket_level), time.monotonic()]}
            return {"rate": self.rate, "burst": self.burst, "operating_limit": self.operating_limit,
                    "method_cost": self.method_cost}

    def fault(self, kind: str, count: int | None = None, ratio: float | None = None,
              method: str | None = None, seconds: float = 1.0) -> dict:
        """Inject a fault into the next *count* requests (or a *ratio* of them).

        Kinds: ``latency`` (answer after *seconds*), ``http500`` (JSON
        INTERNAL_SERVER_ERROR), ``http502`` (nginx HTML page), ``http503``
        (QUERY_LIMIT_EXCEEDED), ``html`` (an HTML page with status 200),
        ``malformed`` (broken JSON), ``truncated`` (body cut short),
        ``drop`` (connection closed, nothing run), ``drop_after`` (the method
        runs, then the connection is closed without an answer), ``http400``
        (``ERROR_ARGUMENT``: refused for good, nothing run).
        """
        kinds = ("latency", "http500", "http502", "http503", "html", "malformed", "truncated",
                 "drop", "drop_after", "http400")
        if kind not in kinds:
            raise RestError(400, "BAD_FAULT", "kind must be one of " + ", ".join(kinds))
        with self.lock:
            self.faults.append({"kind": kind, "count": None if count is None else int(count),
                                "ratio": ratio, "method": method.lower() if method else None,
                                "seconds": float(seconds)})
            return {"faults": len(self.faults)}

    def clear_faults(self) -> dict:
        with self.lock:
            self.faults = []
            return {"faults": 0}

    def stats(self) -> dict:
        with self.lock:
            return {"counts": dict(self.counts), "bytes": dict(self.bytes_out),
                    "requests": sum(self.counts.values()), "bytes_total": sum(self.bytes_out.values()),
                    "log": list(self.log)}

    def reset_stats(self) -> dict:
        with self.lock:
            self.counts.clear()
            self.bytes_out.clear()
            self.log.clear()
            return {}

    def world(self) -> dict:
        with self.lock:
            return {"webhook_user": WEBHOOK_USER_ID, "ids": dict(getattr(self, "world_ids", {})),
                    "lines": {i: {"name": ln["name"], "queue": ln["queue"]} for i, ln in self.lines.items()},
                    "chats": {c["id"]: {"type": c["type"], "title": c["title"],
                                        "members": sorted(c["members"]),
                                        "session": self.sessions.get(c["session_id"], {}).get("status")}
                              for c in self.chats.values()}}

    # -- views ------------------------------------------------------------------
    def _full_name(self, uid: int) -> str:
        u = self.users.get(uid, {})
        return ("%s %s" % (u.get("first_name", ""), u.get("last_name", ""))).strip() or "user %d" % uid

    def _user_out(self, uid: int) -> dict:
        u = self.users[uid]
        kind = u["kind"]
        connector, bot = kind == "connector", kind == "bot"
        phones: Any = False
        if u.get("phone"):
            phones = {"personal_mobile": u["phone"]}
        online = False if connector else _iso(self.clock() - 300)
        return {
            "id": uid, "active": u["active"], "name": self._full_name(uid),
            "first_name": u["first_name"], "last_name": u["last_name"],
            "work_position": u["position"], "color": u["color"], "avatar": "", "avatar_hr": "",
            "gender": u["gender"], "birthday": "", "extranet": connector, "network": False,
            "bot": bot, "connector": connector,
            "external_auth_id": "imconnector" if connector else "bot" if bot else "default",
            "status": "online", "idle": False, "last_activity_date": online,
            "mobile_last_date": False, "desktop_last_date": False, "absent": False,
            "departments": [] if connector or bot else [1], "phones": phones,
            "bot_data": {"code": "welcome", "type": "openline", "app_id": "", "is_hidden": False,
                         "is_support_openline": False} if bot else None,
            "type": "bot" if bot else "user", "website": "", "email": "",
        }

    def _message_out(self, msg: dict, viewer: int | None = None, chat: dict | None = None) -> dict:
        unread = False
        if viewer is not None and chat and viewer in chat["members"]:
            unread = msg["author_id"] != viewer and msg["id"] > chat["members"][viewer]["last_read"]
        return {"id": msg["id"], "chat_id": msg["chat_id"], "author_id": msg["author_id"],
                "date": _iso(msg["date"]), "text": msg["text"], "unread": unread,
                "uuid": msg["uuid"], "replaces": [], "params": msg["params"] or [],
                "disappearing_date": None}

    def _session_status(self, chat: dict) -> int | None:
        session = self.sessions.get(chat["session_id"])
        return session["status"] if session else None

    def _in_queue_for(self, chat: dict, uid: int) -> bool:
        if chat["type"] != "lines" or uid in chat["members"]:
            return False
        status = self._session_status(chat)
        line = self.lines.get(chat["line_id"])
        if not line or status is None or status >= SESSION_ANSWERED or uid not in line["queue"]:
            return False
        return line.get("offer") != "one" or chat["offered_to"] == uid

    def _can_read(self, chat: dict, uid: int) -> bool:
        if uid in chat["members"] or self._in_queue_for(chat, uid):
            return True
        return chat["type"] == "lines" and self.users.get(uid, {}).get("admin", False)

    def _entity_data_1(self, chat: dict) -> str:
        sid = chat["session_id"]
        created = int(self.sessions[sid]["created"]) if sid in self.sessions else 0
        return "Y|LEAD|%d|N|N|%d|%d|%d|0|" % (chat["crm_lead"], sid, created, chat["line_id"] or 0)

    def _chat_title(self, chat: dict, viewer: int) -> str:
        if chat["type"] == "private":
            other = [u for u in chat["private_pair"] if u != viewer]
            return self._full_name(other[0] if other else viewer)
        return chat["title"]

    def _chat_out(self, chat: dict, viewer: int, *, full: bool = False, recent_role: bool = True) -> dict:
        member = chat["members"].get(viewer)
        role = (member["role"] if member else "guest")
        is_lines = chat["type"] == "lines"
        out = {
            "id": chat["id"], "parent_chat_id": 0, "parent_message_id": 0,
            "name": self._chat_title(chat, viewer), "owner": chat["owner"], "extranet": is_lines,
            "contains_collaber": False, "avatar": "", "color": chat["color"],
            "type": "lines" if is_lines else chat["type"],
            "entity_type": chat["entity_type"], "entity_id": chat["entity_id"],
            "entity_data_1": self._entity_data_1(chat) if is_lines else "",
            "entity_data_2": "LEAD|%d|COMPANY|0|CONTACT|0|DEAL|0" % chat["crm_lead"] if is_lines else "",
            "entity_data_3": "", "mute_list": [],
            "manager_list": [chat["owner"]] if chat["owner"] else [],
            "date_create": _iso(chat["created"]), "message_type": chat["message_type"],
            "user_counter": len(chat["members"]),
        }
        if full or member:
            out.update({
                "restrictions": {"avatar": True, "extend": True, "leave": True, "leave_owner": True,
                                 "rename": True, "send": bool(member), "user_list": True, "mute": True,
                                 "call": False},
                "role": role.upper() if recent_role else role.lower(),
                "text_field_enabled": True, "background_id": None,
                "entity_link": {"type": chat["entity_type"] or "", "url": "", "id": chat["entity_id"]},
                "permissions": {"manage_messages": "member", "can_post": "member",
                                "manage_users_add": "member", "manage_users_delete": "manager",
                                "manage_ui": "member", "manage_settings": "owner"},
                "public": "",
            })
        return out

    def _row_date(self, chat: dict, viewer: int) -> float:
        """The recent row's ``date_update`` for *viewer* (fact sheet §7.2): the last message's
        time, bumped by pins and reads; for an in-queue chat also the time it was offered."""
        member = chat["members"].get(viewer)
        if member is None:
            return max(chat["activity"], chat["offered_at"])
        return max(chat["activity"], member.get("bumped", 0.0))

    def _recent_item(self, chat: dict, viewer: int, original_text: bool = False) -> dict:
        ids = chat["message_ids"]
        last = self.messages.get(chat["row_mid"])
        member = chat["members"].get(viewer)
        queued = member is None
        text = last["text"] if last else ""
        if not original_text:      # by default BB-codes are stripped and newlines become spaces
            text = re.sub(r"\[/?[^\]]+\]", "", text).replace("\n", " ")
        message = {"id": last["id"] if last else 0, "text": text,
                   "file": bool(last and (last["params"] or {}).get("FILE_ID")),
                   "author_id": last["author_id"] if last else 0, "attach": False}
        if not queued:
            message["sticker"] = None
        message.update({"date": _iso(last["date"]) if last else _iso(chat["created"]),
                        "status": "received", "uuid": last["uuid"] if last else None})
        author = last["author_id"] if last else 0
        item = {"id": "chat%d" % chat["id"] if chat["type"] != "private" else
                str([u for u in chat["private_pair"] if u != viewer][0]),
                "chat_id": chat["id"], "type": "chat" if chat["type"] != "private" else "user",
                "avatar": {"url": "", "color": chat["color"]}, "title": self._chat_title(chat, viewer),
                "message": message}
        if queued:
            item["counter"] = 1
            item["date_update"] = _iso(self._row_date(chat, viewer))
        else:
            counter = sum(1 for i in ids if i > member["last_read"] and self.messages[i]["author_id"] != viewer)
            item.update({"counter": counter, "last_id": member["last_read"], "pinned": member["pinned"],
                         "unread": False, "has_reminder": False,
                         "date_update": _iso(self._row_date(chat, viewer)),
                         "date_last_activity": _iso(chat["activity"])})
        item["chat"] = self._chat_out(chat, viewer, full=not queued)
        if chat["type"] == "lines":
            sid = chat["session_id"]
            s = self.sessions.get(sid)
            item["lines"] = {"id": sid, "status": s["status"] if s else 0,
                             "date_create": _iso(s["created"]) if s else _iso(chat["created"])}
        item["user"] = self._user_out(author) if author and author in self.users and not queued else {"id": 0}
        item["options"] = []
        return item

    def _recent_for(self, uid: int) -> tuple:
        """(member chats sorted pinned first then activity desc, in-queue chats)."""
        self._apply_rows()
        member = [c for c in self.chats.values() if uid in c["members"] and c["row_mid"]]
        member.sort(key=lambda c: (not c["members"][uid]["pinned"], -c["activity"], -c["id"]))
        queued = [c for c in self.chats.values() if self._in_queue_for(c, uid)]
        queued.sort(key=lambda c: -c["activity"])
        return member, queued

    def _resolve_dialog(self, dialog_id: Any, uid: int) -> dict:
        """``chatN`` -> that chat; ``N`` -> the private chat with user N (made on first use)."""
        did = str(dialog_id or "").strip()
        if not did or did == "0":
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        m = re.fullmatch(r"chat(\d+)", did)
        if m:
            chat = self.chats.get(int(m.group(1)))
            if not chat:
                raise RestError(403, "ACCESS_ERROR", "You do not have access to the specified dialog")
            return chat
        if did.isdigit():
            other = int(did)
            if other not in self.users or not self.users[other]["active"]:
                raise RestError(403, "ACCESS_ERROR", "You do not have access to the specified dialog")
            if other == uid:
                raise RestError(403, "ACCESS_ERROR", "You do not have access to the specified dialog")
            return self._private_chat(uid, other)
        raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")

    def _readable_chat(self, ctx: dict, p: dict, *, chat_id: bool = False) -> dict:
        """The chat named by ``DIALOG_ID`` (or ``CHAT_ID``, which wins) if the caller may read it."""
        if chat_id and p.get("CHAT_ID") not in (None, ""):
            chat = self.chats.get(_int_param(p.get("CHAT_ID"), -1) or -1)
        else:
            chat = self._resolve_dialog(p.get("DIALOG_ID"), ctx["user"])
        if not chat or not self._can_read(chat, ctx["user"]):
            raise RestError(403, "ACCESS_ERROR", "You do not have access to the specified dialog")
        return chat

    # ===========================================================================
    # REST methods
    # ===========================================================================

    def m_scope(self, ctx: dict, p: dict) -> Any:
        if _yes(p.get("full")) or p.get("full") in ("true", "1", True):
            return ["im", "imopenlines", "user", "crm", "task", "disk", "imbot", "placement"]
        return list(ctx["scopes"])

    def m_profile(self, ctx: dict, p: dict) -> Any:
        u = self.users[ctx["user"]]
        if not u["active"]:
            return []
        return {"ID": str(u["id"]), "ADMIN": u["admin"], "NAME": u["first_name"],
                "LAST_NAME": u["last_name"], "PERSONAL_GENDER": u["gender"], "TIME_ZONE": ""}

    def m_user_current(self, ctx: dict, p: dict) -> Any:
        u = self.users[ctx["user"]]
        return {"ID": str(u["id"]), "ACTIVE": u["active"], "NAME": u["first_name"],
                "LAST_NAME": u["last_name"], "EMAIL": "operator@example.invalid",
                "LAST_LOGIN": _iso(self.clock() - 600), "DATE_REGISTER": _iso(self.clock() - 400 * 86400),
                "IS_ONLINE": "Y", "LAST_ACTIVITY_DATE": _iso(self.clock() - 60),
                "PERSONAL_GENDER": u["gender"], "PERSONAL_BIRTHDAY": "", "WORK_POSITION": u["position"],
                "UF_DEPARTMENT": [1]}

    def m_im_recent_list(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        offset = _int_param(p.get("OFFSET"), None)
        if offset is None:
            offset = _int_param(p.get("START"), 0) or 0
        limit = _int_param(p.get("LIMIT"), 50) or 50
        limit = 50 if limit <= 0 else min(limit, 200)
        member, queued = self._recent_for(uid)
        if _yes(p.get("SKIP_OPENLINES")):
            member = [c for c in member if c["type"] != "lines"]
            queued = []
        if _yes(p.get("SKIP_UNDISTRIBUTED_OPENLINES")):
            queued = []
        if _yes(p.get("SKIP_CHAT")):
            member = [c for c in member if c["type"] in ("private", "lines")]
        if _yes(p.get("SKIP_DIALOG")):
            member = [c for c in member if c["type"] != "private"]
        if _yes(p.get("UNREAD_ONLY")):
            member = [c for c in member if self._recent_item(c, uid)["counter"] > 0]
        date_filter = p.get("LAST_MESSAGE_DATE") or p.get("DATE_LAST_ACTIVITY")
        if date_filter:
            try:
                cut = _dt.datetime.fromisoformat(str(date_filter)).timestamp()
            except ValueError:
                raise RestError(400, "ERROR_ARGUMENT", "LAST_MESSAGE_DATE has a wrong format") from None
            page = [c for c in member if int(c["activity"]) <= cut][:limit]
            has_more = len([c for c in member if int(c["activity"]) <= cut]) > limit
        else:
            page = member[offset:offset + limit]
            has_more = len(page) == limit
        original = _yes(p.get("GET_ORIGINAL_TEXT"))
        items = [self._recent_item(c, uid, original) for c in page + queued]
        result = {"items": items, "hasMore": has_more, "hasMorePages": has_more, "copilot": None,
                  "messagesAutoDeleteConfigs": []}
        if not date_filter and not _yes(p.get("UNREAD_ONLY")):
            result["birthdayList"] = []
        extra = {"total": -1}
        if has_more:
            # the portal counts the appended in-queue items too (fact sheet §7.1): a client that
            # follows `next` skips one member dialog per waiting dialog at every page break
            extra["next"] = offset + len(items)
        return result, extra

    def m_im_recent_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        member, queued = self._recent_for(uid)
        now = self.clock()
        if _yes(p.get("ONLY_OPENLINES")):
            chats = queued + [c for c in member if c["type"] == "lines"]
        else:
            sync = p.get("LAST_SYNC_DATE") or p.get("LAST_UPDATE")
            cut = now - 30 * 86400
            if sync:
                try:
                    cut = max(_dt.datetime.fromisoformat(str(sync).replace("Z", "+00:00")).timestamp(),
                              now - 7 * 86400)
                except ValueError:
                    pass      # the portal parses it in a try/catch: an unreadable date is ignored
            # only member rows are filtered; in-queue chats are appended whatever the date
            chats = [c for c in member if self._row_date(c, uid) >= cut] + queued
            chats.sort(key=lambda c: (not (c["members"].get(uid) or {}).get("pinned", False),
                                      -self._row_date(c, uid)))
            if _yes(p.get("SKIP_OPENLINES")):
                chats = [c for c in chats if c["type"] != "lines"]
            if _yes(p.get("SKIP_CHAT")):
                chats = [c for c in chats if c["type"] in ("private", "lines")]
            if _yes(p.get("SKIP_DIALOG")):
                chats = [c for c in chats if c["type"] != "private"]
        return [self._recent_item(c, uid) for c in chats]

    def m_im_dialog_messages_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p, chat_id=True)
        first, last = p.get("FIRST_ID"), p.get("LAST_ID")
        for name, value in (("FIRST_ID", first), ("LAST_ID", last)):
            if value is not None and not re.fullmatch(r"\d+", str(value)):
                raise RestError(400, name + "_STRING", "%s can't be string" % name)
        limit = _int_param(p.get("LIMIT"), 20)
        limit = 20 if limit is None else limit
        unlimited = limit <= 0
        limit = min(limit, 50)
        member = chat["members"].get(uid)
        start_id = member["start_id"] if member else 0
        ids = [i for i in chat["message_ids"] if i > start_id]
        if first is not None:
            rows = [i for i in ids if i > int(first)]
            rows = rows if unlimited else rows[:limit]        # ascending
        elif last is not None and int(last) > 0:
            rows = [i for i in ids if i < int(last)][::-1]
            rows = rows if unlimited else rows[:limit]        # descending
        elif last is not None:
            rows = ids[::-1] if unlimited else ids[::-1][:limit]
        else:
            counter = 0
            if member:
                counter = sum(1 for i in ids if i > member["last_read"] and self.messages[i]["author_id"] != uid)
            if unlimited:
                rows = ids[::-1]
            elif counter and counter <= limit:
                rows = ids[::-1][:limit + counter]
            elif counter > limit:
                unread = [i for i in ids if i > member["last_read"]]
                first_unread = unread[:limit]
                older = [i for i in ids if i < first_unread[0]][::-1][:limit]
                rows = first_unread[::-1] + older
            else:
                rows = ids[::-1][:limit]
        msgs = [self._message_out(self.messages[i], uid, chat) for i in rows]
        authors = []
        for m in msgs:
            if m["author_id"] and m["author_id"] not in authors:
                authors.append(m["author_id"])
        # media: the files of these messages, in the same order as the messages
        files = [self._file_out(f) for m in msgs for f in (m["params"] or {}).get("FILE_ID", [])
                 if isinstance(m["params"], dict) and f in self.files]
        return {"chat_id": chat["id"], "messages": msgs,
                "users": [self._user_out(a) for a in authors if a in self.users], "files": files}

    def _file_out(self, fid: int) -> dict:
        f = self.files[fid]
        url = "%s/bitrix/services/main/ajax.php?action=disk.api.file.download&fileId=%d" % (self.public_url, fid)
        return {"id": fid, "chatId": f["chatId"], "date": _iso(f["date"]), "type": f["type"],
                "name": f["name"], "extension": f["extension"], "size": f["size"], "image": (
                    {"width": 1280, "height": 960} if f["type"] == "image" else False),
                "status": "done", "progress": 100, "authorId": f["authorId"],
                "authorName": self._full_name(f["authorId"]), "urlPreview": url if f["type"] == "image" else "",
                "urlShow": url + "&show=1", "urlDownload": url, "viewerAttrs": None}

    def m_im_message_add(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        if p.get("DIALOG_ID") not in (None, ""):
            did = str(p.get("DIALOG_ID"))
        elif p.get("CHAT_ID") not in (None, ""):
            did = "chat%s" % p.get("CHAT_ID")
        elif p.get("USER_ID") not in (None, ""):
            did = str(p.get("USER_ID"))
        else:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        text = p.get("MESSAGE")
        text = "" if text is None else str(text)
        text = re.sub(r"\[br\]|#BR#", "\n", text, flags=re.IGNORECASE).strip()
        m = re.fullmatch(r"chat(\d+)", did)
        if m:
            chat = self.chats.get(int(m.group(1)))
            if not chat:
                raise RestError(400, "CHAT_ID", "Chat ID can't be empty")
        elif did.isdigit():
            if int(did) not in self.users:
                raise RestError(400, "USER_NOT_FOUND", "User not found")
            chat = self._private_chat(uid, int(did))
        else:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        if not text and not p.get("ATTACH"):
            raise RestError(400, "MESSAGE_EMPTY", "Message can't be empty")
        if uid not in chat["members"]:
            raise RestError(400, "CANCELED", "Action was canceled: you are not a member of this chat")
        template = p.get("TEMPLATE_ID")
        if isinstance(template, str) and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", template):
            # the uuid record is written before the message (fact sheet §9): a repeat while the
            # first attempt runs, or after it died, is refused until the record expires
            record = self.uuids.get(template)
            if record and record["mid"]:
                return record["mid"]
            if record and self.clock() - record["at"] < self.uuid_ttl:
                raise RestError(400, "MESSAGE_DUPLICATED_BY_UUID", "Message with this uuid already exists")
            record = self.uuids[template] = {"mid": None, "at": self.clock()}
            if self.fail_after_uuid > 0:
                self.fail_after_uuid -= 1
                raise RestError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
            if self.message_add_delay > 0:
                # processing takes time; other requests go on meanwhile (handle_rest holds the
                # lock once, so releasing it here lets them in)
                self.lock.release()
                try:
                    time.sleep(self.message_add_delay)
                finally:
                    self.lock.acquire()
        else:
            template = None
        if len(text) > 20000:
            text = text[:20000] + " (...)"
        author = 0 if _yes(p.get("SYSTEM")) else uid
        params = {}
        if chat["type"] == "lines" and author and not _yes(p.get("SKIP_CONNECTOR")):
            params = {"SENDING": "Y", "SENDING_TS": int(self.clock())}
        msg = self._post(chat, author, text, params=params, uuid=template)
        if template:
            self.uuids[template] = {"mid": msg["id"], "at": self.clock()}
        if author:
            self._touch_session(chat, author)
        return msg["id"]

    def m_im_dialog_read(self, ctx: dict, p: dict) -> Any:
        chat = self._resolve_dialog(p.get("DIALOG_ID"), ctx["user"])
        member = chat["members"].get(ctx["user"])
        if member and chat["message_ids"]:
            upto = _int_param(p.get("MESSAGE_ID"), 0) or chat["message_ids"][-1]
            member["last_read"] = max(member["last_read"], upto)
            member["bumped"] = self.clock()     # a read bumps the recent row too (fact sheet §7.2)
        return {"dialogId": str(p.get("DIALOG_ID")), "chatId": chat["id"], "counter": 0}

    def m_im_dialog_users_list(self, ctx: dict, p: dict) -> Any:
        chat = self._readable_chat(ctx, p)
        members = [u for u in chat["members"] if self.users.get(u, {}).get("active")]
        if _yes(p.get("SKIP_EXTERNAL")):
            allowed = set(str(p.get("SKIP_EXTERNAL_EXCEPT_TYPES") or "").split(","))
            members = [u for u in members if self.users[u]["kind"] == "employee"
                       or (self.users[u]["kind"] == "bot" and "bot" in allowed)
                       or (self.users[u]["kind"] == "connector" and "imconnector" in allowed)]
        limit = min(max(_int_param(p.get("LIMIT"), 50) or 50, 1), 200)
        if p.get("LAST_ID") not in (None, ""):
            last = _int_param(p.get("LAST_ID"), 0) or 0
            rows = sorted(u for u in members if u > last)[:limit]
            return [self._user_out(u) for u in rows]
        offset = _int_param(p.get("OFFSET"), None)
        if offset is None:
            offset = _int_param(p.get("START"), 0) or 0
        rows = members[offset:offset + limit]
        extra = {"total": len(members)}
        if offset + limit < len(members):
            extra["next"] = offset + limit
        return [self._user_out(u) for u in rows], extra

    def _dialog_object(self, chat: dict, uid: int) -> dict:
        out = self._chat_out(chat, uid, full=True, recent_role=False)
        ids = chat["message_ids"]
        member = chat["members"].get(uid)
        out.update({
            "description": "", "counter": 0, "message_count": len(ids),
            "unread_id": 0, "last_message_id": ids[-1] if ids else 0, "last_id": ids[-1] if ids else 0,
            "marked_id": 0, "disk_folder_id": 0, "is_new": False,
            "readed_list": [], "last_message_views": {"message_id": 0, "first_viewers": [],
                                                     "count_of_viewers": 0},
            "dialog_id": "chat%d" % chat["id"] if chat["type"] != "private" else
            str([u for u in chat["private_pair"] if u != uid][0]),
        })
        if member:
            out["counter"] = sum(1 for i in ids if i > member["last_read"] and self.messages[i]["author_id"] != uid)
        return out

    def m_im_dialog_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p)
        return self._dialog_object(chat, uid)

    def m_im_chat_get(self, ctx: dict, p: dict) -> Any:
        if p.get("ENTITY_TYPE") is not None or p.get("ENTITY_ID") is not None:
            for chat in self.chats.values():
                if chat["entity_type"] == p.get("ENTITY_TYPE") and chat["entity_id"] == p.get("ENTITY_ID"):
                    return {"ID": chat["id"]}
            return None
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p, chat_id=True)
        return self._dialog_object(chat, uid)

    def m_imopenlines_config_list_get(self, ctx: dict, p: dict) -> Any:
        params = p.get("PARAMS") if isinstance(p.get("PARAMS"), dict) else {}
        options = p.get("OPTIONS") if isinstance(p.get("OPTIONS"), dict) else {}
        if p.get("PARAMS") not in (None, "") and not isinstance(p.get("PARAMS"), dict):
            raise RestError(400, "INVALID_FORMAT", "PARAMS must be an array")
        rows = []
        for line in sorted(self.lines.values(), key=lambda x: x["id"]):
            row = {"ID": str(line["id"]), "ACTIVE": "Y" if line["active"] else "N",
                   "LINE_NAME": line["name"], "CRM": "Y", "QUEUE_TYPE": "evenly",
                   "DATE_CREATE": _iso(self.clock() - 300 * 86400), "CHECK_AVAILABLE": "N"}
            if _yes(options.get("QUEUE")):
                row["QUEUE"] = [str(u) for u in line["queue"]]
                row["QUEUE_USERS_FIELDS"] = {str(u): {"USER_NAME": self._full_name(u),
                                                      "USER_WORK_POSITION": self.users[u]["position"],
                                                      "USER_AVATAR": "", "USER_AVATAR_ID": "0"}
                                             for u in line["queue"]}
            if _yes(options.get("CONFIG_QUEUE")):
                row["CONFIG_QUEUE"] = [{"ENTITY_ID": str(u), "ENTITY_TYPE": "user"} for u in line["queue"]]
            rows.append(row)
        select = params.get("select")
        if isinstance(select, (list, dict)) and select:
            fields = list(select.values()) if isinstance(select, dict) else select
            keep = set(fields) | {"QUEUE", "QUEUE_USERS_FIELDS", "CONFIG_QUEUE"}
            rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
        return rows

    def _history_allowed(self, chat: dict, uid: int) -> bool:
        session = self.sessions.get(chat["session_id"])
        return uid in chat["members"] or (session and session["operator"] == uid) or \
            self.users.get(uid, {}).get("admin", False)

    def m_imopenlines_session_history_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        sid = _int_param(p.get("SESSION_ID"), 0)
        chat_id = _int_param(p.get("CHAT_ID"), 0)
        if not sid and not chat_id:
            raise RestError(400, "MISSING_REQUIRED_PARAM", "SESSION_ID or CHAT_ID is required")
        if sid:
            session = self.sessions.get(sid)
            if not session:
                raise RestError(400, "INVALID_SESSION_ID", "Session not found")
            chat = self.chats[session["chat_id"]]
        else:
            chat = self.chats.get(chat_id)
            if not chat or chat["type"] != "lines":
                raise RestError(400, "CHAT_ID", "Chat not found")
            sessions = [s for s in self.sessions.values() if s["chat_id"] == chat["id"]]
            if not sessions:
                raise RestError(400, "INVALID_SESSION_ID", "No session in this chat")
            session = max(sessions, key=lambda s: s["id"])
        if not self._history_allowed(chat, uid):
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this session history")
        later = [s["created"] for s in self.sessions.values()
                 if s["chat_id"] == chat["id"] and s["id"] > session["id"]]
        end = min(later) if later else float("inf")
        ids = [i for i in chat["message_ids"] if session["created"] <= self.messages[i]["date"] < end]
        message = {}
        for i in sorted(ids, reverse=True):
            m = self.messages[i]
            message[str(i)] = {"id": str(i), "chatid": str(chat["id"]), "senderid": str(m["author_id"]),
                               "recipientid": "chat%d" % chat["id"], "date": _iso(m["date"]),
                               "text": m["text"], "textlegacy": m["text"], "params": m["params"] or []}
        users = {}
        for i in ids:
            a = self.messages[i]["author_id"]
            if a and str(a) not in users:
                u = self._user_out(a)
                users[str(a)] = {"id": a, "name": u["name"], "firstName": u["first_name"],
                                 "lastName": u["last_name"], "connector": u["connector"],
                                 "bot": u["bot"], "phones": u["phones"]}
        return {"chatId": chat["id"], "canJoin": "N", "canVoteHead": "N", "sessionId": session["id"],
                "sessionVoteHead": 0, "sessionCommentHead": "", "userId": "chat%d" % chat["id"],
                "message": message, "usersMessage": {"chat%d" % chat["id"]: [int(i) for i in ids]},
                "users": users, "openlines": {}, "userInGroup": {}, "woUserInGroup": {},
                "chat": {str(chat["id"]): {"id": chat["id"], "name": chat["title"],
                                           "entityType": chat["entity_type"],
                                           "entityId": chat["entity_id"]}},
                "userBlockChat": {}, "userInChat": {str(chat["id"]): sorted(chat["members"])}, "files": []}

    def m_imopenlines_dialog_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = None
        if p.get("CHAT_ID") not in (None, ""):
            chat = self.chats.get(_int_param(p.get("CHAT_ID"), -1) or -1)
        elif p.get("DIALOG_ID") not in (None, ""):
            m = re.fullmatch(r"chat(\d+)", str(p.get("DIALOG_ID")))
            chat = self.chats.get(int(m.group(1))) if m else None
        elif p.get("SESSION_ID") not in (None, ""):
            s = self.sessions.get(_int_param(p.get("SESSION_ID"), -1) or -1)
            chat = self.chats.get(s["chat_id"]) if s else None
        elif p.get("USER_CODE") not in (None, ""):
            code = str(p.get("USER_CODE"))
            code = code[5:] if code.startswith("imol|") else code
            chat = next((c for c in self.chats.values() if c["entity_id"] == code), None)
        else:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        if not chat or chat["type"] != "lines" or not self._can_read(chat, uid):
            raise RestError(400, "ACCESS_ERROR", "You do not have access to the specified dialog")
        return self._dialog_object(chat, uid)

    def _session_chat(self, ctx: dict, p: dict) -> dict:
        """The Open Lines chat named by ``CHAT_ID`` that the caller may act on (read access)."""
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), -1) or -1)
        if not chat:
            raise RestError(400, "CHAT_ID", "Chat not found")
        if chat["type"] != "lines":
            raise RestError(400, "CHAT_TYPE", "Not an Open Lines chat")
        if not self._can_read(chat, ctx["user"]):
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this chat")
        return chat

    def m_imopenlines_operator_answer(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        self._take(chat["id"], ctx["user"])
        self._post(chat, 0, "%s took the conversation" % self._full_name(ctx["user"]))
        return True

    def m_imopenlines_session_join(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        self.join(chat["id"], ctx["user"])
        return True

    def m_imopenlines_operator_finish(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        if ctx["user"] not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "You are not an operator of this chat")
        self.close_session(chat["id"])
        return True

    def m_imopenlines_operator_transfer(self, ctx: dict, p: dict) -> Any:
        """``TRANSFER_ID`` = ``queue<lineId>`` (back to that line's queue: the session waits again,
        operators leave) or a user id (that user takes over)."""
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        if p.get("TRANSFER_ID") in (None, ""):
            raise RestError(400, "TRANSFER_ID_EMPTY", "Transfer ID can't be empty")
        chat = self._session_chat(ctx, p)
        if ctx["user"] not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "You are not an operator of this chat")
        target = str(p.get("TRANSFER_ID"))
        session = self.sessions.get(chat["session_id"])
        m = re.fullmatch(r"queue(\d+)", target)
        if m:
            line = self.lines.get(int(m.group(1)))
            if not line:
                raise RestError(400, "OPERATOR_WRONG", "No such line")
            for uid in [u for u in chat["members"] if u != chat["customer_id"]]:
                del chat["members"][uid]
            chat["owner"] = 0
            chat["line_id"] = line["id"]
            if session:
                session.update(status=SESSION_NEW, operator=0, line_id=line["id"])
            chat["offered_to"] = (line["queue"] or [None])[0] if line.get("offer") == "one" else None
            chat["offered_at"] = self.clock()
            self._post(chat, 0, "The conversation was transferred to the queue of %s" % line["name"])
            return True
        uid = _int_param(target, 0) or 0
        if uid not in self.users:
            raise RestError(400, "OPERATOR_WRONG", "Wrong operator")
        chat["members"].pop(ctx["user"], None)
        self._take(chat["id"], uid)
        self._post(chat, 0, "The conversation was transferred to %s" % self._full_name(uid))
        return True

    def m_event_bind(self, ctx: dict, p: dict) -> Any:
        raise RestError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    m_event_get = m_event_unbind = m_events = m_placement_bind = m_event_bind

    # method name -> (handler, scope or None, upper-case top-level params)
    METHODS = {
        "scope": ("m_scope", None, False), "profile": ("m_profile", None, False),
        "user.current": ("m_user_current", "user", False),
        "batch": (None, None, True),
        "im.recent.list": ("m_im_recent_list", "im", True),
        "im.recent.get": ("m_im_recent_get", "im", True),
        "im.dialog.messages.get": ("m_im_dialog_messages_get", "im", True),
        "im.message.add": ("m_im_message_add", "im", True),
        "im.dialog.read": ("m_im_dialog_read", "im", True),
        "im.dialog.users.list": ("m_im_dialog_users_list", "im", True),
        "im.dialog.get": ("m_im_dialog_get", "im", True),
        "im.chat.get": ("m_im_chat_get", "im", True),
        "imopenlines.config.list.get": ("m_imopenlines_config_list_get", "imopenlines", False),
        "imopenlines.session.history.get": ("m_imopenlines_session_history_get", "imopenlines", False),
        "imopenlines.dialog.get": ("m_imopenlines_dialog_get", "imopenlines", False),
        "imopenlines.operator.answer": ("m_imopenlines_operator_answer", "imopenlines", False),
        "imopenlines.session.join": ("m_imopenlines_session_join", "imopenlines", False),
        "imopenlines.operator.finish": ("m_imopenlines_operator_finish", "imopenlines", False),
        "imopenlines.operator.transfer": ("m_imopenlines_operator_transfer", "imopenlines", False),
        "event.bind": ("m_event_bind", None, False), "event.get": ("m_event_get", None, False),
        "event.unbind": ("m_event_unbind", None, False), "events": ("m_events", None, False),
        "placement.bind": ("m_placement_bind", None, False),
    }

    # ===========================================================================
    # Dispatch: authentication, scopes, limits
    # ===========================================================================

    def _time_block(self, start: float, ctx: dict | None = None, method: str | None = None,
                    processing: float | None = None) -> dict:
        finish = max(start, self.clock())     # the portal's own clock (a test may move it)
        block = {"start": start, "finish": finish, "duration": finish - start,
                 "processing": processing if processing is not None else finish - start,
                 "date_start": _iso(start), "date_finish": _iso(finish)}
        if ctx is not None and method:
            used, reset_at = self._operating(ctx, method)
            block["operating_reset_at"] = reset_at
            block["operating"] = used
        return block

    def _operating(self, ctx: dict, method: str) -> tuple:
        now = self.clock()
        minutes = self.operating.setdefault((ctx["user"], method), {})
        current = int(now // 60)
        for m in [m for m in minutes if m <= current - 10]:
            del minutes[m]
        used = sum(minutes.values())
        oldest = min(minutes) if minutes else current
        return used, int((oldest + 10) * 60)

    def _check_operating(self, ctx: dict, method: str) -> None:
        used, _reset = self._operating(ctx, method)
        if used > self.operating_limit:
            raise RestError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")

    def _add_operating(self, ctx: dict, method: str, seconds: float) -> None:
        if seconds < OPERATING_MIN_COUNTED:
            return
        minutes = self.operating.setdefault((ctx["user"], method), {})
        key = int(self.clock() // 60)
        minutes[key] = minutes.get(key, 0.0) + seconds

    def _take_token(self, ip: str) -> None:
        now = time.monotonic()
        level, last = self.bucket.get(ip, [0.0, now])
        level = max(0.0, level - (now - last) * self.rate)
        if level + 1 > self.burst:
            self.bucket[ip] = [level, now]
            raise RestError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        self.bucket[ip] = [level + 1, now]

    def _auth(self, user_id: str | None, code: str | None) -> dict:
        if user_id is None:
            raise RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        hook = self.webhooks.get((_int_param(user_id, -1), code))
        if not hook or _int_param(user_id, -1) not in self.users:
            raise RestError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        if not hook["active"] or not self.users[_int_param(user_id, -1)]["active"]:
            raise RestError(401, "authorization_error", "Unable to authorize user")
        return {"user": int(user_id), "scopes": hook["scopes"]}

    def _run_method(self, ctx: dict, method: str, params: dict) -> tuple:
        """Scope check, operating budget, handler; returns ``(result, extra, time_block)``."""
        handler_name, scope, upper = self.METHODS[method]
        if scope and scope not in ctx["scopes"] and not (scope == "user" and
                                                          {"user_brief", "user_basic"} & set(ctx["scopes"])):
            raise RestError(401, "insufficient_scope",
                            "The request requires higher privileges than provided by the webhook token")
        if upper:
            params = {str(k).upper(): v for k, v in params.items()}
        params = {k: (None if v is None else v) for k, v in params.items() if v is not None}
        self._check_operating(ctx, method)
        start, wall = self.clock(), time.time()
        out = getattr(self, handler_name)(ctx, params)
        elapsed = time.time() - wall
        cost = self.method_cost.get(method, elapsed)
        self._add_operating(ctx, method, cost)
        result, extra = out if isinstance(out, tuple) else (out, {})
        return result, extra, self._time_block(start, ctx, method, cost)

    def handle_rest(self, path_user: str | None, path_code: str | None, method: str, params: dict,
                    ip: str = "127.0.0.1") -> tuple:
        """One REST request -> ``(status, body dict)``; also used by batch sub-calls."""
        method = method.lower()
        for suffix in (".json", ".xml"):
            if method.endswith(suffix):
                method = method[:-len(suffix)]
        with self.lock:
            try:
                self._take_token(ip)
                if method not in self.METHODS:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                ctx = self._auth(path_user, path_code)
                if method == "batch":
                    return 200, self._batch(ctx, params)
                result, extra, tblock = self._run_method(ctx, method, params)
                body = {"result": result}
                body.update(extra)
                body["time"] = tblock
                return 200, body
            except RestError as exc:
                return exc.status, exc.body()

    def _batch(self, ctx: dict, params: dict) -> dict:
        start = self.clock()
        p = {str(k).lower(): v for k, v in params.items()}
        cmd = p.get("cmd")
        halt = str(p.get("halt", "0")).lower() in ("1", "true", "y")
        if isinstance(cmd, list):
            cmd = {str(i): v for i, v in enumerate(cmd)}
        if not isinstance(cmd, dict):
            cmd = {}
        results, errors, totals, nexts, times = {}, {}, {}, {}, {}
        for n, (name, query) in enumerate(cmd.items()):
            if not isinstance(query, str):
                continue
            if n >= 50:
                errors[name] = {"error": "ERROR_BATCH_LENGTH_EXCEEDED",
                                "error_description": "Max batch length exceeded"}
                continue
            sub_method, _, qs = query.partition("?")
            sub_method = sub_method.strip().lower()
            if sub_method.endswith(".json"):
                sub_method = sub_method[:-5]
            sub_params = php_parse(urllib.parse.parse_qsl(qs, keep_blank_values=True))
            sub_params = self._resolve_refs(sub_params, results, errors, totals, nexts, times)
            try:
                refused = self.take_fault(sub_method, kinds=("http400", "http500"))
                if refused:      # a fault aimed at this method refuses the sub-call alone
                    raise RestError(400, "ERROR_ARGUMENT", "Argument error") if refused["kind"] == "http400" \
                        else RestError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
                if sub_method == "batch":
                    raise RestError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
                if sub_method not in self.METHODS:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                result, extra, tblock = self._run_method(ctx, sub_method, sub_params)
                results[name] = result
                if "total" in extra:
                    totals[name] = extra["total"]
                if "next" in extra:
                    nexts[name] = extra["next"]
                times[name] = tblock
            except RestError as exc:
                errors[name] = exc.body()
                if halt:
                    break
        return {"result": {"result": results, "result_error": errors, "result_total": totals,
                           "result_next": nexts, "result_time": times},
                "time": self._time_block(start)}

    _REF = re.compile(r"\$(result|next|total|error|time)\[([^\]]+)\]((?:\[[^\]]*\])*)")

    def _resolve_refs(self, value: Any, results, errors, totals, nexts, times) -> Any:
        tables = {"result": results, "error": errors, "total": totals, "next": nexts, "time": times}
        if isinstance(value, dict):
            return {k: self._resolve_refs(v, results, errors, totals, nexts, times) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_refs(v, results, errors, totals, nexts, times) for v in value]
        if not isinstance(value, str) or "$" not in value:
            return value

        def lookup(m: re.Match) -> tuple:
            node: Any = tables[m.group(1)]
            for key in [m.group(2)] + re.findall(r"\[([^\]]*)\]", m.group(3)):
                if isinstance(node, dict) and key in node:
                    node = node[key]
                elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                    node = node[int(key)]
                else:
                    return False, None
            return True, node

        whole = self._REF.fullmatch(value)
        if whole:
            ok, got = lookup(whole)
            return got if ok else value

        def splice(m: re.Match) -> str:
            ok, got = lookup(m)
            if ok and not isinstance(got, (dict, list)):
                return "" if got is None else str(got)
            return m.group(0)
        return self._REF.sub(splice, value)

    # -- faults -----------------------------------------------------------------
    def take_fault(self, method: str, kinds: tuple = ()) -> dict | None:
        """The fault that applies to this request (or, with *kinds*, to a batch sub-call)."""
        with self.lock:
            for f in list(self.faults):
                if f["method"] and f["method"] != method:
                    continue
                if kinds and (f["kind"] not in kinds or not f["method"]):
                    continue
                if f["count"] is not None:
                    f["count"] -= 1
                    if f["count"] <= 0:
                        self.faults.remove(f)
                    return f
                if f["ratio"] is not None and self.rng.random() < float(f["ratio"]):
                    return f
            return None

    def record(self, method: str, status: int, nbytes: int, error: str = "") -> None:
        with self.lock:
            self.counts[method] += 1
            self.bytes_out[method] += nbytes
            self.log.append({"t": round(time.time(), 3), "method": method, "status": status,
                             "bytes": nbytes, "error": error})

    # -- simulation ----------------------------------------------------------------
    def simulate(self, stop: threading.Event, interval: float = 4.0) -> None:
        """Customers write every few seconds; now and then a new conversation starts."""
        phrases = ["Hi, is anyone there?", "Where is my order?", "Can I change the delivery address?",
                   "Thank you!", "What time do you open tomorrow?", "Do you have it in blue?",
                   "I'd like to return an item", "Ok, waiting"]
        n = 0
        while not stop.wait(interval * (0.5 + self.rng.random())):
            n += 1
            with self.lock:
                lines_chats = [c["id"] for c in self.chats.values()
                               if c["type"] == "lines" and (WEBHOOK_USER_ID in c["members"]
                                                            or self._in_queue_for(c, WEBHOOK_USER_ID))]
                if n % 7 == 0 or not lines_chats:
                    self.new_conversation(self.rng.choice([1, 3]), "Demo Customer%d" % n,
                                          "1000000%04d" % (200 + n), self.rng.choice(phrases))
                elif n % 5 == 0:
                    self.customer_media(self.rng.choice(lines_chats[:4]), "image", "photo_%d.jpg" % n,
                                        self.rng.randint(40, 900) * 1024, self.rng.choice(["", "like this one"]))
                else:
                    self.customer_message(self.rng.choice(lines_chats[:4]), self.rng.choice(phrases))


# ===========================================================================
# HTTP server
# ===========================================================================

_CONTROL = {  # endpoint -> (Portal method, HTTP verbs)
    "customer_message": "customer_message", "new_conversation": "new_conversation",
    "join": "join", "leave": "leave", "operator_message": "operator_message",
    "close_session": "close_session", "messages": "chat_messages", "stats": "stats",
    "reset_stats": "reset_stats", "fault": "fault", "clear_faults": "clear_faults",
    "limits": "set_limits", "webhook": "set_webhook", "add_dialogs": "add_dialogs", "world": "world",
    "offer": "offer", "pin": "pin", "customer_media": "customer_media", "behave": "behave",
    "add_line": "add_line", "forget_uuids": "forget_uuids",
}


class _Handler(BaseHTTPRequestHandler):
    server_version = "BitrixEmulator/1.0"
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; the portal keeps its own log
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json; charset=utf-8",
              declared: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _params(self, query: str, body: bytes) -> dict:
        params = php_parse(urllib.parse.parse_qsl(query, keep_blank_values=True))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body:
            if ctype == "application/json":
                try:
                    data = json.loads(body.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    data = {}     # the real portal silently treats a broken JSON body as "no parameters"
                if isinstance(data, dict):
                    params.update(data)
            elif ctype in ("application/x-www-form-urlencoded", ""):
                params.update(php_parse(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                                               keep_blank_values=True)))
        return params

    def _dispatch(self) -> None:
        portal: Portal = self.server.portal  # type: ignore[attr-defined]
        parts = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        if parts.path.startswith("/_control/"):
            self._control(portal, parts, body)
            return
        m = re.fullmatch(r"/rest/(?:(\d+)/([^/]+)/)?([^/]+?)/?", parts.path)
        if not m:
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
            return
        user, code, method = m.group(1), m.group(2), m.group(3).lower()
        if user is None and method.isdigit():
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
            return
        name = method[:-5] if method.endswith(".json") else method
        fault = portal.take_fault(name)
        if fault:
            if fault["kind"] == "latency":
                time.sleep(fault["seconds"])
            elif self._apply_fault(portal, fault, name):
                return
        status, payload = portal.handle_rest(user, code, method, self._params(parts.query, body),
                                             self.client_address[0])
        if fault and fault["kind"] == "drop_after":
            portal.record(name, 0, 0, "drop_after")
            self.close_connection = True
            return
        raw = json.dumps(phpify(payload), ensure_ascii=False).encode("utf-8")
        # counted before the answer leaves, so a client that got it sees it counted
        portal.record(name, status, len(raw), str(payload.get("error", "")) if status != 200 else "")
        self._send(status, raw)

    def _apply_fault(self, portal: Portal, fault: dict, name: str) -> bool:
        kind = fault["kind"]
        if kind == "drop_after":
            return False
        portal.record(name, 0, 0, kind)
        if kind == "http500":
            self._send(500, json.dumps({"error": "INTERNAL_SERVER_ERROR",
                                        "error_description": "Internal server error"}).encode())
        elif kind == "http502":
            self._send(502, HTML_ERROR_PAGE, "text/html")
        elif kind == "http400":
            self._send(400, json.dumps({"error": "ERROR_ARGUMENT",
                                        "error_description": "Argument error"}).encode())
        elif kind == "http503":
            self._send(503, json.dumps({"error": "QUERY_LIMIT_EXCEEDED",
                                        "error_description": "Too many requests"}).encode())
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Portal maintenance</body></html>", "text/html")
        elif kind == "malformed":
            self._send(200, b'{"result": {"items": [', "application/json")
        elif kind == "truncated":
            full = b'{"result": {"items": [], "hasMore": false}, "time": {"start": 1}}'
            self._send(200, full[:20], declared=len(full))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def _control(self, portal: Portal, parts: urllib.parse.SplitResult, body: bytes) -> None:
        name = parts.path[len("/_control/"):].strip("/")
        target = _CONTROL.get(name)
        if not target:
            self._send(404, json.dumps({"error": "unknown control endpoint %r" % name}).encode())
            return
        args: dict = {k: v for k, v in urllib.parse.parse_qsl(parts.query)}
        if body:
            try:
                data = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                self._send(400, b'{"error": "control body must be JSON"}')
                return
            if isinstance(data, dict):
                args.update(data)
        for key in ("chat_id", "user_id", "line_id", "count"):
            if key in args and isinstance(args[key], str) and args[key].isdigit():
                args[key] = int(args[key])
        try:
            result = getattr(portal, target)(**args)
        except RestError as exc:
            self._send(exc.status, json.dumps(exc.body()).encode())
            return
        except TypeError as exc:
            self._send(400, json.dumps({"error": "bad arguments: %s" % exc}).encode())
            return
        self._send(200, json.dumps({"result": result}, ensure_ascii=False).encode("utf-8"))


class PortalServer(ThreadingHTTPServer):
    """The emulator's HTTP server on 127.0.0.1; ``.portal`` is the :class:`Portal`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, portal: Portal | None = None, port: int = 0):
        self.portal = portal or Portal()
        super().__init__(("127.0.0.1", port), _Handler)
        self.portal.public_url = self.url
        self._thread: threading.Thread | None = None
        self._sim_stop = threading.Event()

    def handle_error(self, request, client_address) -> None:  # a client gave up mid-reply: fine
        pass

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    @property
    def webhook_base(self) -> str:
        return "%s/rest/%d/%s/" % (self.url, WEBHOOK_USER_ID, self.portal.code)

    def start(self) -> PortalServer:
        """Serve in a background thread (for tests and demos)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="mock-b24-portal", daemon=True)
        self._thread.start()
        return self

    def start_simulation(self, interval: float = 4.0) -> None:
        threading.Thread(target=self.portal.simulate, args=(self._sim_stop, interval),
                         name="mock-b24-simulate", daemon=True).start()

    def stop(self) -> None:
        self._sim_stop.set()
        self.shutdown()
        self.server_close()


def serve(port: int = 0, simulate: bool = False, interval: float = 4.0, dialogs: int = 0,
          code: str | None = None) -> PortalServer:
    server = PortalServer(Portal(code=code), port)
    if dialogs:
        server.portal.add_dialogs(dialogs)
    server.start()
    if simulate:
        server.start_simulation(interval)
    return server


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mock_b24_portal.py",
        description="A local Bitrix24 portal emulator on 127.0.0.1 for the Open Lines toolkit.",
        epilog="Example: python3 mock_b24_portal.py --simulate  (then paste the printed "
               "B24_WEBHOOK_BASE line into .env or export it)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--simulate", action="store_true", help="customers write every few seconds")
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between simulated messages")
    parser.add_argument("--dialogs", type=int, default=0, help="add N more Open Lines dialogs")
    parser.add_argument("--code", help="webhook code to accept (default: a random one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port: expected 0..65535")
    if args.interval <= 0:
        parser.error("--interval: expected a positive number of seconds")
    if args.code is not None and not re.fullmatch(r"[A-Za-z0-9_]{4,64}", args.code):
        parser.error("--code: expected 4 to 64 letters or digits")
    try:
        server = serve(args.port, args.simulate, args.interval, max(0, args.dialogs), args.code)
    except OSError as exc:
        sys.stderr.write("mock_b24_portal.py: error: cannot listen on 127.0.0.1:%d (%s)\n"
                         % (args.port, exc.strerror or exc))
        return 1
    print("B24_WEBHOOK_BASE=%s" % server.webhook_base, flush=True)
    sys.stderr.write("mock portal on %s (control API under %s/_control/)%s; Ctrl-C to stop\n"
                     % (server.url, server.url, ", simulating customers" if args.simulate else ""))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
