#!/usr/bin/env python3
"""Print new Bitrix24 Open Lines (WhatsApp) messages as they arrive -- receive only.

Usage examples::

    python3 b24_openlines_reader.py                   # customer messages from now on
    python3 b24_openlines_reader.py --all             # also operators, bots, system notes
    python3 b24_openlines_reader.py --since-minutes 30
    python3 b24_openlines_reader.py --json | jq .text
    python3 b24_openlines_reader.py --state --once    # for cron: resume, one cycle, exit
    python3 b24_openlines_reader.py --demo            # no portal needed

Settings come from the environment or ``.env``: ``B24_WEBHOOK_BASE``
(required, secret) and ``B24_POLL_SEC`` (default 2).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, TextIO

import b24common as bc
import b24delivery as delivery
import b24push as push

log = logging.getLogger("b24_openlines_reader")

IDLE_SAVE_SEC = 60.0     # an idle reader's state file is rewritten at most this often


class PollerStore:
    """Binds a :class:`Poller` to a :class:`StateFile` for one portal and user.

    A state file written for another portal or user is refused.  :meth:`save`
    with ``idle=True`` writes at most once a minute: then only the scan
    watermark moved, and an older one merely makes a restart read further.
    """

    def __init__(self, poller: bc.Poller, state: bc.StateFile, host: str):
        self.poller, self.state, self.host = poller, state, host
        self.saved_at = 0.0
        self.failing = False
        self.lock = threading.Lock()
        self.positions: Callable[[], dict] | None = None   # the sources' positions, saved alongside
        self.saved_sources: dict = {}

    def load(self) -> None:
        saved = self.state.load()
        owner = (saved.get("portal"), saved.get("user_id"))
        if owner[0] is not None and owner != (self.host, self.poller.self_id):
            raise bc.ConfigError("%s: this state file belongs to user %s on %s, not to user %s on %s: use "
                              "another state file, or delete this one to start from now"
                              % (self.state.path, owner[1], owner[0], self.poller.self_id, self.host))
        self.poller.load_state(saved)
        self.saved_sources = bc.as_map(saved.get("sources"))

    def save(self, *, idle: bool = False) -> None:
        """Write the state; a failed write (disk full) is reported once and tried again next time --
        the cursors in memory are still right, and an older file only makes a restart read more."""
        with self.lock:
            if idle and time.monotonic() - self.saved_at < IDLE_SAVE_SEC:
                return
            doc = self.poller.to_state()
            doc.update(portal=self.host, user_id=self.poller.self_id)
            if self.positions is not None:
                doc["sources"] = self.positions()
            try:
                self.state.save(doc)
            except bc.StateWriteError as exc:
                if not self.failing:
                    log.error("%s; trying again at the next message", exc)
                self.failing = True
                return
            if self.failing:
                log.info("%s: the state is written again", self.state.path)
            self.failing = False
            self.saved_at = time.monotonic()




def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_openlines_reader.py",
        description="Print new Bitrix24 Open Lines messages as they arrive (receive only). "
                    "By default only customer messages, starting from now.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  b24_openlines_reader.py                      customer messages from now on\n"
               "  b24_openlines_reader.py --all --since-minutes 60\n"
               "  b24_openlines_reader.py --json | jq -r .text\n"
               "  b24_openlines_reader.py --state --once       (cron: resume, one cycle)\n"
               "  b24_openlines_reader.py --demo               (built-in emulator, no portal)\n"
               "\nsettings: B24_WEBHOOK_BASE (required), B24_POLL_SEC (default 2), B24_STATE_DIR")
    parser.add_argument("--all", action="store_true",
                        help="also print operator, own, bot and system messages (marked as such)")
    parser.add_argument("--json", action="store_true", help="one JSON object per message per line")
    parser.add_argument("--all-senders", action="store_true",
                        help="report the delivery of operators' messages too (not only your own)")
    parser.add_argument("--once", action="store_true", help="one poll cycle, then exit")
    parser.add_argument("--since-minutes", type=float, metavar="N",
                        help="first print what arrived in the last N minutes")
    parser.add_argument("--replay", type=int, metavar="N",
                        help="first print the last N messages of each dialog")
    parser.add_argument("--state", nargs="?", const="", metavar="FILE",
                        help="resume after the last printed message across restarts; FILE defaults "
                             "to reader.json in $B24_STATE_DIR (or the XDG state folder)")
    parser.add_argument("--demo", action="store_true",
                        help="run against a built-in emulator with simulated customers")
    bc.add_common_arguments(parser, poll=True)
    args = parser.parse_args(argv)
    if args.since_minutes is not None and not (0 < args.since_minutes <= 7 * 24 * 60):
        parser.error("--since-minutes: expected a number of minutes from 0 to 10080")
    if args.replay is not None and not (0 < args.replay <= 1000):
        parser.error("--replay: expected a count from 1 to 1000")
    return args


def _when(msg: bc.Message) -> str:
    ts = msg.timestamp
    if ts is None:
        return msg.date
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _who(msg: bc.Message) -> str:
    kind = msg.author_kind
    if kind == "customer":
        return bc.visible(" ".join(x for x in (msg.author_name, msg.customer_phone) if x))
    if kind == "system":
        return "system"
    if kind == "self":
        return "you (%s)" % bc.visible(msg.author_name)
    return "%s %s" % (kind, bc.visible(msg.author_name))


def format_message(msg: bc.Message) -> str:
    """``[chatN] text -- who, when``; continuation lines indented under the text."""
    tag = "[NEW DIALOG %s]" % bc.display_dialog_id(msg.dialog_id) if msg.new_dialog else \
        "[%s]" % bc.display_dialog_id(msg.dialog_id)
    lines = bc.visible((msg.display_text or "").replace("\r\n", "\n")).split("\n") or [""]
    pad = " " * (len(tag) + 1)
    head = "%s %s  -- %s, %s" % (tag, lines[0], _who(msg), _when(msg))
    return "\n".join([head] + [pad + line for line in lines[1:]])


class Reader:
    """The reader's loop: poll, print, remember."""

    def __init__(self, client: bc.Client, args: argparse.Namespace, out: TextIO, interval: float,
                 state: bc.StateFile | None = None):
        self.client, self.args, self.out, self.interval = client, args, out, interval
        self.state = state
        self.stop = threading.Event()
        self.watch = delivery.DeliveryWatch(client)
        self.poller: bc.Poller | None = None
        self.store: PollerStore | None = None
        self.pending_new: set = set()
        self.started = time.monotonic()
        self.progress_shown = False

    def banner(self) -> None:
        me = self.client.whoami()
        log.info("signed in as %s (id %s) on %s; polling every %g s",
                 me["name"], me["id"], self.client.host, self.interval)
        if "imopenlines" in bc.check_scopes(self.client):
            report_queues(self.client, me["id"])

    def make_poller(self, me: int) -> bc.Poller:
        poller = bc.Poller(self.client, self_id=me, in_order=True)
        if self.state is not None:
            self.store = PollerStore(poller, self.state, self.client.host)
            self.store.load()
        if not poller.started:
            poller.start()
        if self.args.since_minutes or self.args.replay:
            since = None
            if self.args.since_minutes:
                since = _dt.datetime.now().timestamp() - self.args.since_minutes * 60
            poller.rewind(since=since, count=self.args.replay, progress=self.progress)
            if self.progress_shown:
                sys.stderr.write("\n")
        return poller

    def progress(self, done: int, total: int) -> None:
        """On a terminal, a replay that takes more than a few seconds shows how far it got."""
        if not sys.stderr.isatty() or time.monotonic() - self.started < 2:
            return
        sys.stderr.write("\rreading history: %d of %d dialogs" % (done, total))
        sys.stderr.flush()
        self.progress_shown = True

    def emit(self, msg: bc.Message) -> None:
        # "new dialog" belongs to the first message shown, which may follow hidden ones
        if msg.new_dialog:
            self.pending_new.add(msg.dialog_id)
        if self.args.all or msg.author_kind == "customer":
            if msg.dialog_id in self.pending_new:
                self.pending_new.discard(msg.dialog_id)
                msg.new_dialog = True
            if self.args.json:
                line = json.dumps(msg.to_json(), ensure_ascii=False)
            else:
                line = format_message(msg)
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except BrokenPipeError:
                raise
            except OSError as exc:      # a full disk, an I/O error: one line, and it was not printed
                raise bc.B24Error("cannot write the output (%s): %s #%d and what follows was not printed"
                                  % (exc.strerror or exc, bc.display_dialog_id(msg.dialog_id), msg.id)) from None

    def follow(self, msg: bc.Message) -> None:
        """Your own messages (and with --all-senders, operators') in Open Lines chats are followed until the
        portal says whether they reached the customer."""
        kinds = ("self", "operator") if self.args.all_senders else ("self",)
        info = self.poller.dialogs.get(msg.dialog_id) if self.poller is not None else None
        if msg.author_kind in kinds and info is not None and delivery.reports_delivery(info.connector):
            self.watch.add(msg.dialog_id, msg.id)

    def report_deliveries(self) -> None:
        """``{"type": "delivery", ...}`` lines (--json: every verdict), or ``[chatN] ! not delivered: ...``."""
        for v in self.watch.check():
            if self.args.json:
                line = json.dumps({"type": "delivery", "dialog_id": bc.display_dialog_id(v.dialog_id),
                                   "message_id": v.message_id, "status": v.status, "reason": v.reason or None})
            elif v.status in (delivery.DELIVERED, delivery.SENT):
                continue
            else:
                line = "[%s] ! %s  -- message %d" % (bc.display_dialog_id(v.dialog_id), bc.visible(v.describe()),
                                                     v.message_id)
            self.out.write(line + "\n")
            self.out.flush()

    def cycle(self, batches: list | None = None) -> bool:
        """One round: a scan (*batches* None), or what the sources' batches point at."""
        assert self.poller is not None
        hints = None if batches is None else push.hints_of(batches)
        msgs = self.poller.poll(auto_ack=self.store is None, hints=hints)
        if self.watch.busy():
            self.report_deliveries()
        for msg in msgs:
            self.follow(msg)
            self.emit(msg)
            if self.store is not None:
                self.poller.ack(msg)
                self.store.save()
        if self.store is not None and not msgs:
            self.store.save(idle=True)
        return True

    def run(self) -> int:
        me = self.client.whoami()["id"]
        self.banner()
        self.poller = self.make_poller(me)
        if self.store is not None:
            self.store.save()
        if not self.args.once:
            log.info("watching %d Open Lines dialog(s); new messages appear below",
                     sum(1 for d in self.poller.dialogs.values() if d.is_lines))
        if self.args.once:
            self.cycle()
        else:
            self.listen(me)
        if self.store is not None:
            self.store.save()       # leaving (--once, SIGTERM): keep the newest watermark
        return bc.EXIT_OK

    def listen(self, me: int) -> None:
        """Until stopped: the sources B24_SOURCE / B24_LISTEN choose, through the poller."""
        assert self.poller is not None
        spool = ":memory:"
        if self.state is not None and self.client.config.listen:
            spool = os.path.join(os.path.dirname(os.path.abspath(self.state.path)),
                                 "reader-receiver-%d.sqlite" % self.client.config.listen[1])
        sources = push.choose_sources(self.client, self_id=me, interval=self.interval, spool_path=spool,
                                    waiting=self.poller.has_waiting)
        inbound = push.Inbound(sources)
        if self.store is not None:
            inbound.restore(self.store.saved_sources)
            self.store.positions = inbound.positions
        inbound.start()
        try:
            push.run_sources(inbound, self.cycle, stop=self.stop, interval=self.interval,
                             backoff_max=self.client.config.backoff_max,
                           on_done=self.store.save if self.store is not None else None)
        finally:
            inbound.close()


