"""The emulated portal's world: who exists, what was said, and how it looks from outside."""
from __future__ import annotations

import bisect
import datetime as _dt
import random
import re
import secrets
import threading
import time
from collections import Counter, deque
from typing import Any, Callable

WEBHOOK_USER_ID = 7
TZ = _dt.timezone(_dt.timedelta(hours=3))

# The real default limits (fact sheet §3).
DEFAULT_RATE = 2.0            # leaky bucket drain per second (non-Enterprise)
DEFAULT_BURST = 50            # bucket size
DEFAULT_OPERATING_LIMIT = 420.0   # seconds per method per 10 minutes (box default)
OPERATING_MIN_COUNTED = 0.1   # calls shorter than this are not counted

SESSION_NEW, SESSION_ANSWERED, SESSION_CLIENT, SESSION_CLIENT_AFTER_OPERATOR = 0, 10, 20, 25
SESSION_SKIP = 5                   # the bot handed the session to the operators (fact sheet §15.4)
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


class World:
    """The world model (users, lines, chats, sessions, messages), its control actions, views,
    limits, faults and statistics.  All state is guarded by one lock.
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
        self.sub_counts: Counter = Counter()    # calls made inside batches, per method
        self.bytes_out: Counter = Counter()
        self.log: deque = deque(maxlen=20000)
        # what other parts of the portal watch: hook(kind, chat, info) on "message", "join",
        # "session_start", "session_finish" -- the event machinery hangs here (see event.py)
        self.hooks: list = []
        self.ticks: list = [self._apply_rows]   # time-driven changes, applied before each request is served
        self.drop_events = 0              # the next N im.v2 events are not recorded (lost on purpose)
        self.drop_push = 0                # the next N POST deliveries are lost on purpose
        self.push_delay = 0.05            # the queue server's delay before a POST goes out
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
                               "active": True, "admin": admin, "lines_modify": admin,
                               "color": "#%06x" % self.rng.randrange(0x222222, 0xdddddd)}
            return uid

    def add_line(self, line_id: int, name: str, queue: list, connector: str = "whatsappbyedna",
                 offer: str = "all") -> dict:
        """An Open Line; ``offer="one"``: a waiting chat is offered to one queue operator at a
        time (the first one, then whoever :meth:`offer` names), as strict/evenly queues do."""
        with self.lock:
            self.lines[int(line_id)] = {"id": int(line_id), "name": name, "queue": [int(u) for u in queue],
                                        "connector": connector, "active": True, "offer": offer,
                                        "modify_user": 0, "bot": None, "bot_join": "always", "bot_time": 600,
                                        "bot_left": "queue"}
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
        self._notify("join", chat, uid=uid)

    def _notify(self, kind: str, chat: dict, **info: Any) -> None:
        for hook in self.hooks:
            hook(kind, chat, info)

    def tick(self) -> None:
        """Apply what time has brought (late recent rows, connector answers); under the lock."""
        for step in self.ticks:
            step()

    def _post(self, chat: dict, author: int, text: str, *, params: Any = None, uuid: str | None = None,
              when: float | None = None, system: bool = False, skip_connector: bool = False) -> dict:
        self.next_message_id += 1 if self.rng.random() < 0.7 else self.rng.randint(2, 6)
        mid = self.next_message_id
        ts = self.clock() if when is None else when
        msg = {"id": mid, "chat_id": chat["id"], "author_id": author, "date": ts, "text": text,
               "params": params or {}, "uuid": uuid, "system": system or not author,
               "skip_connector": skip_connector}
        self.messages[mid] = msg
        chat["message_ids"].append(mid)
        if self.row_lag > 0 and when is None:
            # the recent row is written after the message (fact sheet §7.2)
            self._rows_due.append((time.monotonic() + self.row_lag, chat["id"], mid, ts))
        else:
            self._write_row(chat, mid, ts)
        if author in chat["members"]:
            chat["members"][author]["last_read"] = mid
        self._notify("message", chat, msg=msg)
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
        # webhooks are usually made by someone who runs the lines: may edit them, not an administrator
        self.users[WEBHOOK_USER_ID]["lines_modify"] = True
        self.add_user("Pavel", "Orlov", position="Sales operator", gender="M", uid=9)
        self.add_user("Irina", "Volkova", position="Head of support", gender="F", uid=11, admin=True)
        self.add_user("Welcome", "Bot", kind="bot", uid=15)
        self.add_line(1, "WhatsApp Sales", [WEBHOOK_USER_ID, 9])
        self.add_line(3, "WhatsApp Support", [WEBHOOK_USER_ID, 11], connector="olchat_wa_connector_2")
        self.add_line(5, "Telegram", [9], connector="telegrambot")
        t = now - 3 * 3600
        a = self.new_conversation(3, "Ivan Petrov", "10000000101", "Hello, is my order ready?", when=t)
        self.take_chat(a["chat_id"], WEBHOOK_USER_ID, when=t + 60)
        self.operator_message(a["chat_id"], WEBHOOK_USER_ID, "Hi Ivan, let me check.", when=t + 90)
        self.customer_message(a["chat_id"], "Thanks!\nOrder [b]A-1042[/b]", when=t + 120)
        b = self.new_conversation(1, "Maria Lopez", "+10000000102", "Do you deliver on Sundays?", when=t + 600)
        self.take_chat(b["chat_id"], WEBHOOK_USER_ID, when=t + 700)
        self.operator_message(b["chat_id"], WEBHOOK_USER_ID, "Yes, from 10 to 16.", when=t + 760)
        c = self.new_conversation(1, "Chen Wei", "10000000103", "Price list please", when=now - 1800)
        # c stays in the queue (status 0): readable by queue operators, not writable
        d = self.new_conversation(5, "Telegram User", None, "hi from telegram", when=now - 1200,
                                  external="100000001")
        self.take_chat(d["chat_id"], 9, when=now - 1100)
        e = self.new_conversation(3, "Old Customer", "10000000105", "Thanks, bye", when=now - 86400)
        self.take_chat(e["chat_id"], WEBHOOK_USER_ID, when=now - 86300)
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
        chat["skipped_by"] = set()
        line = self.lines.get(chat["line_id"]) or {}
        chat["offered_to"] = (line.get("queue") or [None])[0] if line.get("offer") == "one" else None
        chat["offered_at"] = ts
        self._notify("session_start", chat, session=sid)
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

    def take_chat(self, chat_id: int, user_id: int, *, when: float | None = None) -> None:
        """*user_id* answers the chat's session (becomes its operator and the chat's owner)."""
        chat = self._chat(chat_id)
        self._add_member(chat, user_id, role="owner")
        chat["owner"] = user_id
        session = self.sessions.get(chat["session_id"])
        if session:
            session["status"] = max(session["status"], SESSION_ANSWERED)
            session["operator"] = user_id
        self._notify("answer", chat, uid=user_id)

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
            self._notify("session_finish", chat, session=chat["session_id"])
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
               message_add_delay: float | None = None, fail_after_uuid: int | None = None,
               drop_events: int | None = None, drop_push: int | None = None,
               push_delay: float | None = None) -> dict:
        """Tune portal behaviours: recent-row lag, uuid record TTL, slow or dying im.message.add,
        im.v2 events and POST deliveries lost on purpose, the queue server's delay."""
        with self.lock:
            for name, value in (("row_lag", row_lag), ("uuid_ttl", uuid_ttl),
                                ("message_add_delay", message_add_delay), ("push_delay", push_delay)):
                if value is not None:
                    setattr(self, name, float(value))
            for name, value in (("fail_after_uuid", fail_after_uuid), ("drop_events", drop_events),
                                ("drop_push", drop_push)):
                if value is not None:
                    setattr(self, name, int(value))
            return {"row_lag": self.row_lag, "uuid_ttl": self.uuid_ttl,
                    "message_add_delay": self.message_add_delay, "fail_after_uuid": self.fail_after_uuid,
                    "drop_events": self.drop_events, "drop_push": self.drop_push, "push_delay": self.push_delay}

    def forget_uuids(self) -> dict:
        """Drop every uuid record (a portal past the records' lifetime)."""
        with self.lock:
            n = len(self.uuids)
            self.uuids.clear()
            return {"forgotten": n}

    def chat_messages(self, chat_id: int) -> list:
        """Every message of a chat, oldest first (including what the API posted)."""
        with self.lock:
            self.tick()
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
                self.take_chat(c["chat_id"], WEBHOOK_USER_ID, when=base + i)
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

    def permissions(self, user_id: int = WEBHOOK_USER_ID, admin: bool | None = None,
                    lines_modify: bool | None = None) -> dict:
        """A user's Open Lines rights: *admin* (read every line), *lines_modify* (edit lines)."""
        with self.lock:
            user = self.users[int(user_id)]
            if admin is not None:
                user["admin"] = bool(admin)
            if lines_modify is not None:
                user["lines_modify"] = bool(lines_modify)
            return {"user_id": user["id"], "admin": user["admin"], "lines_modify": user["lines_modify"]}

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
            return {"counts": dict(self.counts), "sub_counts": dict(self.sub_counts), "bytes": dict(self.bytes_out),
                    "requests": sum(self.counts.values()), "bytes_total": sum(self.bytes_out.values()),
                    "log": list(self.log), "faults_pending": len(self.faults)}

    def reset_stats(self) -> dict:
        with self.lock:
            self.counts.clear()
            self.sub_counts.clear()
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

    def in_queue_for(self, chat: dict, uid: int) -> bool:
        if chat["type"] != "lines" or uid in chat["members"]:
            return False
        status = self._session_status(chat)
        line = self.lines.get(chat["line_id"])
        if not line or status is None or status >= SESSION_ANSWERED or uid not in line["queue"]:
            return False
        if uid in chat.get("skipped_by", ()):
            return False        # they rejected it (imopenlines.operator.skip)
        if (self.sessions.get(chat["session_id"]) or {}).get("bot"):
            return False        # the line's chat bot holds the session: it is in nobody's queue yet
        return line.get("offer") != "one" or chat["offered_to"] == uid

    def _can_read(self, chat: dict, uid: int) -> bool:
        """Membership, a queue offer, or the JOIN permission (fact sheet §17): administrators on every
        line, everybody else (JOIN = self) on the lines whose queue has them or that they last edited."""
        if uid in chat["members"] or self.in_queue_for(chat, uid):
            return True
        if chat["type"] != "lines":
            return False
        line = self.lines.get(chat["line_id"]) or {}
        return self.users.get(uid, {}).get("admin", False) or uid in line.get("queue", ()) \
            or line.get("modify_user") == uid

    def _entity_data_1(self, chat: dict) -> str:
        sid = chat["session_id"]
        created = int(self.sessions[sid]["created"]) if sid in self.sessions else 0
        return "Y|LEAD|%d|N|N|%d|%d|%d|%d|%s" % (chat["crm_lead"], sid, created, chat["line_id"] or 0,
                                                 chat.get("block_date") or 0, chat.get("block_reason") or "")

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

    def _unread(self, ids: list, last_read: int, viewer: int) -> int:
        """Messages after *last_read* in *ids* (ascending) by others than *viewer*: the tail only."""
        return sum(1 for i in ids[bisect.bisect_right(ids, last_read):] if self.messages[i]["author_id"] != viewer)

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
            counter = self._unread(ids, member["last_read"], viewer)
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
        queued = [c for c in self.chats.values() if self.in_queue_for(c, uid)]
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

    def record(self, method: str, status: int, nbytes: int, error: str = "", calls: list | None = None) -> None:
        """Count a request; *calls*: a batch's sub-methods, in order (kept in the log)."""
        with self.lock:
            self.counts[method] += 1
            self.bytes_out[method] += nbytes
            entry = {"t": round(time.time(), 3), "method": method, "status": status, "bytes": nbytes, "error": error}
            if calls is not None:
                entry["calls"] = calls
            self.log.append(entry)

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
                                                            or self.in_queue_for(c, WEBHOOK_USER_ID))]
                if n % 7 == 0 or not lines_chats:
                    self.new_conversation(self.rng.choice([1, 3]), "Demo Customer%d" % n,
                                          "1000000%04d" % (200 + n), self.rng.choice(phrases))
                elif n % 5 == 0:
                    self.customer_media(self.rng.choice(lines_chats[:4]), "image", "photo_%d.jpg" % n,
                                        self.rng.randint(40, 900) * 1024, self.rng.choice(["", "like this one"]))
                else:
                    self.customer_message(self.rng.choice(lines_chats[:4]), self.rng.choice(phrases))
