#!/usr/bin/env python3
"""Hand every inbound Open Lines (WhatsApp) customer message to your bot; post its answer back.

Usage examples::

    python3 b24_ol_bridge.py                 # with BOT_HTTP_URL and B24_WEBHOOK_BASE set
    python3 b24_ol_bridge.py --take          # also take dialogs waiting in the queue to answer them
    python3 b24_ol_bridge.py --replay-dead   # re-deliver the dead letters, then run as usual
    python3 b24_ol_bridge.py --demo          # built-in emulator + echo bot, no portal needed

For each customer message the bot gets one JSON POST (``BOT_HTTP_URL``, with
``Authorization: $BOT_HTTP_AUTH`` when set)::

    {"platform": "bitrix24", "direction": "inbound", "dialog_id": "chat1778",
     "sender": "chat1778", "message_id": 88213, "event_id": "...", "attempt": 1,
     "text": "hello", "attachments": [], "session_id": 3310, "new_dialog": false,
     "customer_phone": "+1...", "customer_name": "...", "metadata": {...}, ...}

and may answer ``{"reply_text": ...}``, ``{"response": ...}``, ``{"text": ...}``,
``{"replies": [...]}``, ``{"messages": [...]}``, Rasa's list, a string,
nothing, or ``{"handoff": true}``.

What it promises: messages of one dialog are handled in order, dialogs side
by side; a message is written to the state database before the portal's
cursor moves past it; the bot's answer is written there before any of it is
posted, and each part carries its own ``TEMPLATE_ID``, so a restart posts the
rest of the *same* answer and never a part twice.  A bot outage is waited out
(``BRIDGE_RETRY_HOURS``); what cannot be delivered goes to the dead-letter
file, from which ``--replay-dead`` re-delivers it.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Mapping

import b24common as bc
from olbridge import chatbot
from olbridge.bot import BotClient
from olbridge.bridge import Bridge, StatePaths, all_bots
from olbridge.health import HealthServer, sd_notify
from olbridge.settings import Settings
from olbridge.store import DeadLetters, InstanceLock, Store

log = logging.getLogger("b24_ol_bridge")


def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_ol_bridge.py",
        description="Forward inbound Open Lines customer messages to your bot over HTTP and post its "
                    "replies back into Bitrix24.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  b24_ol_bridge.py                  run (settings from .env / the environment)\n"
               "  b24_ol_bridge.py --take           take queued dialogs so the bot can answer them\n"
               "  b24_ol_bridge.py --replay-dead    re-deliver dead letters, then run\n"
               "  b24_ol_bridge.py --demo           built-in emulator and echo bot, no portal\n"
               "\nsettings: B24_WEBHOOK_BASE, BOT_HTTP_URL (required); BOT_HTTP_AUTH, "
               "BOT_HTTP_TIMEOUT_SEC (120),\nBOT_MAX_REPLY_BYTES (1 MiB), BRIDGE_RETRY_HOURS (24), "
               "BRIDGE_FALLBACK_TEXT, BRIDGE_MAX_REPLY_CHARS (4096),\nBRIDGE_FORGET_DAYS (7), "
               "B24_BUSINESS_PHONE, B24_POLL_SEC (2), B24_STATE_DIR,\nB24_SOURCE (auto|poll|events), "
               "B24_RECONCILE_SEC (60), B24_LISTEN, B24_APP_TOKEN,\nBRIDGE_BOT_NAME, BRIDGE_BOT_TIME (0), "
               "BRIDGE_BOT_CODE")
    parser.add_argument("--take", action="store_true",
                        help="when a dialog waits in the queue, take it (imopenlines.operator.answer) "
                             "so the reply can be posted")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="dialogs handled side by side (default: BRIDGE_MAX_CONCURRENCY or 8)")
    parser.add_argument("--state", metavar="FILE",
                        help="state database (default: bridge.db in $B24_STATE_DIR, systemd's "
                             "$STATE_DIRECTORY, or the XDG state folder)")
    parser.add_argument("--replay-dead", action="store_true",
                        help="put the dead letters back in line (all, or those of --dialog), then run")
    parser.add_argument("--dialog", metavar="chatN", help="with --replay-dead: only this dialog's")
    parser.add_argument("--reset-state", action="store_true",
                        help="start over from now: the state database is moved aside (kept as "
                             "bridge.db.reset-TIME), then the bridge runs")
    parser.add_argument("--paused", action="store_true",
                        help="list the dialogs the bot stays out of (a person wrote there, or the bot handed "
                             "over), then exit")
    parser.add_argument("--resume", metavar="chatN",
                        help="let the bot answer in this dialog again (lift its pause or hand-over), then exit")
    parser.add_argument("--once", action="store_true",
                        help="one poll cycle, handle what is ready, exit (retries wait for the next run)")
    parser.add_argument("--demo", action="store_true",
                        help="run against a built-in emulator and echo bot with simulated customers")
    parser.add_argument("--register-bot", metavar="URL", nargs="?", const="",
                        help="register the bridge as an Open Lines chat bot (Chatbots 2.0: its events wait on "
                             "the portal, no public URL needed), then exit; with URL, the legacy bot whose events "
                             "are POSTed to URL (the public https:// address of B24_LISTEN's receiver)")
    parser.add_argument("--attach-bot", metavar="LINE", type=_line_id,
                        help="make the registered chat bot the chat bot of Open Line LINE (every new conversation, "
                             "kept until it hands over: BRIDGE_BOT_TIME, default 0 = no limit), then exit")
    parser.add_argument("--unregister-bot", action="store_true",
                        help="remove the chat bot registered with --register-bot, then exit")
    bc.add_common_arguments(parser, poll=True)
    args = parser.parse_args(argv)
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers: expected 1 to 64")
    if sum((args.register_bot is not None, args.unregister_bot, args.attach_bot is not None)) > 1:
        parser.error("--register-bot, --attach-bot and --unregister-bot: one at a time")
    if args.dialog and not args.replay_dead:
        parser.error("--dialog goes with --replay-dead")
    for name in ("dialog", "resume"):
        if getattr(args, name):
            try:
                setattr(args, name, bc.parse_dialog_id(getattr(args, name)))
            except bc.UsageError as exc:
                parser.error("--%s: %s" % (name, exc))
    return args


def _line_id(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError("expected the number of an Open Line (b24_ol_bridge.py --check lists them)")
    return int(text)


def bot_command_given(args: argparse.Namespace) -> bool:
    return args.register_bot is not None or args.unregister_bot or args.attach_bot is not None


def replay_dead(store: Store, dead: DeadLetters, dialog: str | None) -> set:
    """Put the dead letters (of one dialog) back in line; the dialogs they belong to."""
    entries = dead.take(dialog)
    for entry in entries:
        store.requeue(entry)
    log.info("put %d dead letter(s)%s back in line", len(entries),
             " of %s" % bc.display_dialog_id(dialog) if dialog else "")
    return {entry["dialog"] for entry in entries}


def check(args: argparse.Namespace) -> int:
    """``--check``: the shared portal checks, then the state folder, the chat bot and the bots."""
    def extra(doctor: bc.Doctor, environ: dict, client: bc.Client | None) -> None:
        try:
            cfg = bc.Config.from_env(environ, require_bot=True)
            settings = Settings(environ)
        except bc.ConfigError as exc:
            doctor.fail("bridge settings: %s" % exc, "fix the setting")
            return
        doctor.ok("bridge settings: retry for %g h, replies up to %d characters%s" % (
            settings.retry_hours, settings.max_chars,
            ", health on %s:%d" % settings.http_listen if settings.http_listen else ""))
        paths = StatePaths(args, environ)
        doctor.state_dir(os.path.dirname(os.path.abspath(paths.db)))
        try:
            reg = chatbot.load_chat_bot(paths.folder, cfg.portal_host)
        except bc.ConfigError as exc:
            doctor.fail(str(exc), "run --register-bot again")
            reg = None
        if reg and chatbot.is_fetch(reg):
            doctor.ok("chat bot %s registered (Chatbots 2.0, fetch mode): replies go as the bot, its events are "
                      "fetched from the portal" % reg["bot_id"])
        elif reg:
            doctor.ok("chat bot %s registered; replies go as the bot, its events to %s" % (
                reg["bot_id"], bc.split_url(str(reg.get("url") or "http://unknown/"), "url", "").hostname))
            if not cfg.listen:
                doctor.warn("a chat bot is registered but B24_LISTEN is not set: its events are not heard "
                            "(the scan still finds what the webhook user can see); b24_ol_bridge.py "
                            "--register-bot (no URL) moves it to fetch mode")
        if reg and client is not None:
            check_lines(doctor, client, reg)
        doctor.receiver_token(cfg, chat_bot=bool(reg) and not chatbot.is_fetch(reg))
        check_bots(doctor, cfg)
    return bc.run_doctor(args, require_bot=True, extra=extra)


def check_lines(doctor: bc.Doctor, client: bc.Client, reg: Mapping) -> None:
    """Each line's chat bot settings; a warning where ours loses its chats after a time."""
    try:
        rows = chatbot.lines_with_settings(client)
    except bc.B24Error as exc:
        doctor.warn("the lines' chat bot settings could not be read (%s)" % bc.format_error(exc))
        return
    bot_id = bc.as_int(reg["bot_id"])
    ours = False
    for row in rows:
        text, warn = chatbot.describe_line(row, bot_id)
        ours = ours or "(ours)" in text
        if warn:
            doctor.warn(warn)
        else:
            doctor.ok(text)
    if not ours:
        doctor.warn("our chat bot %d is the chat bot of no line: b24_ol_bridge.py --attach-bot LINE" % bot_id)


