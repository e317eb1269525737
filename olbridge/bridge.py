"""The bridge's main loop: sign in, open the state, then read what the sources point at, write each customer
message to the inbox with the cursor that moved past it, and wake the dialog's worker."""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Mapping

import b24common as bc
import b24files
import b24push as push
from olbridge import chatbot
from olbridge.asker import Asker
from olbridge.bot import BotClient
from olbridge.botsession import BotSessions
from olbridge.delivered import REASONS, Deliveries
from olbridge.files import AnswerFiles
from olbridge.health import Liveness, Watchdog, metric, sd_notify
from olbridge.pauses import Pauses
from olbridge.poster import Poster
from olbridge.scheduler import Scheduler
from olbridge.settings import Settings
from olbridge.shared import Shared, is_bridge_uuid, reply_template_id
from olbridge.store import DeadLetters, Store, migrate_json_state

log = logging.getLogger("b24_ol_bridge")

STOP_GRACE_SEC = 1.5        # on SIGTERM, how long replies in progress may still finish (the rest is redone)
PRUNE_EVERY_SEC = 3600.0    # how often dialogs idle for BRIDGE_FORGET_DAYS are forgotten
BEHIND_AFTER_SEC = 60.0     # a message unanswered this long past the bot's timeout: the status line says "behind"


