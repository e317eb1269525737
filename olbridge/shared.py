"""What the bridge's parts share: the portal, the state, the settings, the counters -- and the one way a
message that failed is tried again later or laid to rest."""
from __future__ import annotations

import collections
import hashlib
import logging
import random
import threading
import time
import uuid
from typing import Any, Callable

import b24common as bc
from olbridge import chatbot
from olbridge.files import AnswerFiles
from olbridge.health import Histogram, Liveness
from olbridge.settings import Settings
from olbridge.store import DeadLetters, Row, Store

log = logging.getLogger("b24_ol_bridge")

BACKOFF_CAP_SEC = 300.0     # a message's wait after failures doubles up to this (from BRIDGE_RETRY_FIRST_SEC)
UNUSABLE_TRIES = 3          # an unusable bot answer is asked again this often before a dead letter
MAX_PARTS = 10              # messages one answer may become
FALLBACK_INDEX = 1000       # TEMPLATE_ID index of the fallback text (replies use 0..MAX_PARTS-1)
OWN_KEPT = 2000             # posted message ids remembered to recognise their echoes


def _bridge_tag(portal: str) -> bytes:
    return hashlib.sha256(("b24-bridge|%s" % portal).encode()).digest()[:4]


def reply_template_id(portal: str, dialog_id: str, message_id: int, index: int) -> str:
    """The same UUID v4-shaped ``TEMPLATE_ID`` for the same reply, however often it is sent.

    A reply re-sent after a crash carries the id of the first attempt, so the
    portal recognises it instead of posting it twice.  Its first 8 hex digits
    are the bridge's tag for this portal: :func:`is_bridge_uuid` tells the
    bridge's own messages from anything a person typed as the same user.
    """
    digest = hashlib.sha256(("%s|%s|%d|%d" % (portal, dialog_id, message_id, index)).encode()).digest()
    return str(uuid.UUID(bytes=_bridge_tag(portal) + digest[:12], version=4))


def is_bridge_uuid(portal: str, value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_bridge_tag(portal).hex())


