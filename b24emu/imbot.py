"""``imbot.*``: chat bots registered through the webhook (fact sheet §12; REST docs).

A webhook may register a bot when it passes ``CLIENT_ID`` (else 403
``ACCESS_DENIED``); its handler URLs get ``?CLIENT_ID=...`` appended, and
every later ``imbot.*`` call must bring the same ``CLIENT_ID``.  Registering
a taken ``CODE`` again returns the old bot, whatever the ``CLIENT_ID``.  The
bots of a chat hear its join and every message by a person (customer,
operator, the webhook user): as POSTs carrying ``auth[application_token]`` =
the CLIENT_ID, or -- for a bot in fetch mode (``imbot_v2.py``) -- in its event
queue.  When a line's bot joins and leaves: ``welcome_bot.py``.
"""
from __future__ import annotations

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
        self.hooks.append(self._bot_hook)     # before the welcome bot's: a "0" is sent, then acted on

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
            if bot["code"] == code:
                # the same code again: the old bot id, even for another CLIENT_ID -- whose handlers are
                # bound but never called, and whose imbot.* calls fail (fact sheet §12)
                bot["handlers"], bot["handler_client"] = handlers, client
                return bot["id"]
        if sum(1 for b in self.bots.values() if b["client_id"] == client) >= MAX_BOTS_PER_APP:
            raise RestError(400, "MAX_COUNT_ERROR", "Has reached the maximum number of bots for application "
                                                    "(max: %d)" % MAX_BOTS_PER_APP)
        uid = self.add_user(name or str(props.get("LAST_NAME")), str(props.get("LAST_NAME") or ""), kind="bot",
                            position=str(props.get("WORK_POSITION") or ""))
        openline = str(p.get("TYPE") or "B").upper() == "O" or _yes(p.get("OPENLINE"))
        self.bots[uid] = {"id": uid, "code": code, "client_id": client, "handlers": handlers,
                          "handler_client": client, "openline": openline,
                          "owner": ctx["user"], "event_mode": "webhook", "type": "openline" if openline else "bot",
                          "events": []}
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
            raise RestError(400, "CANCELED", "Action was canceled")
        msg = self._post(chat, bot["id"], text)
        self._touch_session(chat, bot["id"])
        return msg["id"]

    # -- what the bots hear -------------------------------------------------------------
    def _bot_hook(self, kind: str, chat: dict, info: dict) -> None:
        """Events for the bots in a chat: a bot added (join), and every message whose author is neither a
        bot nor the system (fact sheet §12: customers, operators, the webhook user).  A fetch-mode bot gets
        them in its queue (``imbot_v2.py``), the others as POSTs."""
        if chat["type"] != "lines" or not self.bots:
            return
        if kind == "join" and info["uid"] in self.bots:
            bot = self.bots[info["uid"]]
            if bot["event_mode"] == "fetch":
                self._bot_v2_event(bot, "ONIMBOTV2JOINCHAT", chat, user=chat["customer_id"])
            else:
                self._bot_post(bot, "ONIMBOTJOINCHAT", self._bot_params(chat, bot["id"]))
        elif kind == "message":
            msg = info["msg"]
            author = self.users.get(msg["author_id"], {})
            if not msg["author_id"] or msg.get("system") or author.get("kind") == "bot":
                return
            for bot_id in [b for b in chat["members"] if b in self.bots]:
                bot = self.bots[bot_id]
                if bot["event_mode"] == "fetch":
                    self._bot_v2_event(bot, "ONIMBOTV2MESSAGEADD", chat, msg=msg)
                    continue
                params = dict(self._bot_params(chat, bot_id), MESSAGE=msg["text"], MESSAGE_ID=msg["id"],
                              FROM_USER_ID=msg["author_id"], AUTHOR_ID=msg["author_id"], MESSAGE_TYPE="L",
                              SYSTEM="N", TEMPLATE_ID=msg["uuid"] or "")
                connector = author.get("kind") == "connector"
                self._bot_post(bot, "ONIMBOTMESSAGEADD", params, user={
                    "ID": msg["author_id"], "NAME": self._full_name(msg["author_id"]),
                    "FIRST_NAME": author.get("first_name", ""), "LAST_NAME": author.get("last_name", ""),
                    "IS_BOT": "N", "IS_CONNECTOR": "Y" if connector else "N", "IS_NETWORK": "N",
                    "IS_EXTRANET": "Y" if connector else "N"})

    def _bot_params(self, chat: dict, bot_id: int) -> dict:
        return {"DIALOG_ID": "chat%d" % chat["id"], "TO_CHAT_ID": chat["id"], "CHAT_ID": chat["id"],
                "CHAT_TYPE": "L", "CHAT_TITLE": chat["title"], "CHAT_ENTITY_TYPE": "LINES",
                "CHAT_ENTITY_ID": chat["entity_id"], "CHAT_ENTITY_DATA_1": self._entity_data_1(chat),
                "TO_USER_ID": bot_id, "LANGUAGE": "en"}

    def _bot_post(self, bot: dict, event: str, params: dict, user: dict | None = None) -> None:
        if bot["event_mode"] == "fetch" or not bot["handlers"] or bot.get("handler_client") != bot["client_id"]:
            return      # a fetch bot gets no POSTs; handlers re-bound for another CLIENT_ID are never called
        url = bot["handlers"]["EVENT_BOT_DELETE" if event == "ONIMBOTDELETE" else
                              "EVENT_WELCOME_MESSAGE" if event == "ONIMBOTJOINCHAT" else "EVENT_MESSAGE_ADD"]
        auth = self._auth_block(bot["client_id"])       # application_token = the raw CLIENT_ID
        data = {"BOT": {str(bot["id"]): {"AUTH": [], "BOT_ID": bot["id"], "BOT_CODE": bot["code"]}},
                "PARAMS": params, "USER": user or {}}
        self._deliver(url, event, 0, data, auth)
