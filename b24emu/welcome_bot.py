"""A line's welcome bot: its settings, when it joins, when it lets go, and the bot-session methods (fact sheet §15).

A line with ``WELCOME_BOT_ENABLE=Y`` and a bot id gives each new session
(``JOIN=always``; ``first``: only a chat's first one) to that bot: the bot
becomes a member and the chat's owner, the session's operator is the bot, and
no queue operator is offered it.  The bot lets go when its time runs out
(``WELCOME_BOT_TIME``, 0 = never), when a person writes ``0``, on
``imopenlines.bot.session.operator`` / ``.transfer``, or when an operator
answers; with ``WELCOME_BOT_LEFT=queue`` it then leaves the chat (``close``:
it stays until the session closes).  ``imopenlines.config.update`` does not
merge: the bot id, time and leave setting fall back to 0, 600 and ``queue``
unless ``WELCOME_BOT_ENABLE=Y`` is in the same call.
"""
from __future__ import annotations

import re
from typing import Any

from .world import SESSION_ANSWERED, SESSION_CLOSED, SESSION_NEW, SESSION_SKIP, RestError, _int_param, _yes

BOT_HANDED_OVER = "Bot has forwarded conversation to an agent"
LINE_FIELDS = {"WELCOME_BOT_ENABLE": "bot", "WELCOME_BOT_ID": "bot", "WELCOME_BOT_JOIN": "bot_join",
               "WELCOME_BOT_TIME": "bot_time", "WELCOME_BOT_LEFT": "bot_left"}


