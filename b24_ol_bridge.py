#!/usr/bin/env python3
"""Hand every inbound Open Lines (WhatsApp) customer message to your bot; post its answer back.

Usage examples::

    python3 b24_ol_bridge.py                 # with BOT_HTTP_URL and B24_WEBHOOK_BASE set
    python3 b24_ol_bridge.py --take          # also take dialogs waiting in the queue to answer them
    python3 b24_ol_bridge.py --demo          # built-in emulator + echo bot, no portal needed

For each customer message the bot gets one JSON POST (``BOT_HTTP_URL``, with
``Authorization: $BOT_HTTP_AUTH`` when set)::

    {"platform": "bitrix24", "direction": "inbound", "dialog_id": "chat1778",
     "message_id": 88213, "text": "hello", "phone": "+1...", "message": "hello",
     "customer_phone": "+1...", "customer_name": "...", "business_phone": "+1...", ...}

and may answer ``{"reply_text": ...}``, ``{"response": ...}``, ``{"text": ...}``,
``{"replies": [...]}``, ``{"messages": [...]}``, a string, a list, or nothing.
Messages of one dialog are handled in order; dialogs run side by side. The
state file remembers what was handled, so a restart neither loses nor
repeats a message; a reply re-sent after a crash carries the same
``TEMPLATE_ID`` and is not posted twice. Runs under systemd with
``Type=notify`` and ``WatchdogSec=`` (see README).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

import b24common as bc

log = logging.getLogger("b24_ol_bridge")

SEND_PATIENCE_SEC = 600.0  # how long a reply is retried through portal trouble before giving up
STOP_GRACE_SEC = 20.0     # on SIGTERM, how long replies in progress may still finish
STATUS_EVERY_SEC = 10.0   # systemd's status line is refreshed this often (watchdog or not)


def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_ol_bridge.py",
        description="Forward inbound Open Lines customer messages to your bot over HTTP and post its "
                    "replies back into Bitrix24.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  b24_ol_bridge.py                  run (settings from .env / the environment)\n"
               "  b24_ol_bridge.py --take           take queued dialogs so the bot can answer them\n"
               "  b24_ol_bridge.py --demo           built-in emulator and echo bot, no portal\n"
               "\nsettings: B24_WEBHOOK_BASE, BOT_HTTP_URL (required); BOT_HTTP_AUTH, "
               "BOT_HTTP_TIMEOUT_SEC (120),\nB24_BUSINESS_PHONE, B24_POLL_SEC (2), B24_STATE_DIR")
    parser.add_argument("--take", action="store_true",
                        help="when a dialog waits in the queue, take it (imopenlines.operator.answer) "
                             "so the reply can be posted")
    parser.add_argument("--workers", type=int, default=4, metavar="N",
                        help="dialogs handled side by side (default 4)")
    parser.add_argument("--state", metavar="FILE",
                        help="state file (default: bridge.json in $B24_STATE_DIR, systemd's "
                             "$STATE_DIRECTORY, or the XDG state folder)")
    parser.add_argument("--once", action="store_true", help="one poll cycle, handle what came, exit")
    parser.add_argument("--demo", action="store_true",
                        help="run against a built-in emulator and echo bot with simulated customers")
    bc.add_common_arguments(parser, poll=True)
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 64:
        parser.error("--workers: expected 1 to 64")
    return args


class Bridge:
    """Poll, queue customer messages per dialog, ask the bot, post replies, remember."""

    def __init__(self, client: bc.Client, bot: bc.BotClient, store: bc.PollerStore,
                 args: argparse.Namespace, interval: float):
        self.client, self.bot, self.store, self.args = client, bot, store, args
        self.poller = store.poller
        self.interval = interval
        self.cfg = client.config
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pending: dict = collections.defaultdict(collections.deque)   # dialog -> messages
        self.active: set = set()          # dialogs a worker holds
        self.ready: queue.Queue = queue.Queue()
        self.busy = 0
        self.new_dialogs: set = set()
        self.stats = collections.Counter()
        self.watchdog = bc.watchdog_seconds()
        self.last_ping = 0.0

    # -- workers ------------------------------------------------------------------
    def start_workers(self) -> None:
        for n in range(self.args.workers):
            threading.Thread(target=self._worker, name="bridge-worker-%d" % n, daemon=True).start()

    def _worker(self) -> None:
        while True:
            dialog = self.ready.get()
            while not self.stop.is_set():
                with self.lock:
                    if not self.pending[dialog]:
                        self.active.discard(dialog)
                        break
                    msg = self.pending[dialog][0]
                    self.busy += 1
                try:
                    finished = self.handle(msg)
                except Exception:  # noqa: BLE001 - one bad message must not stop the bridge
                    log.exception("%s #%d: unexpected failure; message skipped",
                                  bc.display_dialog_id(msg.dialog_id), msg.id)
                    finished = True
                with self.lock:
                    self.busy -= 1
                    if finished:
                        self.pending[dialog].popleft()
                if not finished:
                    continue          # stopping: left unacknowledged, redone at the next start
                self.poller.ack(msg)
                self.store.save()
            else:
                with self.lock:
                    self.active.discard(dialog)

    def dispatch(self, msgs: list) -> None:
        for msg in msgs:
            if msg.new_dialog:               # may be the system note that opens a conversation:
                self.new_dialogs.add(msg.dialog_id)   # the bot hears it with the first customer words
            if msg.author_kind == "customer" and msg.dialog_id in self.new_dialogs:
                self.new_dialogs.discard(msg.dialog_id)
                msg.new_dialog = True
            if msg.author_kind != "customer":
                with self.lock:
                    waiting = bool(self.pending[msg.dialog_id])
                if not waiting:
                    self.poller.ack(msg)     # nothing to do for it
                    continue
            with self.lock:
                self.pending[msg.dialog_id].append(msg)
                if msg.dialog_id not in self.active:
                    self.active.add(msg.dialog_id)
                    self.ready.put(msg.dialog_id)
        self.store.save(idle=not msgs)

    # -- one message ----------------------------------------------------------------
    def payload(self, msg: bc.Message) -> dict:
        return {"platform": "bitrix24", "direction": "inbound",
                "dialog_id": bc.display_dialog_id(msg.dialog_id), "chat_id": msg.chat_id,
                "message_id": msg.id, "date": msg.date, "text": msg.text, "message": msg.text,
                "phone": msg.customer_phone or None, "customer_phone": msg.customer_phone or None,
                "customer_name": msg.customer_name or msg.author_name, "author_id": msg.author_id,
                "line_id": msg.line_id, "business_phone": self.cfg.business_phone or None,
                "attachments": list(msg.attachments), "new_dialog": msg.new_dialog}

    def handle(self, msg: bc.Message) -> bool:
        """Ask the bot and post its replies; False if stopping interrupted it (redo later)."""
        if msg.author_kind != "customer":
            return True
        where = "%s #%d" % (bc.display_dialog_id(msg.dialog_id), msg.id)
        self.stats["forwarded"] += 1
        started = time.monotonic()
        try:
            replies = self.bot.ask(self.payload(msg))
        except bc.BotError as exc:
            self.stats["bot_failures"] += 1
            log.error("%s: %s; no reply for this message", where, exc)
            return True
        log.info("%s: bot answered in %.1f s with %d repl%s", where, time.monotonic() - started,
                 len(replies), "y" if len(replies) == 1 else "ies")
        if self.args.demo:      # a demo shows the conversation; a real journal keeps texts out
            log.info("  customer %s: %s", msg.author_name, msg.display_text)
            for text in replies:
                log.info("  bot: %s", text)
        parts = [p for text in replies for p in bc.split_text(text)]
        for index, part in enumerate(parts):
            posted = self.post(msg, index, part, where)
            if posted is None:
                return False
            if not posted:
                return True
        return True

    def post(self, msg: bc.Message, index: int, text: str, where: str) -> bool | None:
        """Post one reply: True posted, False given up, None interrupted by stopping.

        Passing trouble (rate limits, 5xx, the portal unreachable, an answer
        lost on the way) is retried with backoff for up to ``SEND_PATIENCE_SEC``,
        always with the same ``TEMPLATE_ID``, so a reply that did arrive is
        recognised by the portal rather than posted twice.
        """
        template = bc.reply_template_id(self.client.host, msg.dialog_id, msg.id, index)
        took = False
        delay = max(1.0, self.interval)
        deadline = time.monotonic() + SEND_PATIENCE_SEC
        while True:
            try:
                bc.send_text(self.client, msg.dialog_id, text, template_id=template)
                self.stats["replies"] += 1
                return True
            except bc.NotMemberError:
                if self.args.take and not took and msg.dialog_id.startswith("chat"):
                    took = True
                    try:
                        bc.take_dialog(self.client, msg.dialog_id)
                        log.info("%s: took the dialog from the queue to answer it", where)
                        continue
                    except bc.B24Error as exc:
                        log.error("%s: could not take the dialog: %s", where, exc)
                log.error("%s: reply not posted: the webhook user is not a member of this dialog (it waits "
                          "in the queue or its session was closed)%s", where,
                          "" if self.args.take else "; --take lets the bridge take queued dialogs")
            except (bc.RateLimitError, bc.ServerError, bc.TransportError) as exc:
                if self.stop.is_set():
                    return None
                if time.monotonic() + delay < deadline:
                    log.warning("%s: reply not posted yet (%s); trying again in %.0f s", where, exc, delay)
                    self.stop.wait(delay)
                    delay = min(60.0, delay * 2)
                    continue
                log.error("%s: reply not posted after %.0f minutes of trying: %s", where,
                          SEND_PATIENCE_SEC / 60, exc)
            except bc.B24Error as exc:
                log.error("%s: reply not posted: %s", where, bc.format_error(exc))
            self.stats["send_failures"] += 1
            return False

    # -- the loop -------------------------------------------------------------------
    def cycle(self) -> None:
        self.dispatch(self.poller.poll(auto_ack=False))

    def on_success(self) -> None:
        """After a good cycle: ping systemd's watchdog (if on) and refresh the status line."""
        now = time.monotonic()
        if now - self.last_ping >= (self.watchdog or STATUS_EVERY_SEC):
            fields = {"WATCHDOG": 1} if self.watchdog else {}
            bc.sd_notify(**fields, STATUS=self.status())
            self.last_ping = now

    def status(self) -> str:
        with self.lock:
            waiting = sum(len(q) for q in self.pending.values())
        return "polling %s; %d forwarded, %d replies, %d bot failures, %d waiting" % (
            self.client.host, self.stats["forwarded"], self.stats["replies"], self.stats["bot_failures"], waiting)

    def drained(self, timeout: float, *, in_flight_only: bool = False) -> bool:
        """Wait until every queued message is handled (or only those being handled now)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if (self.busy == 0) if in_flight_only else not any(self.pending.values()):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def run(self) -> int:
        self.start_workers()
        bc.sd_notify(READY=1, STATUS=self.status())
        log.info("bridging Open Lines on %s to the bot on %s (%d dialogs side by side)",
                 self.client.host, self.bot.host, self.args.workers)
        bc.poll_forever(self.cycle, interval=self.interval, stop=self.stop, once=self.args.once,
                        on_success=self.on_success)
        if self.args.once:
            self.drained(self.cfg.bot_timeout * (self.bot.retries + 1) + 60)
        bc.sd_notify(STOPPING=1, STATUS="stopping")
        self.stop.set()
        if not self.drained(STOP_GRACE_SEC, in_flight_only=True):
            log.warning("leaving with replies still in progress; they are redone at the next start")
        self.store.save()
        log.info(self.status().replace("polling", "stopped; was polling"))
        return bc.EXIT_OK


def _banner(client: bc.Client) -> int:
    me = client.whoami()
    bc.check_scopes(client)
    log.info("signed in as %s (id %s) on %s", me["name"], me["id"], client.host)
    return me["id"]


def main(argv: list | None = None) -> int:
    args = _parse_args(argv)
    bc.setup_logging(-1 if args.quiet else args.verbose)

    def body() -> int:
        environ, demo = bc.environment_or_demo(args)
        servers: list = []
        if demo:
            import mock_bot_server
            bot = mock_bot_server.BotServer().start()
            servers = [bc.start_demo_portal(environ), bot]
            environ["BOT_HTTP_URL"] = bot.url
            environ.pop("BOT_HTTP_AUTH", None)
            environ.setdefault("B24_STATE_DIR", os.path.join(bc.default_state_dir(environ), "demo"))
            args.demo = args.take = True
            log.info("demo: an emulator stands in for the portal and an echo bot for yours; simulated "
                     "customers write every few seconds and get answers (Ctrl-C to stop)")
        try:
            cfg = bc.Config.from_env(environ, require_bot=True)
            client = bc.Client(cfg)
            bot_client = bc.BotClient(cfg)
            path = args.state or os.path.join(cfg.state_dir or bc.default_state_dir(environ), "bridge.json")
            if demo and not args.state:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if os.path.exists(path):
                    os.unlink(path)       # each demo portal is new
            me = _banner(client)
            store = bc.PollerStore(bc.Poller(client, self_id=me), bc.StateFile(path), client.host)
            store.load()
            if not store.poller.started:
                store.poller.start()
                log.info("starting from now: messages already in the dialogs are not forwarded")
            store.save()
            bridge = Bridge(client, bot_client, store, args, args.interval or cfg.poll_sec)
            stopped_by: list = []

            def on_signal(signum: int, frame: Any) -> None:
                stopped_by.append(signum)
                bridge.stop.set()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
            code = bridge.run()
            return bc.EXIT_INTERRUPTED if signal.SIGINT in stopped_by else code
        finally:
            for server in servers:
                server.stop()

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
