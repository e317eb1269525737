"""Which conversations our chat bot holds: a join gives it a session; an event whose chat has another owner, a
customer's "0", or a post the portal refuses takes it away -- that session is then not answered, once said."""
from __future__ import annotations

import collections
import logging
import threading
from typing import Mapping

import b24common as bc
from olbridge.pauses import Pauses
from olbridge.shared import Shared
from olbridge.store import Row

log = logging.getLogger("b24_ol_bridge")

HAND_OVER_TEXT = "0"        # a person writing just this ends the bot's session (fact sheet §15.4)
HEARD_KEPT = 10000          # messages announced by the bot's events, remembered until they are asked about


def session_of(chat: Mapping) -> int:
    """The Open Lines session of an event's chat (field 6 of ``entityData1``), 0 if not known."""
    fields = str(chat.get("entityData1") or chat.get("entity_data_1") or "").split("|")
    return bc.as_int(fields[5]) if len(fields) > 5 else 0


class BotSessions:
    """Follows the sessions of the chats our fetch-mode chat bot is in (fed by the bot's event source)."""

    def __init__(self, shared: Shared, pauses: Pauses):
        self.shared = shared
        self.pauses = pauses
        self.lock = threading.Lock()
        self.heard: collections.OrderedDict = collections.OrderedDict()   # (dialog, id): announced to the bot

    def observe(self, event: Mapping) -> None:
        """One event of the bot's stream, as it is fetched (before the messages it points at are read)."""
        bot = self.shared.fetch_bot
        etype = str(event.get("type") or "").upper()
        data = bc.as_map(event.get("data"))
        chat = bc.as_map(data.get("chat"))
        dialog = str(chat.get("dialogId") or data.get("dialogId") or "")
        if bot is None or not dialog.startswith("chat"):
            return
        session = session_of(chat)
        if etype == "ONIMBOTV2JOINCHAT":
            self._joined(dialog, session)
            return
        if etype != "ONIMBOTV2MESSAGEADD":
            return
        msg, user = bc.as_map(data.get("message")), bc.as_map(data.get("user"))
        owner = bc.as_int(chat.get("owner"))
        if user.get("bot") or self._holds(dialog, session, str(msg.get("text") or ""), owner):
            with self.lock:
                self.heard[(dialog, bc.as_int(msg.get("id")))] = (session, owner)
                while len(self.heard) > HEARD_KEPT:
                    self.heard.popitem(last=False)

    def check(self, row: Row) -> bool:
        """May our bot answer *row* (a customer message in a chat it held)?  Its session is taken from the
        bot's event that announced it, else (a scan found it first, or the bot is out and heard nothing) from
        the chat itself, asked once -- the scan's idea of the session may be older.  Not when the customer
        asked for a person ("0"), or another owner has the chat: the session left the bot."""
        key = (row.dialog, row.message_id)
        with self.lock:
            heard = self.heard.pop(key, None)
        session, owner = heard if heard is not None else self._ask_chat(row.dialog)
        bot = self.shared.fetch_bot
        holds = heard is not None or (bot is not None and owner == bc.as_int(bot["bot_id"]))
        if (session and session != row.payload.get("session_id")) or (holds and row.payload.get("waiting")):
            row.payload["session_id"] = session or row.payload.get("session_id")
            row.payload["waiting"] = row.payload.get("waiting") and not holds    # the bot has it, no queue
            self.shared.store.update(row, payload=row.payload)
        session = row.payload.get("session_id") or 0
        if not self._holds(row.dialog, session, str(row.payload.get("text") or ""), owner):
            return False
        self._joined(row.dialog, session)
        return True

    def _holds(self, dialog: str, session: int, text: str, owner: int) -> bool:
        """Does the bot still hold this session, after a message *text* in a chat owned by *owner*?  Not when
        the customer asked for a person ("0"), or another owner has the chat: then it left (said once)."""
        bot = self.shared.fetch_bot
        if text.strip() == HAND_OVER_TEXT:
            self.left(dialog, session, "the customer typed %s: it goes to the operators" % HAND_OVER_TEXT)
        elif bot is not None and owner and owner != bc.as_int(bot["bot_id"]):
            self.left(dialog, session, "operator %d has it now" % owner)
        else:
            return True
        return False

    def _ask_chat(self, dialog: str) -> tuple:
        """``(session, owner)`` of a chat as the portal has it now (``(0, 0)`` if it cannot be read)."""
        try:
            chat = bc.as_map(self.shared.client.call("im.dialog.get", {"DIALOG_ID": dialog}))
        except bc.B24Error as exc:
            log.debug("%s: could not ask who holds the chat (%s)", bc.display_dialog_id(dialog), exc)
            return 0, 0                # the post will tell
        return session_of(chat), bc.as_int(chat.get("owner"))

    def _joined(self, dialog: str, session: int) -> None:
        """The bot holds *session*: a hand-over of an older session of the dialog is history (saved)."""
        if self.pauses.bot_joined(dialog, session):
            self._save(dialog, 0)

    def left(self, dialog: str, session: int, why: str) -> None:
        """The session left the bot: say it once, keep it (the bot stays out of it until a new session)."""
        if self.pauses.left_bot(dialog, session, why):
            log.info("%s: %s; the bridge stops answering in this session", bc.display_dialog_id(dialog), why)
            self._save(dialog, session)

    def _save(self, dialog: str, session: int) -> None:
        store = self.shared.store
        if store is not None:
            try:
                store.set_handed_off(dialog, session)
            except Exception as exc:  # noqa: BLE001 - kept in memory; said, and retried with the next change
                log.warning("%s: could not save that the session left the bot (%s)", bc.display_dialog_id(dialog),
                            exc)
