"""Did each answer reach the customer: the parts the poster sent are followed until the portal settles them
(b24delivery); a part not delivered is logged once, counted, kept in the dead letters with the reason,
told to the bot (BOT_DELIVERY_EVENTS=1) and, with BRIDGE_UNDELIVERED_TO=queue, handed to the line's queue."""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import time

import b24common as bc
import b24delivery as delivery
from olbridge.bot import BotClient, BotError
from olbridge.shared import Shared
from olbridge.store import Row

log = logging.getLogger("b24_ol_bridge")

REASONS = ("window", "blocked", "provider", "unconfirmed")     # b24_bridge_replies_undelivered_total{reason}
READ_AGAIN_SEC = 5.0        # a part the poller read while still in flight is checked once this much has passed


def reason_kind(verdict: delivery.Verdict) -> str:
    if verdict.status == delivery.REFUSED:
        return "window"
    if verdict.status == delivery.UNCONFIRMED:
        return "unconfirmed"
    return "blocked" if "block" in verdict.reason.lower() else "provider"


class Deliveries:
    """Checked from the main loop at most once a poll interval, and only while parts are in flight."""

    def __init__(self, shared: Shared, bot_for_line, *, notify_bot: bool, hand_to_queue: bool):
        self.shared = shared
        self.bot_for_line = bot_for_line            # line id -> BotClient | None
        self.notify_bot, self.hand_to_queue = notify_bot, hand_to_queue
        self.watch: delivery.DeliveryWatch | None = None   # made (and filled from the store) by the main thread
        self.posted: queue.Queue = queue.Queue()    # parts the poster posted, for the main thread to follow
        self.read_in_flight: dict = {}              # message id -> when the poller read it unsettled (monotonic)
        self.last = 0.0
        self.counts = {"delivered": 0, **{r: 0 for r in REASONS}}

    def follow(self, part: tuple) -> None:
        """The poster posted a part (``(message id, dialog, source, part, sent at, payload)``); any thread."""
        self.posted.put(part)

    def _take_posted(self) -> None:
        """In the main thread: the parts in flight from the store once (a restart loses no verdict), then
        those the poster posted since."""
        if self.watch is None:
            self.watch = delivery.DeliveryWatch(self.shared.client, clock=time.time)
            for part in self.shared.store.sent_in_flight():
                self.posted.put(part)
        while True:
            try:
                mid, dialog, _source, _part, sent_at, _payload = self.posted.get_nowait()
            except queue.Empty:
                return
            # only the dialog and the time are held; what a failure needs is read from the store then
            if mid not in self.watch.pending:
                self.watch.add(dialog, mid, at=sent_at)

    def seen(self, msgs: list) -> None:
        """The poller read these anyway: a part among them (posting it moved its dialog, so the next scan
        reads it) is judged from what came with it, at no extra request; only parts still in flight then
        are left to :meth:`check`."""
        self._take_posted()
        if not self.watch.busy():
            return
        verdicts = []
        now = time.time()
        for i, msg in enumerate(msgs):
            pending = self.watch.pending.get(msg.id)
            if pending is None or pending[0] != msg.dialog_id:
                continue
            notices = [{"text": m.text, "author_id": 0} for m in msgs[i + 1:]
                       if m.dialog_id == msg.dialog_id and m.author_kind == "system"]
            verdict = delivery.judge({"id": msg.id, "params": msg.params}, notices, age=now - pending[1],
                                     wait=self.watch.wait, dialog_id=msg.dialog_id)
            if verdict is not None:
                del self.watch.pending[msg.id]
                verdicts.append(verdict)
            else:       # read before its delivery mark came: no read of the poller brings it again
                self.read_in_flight.setdefault(msg.id, time.monotonic())
        self._settle_all(verdicts)

    def check(self, interval: float) -> None:
        self._take_posted()
        every = max(interval, self.shared.settings.delivery_check)        # BRIDGE_DELIVERY_CHECK_SEC
        if not self.watch.busy() or time.monotonic() - self.last < every:
            return
        self.last = now = time.monotonic()
        # a part posted just now is read by the poller soon anyway (Poller.posted): judged from that read,
        # unless that read came before the part's delivery mark
        longest = bc.OWN_READ_WATCHED * self.shared.settings.own_read_delay
        pending = self.watch.pending                                       # message id -> (dialog, sent at)
        self.read_in_flight = {m: at for m, at in self.read_in_flight.items() if m in pending}
        read = {pending[m][0] for m, at in self.read_in_flight.items() if now - at >= READ_AGAIN_SEC}
        self._settle_all(self.watch.check(younger=longest + interval, also=read))

    def _settle_all(self, verdicts: list) -> None:
        for v in verdicts:
            self._settle(v)
        if verdicts:
            try:
                self.shared.store.settled([v.message_id for v in verdicts])
            except sqlite3.Error as exc:
                self.shared.note_save_error(exc)

    def _settle(self, v: delivery.Verdict) -> None:
        sh = self.shared
        if v.status in (delivery.DELIVERED, delivery.SENT):
            self.counts["delivered"] += 1
            return
        kind = reason_kind(v)
        self.counts[kind] += 1
        try:
            dialog, source, part, payload = sh.store.sent_part(v.message_id) or (v.dialog_id, 0, 0, {})
        except sqlite3.Error as exc:
            sh.note_save_error(exc)
            dialog, source, part, payload = v.dialog_id, 0, 0, {}
        where = "%s #%d" % (bc.display_dialog_id(dialog), source)
        log.warning("%s: reply %d (message %d) %s", where, part + 1, v.message_id, v.describe())
        row = Row((dialog, source, json.dumps(payload), "answered", json.dumps([payload.get("text", "")]), 0, 0,
                   0, None, 0, None, 0))
        sh.dead_letter(row, "reply %d %s" % (part + 1, v.describe()), "delivery")
        if self.notify_bot:
            self._tell_bot(v, payload)
        if self.hand_to_queue:
            sh.to_queue(row, "a reply was not delivered: BRIDGE_UNDELIVERED_TO")

    def _tell_bot(self, v: delivery.Verdict, payload: dict) -> None:
        bot: BotClient | None = self.bot_for_line(payload.get("line_id"))
        if bot is None:
            return
        status = "unconfirmed" if v.status == delivery.UNCONFIRMED else "failed"
        notice = {"type": "delivery", "event_id": payload.get("event_id"),
                  "dialog_id": bc.display_dialog_id(v.dialog_id), "message_ids": [v.message_id],
                  "status": status, "reason": v.reason}
        try:
            bot.tell(notice)
        except BotError as exc:
            log.warning("%s: the bot was not told that a reply %s (%s)", bc.display_dialog_id(v.dialog_id),
                        status, exc)