class WelcomeBot:
    """``imopenlines.config.get/update`` and ``imopenlines.bot.session.*``; the welcome bot's life in a chat."""

    METHODS = {
        "imopenlines.config.get": ("m_imopenlines_config_get", "imopenlines", False),
        "imopenlines.config.update": ("m_imopenlines_config_update", "imopenlines", False),
        "imopenlines.bot.session.operator": ("m_bot_session_operator", "imopenlines", True),
        "imopenlines.bot.session.transfer": ("m_bot_session_transfer", "imopenlines", False),
        "imopenlines.bot.session.finish": ("m_bot_session_finish", "imopenlines", True),
        "imopenlines.bot.session.message.send": ("m_bot_session_message_send", "imopenlines", True),
    }

    def attach(self) -> None:
        self.hooks.append(self._welcome_hook)
        self.ticks.append(self._bot_time_out)

    # -- the line's settings -------------------------------------------------------------
    def line_settings(self, line: dict) -> dict:
        """The WELCOME_BOT_* fields of a line as ``imopenlines.config.get`` shows them (strings)."""
        return {"ID": str(line["id"]), "LINE_NAME": line["name"], "ACTIVE": "Y" if line["active"] else "N",
                "WELCOME_BOT_ENABLE": "Y" if line["bot"] else "N", "WELCOME_BOT_ID": str(line["bot"] or 0),
                "WELCOME_BOT_JOIN": line["bot_join"], "WELCOME_BOT_TIME": str(line["bot_time"]),
                "WELCOME_BOT_LEFT": line["bot_left"], "MODIFY_USER_ID": str(line["modify_user"])}

    def m_imopenlines_config_get(self, ctx: dict, p: dict) -> Any:
        line = self.lines.get(_int_param(p.get("CONFIG_ID"), 0) or 0)
        if line is None:
            raise RestError(400, "CONFIG_NOT_FOUND", "Config not found")
        return self.line_settings(line)

    def m_imopenlines_config_update(self, ctx: dict, p: dict) -> Any:
        if p.get("CONFIG_ID") in (None, ""):
            raise RestError(400, "CONFIG_ID_EMPTY", "Config ID can't be empty")
        if not self.users[ctx["user"]].get("lines_modify"):
            raise RestError(403, "CONFIG_WRONG_USER_PERMISSION", "You do not have permission to edit this line")
        line = self.lines.get(_int_param(p.get("CONFIG_ID"), 0) or 0)
        params = p.get("PARAMS") if isinstance(p.get("PARAMS"), dict) else {}
        if line is None:
            return False
        enable = _yes(params.get("WELCOME_BOT_ENABLE"))
        # computed against ENABLE of this same call: not merged with what is stored
        line["bot"] = (_int_param(params.get("WELCOME_BOT_ID"), 0) or None) if enable else None
        line["bot_time"] = max(0, _int_param(params.get("WELCOME_BOT_TIME"), 600) or 0) if enable else 600
        line["bot_left"] = "close" if enable and params.get("WELCOME_BOT_LEFT") == "close" else "queue"
        if params.get("WELCOME_BOT_JOIN") in ("always", "first"):
            line["bot_join"] = params["WELCOME_BOT_JOIN"]
        if "LINE_NAME" in params:
            line["name"] = str(params["LINE_NAME"])
        if "SKIP_MODIFY_MARK" not in params:
            line["modify_user"] = ctx["user"]
        return True

    def line_bot(self, line_id: int, bot_id: int | None, time: int = 600, left: str = "queue",
                 join: str = "always") -> dict:
        """Choose (or, with None, remove) the Open Lines bot of a line, as in the line's settings."""
        with self.lock:
            line = self.lines.get(int(line_id))
            if not line:
                raise RestError(400, "LINE_ID", "no such line")
            if bot_id and (int(bot_id) not in self.bots or not self.bots[int(bot_id)]["openline"]):
                raise RestError(400, "BOT_ID", "not an Open Lines bot")
            line.update(bot=int(bot_id) if bot_id else None, bot_time=int(time), bot_left=left, bot_join=join)
            return {"line_id": line["id"], "bot": line["bot"]}

    # -- the bot's life in a chat --------------------------------------------------------------
    def _welcome_hook(self, kind: str, chat: dict, info: dict) -> None:
        if chat["type"] != "lines":
            return
        session = self.sessions.get(chat["session_id"])
        if kind == "session_start":
            line = self.lines.get(chat["line_id"]) or {}
            bot_id = line.get("bot")
            first = not any(s["chat_id"] == chat["id"] for s in self.sessions.values() if s is not session)
            if line.get("active") and bot_id in self.bots and session and (line["bot_join"] == "always" or first):
                session.update(operator=bot_id, bot=bot_id,
                               bot_until=self.clock() + line["bot_time"] if line["bot_time"] else None)
                chat["owner"] = bot_id
                self._add_member(chat, bot_id, role="manager")
        elif kind == "session_finish" and session:
            session.pop("bot", None)
            session.pop("bot_until", None)
        elif kind == "answer" and session and session.get("bot") and info["uid"] != session["bot"]:
            self._bot_lets_go(chat, session, to_queue=False)       # an operator answered
        elif kind == "message" and session and session.get("bot"):
            msg = info["msg"]
            author = self.users.get(msg["author_id"], {})
            if msg["author_id"] and author.get("kind") != "bot" and msg["text"].strip() == "0":
                # after the message's own events (the hooks that send them come first)
                self._bot_lets_go(chat, session, to_queue=True, note=BOT_HANDED_OVER)

    def _bot_lets_go(self, chat: dict, session: dict, *, to_queue: bool, note: str = "",
                     leave: bool | None = None) -> None:
        """The bot's session ends: the chat goes to the queue (*to_queue*) or stays with whoever answered;
        the bot leaves when the line says ``queue`` (or *leave* says so)."""
        bot_id = session.pop("bot")
        session.pop("bot_until", None)
        line = self.lines.get(chat["line_id"]) or {}
        if to_queue:
            session.update(status=SESSION_SKIP, operator=0)
            chat["offered_to"] = (line.get("queue") or [None])[0] if line.get("offer") == "one" else None
            chat["offered_at"] = self.clock()
        if chat["owner"] == bot_id:
            chat["owner"] = 0
        if note:
            self._post(chat, 0, note, system=True)
        if (line.get("bot_left", "queue") == "queue" if leave is None else leave):
            chat["members"].pop(bot_id, None)

    def _bot_time_out(self) -> None:
        now = self.clock()
        for session in list(self.sessions.values()):
            until = session.get("bot_until")
            if session.get("bot") and until is not None and until <= now and session["status"] < SESSION_CLOSED:
                chat = self.chats.get(session["chat_id"])
                if chat is not None and chat["session_id"] == session["id"]:
                    self._bot_lets_go(chat, session, to_queue=True)

    # -- imopenlines.bot.session.* ----------------------------------------------------------
    def _session_chat_of(self, p: dict) -> dict:
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), 0) or 0)
        if chat is None or chat["type"] != "lines":
            raise RestError(400, "WRONG_CHAT", "Operator is not a bot")
        return chat

    def _session_bot(self, chat: dict) -> dict:
        session = self.sessions.get(chat["session_id"])
        if not session or not session.get("bot"):
            raise RestError(400, "WRONG_CHAT", "Operator is not a bot")
        return session

    def _owning_bot(self, p: dict) -> int:
        """``CLIENT_ID`` -> the first bot of that owner (``"custom" + CLIENT_ID``)."""
        client = str(p.get("CLIENT_ID") or "")
        if not client:
            raise RestError(403, "ACCESS_DENIED", "Access denied! Client ID not specified")
        bot = next((b for b in sorted(self.bots.values(), key=lambda b: b["id"]) if b["client_id"] == client), None)
        if bot is None:
            raise RestError(400, "BOT_ID_ERROR", "Bot not found")
        return bot["id"]

    def m_bot_session_operator(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat_of(p)
        self._bot_lets_go(chat, self._session_bot(chat), to_queue=True, note=BOT_HANDED_OVER)
        return True

    def m_bot_session_transfer(self, ctx: dict, p: dict) -> Any:
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        target = p.get("TRANSFER_ID")
        if target in (None, ""):
            target = p.get("USER_ID") if p.get("USER_ID") not in (None, "") else (
                "queue%s" % p["QUEUE_ID"] if p.get("QUEUE_ID") not in (None, "") else None)
        if target in (None, ""):
            raise RestError(400, "TRANSFER_ID_EMPTY", "Transfer ID can't be empty")
        bot_id = self._owning_bot(p)
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), 0) or 0)
        session = self.sessions.get(chat["session_id"]) if chat else None
        if chat is None or not session or session.get("bot") != bot_id:
            raise RestError(400, "OPERATOR_WRONG", "You can not redirect to this operator")
        leave = _yes(p.get("LEAVE"))
        m = re.fullmatch(r"queue(\d+)", str(target))
        if m:
            line = self.lines.get(int(m.group(1)))
            if not line:
                raise RestError(400, "OPERATOR_WRONG", "You can not redirect to this operator")
            for uid in [u for u in chat["members"] if u not in (chat["customer_id"], bot_id)]:
                del chat["members"][uid]
            chat["line_id"] = session["line_id"] = line["id"]
            self._bot_lets_go(chat, session, to_queue=True, leave=leave or None)
            session["status"] = SESSION_NEW
            self._post(chat, 0, "Enquiry has been resubmitted to the queue.", system=True)
            return True
        uid = _int_param(target, 0) or 0
        user = self.users.get(uid)
        if not user or not user["active"] or user["kind"] != "employee":
            raise RestError(400, "OPERATOR_WRONG", "You can not redirect to this operator")
        self._post(chat, 0, "%s transfered conversation to %s" % (self._full_name(bot_id), self._full_name(uid)),
                   system=True)
        self.take_chat(chat["id"], uid)            # the target answers at once; the bot lets go there
        if leave:
            chat["members"].pop(bot_id, None)
        session["status"] = max(session["status"], SESSION_ANSWERED)
        return True

    def m_bot_session_finish(self, ctx: dict, p: dict) -> Any:
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        self._owning_bot(p)
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), 0) or 0)
        if chat is not None and chat["type"] == "lines" and chat["session_id"]:
            self.close_session(chat["id"])
        return True

    def m_bot_session_message_send(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat_of(p)
        text = str(p.get("MESSAGE") or "").strip()
        if str(p.get("NAME") or "DEFAULT").upper() == "DEFAULT" and text:
            self._post(chat, 0, text)          # an author-0 message the connector does forward
        return True
