"""When the bot stays out of a dialog: a person wrote there (a pause), or the bot handed it over."""
from __future__ import annotations

import logging
import threading
import time

import b24common as bc
from olbridge.store import Row

log = logging.getLogger("b24_ol_bridge")


class Pauses:
    """``pauses``: dialog -> (until, session, id of the last human message); ``handed``: dialog -> the
    session the bot handed over.  Both are saved in the dialogs table (pause changes go with the next
    commit, a hand-over at once) and survive restarts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pauses: dict = {}
        self.handed: dict = {}
        self.changes: dict = {}        # pauses not saved yet
        self.said: dict = {}           # dialog -> the reason last logged
        self.left: dict = {}           # dialog -> why its session left our chat bot (not saved: "handed" is)

    def load(self, pauses: dict, handed: dict) -> None:
        with self.lock:
            self.pauses, self.handed = pauses, handed

    def human_wrote(self, msg: bc.Message, minutes: float) -> None:
        """A person wrote (another operator, or someone typing as the webhook user): the bot pauses."""
        if not minutes:
            return
        until = time.time() + minutes * 60
        with self.lock:
            before = self.pauses.get(msg.dialog_id)
            self.pauses[msg.dialog_id] = (until, msg.session_id, max(msg.id, before[2] if before else 0))
            self.changes[msg.dialog_id] = self.pauses[msg.dialog_id]
        if not before or before[0] < time.time():
            log.info("%s #%d: %s wrote in the dialog; the bot pauses here until %s (or a new session)",
                     bc.display_dialog_id(msg.dialog_id), msg.id,
                     "someone as the webhook user" if msg.author_kind == "self" else "operator " + msg.author_name,
                     time.strftime("%H:%M", time.localtime(until)))

    def why(self, row: Row) -> str:
        """Why the bot stays out of this message's dialog now ("" if it does not)."""
        session = row.payload.get("session_id") or 0
        with self.lock:
            handed = self.handed.get(row.dialog)
            pause = self.pauses.get(row.dialog)
        if handed and handed == session:
            return self.left.get(row.dialog) or "the bot handed this conversation over to a person"
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

    def stays_out(self, row: Row) -> bool:
        """The bot stays out of *row*'s dialog (said once per dialog and reason)."""
        why = self.why(row)
        if not why:
            self.said.pop(row.dialog, None)
            return False
        if self.said.get(row.dialog) != why:
            log.info("%s: not forwarded: %s", row.where, why)
            self.said[row.dialog] = why
        return True

    def human_after(self, row: Row) -> bool:
        """Did a person write in the dialog after this customer message (its answer is stale)?"""
        with self.lock:
            pause = self.pauses.get(row.dialog)
        return bool(pause and pause[2] > row.message_id)

    def hand_over(self, row: Row) -> int:
        """The bot handed *row*'s session over; returns the session (to be saved)."""
        session = row.payload.get("session_id") or 0
        with self.lock:
            self.handed[row.dialog] = session
        return session

    def handed_over(self, row: Row) -> bool:
        """Was *row*'s session handed over (by the bot, or taken from our chat bot) -- its answer is late?"""
        session = row.payload.get("session_id") or 0
        with self.lock:
            return bool(session) and self.handed.get(row.dialog) == session

    def left_bot(self, dialog: str, session: int, why: str) -> bool:
        """The session *session* of *dialog* left our chat bot (time ran out, "0", an operator took it):
        the bot stays out of it.  True the first time (to be saved and said)."""
        with self.lock:
            if not session or self.handed.get(dialog) == session:
                return False
            self.handed[dialog] = session
            self.left[dialog] = "the conversation left the chat bot (%s)" % why
            return True

    def bot_joined(self, dialog: str, session: int) -> bool:
        """Our chat bot holds *session* of *dialog* (a new session): a hand-over of an older one is history.
        True when something was lifted (to be saved)."""
        with self.lock:
            if dialog in self.handed and self.handed[dialog] != session:
                del self.handed[dialog]
                self.left.pop(dialog, None)
                return True
        return False

    def take_changes(self) -> dict:
        with self.lock:
            changes, self.changes = self.changes, {}
        return changes

    def put_back(self, changes: dict) -> None:
        """A commit failed: these changes go with the next one (newer ones win)."""
        with self.lock:
            self.changes = dict(changes, **self.changes)
