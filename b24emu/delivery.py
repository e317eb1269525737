"""What happens to an operator's or bot's message after it is stored: the hand-off to the connector, its
delivery marks and failure notices, and the WhatsApp 24-hour reply window (fact sheet §13, §19).

* A message by anyone but the customer in a LINES chat, not ``SYSTEM``/``SKIP_CONNECTOR``, is handed to
  the line's connector (never for ``livechat``): ``SENDING:"Y"`` and ``SENDING_TS`` at once; a moment
  later (``delivery_delay``) the connector answers:
  - delivered: ``SENDING``/``SENDING_TS`` removed, ``CONNECTOR_MID`` added (§13.1);
  - failed (:meth:`delivery` ``mode="fail"``): ``IS_DELIVERED:"N"``, ``SENDING`` removed, and a system
    message "Message could not be delivered" with the provider's text between dashed lines (§13.2);
  - stuck (``mode="stuck"``): ``SENDING`` stays; after ``delivery_timeout`` (300 s) the chat gets
    "Your message was not delivered. Customer is still waiting for reply." once (§13.2, 300 s rule).
* Window connectors (``whatsappbyedna``, ``whatsappbytwilio``): every inbound customer message sets the
  block to now + 24 h (``DEFAULT``); entity_data_1 fields 9 and 10 show it (§13.4).  A message sent while
  the block date has passed is refused before the hand-off: ``SENDING:"Y"`` stays for good and the chat
  gets "Error sending message" (§13.1).  :meth:`window` closes it (expired) or records an opt-out (``USER``).
* :meth:`delete_message` / :meth:`edit_message`: the customer's soft delete and edit (§19).
"""
from __future__ import annotations

import secrets
import time

from .world import RestError

WINDOW_SEC = {"whatsappbyedna": 86400, "whatsappbytwilio": 86400}    # §13.4 (wazzup's wapi channel too)
NO_REPORTS = ("livechat",)                                            # no delivery status at all (§13)
NOT_DELIVERED = "Message could not be delivered"
NOT_SENT = "Error sending message"
NOT_CONFIRMED = "Your message was not delivered. Customer is still waiting for reply."
DELETED_TEXT = "This message has been deleted."