class Shared:
    """One per running bridge; every part holds it.  ``settings`` is replaced on reload."""

    def __init__(self, client: bc.Client, settings: Settings, live: Liveness, *, demo: bool = False):
        self.client = client
        self.settings = settings
        self.live = live
        self.demo = demo                          # a demo logs the conversation's texts
        self.store: Store = None                  # type: ignore[assignment]  -- opened after sign-in
        self.dead: DeadLetters = None             # type: ignore[assignment]
        self.chat_bot: dict | None = None         # the registered Open Lines chat bot (--register-bot)
        self.own: collections.OrderedDict = collections.OrderedDict()   # (dialog, id) of messages we posted
        self.tell_poller: Callable[[str, int, frozenset], None] = lambda dialog, message_id, after: None  # Poller.posted
        self.files: AnswerFiles = None            # type: ignore[assignment]  -- the answers' files, kept
        self.file_route = ""                      # how files go as the webhook user ("disk" / "upload")
        self.uploading: set = set()               # dialogs with a file post in flight (its id not known yet)
        self.stats: collections.Counter = collections.Counter()
        self.latency = Histogram()
        self.cannot_post: dict = {}               # dialog -> session id in which posting was refused
        self.checked: set = set()                 # (dialog, id) needing no look for replies already posted:
                                                  # written by this process, or looked at once
        self.save_error = ""
        self.rng = random.Random()
        self._told_lock = threading.Lock()

    # -- the state database -----------------------------------------------------------
    def note_save_error(self, exc: Exception) -> None:
        text = "cannot write the state database %s (%s); the work waits and is retried" % (self.store.path, exc)
        if text != self.save_error:
            log.error(text)
        self.save_error = text

    def saved_again(self) -> None:
        if self.save_error:
            log.info("the state database is writable again")
            self.save_error = ""

    def finish(self, row: Row) -> None:
        """*row* needs nothing more: out of the inbox, and out of memory."""
        self.store.finish(row)
        self.checked.discard((row.dialog, row.message_id))

    # -- our own messages ---------------------------------------------------------------
    def template(self, row: Row, index: int) -> str:
        """The ``TEMPLATE_ID`` of part *index* of this message's answer (the same on every try)."""
        return reply_template_id(self.client.host, row.dialog, row.message_id, index)

    def posted(self, dialog: str, message_id: int, after: frozenset = frozenset()) -> None:
        """Remember a message we posted (the most recent OWN_KEPT): its echo from a push source needs no read,
        and the poller puts off reading it (:meth:`b24common.Poller.posted`; *after*: the methods that ran
        before it in its request)."""
        if message_id:
            self.tell_poller(dialog, message_id, after)
            with self._told_lock:
                self.own[(dialog, message_id)] = True
                while len(self.own) > OWN_KEPT:
                    self.own.popitem(last=False)

    def is_own(self, dialog: str, message_id: int) -> bool:
        with self._told_lock:
            return (dialog, message_id) in self.own

    # -- the chat bot (Chatbots 2.0, fetch mode) ------------------------------------------
    @property
    def fetch_bot(self) -> dict | None:
        """The registered chat bot when it fetches its events (imbot.v2), else None."""
        return self.chat_bot if chatbot.is_fetch(self.chat_bot) else None

    @property
    def legacy_bot(self) -> dict | None:
        """The registered chat bot when it is the legacy kind (``imbot.*``, events POSTed to it), else None."""
        return self.chat_bot if self.chat_bot and not chatbot.is_fetch(self.chat_bot) else None

    def as_bot(self, row: Row) -> bool:
        """Does *row*'s dialog belong to our fetch-mode chat bot (answers go as the bot, hand-overs through
        its session)?"""
        return self.fetch_bot is not None and bool(row.payload.get("bot_chat"))

    def cannot_post_in(self, row: Row, why: str) -> None:
        """Remember (and say once per session) that the webhook user cannot post in this dialog."""
        session = row.payload.get("session_id") or 0
        with self._told_lock:
            told = self.cannot_post.get(row.dialog) == session
            self.cannot_post[row.dialog] = session
        if not told:
            log.warning("%s: the bot is not asked while the webhook user cannot post in %s: %s", row.where,
                        bc.display_dialog_id(row.dialog), why)

    def to_queue(self, row: Row, why: str, target: str = "") -> bool:
        """Give *row*'s dialog to people: the line's queue, or *target* (``queueN`` or a user id).  A chat
        our chat bot holds goes through the bot's session (``imopenlines.bot.session.operator`` /
        ``.transfer``); any other with ``imopenlines.operator.transfer``.  One log line either way; True
        when it went."""
        dialog, line = row.dialog, row.payload.get("line_id")
        target = target if target not in ("", "queue") else ""
        if not dialog.startswith("chat") or not (target or line or self.as_bot(row)):
            return False
        chat_id = int(dialog[4:])
        if self.as_bot(row) and not target:
            method, params = "imopenlines.bot.session.operator", {"CHAT_ID": chat_id}
            where_to = "the operators of line %s" % line
        elif self.as_bot(row):
            method, params = "imopenlines.bot.session.transfer", {
                "CHAT_ID": chat_id, "TRANSFER_ID": target, "LEAVE": "Y", "CLIENT_ID": self.fetch_bot["client_id"]}
            where_to = target
        else:
            method, params = "imopenlines.operator.transfer", {"CHAT_ID": chat_id,
                                                               "TRANSFER_ID": target or "queue%d" % line}
            where_to = target or "the queue of line %s" % line
        try:
            self.client.call(method, params, write=True)
        except bc.B24Error as exc:
            log.error("%s: could not hand the dialog to %s: %s", row.where, where_to, bc.format_error(exc))
            return False
        log.info("%s: transferred to %s (%s)", row.where, where_to, why)
        return True

    # -- a message that failed ------------------------------------------------------------
    def retry_later(self, row: Row, error: str, *, unusable: bool = False) -> bool:
        """Schedule another try; False when this message's time (or patience) is up."""
        first = row.first_try or time.time()
        attempts = row.attempts + 1
        over = (time.time() - first >= self.settings.retry_hours * 3600
                or (unusable and attempts >= UNUSABLE_TRIES))
        if over:
            return False
        base = min(BACKOFF_CAP_SEC, self.settings.retry_first * (2 ** min(row.attempts, 20)))
        delay = base * self.rng.uniform(0.8, 1.0)
        self.stats["retries"] += 1
        self.store.update(row, attempts=attempts, first_try=first, next_try=time.time() + delay, error=error)
        log.warning("%s: %s; trying again in %.0f s (attempt %d)", row.where, error, delay, attempts + 1)
        return True

    def dead_letter(self, row: Row, reason: str, stage: str) -> None:
        self.dead.add(row, reason, stage)
        self.stats["dead_letters"] += 1

    def bury(self, row: Row, reason: str, stage: str) -> None:
        """Dead letter, fallback text (if set), and the row is done."""
        self.dead_letter(row, reason, stage)
        log.error("%s: %s -- moved to the dead letters (%s); b24_ol_bridge.py --replay-dead re-delivers it",
                  row.where, reason, self.dead.path)
        if stage == "bot" and self.settings.fallback_text and row.dialog not in self.cannot_post:
            try:
                bc.send_text(self.client, row.dialog, self.settings.fallback_text,
                             template_id=self.template(row, FALLBACK_INDEX))
                log.info("%s: posted BRIDGE_FALLBACK_TEXT instead", row.where)
            except bc.B24Error as exc:
                log.error("%s: BRIDGE_FALLBACK_TEXT not posted: %s", row.where, bc.format_error(exc))
        self.finish(row)
