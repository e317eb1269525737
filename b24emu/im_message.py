"""``im.message.add`` (fact sheet §9)."""
from __future__ import annotations

import re
import time
from typing import Any

from .world import RestError, _yes

_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class ImMessage:
    """``im.message.add`` (fact sheet §9)."""

    METHODS = {
        "im.message.add": ("m_im_message_add", "im", True),
    }

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
        template, known = self._template_of(p.get("TEMPLATE_ID"))
        if known:
            return known
        if len(text) > 20000:
            text = text[:20000] + " (...)"
        author = 0 if _yes(p.get("SYSTEM")) else uid
        # the connector hand-off and its marks: b24emu/delivery.py (fact sheet §13)
        msg = self._post(chat, author, text, uuid=template, skip_connector=_yes(p.get("SKIP_CONNECTOR")))
        if template:
            self.uuids[template] = {"mid": msg["id"], "at": self.clock()}
        if author:
            self._touch_session(chat, author)
        return msg["id"]

    def _template_of(self, value: Any, busy: RestError | None = None) -> tuple:
        """``(the uuid, or None when *value* is none, the id of the message it already names, or None)``."""
        if not is_uuid(value):
            return None, None
        return value, self._uuid_claim(value, busy or RestError(400, "MESSAGE_DUPLICATED_BY_UUID",
                                                                "Message with this uuid already exists"))

    def _uuid_claim(self, template: str, busy: RestError) -> int | None:
        """The uuid record is written before the message (fact sheet §9): the id of the message a repeat
        names, or None once this attempt holds the record; a repeat while the first attempt runs, or after
        it died, is refused with *busy* until the record expires."""
        record = self.uuids.get(template)
        if record and record["mid"]:
            return record["mid"]
        if record and self.clock() - record["at"] < self.uuid_ttl:
            raise busy
        self.uuids[template] = {"mid": None, "at": self.clock()}
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
        return None


def is_uuid(value: Any) -> bool:
    return isinstance(value, str) and bool(_UUID4.fullmatch(value))