def check_bots(doctor: bc.Doctor, cfg: bc.Config) -> None:
    """Each bot answers a probe; with BOT_HTTP_SECRET, refuses a wrong signature."""
    for what, bot in all_bots(cfg):
        if bot.insecure_remote:
            doctor.warn("bot (%s): plain http:// to %s -- the token and messages cross the network "
                        "unencrypted" % (what, bot.host))
        status, text = bot.probe()
        if status is None:
            doctor.fail("bot: %s" % text, "check %s and that the bot is running" % what.split(" line")[0])
            continue
        if status in (401, 403):
            doctor.fail("bot on %s answers HTTP %d to a probe" % (bot.host, status), "check BOT_HTTP_AUTH")
            continue
        if status >= 500:
            doctor.fail("bot on %s answers HTTP %d to a probe" % (bot.host, status), "look at the bot's logs")
            continue
        doctor.ok("bot on %s (%s) answers (HTTP %d to a GET probe)" % (bot.host, what, status))
        if cfg.bot_secret:
            status, text = bot.probe_signature()
            if status in (401, 403):
                doctor.ok("bot on %s refuses a request with a wrong signature (HTTP %d)" % (bot.host, status))
            else:
                doctor.warn("bot on %s accepted a request with a wrong signature (%s): does it check "
                            "X-B24-Signature with BOT_HTTP_SECRET?" % (bot.host, status or text))


