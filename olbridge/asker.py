"""One customer message at a time, per dialog: may the bot answer it, ask the bot, keep its answer (before
any of it is posted), then hand the answer to the poster."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time

import b24common as bc
from b24delivery import WINDOW_SEC
from olbridge.bot import BotClient, BotError
from olbridge.botsession import BotSessions
from olbridge.files import MAX_FILES, FileError
from olbridge.pauses import Pauses
from olbridge.poster import Poster, next_missing
from olbridge.scheduler import Scheduler
from olbridge.shared import MAX_PARTS, UNUSABLE_TRIES, Shared
from olbridge.store import Row

log = logging.getLogger("b24_ol_bridge")

DELETED_RECHECK_SEC = 1.0   # a message that looks deleted is read again this much later before it is skipped
TYPING_AFTER_SEC = 1.0      # a bot slower than this shows "typing..." in the chat our chat bot holds,
TYPING_EVERY_SEC = 20.0     # refreshed this often (each shown for TYPING_EVERY_SEC + 10 s)


class Asker:
    """The workers' job: :meth:`serve` handles a dialog's messages in order (the scheduler calls it)."""

    def __init__(self, shared: Shared, pauses: Pauses, scheduler: Scheduler, poster: Poster, stop: threading.Event,
                 *, take: str = ""):
        self.shared = shared
        self.pauses = pauses
        self.scheduler = scheduler
        self.poster = poster
        self.stop = stop
        self.take = take                  # "answer" / "join": take dialogs waiting in the queue; "": don't
        self.lock = threading.Lock()
        self.cfg: bc.Config = shared.client.config
        self.routes: dict = {}
        self.bot_url = ""
        self.bots: dict = {}              # URL -> BotClient
        self.warned_unrouted: set = set()
        self.sessions: BotSessions | None = None       # which chats our fetch-mode chat bot holds
        self.use_bots(self.cfg, BotClient(self.cfg) if self.cfg.bot_url else None)

    def use_bots(self, cfg: bc.Config, bot: BotClient | None) -> None:
        """The bots to ask (BOT_HTTP_URL and BOT_ROUTES) -- at start and on reload."""
        with self.lock:
            self.cfg, self.routes, self.bot_url = cfg, dict(cfg.bot_routes), cfg.bot_url
            self.bots = {bot.url: bot} if bot is not None else {}

    def bot_hosts(self) -> list:
        with self.lock:
            return sorted({b.host for b in self.bots.values()})

    # -- a dialog ---------------------------------------------------------------------------
    def serve(self, dialog: str) -> float | None:
        """Handle *dialog*'s messages in order; return when to come back (None: nothing left)."""
        sh = self.shared
        while not self.stop.is_set():
            try:
                row = sh.store.head(dialog)
            except sqlite3.Error as exc:
                sh.note_save_error(exc)
                return time.monotonic() + 5
            if row is None:
                return None
            wait = row.next_try - time.time()
            if wait > 0:
                return time.monotonic() + wait
            self.scheduler.add_busy(1)
            sh.live.beat("handling %s" % row.where)
            try:
                if self.handle(row) == "posting":
                    return None      # the poster has the dialog now; it wakes it when done
            except sqlite3.Error as exc:
                sh.note_save_error(exc)
                return time.monotonic() + 5
            finally:
                self.scheduler.add_busy(-1)
        return None

    def handle(self, row: Row) -> str | None:
        if not self.reconcile(row):
            return None
        if row.state == "new":
            return self.ask_bot(row)
        if row.state == "answered":
            return self.poster.take(row)
        self.shared.finish(row)
        return None

    def reconcile(self, row: Row) -> bool:
        """For a message left over from an earlier run: False if it needs nothing more."""
        sh = self.shared
        key = (row.dialog, row.message_id)
        if key in sh.checked:
            return True
        try:
            row.present = self.poster.parts_present(row)
        except bc.B24Error as exc:
            log.warning("%s: cannot check the dialog for replies already posted (%s); trying later", row.where, exc)
            sh.retry_later(row, "dialog check failed")
            return False
        sh.checked.add(key)
        if row.state == "new" and row.present:
            log.info("%s: its replies are already in the dialog; not asking the bot again", row.where)
            sh.finish(row)
            return False
        if row.state == "answered":
            if self.poster.follow(row):        # posted before the crash, never recorded: their verdicts too
                for index, mid in row.present.items():
                    if index >= row.posted:
                        self.poster.on_posted(sh.store.part_found(row, mid, index))
            start = next_missing(row, row.posted)
            if start > row.posted:
                log.info("%s: replies %d-%d are already in the dialog; posting the rest", row.where,
                         row.posted + 1, start)
                sh.store.update(row, posted=start)
        return True

    # -- may the bot answer? ------------------------------------------------------------------
    def _skip(self, row: Row, counter: str) -> None:
        self.shared.stats[counter] += 1
        self.shared.finish(row)

    def _can_answer(self, row: Row) -> bool:
        """The bot is not asked for a dialog we cannot post to (logged once per dialog)."""
        sh = self.shared
        session = row.payload.get("session_id") or 0
        if row.dialog in sh.cannot_post and sh.cannot_post[row.dialog] == session:
            return False
        if row.payload.get("waiting") and not self.take and not sh.legacy_bot:
            sh.cannot_post_in(row, "it waits in the queue and the webhook user has not taken it "
                                   "(--take or BRIDGE_TAKE=answer lets the bridge take queued dialogs)")
            return False
        return True

    def _bot_for(self, row: Row) -> BotClient | None:
        bot = self.bot_for_line(row.payload.get("line_id"))
        line = row.payload.get("line_id")
        if bot is None and line not in self.warned_unrouted:
            self.warned_unrouted.add(line)
            log.warning("%s: line %s has no bot (no BOT_ROUTES entry, no BOT_HTTP_URL): its messages are "
                        "not forwarded", row.where, line)
        return bot

    def bot_for_line(self, line: int | None) -> BotClient | None:
        """The bot of an Open Line (its BOT_ROUTES entry, else BOT_HTTP_URL's); None if it has none."""
        with self.lock:
            url = self.routes.get(line) or self.bot_url
            if url:
                bot = self.bots.get(url)
                if bot is None:
                    bot = self.bots[url] = BotClient(self.cfg, url)
                return bot
        return None

    def _take_from_queue(self, row: Row) -> bool:
        """Take (or join) a dialog waiting in the queue before its answer; False: try again later."""
        sh = self.shared
        try:
            bc.take_dialog(sh.client, row.dialog, self.take)
            log.info("%s: %s the dialog from the queue to answer it", row.where,
                     "joined" if self.take == "join" else "took")
            row.payload.update(waiting=False, taken=True)      # taken once: a retry does not take it again
            sh.store.update(row, payload=row.payload)
        except bc.TRANSIENT as exc:
            if not sh.retry_later(row, "could not take the dialog yet (%s)" % exc):
                sh.bury(row, "could not take the dialog: %s" % exc, "bot")
            return False
        except bc.B24Error as exc:
            log.info("%s: not taken (%s); answering if we can", row.where, exc)
        return True

    # -- asking --------------------------------------------------------------------------------
    def ask_bot(self, row: Row) -> str | None:
        sh = self.shared
        if sh.as_bot(row) and self.sessions is not None and not self.sessions.check(row):
            self.pauses.stays_out(row)              # says why, once
            return self._skip(row, "paused")
        if not self._can_answer(row):
            return self._skip(row, "skipped")
        if self.pauses.stays_out(row):
            return self._skip(row, "paused")
        bot = self._bot_for(row)
        if bot is None:
            return self._skip(row, "skipped")
        if row.payload.get("deleted"):
            gone = self._deleted(row)
            if gone is None:
                return None                       # looked at again in a moment
            if gone:
                log.info("%s: deleted by the customer; not forwarded", row.where)
                return self._skip(row, "deleted")
        if sh.settings.debounce and not row.attempts:
            group = sh.store.waiting_rows(row.dialog)
            newest = max(r.arrived for r in group) if group else 0
            if time.time() - newest < sh.settings.debounce:
                sh.store.update(row, next_try=newest + sh.settings.debounce)
                return None
            if len(group) > 1:
                row = self._fold(group)
        if row.payload.get("waiting") and self.take and not sh.legacy_bot \
                and not self._take_from_queue(row):
            return None
        answer, took = self._exchange(bot, row)
        if answer is None:
            return None
        closed = self._window_closed(row)
        if closed:
            sh.bury(row, "window closed: %s -- the answer was not posted" % closed, "post")
            return None
        parts = self._parts(row, answer.texts)
        files = self._files(row, answer.files, bot.url, first=len(parts))
        log.info("%s: bot answered in %.1f s with %d message%s%s%s", row.where, took,
                 len(parts), "" if len(parts) == 1 else "s",
                 " and %d file%s" % (len(files), "" if len(files) == 1 else "s") if files else "",
                 " and hands over to a person" if answer.handoff else "")
        parts += files
        if sh.demo:      # a demo shows the conversation; a real journal keeps texts out
            log.info("  customer %s: %s", row.payload.get("customer_name"), row.payload.get("text"))
            for part in parts:
                log.info("  bot: %s", part if isinstance(part, str) else "[file %s]" % part["name"])
        # the answer is kept before any of it is posted: a restart posts the rest of the same answer
        sh.store.update(row, state="answered", answer=parts, posted=0, handoff=int(answer.handoff),
                        attempts=0, first_try=None, next_try=0, error=None)
        return self.poster.take(row)

    def _deleted(self, row: Row) -> bool | None:
        """A message that looked deleted when read: True if it still is a moment later, False if it was
        only read before its params were written (fact sheet §19: its text is taken from the second read),
        None while the moment has not passed."""
        sh = self.shared
        if not row.payload.get("deleted_seen"):
            row.payload["deleted_seen"] = time.time()
            sh.store.update(row, payload=row.payload, next_try=time.time() + DELETED_RECHECK_SEC)
            return None
        res = sh.client.call("im.dialog.messages.get", {"DIALOG_ID": row.dialog, "FIRST_ID": row.message_id - 1,
                                                         "LIMIT": 1})
        msgs, users, files = bc.messages_of(res)
        raw = next((m for m in msgs if bc.as_int(m.get("id")) == row.message_id), None)
        if raw is None or str(bc.as_map(raw.get("params")).get("IS_DELETED") or "").upper() == "Y":
            return True
        factory = bc.MessageFactory(0)
        factory.learn(users, None, files)
        again = factory.make(raw, row.dialog, None)
        for key in ("deleted", "deleted_seen"):
            row.payload.pop(key, None)
        row.payload.update(text=again.text, message=again.text, attachments=list(again.attachments))
        sh.store.update(row, payload=row.payload)
        return False

    def _exchange(self, bot: BotClient, row: Row) -> tuple:
        """One request to the bot: ``(answer, seconds)``, or ``(None, 0)`` -- the message is then retried
        later or buried."""
        sh = self.shared
        payload = dict(row.payload, attempt=row.attempts + 1)
        for key in ("waiting", "taken", "connector", "deleted", "deleted_seen", "bot_chat"):
            payload.pop(key, None)
        started = time.monotonic()
        sh.stats["forwarded"] += 1
        sh.live.beat("asking the bot about %s" % row.where)
        typing = Typing(sh, row.dialog) if sh.as_bot(row) else None
        try:
            answer = bot.ask(payload, headers={"Idempotency-Key": row.payload.get("event_id") or ""})
        except BotError as exc:
            sh.live.beat("handling %s" % row.where)
            sh.stats["bot_failures"] += 1
            if not sh.retry_later(row, str(exc), unusable=not exc.retryable):
                why = ("the bot's answer stayed unusable after %d tries: %s" % (UNUSABLE_TRIES, exc)
                       if not exc.retryable else "the bot did not answer for %g hours: %s"
                       % (sh.settings.retry_hours, exc))
                sh.bury(row, why, "bot")
            elif row.payload.get("taken") and time.time() - row.first_try >= sh.settings.handback_min * 60:
                self._hand_back(row, exc)
            return None, 0.0
        finally:
            if typing is not None:
                typing.stop()
        sh.live.beat("handling %s" % row.where)
        took = time.monotonic() - started
        sh.latency.add(took)
        return answer, took

    def _hand_back(self, row: Row, exc: Exception) -> None:
        """The bot stays down, and the bridge took this dialog from the queue: the customer goes back to the
        line's queue (with BRIDGE_FALLBACK_TEXT, once), where a person can answer; the bot stays out of
        this session, and the message is kept in the dead letters."""
        sh = self.shared
        minutes = (time.time() - row.first_try) / 60
        line = row.payload.get("line_id")
        sh.bury(row, "the bot was down for %.0f min (%s): handed back to the queue of line %s" % (
            minutes, exc, line), "bot")              # the fallback text goes with it
        self.pauses.hand_over(row)
        sh.store.set_handed_off(row.dialog, row.payload.get("session_id") or 0)
        if sh.to_queue(row, "BRIDGE_OUTAGE_HANDBACK_MIN"):
            log.warning("%s: the bot has been down for %.0f min: the dialog went back to the queue of line %s",
                        row.where, minutes, line)

    @staticmethod
    def _window_closed(row: Row) -> str:
        """Why the WhatsApp window of *row*'s dialog is closed by now ("" if open): the customer's message
        opened it for 24 hours (fact sheet §13.4), and the bot or the retries took longer."""
        window = WINDOW_SEC.get(row.payload.get("connector") or "")
        sent = bc.parse_date(row.payload.get("date"))
        if window and sent is not None and time.time() > sent + window:
            return "24 hours passed since the customer's message (%s)" % row.payload.get("date")
        return ""

    def _parts(self, row: Row, texts: list) -> list:
        """The answer's texts as messages of at most BRIDGE_MAX_REPLY_CHARS, at most MAX_PARTS of them."""
        parts: list = []
        for text in texts:
            parts.extend(bc.split_text(text, self.shared.settings.max_chars))
        if len(parts) > MAX_PARTS:
            log.warning("%s: the answer makes %d messages; posting the first %d, the rest is cut", row.where,
                        len(parts), MAX_PARTS)
            parts = parts[:MAX_PARTS]
        return parts

    def _files(self, row: Row, specs: list, bot_url: str, *, first: int) -> list:
        """The answer's files fetched (or decoded) and kept, as the parts that stand for them; one that
        cannot be had is said and dead-lettered with the reason, and the rest goes on."""
        sh = self.shared
        if len(specs) > MAX_FILES:
            log.warning("%s: the answer carries %d files; posting the first %d", row.where, len(specs), MAX_FILES)
        parts = []
        for n, spec in enumerate(specs[:MAX_FILES]):
            try:
                parts.append(sh.files.keep(sh.template(row, first + len(parts)), spec, bot_url))
            except FileError as exc:
                log.error("%s: file %d of the answer is not posted: %s", row.where, n + 1, exc)
                sh.dead_letter(row, "file %d of the answer not posted: %s" % (n + 1, exc), "file")
            except OSError as exc:
                log.error("%s: file %d of the answer could not be kept: %s", row.where, n + 1, exc)
                sh.dead_letter(row, "file %d of the answer not kept: %s" % (n + 1, exc), "file")
        return parts

    def _fold(self, group: list) -> Row:
        """Messages of one burst become one bot turn on the last of them."""
        last = group[-1]
        texts = [r.payload.get("text") or "" for r in group]
        last.payload.update(text="\n".join(texts), message="\n".join(texts),
                            message_ids=[r.message_id for r in group],
                            attachments=[a for r in group for a in r.payload.get("attachments") or []],
                            new_dialog=any(r.payload.get("new_dialog") for r in group))
        self.shared.store.fold(group, last)
        self.shared.checked.difference_update((r.dialog, r.message_id) for r in group[:-1])
        log.info("%s: %d messages within BRIDGE_DEBOUNCE_SEC=%g s go to the bot as one turn", last.where,
                 len(group), self.shared.settings.debounce)
        return last


class Typing:
    """While the bot thinks, our chat bot shows "typing..." in the chat (``imbot.v2.Chat.InputAction.notify``):
    first after TYPING_AFTER_SEC -- a quick bot costs no request -- then every TYPING_EVERY_SEC."""

    def __init__(self, shared: Shared, dialog: str):
        self.shared, self.dialog = shared, dialog
        self.done = threading.Event()
        threading.Thread(target=self._run, name="typing", daemon=True).start()

    def _run(self) -> None:
        wait = TYPING_AFTER_SEC
        while not self.done.wait(wait):
            bot = self.shared.fetch_bot
            if bot is None:
                return
            try:
                self.shared.client.call("imbot.v2.Chat.InputAction.notify", {
                    "botId": bot["bot_id"], "botToken": bot["client_id"], "dialogId": self.dialog,
                    "duration": int(TYPING_EVERY_SEC + 10)}, write=True)
            except bc.B24Error as exc:          # a nicety: never worth more than a debug line
                log.debug("%s: typing not shown (%s)", bc.display_dialog_id(self.dialog), exc)
            except bc.Interrupted:
                return
            wait = TYPING_EVERY_SEC

    def stop(self) -> None:
        self.done.set()