def report_queues(client: bc.Client, me: int) -> None:
    """Log, per Open Line, whether the webhook user is in its queue; warn if in none."""
    try:
        lines = bc.line_queues(client, me)
    except bc.APIError as exc:
        log.warning("cannot read the Open Lines queues: %s", exc)
        return
    for lid, name, inside in lines:
        log.info("line %s %r: %s", lid, name, "you are in its queue" if inside else "not in its queue")
    if not any(inside for _l, _n, inside in lines):
        log.warning("you are in no Open Lines queue: only dialogs you joined are visible -- add "
                    "this user to the line's queue, or Join the chat in Bitrix24")


def main(argv: list | None = None, out: TextIO | None = None) -> int:
    args = _parse_args(argv)
    out = out or sys.stdout
    bc.setup_logging(-1 if args.quiet else args.verbose, json_lines=args.log_json)

    def check_state(doctor: bc.Doctor, environ: dict, client: bc.Client | None) -> None:
        if client is not None:
            doctor.receiver_token(client.config)
        if args.state is not None:
            folder = os.path.dirname(os.path.abspath(args.state)) if args.state else bc.default_state_dir(environ)
            doctor.state_dir(folder)

    def body() -> int:
        if args.check:
            return bc.run_doctor(args, extra=check_state)
        environ, demo = bc.environment_or_demo(args)
        server = None
        if demo:
            server = bc.start_demo_portal(environ, interval=3.0)
            log.info("demo: a built-in emulator stands in for the portal; simulated customers write "
                     "every few seconds (Ctrl-C to stop)")
        try:
            cfg = bc.Config.from_env(environ)
            interval = args.interval or cfg.poll_sec
            state = None
            if args.state is not None:
                path = args.state or os.path.join(bc.default_state_dir(environ), "reader.json")
                bc.private_folder(os.path.dirname(os.path.abspath(path)))
                state = bc.StateFile(path)
                state.load()   # a broken state file is reported before anything else
            reader = Reader(bc.Client(cfg), args, out, interval, state)
            signal.signal(signal.SIGTERM, lambda *_: reader.stop.set())
            return reader.run()
        finally:
            if server is not None:
                server.stop()

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