def start_demo(environ: dict, args: argparse.Namespace) -> tuple:
    """``--demo``: an emulator for the portal, an echo bot, state in a throwaway folder.
    Returns ``(servers to stop, folder to remove)``."""
    import mock_bot_server
    bot_server = mock_bot_server.BotServer().start()
    servers = [bc.start_demo_portal(environ), bot_server]
    environ["BOT_HTTP_URL"] = bot_server.url
    environ.pop("BOT_HTTP_AUTH", None)
    # the demo keeps its state in a throwaway folder, never in B24_STATE_DIR
    scratch = tempfile.mkdtemp(prefix="b24-bridge-demo-")
    args.state = os.path.join(scratch, "bridge.db")
    args.demo = args.take = True
    log.info("demo: an emulator stands in for the portal and an echo bot for yours; simulated "
             "customers write every few seconds and get answers (Ctrl-C to stop)")
    return servers, scratch


def run_bridge(args: argparse.Namespace, environ: dict, demo: bool) -> int:
    """The daemon: one bridge per state, signals, the health listener, then the loop."""
    managing = bot_command_given(args)
    cfg = bc.Config.from_env(environ, require_bot=not managing)
    settings = Settings(environ)
    client = bc.Client(cfg)
    client.share_batches = True     # the scan, the reads, the replies and the delivery checks share requests
    paths = StatePaths(args, environ)
    bc.private_folder(os.path.dirname(os.path.abspath(paths.db)))
    if managing:
        return chatbot.bot_command(args, client, paths.folder, environ)
    log.info("b24_ol_bridge %s: settings from %s; state in %s", bc.VERSION,
             getattr(args, "env_file_used", None) or "the environment", paths.db)
    lock = InstanceLock(paths.lock)
    lock.acquire()
    if args.reset_state:
        aside = Store.set_aside(paths.db)
        log.warning("--reset-state: %s; the bridge starts from now", "the old state is kept as %s" % aside
                    if aside else "there was no state to set aside")
    bridge = Bridge(client, args, settings, environ=os.environ if not demo else environ, demo=bool(args.demo))
    stopped_by: list = []

    def on_signal(signum: int, frame: Any) -> None:
        stopped_by.append(signum)
        bridge.stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        bridge.reload_requested = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    http = None
    try:
        if settings.http_listen:
            try:
                http = HealthServer(settings.http_listen, bridge).start()
            except OSError as exc:
                raise bc.ConfigError("BRIDGE_HTTP_LISTEN=%s:%d: cannot listen (%s)" % (
                    settings.http_listen + (exc.strerror or exc,))) from None
            log.info("health and metrics on http://%s:%d/healthz and /metrics", *settings.http_listen)
        # systemd hears READY at once: from here on, outages are waited out, not fatal
        sd_notify(READY=1, STATUS="starting: signing in to %s" % client.host)
        bridge.watchdog.start()
        bridge.open(paths, BotClient(cfg) if cfg.bot_url else None)
        if args.replay_dead:
            replayed = replay_dead(bridge.shared.store, bridge.shared.dead, args.dialog)
            if args.once:           # only what was put back: nothing new is read, no other dialog answered
                bridge.only = replayed
        code = bridge.run()
        return bc.EXIT_INTERRUPTED if signal.SIGINT in stopped_by else code
    except (KeyboardInterrupt, bc.Interrupted):
        sd_notify(STOPPING=1, STATUS="stopping")
        log.info("stopped while starting")
        return bc.EXIT_INTERRUPTED if signal.SIGINT in stopped_by else bc.EXIT_OK
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        lock.release()


