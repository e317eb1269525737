"""``imbot.v2.*``: Chatbots 2.0 -- bots owned by a ``botToken``, events kept in a queue to fetch (fact sheet §14).

Every call names its owner with ``botToken`` (or the deprecated ``CLIENT_ID``):
a v1 bot registered with ``CLIENT_ID=X`` is owned by ``botToken=X``, so the
two APIs share one registry (``self.bots``).  A bot in ``fetch`` mode gets no
POSTs: its events wait in its queue for ``imbot.v2.Event.get`` (same offsets
as ``im.v2.Event.get``; ``withUserEvents`` merges the webhook user's own
queue).  Registering a code again returns that bot unchanged for its owner;
another owner gets ``BOT_CODE_ALREADY_TAKEN``.
"""
from __future__ import annotations

from typing import Any

from .world import RestError, _int_param

BOT_TYPES = ("bot", "openline", "supervisor", "personal", "network")
BOT_TOKEN_MAX = 40
BOTS_PER_OWNER = 100


def _flag(value: Any, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().upper() in ("Y", "TRUE", "1")


class ImbotV2:
    """``imbot.v2.Bot.*``, ``imbot.v2.Event.get``, ``imbot.v2.Chat.Message.send``, ``...InputAction.notify``."""

    METHODS = {
        "imbot.v2.bot.register": ("m_v2_bot_register", "imbot", False),
        "imbot.v2.bot.update": ("m_v2_bot_update", "imbot", False),
        "imbot.v2.bot.unregister": ("m_v2_bot_unregister", "imbot", False),
        "imbot.v2.bot.list": ("m_v2_bot_list", "imbot", False),
        "imbot.v2.bot.get": ("m_v2_bot_get", "imbot", False),
        "imbot.v2.event.get": ("m_v2_event_get", "imbot", False),
        "imbot.v2.chat.message.send": ("m_v2_message_send", "imbot", False),
        "imbot.v2.chat.inputaction.notify": ("m_v2_input_action", "imbot", False),
    }

    def attach(self) -> None:
        self.typing: list = []            # (bot id, chat id, duration, time) of each "typing..." shown

    def typing_shown(self) -> list:
        """The "typing..." indications bots sent: ``[{"bot_id", "chat_id", "duration", "at"}]``."""
        with self.lock:
            return [{"bot_id": b, "chat_id": c, "duration": d, "at": t} for b, c, d, t in self.typing]

    # -- who is asking ----------------------------------------------------------------
    @staticmethod
    def _token(p: dict) -> str:
        token = p.get("botToken") or p.get("BOT_TOKEN") or p.get("CLIENT_ID") or p.get("clientId")
        if not token and isinstance(p.get("fields"), dict):
            token = p["fields"].get("botToken")
        if not token:
            raise RestError(400, "BOT_TOKEN_NOT_SPECIFIED", "Bot token is not specified")
        return str(token)

    def _owned(self, p: dict) -> dict:
        token = self._token(p)
        bot_id = _int_param(p.get("botId"), 0)
        if not bot_id:
            raise RestError(400, "BOT_ID_REQUIRED", "Bot ID is required")
        bot = self.bots.get(bot_id)
        if bot is None:
            raise RestError(400, "BOT_NOT_FOUND", "Bot not found")
        if bot["client_id"] != token:
            raise RestError(400, "BOT_OWNERSHIP_ERROR", "The bot belongs to another application")
        return bot

    def _bot_out(self, bot: dict) -> dict:
        return {"id": bot["id"], "code": bot["code"], "type": bot["type"], "isHidden": False,
                "isSupportOpenline": bot["openline"], "isReactionsEnabled": True, "backgroundId": None,
                "language": "en", "moduleId": "rest", "eventMode": bot["event_mode"], "countMessage": 0,
                "countCommand": 0, "countChat": 0, "countUser": 0}

    def _bot_answer(self, bot: dict) -> dict:
        return {"bot": self._bot_out(bot), "users": [self._v2_user(bot["id"])]}

    # -- managing bots ------------------------------------------------------------------------
    def m_v2_bot_register(self, ctx: dict, p: dict) -> Any:
        token = self._token(p)
        if len(token) > BOT_TOKEN_MAX:
            raise RestError(400, "BOT_TOKEN_INVALID_LENGTH", "Bot token must be at most %d characters" % BOT_TOKEN_MAX)
        fields = p.get("fields") if isinstance(p.get("fields"), dict) else {}
        code = str(fields.get("code") or "")
        if not code:
            raise RestError(400, "BOT_CODE_REQUIRED", "Bot code is required")
        props = fields.get("properties") if isinstance(fields.get("properties"), dict) else {}
        if not props.get("name"):
            raise RestError(400, "BOT_PROPERTIES_REQUIRED", "Bot properties are required")
        btype = str(fields.get("type") or "bot")
        if btype not in BOT_TYPES:
            raise RestError(400, "BOT_INVALID_TYPE", "Invalid bot type")
        mode = str(fields.get("eventMode") or "fetch").lower()
        if mode not in ("fetch", "webhook"):
            raise RestError(400, "BOT_INVALID_EVENT_MODE", "Invalid event mode")
        if mode == "webhook" and not fields.get("webhookUrl"):
            raise RestError(400, "BOT_WEBHOOK_URL_REQUIRED", "Webhook URL is required")
        for bot in self.bots.values():
            if bot["code"] == code:           # idempotent for its owner: returned unchanged
                if bot["client_id"] != token:
                    raise RestError(400, "BOT_CODE_ALREADY_TAKEN", "Bot code is already taken")
                return self._bot_answer(bot)
        if sum(1 for b in self.bots.values() if b["client_id"] == token) >= BOTS_PER_OWNER:
            raise RestError(400, "BOT_LIMIT_EXCEEDED", "Bot limit exceeded")
        uid = self.add_user(str(props["name"]), str(props.get("lastName") or ""), kind="bot",
                            position=str(props.get("workPosition") or ""))
        openline = btype == "openline" or _flag(fields.get("isSupportOpenline"))
        self.bots[uid] = {"id": uid, "code": code, "client_id": token, "handlers": {}, "handler_client": token,
                          "openline": openline, "owner": ctx["user"], "event_mode": mode, "type": btype,
                          "events": []}
        return self._bot_answer(self.bots[uid])

    def m_v2_bot_update(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        fields = p.get("fields") if isinstance(p.get("fields"), dict) else {}
        if "eventMode" in fields:
            mode = str(fields["eventMode"] or "").lower()
            if mode not in ("fetch", "webhook"):
                raise RestError(400, "BOT_INVALID_EVENT_MODE", "Invalid event mode")
            if mode == "webhook" and not fields.get("webhookUrl"):
                raise RestError(400, "BOT_WEBHOOK_URL_REQUIRED", "Webhook URL is required")
            if mode == "webhook":
                bot["events"] = []            # FETCH -> WEBHOOK drops what was pending
            bot["event_mode"] = mode
        if "isSupportOpenline" in fields:
            bot["openline"] = _flag(fields["isSupportOpenline"])
        props = fields.get("properties") if isinstance(fields.get("properties"), dict) else {}
        if props.get("name"):
            self.users[bot["id"]]["first_name"] = str(props["name"])
        return self._bot_answer(bot)

    def m_v2_bot_unregister(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        del self.bots[bot["id"]]
        for line in self.lines.values():
            if line.get("bot") == bot["id"]:
                line["bot"] = None
        for chat in self.chats.values():
            chat["members"].pop(bot["id"], None)
        self.users[bot["id"]]["active"] = False
        return True

    def m_v2_bot_list(self, ctx: dict, p: dict) -> Any:
        token = self._token(p)
        limit = max(1, _int_param(p.get("limit"), 50) or 50)
        offset = max(0, _int_param(p.get("offset"), 0) or 0)
        mine = [b for b in sorted(self.bots.values(), key=lambda b: b["id"]) if b["client_id"] == token]
        page = mine[offset:offset + limit]
        return {"bots": [self._bot_out(b) for b in page], "users": [self._v2_user(b["id"]) for b in page],
                "hasNextPage": len(page) == limit}

    def m_v2_bot_get(self, ctx: dict, p: dict) -> Any:
        self._token(p)
        if not p.get("botId") and not p.get("code"):
            raise RestError(400, "PARAMS_REQUIRED", "botId or code is required")
        bot = self.bots.get(_int_param(p.get("botId"), 0) or 0) if p.get("botId") else next(
            (b for b in self.bots.values() if b["code"] == str(p.get("code"))), None)
        if bot is None:
            raise RestError(400, "BOT_NOT_FOUND", "Bot not found")
        return self._bot_answer(bot)

    # -- events --------------------------------------------------------------------------------
    def _bot_v2_event(self, bot: dict, etype: str, chat: dict, *, msg: dict | None = None, user: int = 0) -> None:
        """Keep an event in a fetch-mode bot's queue (fact sheet §14.3, §14.4)."""
        if self.drop_events > 0:
            self.drop_events -= 1
            return
        data: dict = {"bot": self._bot_out(bot), "chat": self._v2_chat(chat), "language": "en"}
        if msg is not None:
            data.update(message=self._v2_message(msg), user=self._v2_user(msg["author_id"]))
        else:
            data.update(dialogId="chat%d" % chat["id"], user=self._v2_user(user))
        bot["events"].append(self._new_event(etype, data))

    def m_v2_event_get(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        queues = [bot["events"]]
        if _flag(p.get("withUserEvents")):
            if "im" not in ctx["scopes"]:
                raise RestError(400, "SCOPE_ERROR", "withUserEvents needs the im scope")
            mine = self.event_queues.get(ctx["user"])
            if mine is None:
                raise RestError(400, "USER_NOT_SUBSCRIBED", "The user is not subscribed to events")
            queues.append(mine["events"])
        return self._read_events(queues, p)

    # -- in the chat ---------------------------------------------------------------------------
    def _v2_dialog(self, p: dict) -> dict:
        dialog = str(p.get("dialogId") or "")
        chat = self.chats.get(_int_param(dialog[4:], 0) or 0) if dialog.startswith("chat") else None
        if chat is None:
            raise RestError(400, "CHAT_NOT_FOUND", "Chat not found")
        return chat

    def m_v2_message_send(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        chat = self._v2_dialog(p)
        if bot["id"] not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "The bot has no access to this chat")
        fields = p.get("fields") if isinstance(p.get("fields"), dict) else {}
        text = str(fields.get("message") or "").strip()
        if not text and not fields.get("attach"):
            raise RestError(400, "EMPTY_MESSAGE", "Message is empty")
        template, known = self._template_of(fields.get("templateId"),
                                            RestError(400, "SENDING_FAILED", "Message was not sent"))
        if known:
            return {"id": known, "uuidMap": []}
        system = _flag(fields.get("system"))
        msg = self._post(chat, 0 if system else bot["id"], text[:20000], uuid=template,
                         skip_connector=_flag(fields.get("skipConnector")))
        if template:
            self.uuids[template] = {"mid": msg["id"], "at": self.clock()}
        return {"id": msg["id"], "uuidMap": []}

    def m_v2_input_action(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        chat = self._v2_dialog(p)
        if not self._can_read(chat, bot["id"]):
            raise RestError(400, "ACCESS_DENIED", "The bot has no access to this chat")
        duration = _int_param(p.get("duration"), 0) or 0
        if duration and not 1 <= duration <= 600:
            raise RestError(400, "INVALID_DURATION", "duration must be 1-600 seconds")
        self.typing.append((bot["id"], chat["id"], duration, self.clock()))
        return True