class Delivery:
    METHODS: dict = {}

    def attach(self) -> None:
        self.delivery_delay = 0.3         # seconds until the connector answers
        self.delivery_timeout = 300.0     # the 300 s rule
        self.delivery_modes: dict = {}    # chat id -> {"mode": "deliver|fail|stuck", "reason": text}
        self._handoffs: list = []         # [monotonic due, message id, chat id]
        self._unconfirmed: dict = {}      # message id -> (monotonic since, chat id): stuck in SENDING
        self.hooks.append(self._delivery_hook)
        self.ticks.append(self._apply_deliveries)
        for chat in self.chats.values():      # the standing world's windows, from its customers' last words
            connector = (self.lines.get(chat["line_id"]) or {}).get("connector")
            if chat["type"] == "lines" and connector in WINDOW_SEC:
                last = [self.messages[m]["date"] for m in chat["message_ids"]
                        if self.messages[m]["author_id"] == chat["customer_id"]]
                if last:
                    chat["block_date"], chat["block_reason"] = int(max(last)) + WINDOW_SEC[connector], "DEFAULT"

    # -- the hook ------------------------------------------------------------------------
    def _delivery_hook(self, kind: str, chat: dict, info: dict) -> None:
        if kind != "message" or chat["type"] != "lines":
            return
        msg = info["msg"]
        line = self.lines.get(chat["line_id"]) or {}
        connector = line.get("connector", "")
        if msg["author_id"] == chat["customer_id"]:
            if connector in WINDOW_SEC:                      # the customer wrote: the window opens again
                chat["block_date"], chat["block_reason"] = int(self.clock()) + WINDOW_SEC[connector], "DEFAULT"
            return
        params = msg["params"] if isinstance(msg["params"], dict) else {}
        if not msg["author_id"] or msg.get("system") or msg.get("skip_connector") or connector in NO_REPORTS:
            return
        msg["params"] = dict(params, SENDING="Y", SENDING_TS=int(self.clock()))
        block = chat.get("block_date") or 0
        if block and block < self.clock():                   # refused before the hand-off: stuck for good
            self._post(chat, 0, NOT_SENT, system=True)
            return
        self._handoffs.append([time.monotonic() + self.delivery_delay, msg["id"], chat["id"]])

    def _apply_deliveries(self) -> None:
        now = time.monotonic()
        due = [h for h in self._handoffs if h[0] <= now]
        if due:
            self._handoffs = [h for h in self._handoffs if h[0] > now]
        for handed_at, mid, chat_id in due:
            msg, chat = self.messages.get(mid), self.chats.get(chat_id)
            if not msg or not chat:
                continue
            rule = self.delivery_modes.get(chat_id, {})
            mode = rule.get("mode", "deliver")
            params = {k: v for k, v in (msg["params"] or {}).items() if k not in ("SENDING", "SENDING_TS")}
            if mode == "deliver":
                msg["params"] = dict(params, CONNECTOR_MID=["wamid.%s" % secrets.token_hex(6)])
            elif mode == "fail":
                msg["params"] = dict(params, IS_DELIVERED="N")
                reason = rule.get("reason") or ""
                text = NOT_DELIVERED + ("[BR][BR]------------------------------------------------------[BR]%s"
                                        "[BR]------------------------------------------------------" % reason
                                        if reason else "")
                self._post(chat, 0, text, system=True)
            else:                                              # stuck: nobody confirms
                self._unconfirmed[mid] = (handed_at, chat_id)     # (applied lazily: count from then)
        told = set()
        for mid, (since, chat_id) in list(self._unconfirmed.items()):
            if now - since >= self.delivery_timeout:
                del self._unconfirmed[mid]
                if chat_id not in told and chat_id in self.chats:     # once per chat
                    told.add(chat_id)
                    self._post(self.chats[chat_id], 0, NOT_CONFIRMED, system=True)

    # -- control ---------------------------------------------------------------------------
    def delivery(self, chat_id: int, mode: str = "deliver", reason: str = "", delay: float | None = None,
                 timeout: float | None = None) -> dict:
        """How the connector treats the chat's next messages: ``deliver``, ``fail`` (with the provider's
        *reason*) or ``stuck``; *delay* / *timeout* tune the answer time and the 300 s rule (all chats)."""
        if mode not in ("deliver", "fail", "stuck"):
            raise RestError(400, "BAD_MODE", "mode must be deliver, fail or stuck")
        with self.lock:
            self._chat(chat_id)
            self.delivery_modes[int(chat_id)] = {"mode": mode, "reason": reason}
            if delay is not None:
                self.delivery_delay = float(delay)
            if timeout is not None:
                self.delivery_timeout = float(timeout)
            return {"chat_id": int(chat_id), "mode": mode}

    def window(self, chat_id: int, close: bool = True, reason: str = "expired") -> dict:
        """Close the chat's reply window (``expired``: 24 h passed; ``opted_out``: the customer blocked the
        business), or open it again (``close=False``)."""
        with self.lock:
            chat = self._chat(chat_id)
            if not close:
                chat["block_date"], chat["block_reason"] = 0, ""
            else:
                chat["block_date"] = int(self.clock()) - (3600 if reason == "expired" else 1)
                chat["block_reason"] = "USER" if reason == "opted_out" else "DEFAULT"
            return {"chat_id": chat["id"], "block_date": chat["block_date"], "block_reason": chat["block_reason"]}

    def delete_message(self, message_id: int) -> dict:
        """The customer deleted a message: same id, the placeholder text, params ``{IS_DELETED: "Y"}``."""
        with self.lock:
            msg = self.messages.get(int(message_id))
            if not msg:
                raise RestError(400, "MESSAGE_ID", "Message not found")
            msg["text"], msg["params"] = DELETED_TEXT, {"IS_DELETED": "Y"}
            self._notify("update", self.chats[msg["chat_id"]], msg=msg)
            return {"message_id": msg["id"]}

    def edit_message(self, message_id: int, text: str) -> dict:
        """The customer edited a message: same id, new text, ``IS_EDITED: "Y"``."""
        with self.lock:
            msg = self.messages.get(int(message_id))
            if not msg:
                raise RestError(400, "MESSAGE_ID", "Message not found")
            msg["text"] = str(text)
            msg["params"] = dict(msg["params"] or {}, IS_EDITED="Y")
            self._notify("update", self.chats[msg["chat_id"]], msg=msg)
            return {"message_id": msg["id"]}