def pause_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``--paused`` / ``--resume chatN``: read or change the state database (a running bridge is told)."""
    paths = StatePaths(args, environ)
    if not os.path.exists(paths.db):
        raise bc.ConfigError("%s: no state database here (the bridge has not run with this --state / "
                             "B24_STATE_DIR)" % paths.db)
    store = Store(paths.db)
    if args.resume:
        if not store.resume(args.resume):
            print("%s: the bot is not paused there" % bc.display_dialog_id(args.resume))
            return bc.EXIT_OK
        holder = InstanceLock(paths.lock).holder()
        if holder:
            os.kill(holder, signal.SIGHUP)          # the running bridge takes it from the store
        print("%s: the bot answers again%s" % (bc.display_dialog_id(args.resume),
                                              " (told the running bridge, pid %d)" % holder if holder else ""))
        return bc.EXIT_OK
    paused, handed = store.pauses()
    now = time.time()
    rows = sorted(set(d for d, (until, _s, _h) in paused.items() if until > now) | set(handed))
    for dialog in rows:
        until = paused.get(dialog, (0, 0, 0))[0]
        why = ["a person wrote; paused until %s" % time.strftime("%Y-%m-%d %H:%M", time.localtime(until))
               ] if until > now else []
        why += ["handed over to a person (session %s)" % handed[dialog]] if dialog in handed else []
        print("%-12s %s" % (bc.display_dialog_id(dialog), "; ".join(why)))
    if not rows:
        print("the bot is paused in no dialog")
    return bc.EXIT_OK


def main(argv: list | None = None) -> int:
    args = _parse_args(argv)
    bc.setup_logging(-1 if args.quiet else args.verbose, json_lines=args.log_json)

    def body() -> int:
        if args.check:
            return check(args)
        if args.paused or args.resume:
            environ = dict(os.environ)
            bc.apply_env_file(args, environ)
            return pause_command(args, environ)
        environ, demo = bc.environment_or_demo(args)
        servers, scratch = start_demo(environ, args) if demo else ([], None)
        try:
            return run_bridge(args, environ, demo)
        finally:
            for server in servers:
                server.stop()
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
