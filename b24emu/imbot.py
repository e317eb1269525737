"""``imbot.*``: chat bots registered through the webhook (fact sheet §12; REST docs).

A webhook may register a bot when it passes ``CLIENT_ID`` (else 403
``ACCESS_DENIED``); its handler URLs get ``?CLIENT_ID=...`` appended, and
every later ``imbot.*`` call must bring the same ``CLIENT_ID``.  An Open
Lines bot (``TYPE=O`` or ``OPENLINE=Y``) chosen for a line (here: the control
action :meth:`Imbot.line_bot`, in the portal the line's settings) joins every
new session of that line (``ONIMBOTJOINCHAT``) and gets ``ONIMBOTMESSAGEADD``
for each customer message while it is in the chat; it answers with
``imbot.message.add``.  A closed session removes it with everybody else.
"""
from __future__ import annotations

import secrets
import urllib.parse
from typing import Any

from .world import RestError, _int_param, _yes

BOT_EVENTS = ("EVENT_MESSAGE_ADD", "EVENT_WELCOME_MESSAGE", "EVENT_BOT_DELETE")
MAX_BOTS_PER_APP = 5


def _url_ok(url: Any) -> bool:
    parts = urllib.parse.urlsplit(str(url or ""))
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class Imbot:
    """``imbot.register`` / ``imbot.unregister`` / ``imbot.message.add`` / ``imbot.bot.list``."""

    METHODS = {
        "imbot.register": ("m_imbot_register", "imbot", True),
        "imbot.unregister": ("m_imbot_unregister", "imbot", True),
        "imbot.message.add": ("m_imbot_message_add", "imbot", True),
        "imbot.bot.list": ("m_imbot_bot_list", "imbot", True),
    }

    def attach(self) -> None:
        self.bots: dict = {}              # bot user id -> registration
        self.apps: dict = {}              # CLIENT_ID -> {"token": application token}
        self.hooks.append(self._bot_hook)

    def _client(self, p: dict) -> str:
        client = str(p.get("CLIENT_ID") or "")
        if not client:
            raise RestError(403, "ACCESS_DENIED", "Access denied! Client ID not specified")
        return client

    def _bot(self, p: dict, client: str) -> dict:
        bot = self.bots.get(_int_param(p.get("BOT_ID"), 0) or 0)
        if bot is None and not p.get("BOT_ID"):
            bot = next((b for b in self.bots.values() if b["client_id"] == client), None)
        if bot is None:
            raise RestError(400, "BOT_ID_ERROR", "Bot not found")
        if bot["client_id"] != client:
            raise RestError(400, "APP_ID_ERROR", "Bot was installed by another rest application")
        return bot

    def m_imbot_register(self, ctx: dict, p: dict) -> Any:
        client = self._client(p)
        code = str(p.get("CODE") or "")
        if not code:
            raise RestError(400, "CODE_ERROR", "Bot code isn't specified")
        handlers = {}
        general = p.get("EVENT_HANDLER")
        for name in BOT_EVENTS:
            url = p.get(name) or general
            if not url:
                raise RestError(400, name + "_ERROR", "Handler for event isn't specified")
            if not _url_ok(url):
                raise RestError(400, name + "_ERROR", "Wrong handler URL")
            handlers[name] = "%s%sCLIENT_ID=%s" % (url, "&" if "?" in str(url) else "?", urllib.parse.quote(client))
        props = p.get("PROPERTIES") if isinstance(p.get("PROPERTIES"), dict) else {}
        name = str(props.get("NAME") or "")
        if not name and not props.get("LAST_NAME"):
            raise RestError(400, "NAME_ERROR", "Bot name isn't specified")
        for bot in self.bots.values():
            if bot["code"] == code:      # the same code again: that bot (its handlers follow the call)
                if bot["client_id"] != client:
                    raise RestError(400, "WRONG_REQUEST", "Bot can't be created")
                bot["handlers"] = handlers
                return bot["id"]
        if sum(1 for b in self.bots.values() if b["client_id"] == client) >= MAX_BOTS_PER_APP:
            raise RestError(400, "MAX_COUNT_ERROR", "Has reached the maximum number of bots for application "
                                                    "(max: %d)" % MAX_BOTS_PER_APP)
        app = self.apps.setdefault(client, {"token": secrets.token_hex(16)})
        uid = self.add_user(name or str(props.get("LAST_NAME")), str(props.get("LAST_NAME") or ""), kind="bot",
                            position=str(props.get("WORK_POSITION") or ""))
        openline = str(p.get("TYPE") or "B").upper() == "O" or _yes(p.get("OPENLINE"))
        self.bots[uid] = {"id": uid, "code": code, "client_id": client, "handlers": handlers,
                          "openline": openline, "token": app["token"], "owner": ctx["user"]}
        return uid

    def m_imbot_unregister(self, ctx: dict, p: dict) -> Any:
        client = self._client(p)
        bot = self._bot(p, client)
        del self.bots[bot["id"]]
        for line in self.lines.values():
            if line.get("bot") == bot["id"]:
                line["bot"] = None
        self._bot_post(bot, "ONIMBOTDELETE", {"BOT_ID": bot["id"], "BOT_CODE": bot["code"]})
        self.users[bot["id"]]["active"] = False
        return True

    def m_imbot_bot_list(self, ctx: dict, p: dict) -> Any:
        return {str(b["id"]): {"ID": b["id"], "NAME": self._full_name(b["id"]), "CODE": b["code"],
                               "OPENLINE": "Y" if b["openline"] else "N"} for b in self.bots.values()}

    def m_imbot_message_add(self, ctx: dict, p: dict) -> Any:
        client = self._client(p)
        bot = self._bot(p, client)
        dialog = str(p.get("DIALOG_ID") or "")
        if not dialog:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        text = str(p.get("MESSAGE") or "").strip()
        if not text:
            raise RestError(400, "MESSAGE_EMPTY", "Message can't be empty")
        chat = self.chats.get(_int_param(dialog[4:], 0) or 0) if dialog.startswith("chat") else None
        if chat is None or bot["id"] not in chat["members"]:
            raise RestError(400, "WRONG_REQUEST", "Message isn't added")
        msg = self._post(chat, bot["id"], text)
        self._touch_session(chat, bot["id"])
        return msg["id"]

    # -- a bot in a line --------------------------------------------------------------
    def line_bot(self, line_id: int, bot_id: int | None) -> dict:
        """Choose (or, with None, remove) the Open Lines bot of a line, as in the line's settings."""
        with self.lock:
            line = self.lines.get(int(line_id))
            if not line:
                raise RestError(400, "LINE_ID", "no such line")
            if bot_id and (int(bot_id) not in self.bots or not self.bots[int(bot_id)]["openline"]):
                raise RestError(400, "BOT_ID", "not an Open Lines bot")
            line["bot"] = int(bot_id) if bot_id else None
            return {"line_id": line["id"], "bot": line["bot"]}

    def _bot_hook(self, kind: str, chat: dict, info: dict) -> None:
        if chat["type"] != "lines" or not self.bots:
            return
        if kind == "session_start":
            bot_id = (self.lines.get(chat["line_id"]) or {}).get("bot")
            if bot_id in self.bots and bot_id not in chat["members"]:
                self._add_member(chat, bot_id)
                self._bot_post(self.bots[bot_id], "ONIMBOTJOINCHAT", self._bot_params(chat, bot_id))
        elif kind == "message" and info["msg"]["author_id"] == chat["customer_id"]:
            msg = info["msg"]
            for bot_id in [b for b in chat["members"] if b in self.bots]:
                params = dict(self._bot_params(chat, bot_id), MESSAGE=msg["text"], MESSAGE_ID=msg["id"],
                              FROM_USER_ID=msg["author_id"], AUTHOR_ID=msg["author_id"], MESSAGE_TYPE="L",
                              SYSTEM="N", TEMPLATE_ID=msg["uuid"] or "")
                user = self.users.get(msg["author_id"], {})
                self._bot_post(self.bots[bot_id], "ONIMBOTMESSAGEADD", params, user={
                    "ID": msg["author_id"], "NAME": self._full_name(msg["author_id"]),
                    "FIRST_NAME": user.get("first_name", ""), "LAST_NAME": user.get("last_name", ""),
                    "IS_BOT": "N", "IS_CONNECTOR": "Y", "IS_NETWORK": "N", "IS_EXTRANET": "Y"})

    def _bot_params(self, chat: dict, bot_id: int) -> dict:
        return {"DIALOG_ID": "chat%d" % chat["id"], "TO_CHAT_ID": chat["id"], "CHAT_ID": chat["id"],
                "CHAT_TYPE": "L", "CHAT_TITLE": chat["title"], "CHAT_ENTITY_TYPE": "LINES",
                "CHAT_ENTITY_ID": chat["entity_id"], "CHAT_ENTITY_DATA_1": self._entity_data_1(chat),
                "TO_USER_ID": bot_id, "LANGUAGE": "en"}

    def _bot_post(self, bot: dict, event: str, params: dict, user: dict | None = None) -> None:
        url = bot["handlers"]["EVENT_BOT_DELETE" if event == "ONIMBOTDELETE" else
                              "EVENT_WELCOME_MESSAGE" if event == "ONIMBOTJOINCHAT" else "EVENT_MESSAGE_ADD"]
        auth = self._auth_block(bot["token"])
        bot_auth = dict(auth, client_id=bot["client_id"], user_id=bot["id"], BOT_ID=bot["id"], BOT_CODE=bot["code"])
        data = {"BOT": {str(bot["id"]): bot_auth}, "PARAMS": params, "USER": user or {}}
        self._deliver(url, event, 0, data, auth)