class StatePaths:
    """Where this bridge keeps its state: the folder, the database, and the files named after it."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]):
        self.folder = bc.default_state_dir(environ)
        self.db = args.state or os.path.join(self.folder, "bridge.db")
        self.base = self.db[:-3] if self.db.endswith(".db") else self.db
        self.explicit = bool(args.state)

    @property
    def lock(self) -> str:
        return self.base + ".lock"

    @property
    def dead_letters(self) -> str:
        return self.base + ".dead-letters.jsonl"

    @property
    def spool(self) -> str:
        return self.base + ".receiver.sqlite"

    @property
    def files(self) -> str:
        return self.base + ".files"


class Bridge:
    """Sources -> poller -> inbox (the main thread); workers ask the bot (:class:`Asker`), the poster
    posts (:class:`Poster`), the scheduler keeps each dialog in order."""

    def __init__(self, client: bc.Client, args: argparse.Namespace, settings: Settings, *,
                 environ: Mapping[str, str] | None = None, demo: bool = False):
        cfg = client.config
        self.client, self.args = client, args
        self.interval = args.interval or cfg.poll_sec
        self.base_environ = dict(os.environ if environ is None else environ)   # SIGHUP re-reads on top of it
        self.stop = threading.Event()
        self.live = Liveness(settings.stuck_sec or max(cfg.bot_timeout, cfg.http_timeout) + 60)
        client.on_progress = self.live.beat
        client.limiter.stop = self.stop       # every wait for the portal ends when the bridge is asked to stop
        self.shared = Shared(client, settings, self.live, demo=demo)
        self.pauses = Pauses()
        self.scheduler = Scheduler(self.live, args.workers or settings.concurrency)
        self.poster = Poster(self.shared, self.pauses, self.scheduler)
        self.asker = Asker(self.shared, self.pauses, self.scheduler, self.poster, self.stop,
                           take="answer" if getattr(args, "take", False) else settings.take)
        self.deliveries = Deliveries(self.shared, self.asker.bot_for_line, notify_bot=settings.delivery_events,
                                     hand_to_queue=settings.undelivered_to == "queue")
        self.poster.on_posted = self.deliveries.follow
        self.bot_sessions = BotSessions(self.shared, self.pauses)
        self.poster.bot_left = self.bot_sessions.left
        self.asker.sessions = self.bot_sessions
        self.watchdog = Watchdog(self.live, self.status)
        self.poller: bc.Poller | None = None
        self.inbound: push.Inbound | None = None     # the sources (see choose_sources); None: scans only
        self.uncommitted: list = []           # rows whose save failed; retried before polling on
        self.activity: dict = {}              # dialog -> portal time of its newest message (not saved yet)
        self.pending: list = []               # batches not handled yet (an outage, a full disk)
        self.positions: dict = {}             # the sources' positions to save with the next commit
        self.trouble: tuple = ()              # (since, what) while the portal cannot be reached
        self.phase = "starting"
        self.last_poll_ok = 0.0
        self.last_prune = time.monotonic()
        self.reload_requested = False
        self.scans = 0                        # scans done (--once waits for one)
        self.only: set | None = None          # --replay-dead --once: handle these dialogs' work, read nothing new

    @property
    def settings(self) -> Settings:
        return self.shared.settings

    # -- start-up ------------------------------------------------------------------------
    def open(self, paths: StatePaths, bot: BotClient | None) -> None:
        """Sign in, open the state and the sources; outages on the way are waited out."""
        client = self.client
        self.phase = "signing in to %s" % client.host
        me, scopes = self.wait_out("signing in", lambda: sign_in(client, bot))
        self.phase = "opening the state database"

        def open_store() -> Store:
            store = Store(paths.db)
            if not paths.explicit:
                migrate_json_state(store, os.path.join(paths.folder, "bridge.json"))
            return store
        store = self.wait_out("opening the state database", open_store)
        saved = store.poller_state()
        if saved.get("portal") is not None and (saved["portal"], saved["user_id"]) != (client.host, me):
            raise bc.ConfigError("%s belongs to user %s on %s, not to user %s on %s: use another --state"
                                 % (store.path, saved["user_id"], saved["portal"], me, client.host))
        self.poller = poller = bc.Poller(client, self_id=me)
        poller.own_read_delay = self.shared.settings.own_read_delay
        poller.load_state(saved)
        self.shared.tell_poller = poller.posted
        if not poller.started:
            self.phase = "reading where every dialog stands"
            self.wait_out("reading the dialogs", poller.start)
            log.info("starting from now: messages already in the dialogs are not forwarded")
        self.shared.store, self.shared.dead = store, DeadLetters(paths.dead_letters)
        self.shared.files = AnswerFiles(paths.files, client.config)
        self.shared.file_route = b24files.route_for(scopes)
        self.pauses.load(*store.pauses())
        self.shared.chat_bot = chat_bot = chatbot.load_chat_bot(paths.folder, client.host)
        if chatbot.is_fetch(chat_bot):
            log.info("the chat bot %s (id %s) answers in the chats it holds; its events are fetched from the "
                     "portal", chat_bot.get("name") or "", chat_bot["bot_id"])
        elif chat_bot:
            log.info("replies go as the chat bot %s (id %s); where it is not in a dialog, as the webhook user",
                     chat_bot.get("name") or "", chat_bot["bot_id"])
        self.wait_out("writing the state", self.commit_or_raise)
        if not self.args.once:
            self.phase = "choosing the sources of inbound messages"
            sources = self.wait_out("choosing the sources", lambda: push.choose_sources(
                client, self_id=me, interval=self.interval, spool_path=paths.spool,
                client_id=(chat_bot or {}).get("client_id", "") if not chatbot.is_fetch(chat_bot) else "",
                waiting=poller.has_waiting, own=self.shared.is_own, busy=self.poster.busy,
                bot=chat_bot if chatbot.is_fetch(chat_bot) else None, observe=self.bot_sessions.observe,
                skip=lambda m: is_bridge_uuid(client.host, m.get("uuid"))))
            self.inbound = push.Inbound(sources)
            self.inbound.restore(bc.as_map(store.get_meta().get("sources")))

    def wait_out(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run *attempt* until the portal answers: outages are waited out with capped backoff while
        the status line says what is wrong since when; credential and setting errors are raised."""
        backoff = bc.Backoff(1.0, self.client.config.backoff_max)
        while True:
            self.live.beat(what)
            try:
                result = attempt()
                if self.trouble:
                    log.info("the portal answers again")
                self.trouble = ()
                return result
            except bc.TRANSIENT + (bc.StateWriteError, sqlite3.OperationalError) as exc:
                if not self.trouble:
                    self.trouble = (time.time(), str(exc))
                self.give_up_once(exc)
                delay = backoff.failed()
                log.warning("%s: %s -- trying again in %.0f s", what, exc, delay)
                sd_notify(STATUS="%s; %s" % (self.phase, self.problem()))
                if self.stop.wait(delay):
                    raise KeyboardInterrupt from None

    def give_up_once(self, exc: BaseException | None = None) -> None:
        """With --once, trouble is waited out for BRIDGE_ONCE_PATIENCE_SEC at most: then the run fails (exit 1)."""
        if self.args.once and self.trouble and time.time() - self.trouble[0] >= self.settings.once_patience:
            raise bc.TransportError("--once: the portal did not answer for %g s (%s); nothing is lost, the next "
                                    "run goes on from here" % (self.settings.once_patience, exc or self.trouble[1]))

    # -- what the sources found -------------------------------------------------------------
    def payload(self, msg: bc.Message, new_dialog: bool) -> dict:
        """What the bot gets for one customer message."""
        did = bc.display_dialog_id(msg.dialog_id)
        host = self.client.host
        return {"platform": "bitrix24", "direction": "inbound", "dialog_id": did, "sender": did,
                "chat_id": msg.chat_id, "message_id": msg.id, "date": msg.date, "text": msg.text,
                "message": msg.text, "attachments": list(msg.attachments),
                "phone": msg.customer_phone or None, "customer_phone": msg.customer_phone or None,
                "customer_name": msg.customer_name or msg.author_name, "author_id": msg.author_id,
                "line_id": msg.line_id, "session_id": msg.session_id or None,
                "business_phone": self.client.config.business_phone or None, "new_dialog": new_dialog,
                "event_id": reply_template_id(host, msg.dialog_id, msg.id, -1),
                "message_ids": [msg.id], "crm": {k: msg.crm.get(k) for k in ("lead", "contact", "deal", "company")},
                "waiting": msg.waiting, "connector": self._connector(msg.dialog_id),
                **({"bot_chat": True} if self._adopted(msg.dialog_id) else {}),
                **({"deleted": True} if msg.deleted else {}),
                "metadata": {"dialog_id": did, "message_id": msg.id, "line_id": msg.line_id,
                             "session_id": msg.session_id or None, "customer_name": msg.customer_name or None,
                             "customer_phone": msg.customer_phone or None, "portal": host}}

    def _ours(self, msg: bc.Message) -> bool:
        """A message as the webhook user that the bridge posted: a reply's uuid, or a file it posted (the
        one-call upload has no uuid: known by its id, or by a file post of that dialog still in flight)."""
        sh = self.shared
        if is_bridge_uuid(self.client.host, msg.uuid) or sh.is_own(msg.dialog_id, msg.id):
            return True
        if not msg.attachments:
            return False
        if msg.dialog_id in sh.uploading:
            return True
        # posted by a run that was stopped before it could remember: a file of the answer being posted
        try:
            row = sh.store.head(msg.dialog_id)
        except sqlite3.Error:
            return False
        names = {str(a.get("name") or "") for a in msg.attachments}
        return bool(row is not None and row.state == "answered" and any(
            not isinstance(part, str) and part.get("name") in names for part in row.answer))

    def _adopted(self, dialog_id: str) -> bool:
        """Is this a chat our chat bot holds (met through its events)?"""
        info = self._info(dialog_id)
        return bool(info is not None and info.adopted)

    def _connector(self, dialog_id: str) -> str:
        info = self._info(dialog_id)
        return info.connector if info is not None else ""

    def _info(self, dialog_id: str) -> bc.DialogInfo | None:
        return self.poller.dialogs.get(dialog_id) if self.poller is not None else None

    def inbox_rows(self, msgs: list) -> list:
        """Customer messages -> inbox rows (a new session means new_dialog); a person who wrote pauses the
        bot; the rest needs nothing."""
        rows = []
        sessions: dict = {}
        for msg in msgs:
            if msg.author_kind == "operator" or (msg.author_kind == "self" and not self._ours(msg)):
                self.pauses.human_wrote(msg, self.settings.human_pause_min)
                continue
            if msg.author_kind != "customer":
                continue
            seen = sessions.get(msg.dialog_id)
            if seen is None:
                seen = self.shared.store.session_seen(msg.dialog_id)
            new = msg.new_dialog or bool(msg.session_id and msg.session_id != seen)
            sessions[msg.dialog_id] = msg.session_id or seen
            rows.append({"dialog": msg.dialog_id, "message_id": msg.id, "payload": self.payload(msg, new),
                         "session": msg.session_id})
        return rows

    def commit(self) -> bool:
        """Write what the last polls found; False (and nothing lost) if the disk said no."""
        assert self.poller is not None
        rows = self.uncommitted
        changes = self.poller.take_dirty()
        meta = dict(self.poller.meta(), portal=self.client.host, user_id=self.poller.self_id)
        if self.positions:
            meta["sources"] = dict(self.positions)
        pauses = self.pauses.take_changes()
        try:
            self.shared.store.commit_cycle(rows, changes, meta, self.activity, pauses)
        except sqlite3.Error as exc:
            self.pauses.put_back(pauses)
            self.poller.mark_dirty(changes)
            self.shared.note_save_error(exc)
            return False
        self.uncommitted = []
        self.activity = {}
        self.shared.checked.update((r["dialog"], r["message_id"]) for r in rows)
        self.shared.saved_again()
        self.shared.stats["received"] += len(rows)
        for dialog in {r["dialog"] for r in rows}:
            self.scheduler.wake(dialog)
        return True

    def commit_or_raise(self) -> None:
        if not self.commit():
            raise bc.StateWriteError(self.shared.save_error)

    def cycle(self, batches: list | None = None) -> bool:
        """One round: a scan (*batches* None), or what the sources' batches point at.  False when what
        was read is not safe on disk yet (the batches are then not acknowledged)."""
        assert self.poller is not None
        if self.uncommitted and not self.commit():
            return False        # do not read further while what we read is not safe yet
        for b in batches or ():
            if b.error is not None:
                raise b.error
        if batches and self.inbound is not None:
            self.positions = self.inbound.positions(after=batches)   # saved with the work they led to
        hints = None if batches is None else push.hints_of(batches)
        msgs = self.poller.poll(auto_ack=True, hints=hints)
        if hints is None or push.SCAN in hints:
            self.scans += 1
        for m in msgs:
            ts = m.timestamp
            if ts is not None:
                self.activity[m.dialog_id] = max(self.activity.get(m.dialog_id, 0.0), ts)
        self.uncommitted.extend(self.inbox_rows(msgs))
        self.deliveries.seen(msgs)          # our parts among them are judged from this read
        return self.commit()

    def prune(self) -> None:
        """Forget dialogs idle for BRIDGE_FORGET_DAYS (they come back as first seen, from then on).

        Only dialogs whose last message is well before the last scan: one that comes back is read
        from that scan on, and must have nothing newer that we already handled."""
        assert self.poller is not None
        watermark = self.poller.meta().get("watermark")
        if watermark is None:
            return
        try:
            idle = self.shared.store.idle_dialogs(time.time() - self.settings.forget_days * 86400,
                                                  watermark - 3 * bc.SYNC_MARGIN_SEC)
        except sqlite3.Error as exc:
            self.shared.note_save_error(exc)
            return
        # a dialog waiting in the queue comes with every scan: forgetting it would only churn
        idle = [d for d in idle if not getattr(self.poller.dialogs.get(d), "waiting", False)]
        for dialog in idle:
            self.poller.forget(dialog)
            self.shared.cannot_post.pop(dialog, None)
        if idle:
            names = ", ".join(bc.display_dialog_id(d) for d in idle[:5]) + (", ..." if len(idle) > 5 else "")
            log.info("forgot %d dialog(s) idle for %g days: %s", len(idle), self.settings.forget_days, names)

    # -- health ----------------------------------------------------------------------------
    def problem(self) -> str:
        """Why the bridge is not healthy right now ("" when it is)."""
        stuck = self.live.stuck()
        if stuck:
            name, age, doing = stuck[0]
            return "%s made no progress for %.0f s (%s)" % (name, age, doing or "?")
        if self.shared.save_error:
            return self.shared.save_error
        if self.trouble:
            return "portal unreachable since %s: %s" % (time.strftime("%H:%M:%S", time.localtime(self.trouble[0])),
                                                       self.trouble[1])
        if self.phase != "running":
            return self.phase
        return ""

    def oldest_unanswered(self) -> float:
        """Seconds the oldest message in flight has waited (0 when none does)."""
        try:
            oldest = self.shared.store.oldest_arrival() if self.shared.store is not None else None
        except sqlite3.Error:
            return 0.0
        return max(0.0, time.time() - oldest) if oldest else 0.0

    def status(self) -> str:
        """systemd's status line: what it is doing, the counts, and what is wrong since when."""
        problem = self.problem()
        if self.phase != "running":
            return self.phase + ("; " + problem if problem and problem != self.phase else "")
        stats = self.shared.stats
        text = "polling %s; %d forwarded, %d replies, %d bot failures, %d dead letters, %d dialogs waiting to retry" % (
            self.client.host, stats["forwarded"], stats["replies"], stats["bot_failures"],
            stats["dead_letters"], self.scheduler.waiting_to_retry())
        waited = self.oldest_unanswered()
        if waited > BEHIND_AFTER_SEC + self.client.config.bot_timeout:
            text += "; behind: the oldest message has waited %.0f s" % waited
        return text + ("; " + problem if problem else "")

    def metrics(self) -> str:
        """``/metrics`` in the Prometheus text format."""
        out: list = []
        stats = self.shared.stats
        counters = [("messages_received", "received", "Customer messages written to the inbox."),
                    ("bot_requests", "forwarded", "Requests made to the bot."),
                    ("bot_failures", "bot_failures", "Bot requests that failed or gave an unusable answer."),
                    ("replies_posted", "replies", "Replies posted into Bitrix24."),
                    ("retries", "retries", "Messages scheduled for another try."),
                    ("dead_letters", "dead_letters", "Messages or parts moved to the dead letters."),
                    ("skipped", "skipped", "Messages not forwarded because the dialog cannot be answered.")]
        for name, key, help_ in counters:
            metric(out, "b24_bridge_%s_total" % name, "counter", help_, [("", stats[key])])
        self.shared.latency.render(out, "b24_bridge_bot_latency_seconds", "Time the bot took to answer.")
        try:
            backlog = self.shared.store.backlog() if self.shared.store is not None else {}
        except sqlite3.Error:
            backlog = {}
        metric(out, "b24_bridge_backlog", "gauge", "Messages in flight per dialog.",
               [('{dialog="%s"}' % bc.display_dialog_id(d), n) for d, n in sorted(backlog.items())])
        metric(out, "b24_bridge_backlog_messages", "gauge", "Messages in flight, all dialogs.",
               [("", sum(backlog.values()))])
        with self.pauses.lock:
            now = time.time()
            paused = sum(1 for until, _s, _h in self.pauses.pauses.values() if until > now)
            handed = len(self.pauses.handed)
        metric(out, "b24_bridge_paused_total", "counter", "Customer messages not forwarded: a person wrote "
               "in the dialog, or the bot handed it over.", [("", stats["paused"])])
        metric(out, "b24_bridge_paused_dialogs", "gauge", "Dialogs the bot stays out of now (b24_ol_bridge.py "
               "--paused lists them, --resume lifts one).", [('{why="person wrote"}', paused),
                                                            ('{why="handed over"}', handed)])
        metric(out, "b24_bridge_replies_delivered_total", "counter", "Reply parts the portal says reached the "
               "customer (or sent where the channel reports nothing).", [("", self.deliveries.counts["delivered"])])
        metric(out, "b24_bridge_replies_undelivered_total", "counter", "Reply parts that did not reach the customer.",
               [('{reason="%s"}' % r, self.deliveries.counts[r]) for r in REASONS])
        metric(out, "b24_bridge_portal_requests_total", "counter", "HTTP requests made to the portal.",
               [("", self.client.requests)])
        metric(out, "b24_bridge_messages_answered_total", "counter", "Customer messages whose answer is posted.",
               [("", stats["answered"])])
        metric(out, "b24_bridge_requests_per_answered_message", "gauge", "Portal requests (all of them: "
               "scans, reads, posts, delivery checks) per answered message, since the start.",
               [("", round(self.client.requests / stats["answered"], 3) if stats["answered"] else 0)])
        metric(out, "b24_bridge_oldest_unanswered_seconds", "gauge", "Age of the oldest customer message not "
               "answered yet (0: none waits).", [("", round(self.oldest_unanswered(), 1))])
        metric(out, "b24_bridge_portal_limit_hits_total", "counter", "Portal answers refused by a rate limit.",
               [("", self.client.limit_hits)])
        metric(out, "b24_bridge_last_poll_success_timestamp_seconds", "gauge",
               "Unix time of the last successful poll.", [("", self.last_poll_ok)])
        metric(out, "b24_bridge_healthy", "gauge", "1 when /healthz says ok.", [("", 0 if self.problem() else 1)])
        return "\n".join(out) + "\n"

    # -- reload ------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: read the settings file again; take the bot, its auth and the tuning from it.
        An invalid file changes nothing; in-flight work is untouched."""
        environ = dict(self.base_environ)
        try:
            bc.apply_env_file(self.args, environ)
            cfg = bc.Config.from_env(environ, require_bot=True)
            settings = Settings(environ)
            bot = BotClient(cfg) if cfg.bot_url else None
        except bc.B24Error as exc:
            log.error("reload refused, the running settings stay: %s", bc.format_error(exc))
            return
        old_cfg, old = self.client.config, self.settings
        for changed, what in ((cfg.webhook_base != old_cfg.webhook_base, "B24_WEBHOOK_BASE"),
                              (settings.http_listen != old.http_listen, "BRIDGE_HTTP_LISTEN"),
                              ((cfg.source, cfg.listen, cfg.app_token) != (old_cfg.source, old_cfg.listen,
                                                                           old_cfg.app_token),
                               "B24_SOURCE, B24_LISTEN or B24_APP_TOKEN"),
                              (settings.concurrency != old.concurrency and not self.args.workers,
                               "BRIDGE_MAX_CONCURRENCY")):
            if changed:
                log.warning("reload: %s changed -- that needs a restart; the rest is applied", what)
        self.asker.use_bots(cfg, bot)
        if not settings.human_pause_min and self.pauses.pauses:
            lifted = self.shared.store.resume() if self.commit() else 0
            log.info("reload: BRIDGE_HUMAN_PAUSE_MIN=0 -- the bot is back in %d paused dialog(s)", lifted)
        if self.commit():            # pauses lifted with --resume meanwhile are in the store
            self.pauses.load(*self.shared.store.pauses())
        self.asker.take = "answer" if getattr(self.args, "take", False) else settings.take
        self.deliveries.notify_bot = settings.delivery_events
        self.deliveries.hand_to_queue = settings.undelivered_to == "queue"
        self.shared.settings = settings
        self.interval = self.args.interval or cfg.poll_sec
        if self.inbound is not None:
            self.inbound.retune(self.interval, cfg.reconcile_sec)
        self.live.stuck_after = settings.stuck_sec or max(cfg.bot_timeout, cfg.http_timeout) + 60
        if bot is not None and bot.insecure_remote:
            log.warning("BOT_HTTP_URL is plain http:// to %s: the bot's token and your customers' messages "
                        "cross the network unencrypted -- use https://", bot.host)
        log.info("reloaded the settings: bot on %s, polling every %g s",
                 bot.host if bot is not None else "(routes only)", self.interval)

    # -- the loop ------------------------------------------------------------------------------
    def housekeeping(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        if self.shared.store is not None:
            try:
                self.deliveries.check(self.interval)      # one batch a poll interval, while parts are in flight
            except bc.TRANSIENT as exc:
                log.debug("delivery reports not read this time: %s", exc)
            except sqlite3.Error as exc:
                self.shared.note_save_error(exc)
        now = time.monotonic()
        if now - self.last_prune >= min(PRUNE_EVERY_SEC, self.settings.forget_days * 86400 / 4):
            self.last_prune = now
            self.prune()

    def run(self) -> int:
        """Until stopped (or, with --once, until one scan's work is done)."""
        self.scheduler.start(self.asker.serve)
        self.poster.start()
        try:
            for dialog, _due in self.shared.store.dialogs_with_work():
                if self.only is None or dialog in self.only:
                    self.scheduler.wake(dialog)
        except sqlite3.Error as exc:
            self.shared.note_save_error(exc)
        if self.only is not None:
            self.scans = 1                    # nothing is read: the replayed work is all there is
        self.phase = "running"
        sd_notify(STATUS=self.status())
        log.info("bridging Open Lines on %s to the bot on %s (%d dialogs side by side)",
                 self.client.host, ", ".join(self.asker.bot_hosts() or ["(routes)"]), self.scheduler.workers)
        if self.inbound is None:
            self.inbound = push.Inbound([push.ScanSource(self.interval, busy=self.poster.busy)])
        if not self.inbound.started:
            self.inbound.start()
        self.poster.scan_due_in = self.inbound.scan_due_in    # replies due just before a scan go with it
        backoff = bc.Backoff(self.interval, self.client.config.backoff_max)
        next_poll = 0.0
        while not self.stop.is_set():
            self.live.beat("polling")
            now = time.monotonic()
            if now >= next_poll and self.only is None:
                try:
                    next_poll = self._round(now, backoff)
                except bc.Interrupted:
                    break                        # asked to stop while the portal was waited for
            wait = self.scheduler.release_due()
            self.housekeeping()
            if self.args.once:
                time.sleep(0.05)
                if self.scans and self.scheduler.idle():
                    break
                continue
            timeout = max(0.02, min(next_poll - time.monotonic(), wait, 1.0))
            if time.monotonic() >= next_poll and not self.pending:
                self.inbound.wait(timeout)       # wakes at once when a source has something
            else:
                self.stop.wait(timeout)
        return self._finish()

    def _round(self, now: float, backoff: bc.Backoff) -> float:
        """Handle what the sources have (or the batches held back); when to look again."""
        assert self.inbound is not None
        batches, self.pending = self.pending or self.inbound.get(0), []
        if not batches:
            return now
        backoff.interval = self.interval
        try:
            if self.cycle(batches):
                self.inbound.done(batches)
                next_poll = now
            else:
                self.pending = batches
                next_poll = now + min(self.interval, 5.0)
        except bc.TRANSIENT + (bc.BadRequestError,) as exc:   # a 400 on a read: the portal's passing trouble
            if not self.trouble:
                self.trouble = (time.time(), str(exc))
            self.give_up_once()
            delay = backoff.failed()
            log.warning("%s -- trying again in %.0f s", exc, delay)
            self.pending = batches
            return now + delay
        backoff.succeeded()
        self.last_poll_ok = time.time()
        if self.trouble:
            log.info("the portal answers again (unreachable since %s)",
                     time.strftime("%H:%M:%S", time.localtime(self.trouble[0])))
        self.trouble = ()
        return next_poll

    def _finish(self) -> int:
        """Stopping: let replies in progress finish (a while), keep what was read."""
        assert self.inbound is not None
        self.inbound.close()
        self.phase = "stopping"
        sd_notify(STOPPING=1, STATUS="stopping")
        self.stop.set()
        deadline = time.monotonic() + STOP_GRACE_SEC
        while self.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.scheduler.busy:
            log.warning("leaving with replies still in progress; they are redone at the next start")
        if self.uncommitted:
            self.commit()
        self.phase = "running"
        log.info(self.status().replace("polling", "stopped; was polling", 1))
        return bc.EXIT_OK


def sign_in(client: bc.Client, bot: BotClient | None) -> tuple:
    """``(the webhook user's id, the webhook's scopes)``, once the scopes it needs are there; warn about
    plain-http bots."""
    me = client.whoami()
    scopes = bc.check_scopes(client)
    log.info("signed in as %s (id %s) on %s", me["name"], me["id"], client.host)
    for what, each in all_bots(client.config):
        if each.insecure_remote:
            log.warning("%s is plain http:// to %s: the bot's token and your customers' messages "
                        "cross the network unencrypted -- use https://", what, each.host)
    return me["id"], scopes


def all_bots(cfg: bc.Config) -> list:
    """``[(what, BotClient)]``: BOT_HTTP_URL's bot and each BOT_ROUTES bot."""
    out = [("BOT_HTTP_URL", BotClient(cfg))] if cfg.bot_url else []
    out += [("BOT_ROUTES line %d" % line, BotClient(cfg, url)) for line, url in sorted(cfg.bot_routes.items())]
    return out
