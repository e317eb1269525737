#!/usr/bin/env python3
"""Send one message into a Bitrix24 dialog -- for shell scripts.

Usage examples::

    python3 b24_send_message.py chat1771 "Your order has shipped"
    python3 b24_send_message.py 1771 Hello there          # words are joined by spaces
    echo "multi\\nline" | python3 b24_send_message.py chat1771 -
    python3 b24_send_message.py user9 "private note" --json
    python3 b24_send_message.py chat1771 --file invoice.pdf "Your invoice"
    python3 b24_send_message.py chat1771 --session transfer=queue3

Prints the new message id (one per line when a long text was split, or for each
file: the text is then the first file's caption).  ``--session`` performs one
operator action instead (take, skip, transfer, close, ...).  Into a
WhatsApp dialog whose 24-hour window is closed nothing is sent (``--force``
sends anyway); ``--wait-delivered`` waits for the portal's verdict and prints it.
Exit codes: 0 sent (or delivered), 1 the portal or network refused, 2 usage or
configuration mistake, 4 not delivered (or refused: the window is closed),
5 unconfirmed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, TextIO

import b24common as bc
import b24delivery as delivery
import b24files
import b24session


def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_send_message.py",
        description="Send a message into a Bitrix24 dialog (im.message.add) and print its id.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="dialogs: chatN (or just N) for a chat such as an Open Lines dialog, userN for a "
               "private dialog\n\nexamples:\n"
               "  b24_send_message.py chat1771 \"Your order has shipped\"\n"
               "  printf 'line 1\\nline 2\\n' | b24_send_message.py chat1771 -\n"
               "  b24_send_message.py --take chat1795 \"Hello, I'm looking into it\"\n"
               "\nTexts over %d characters are sent as several messages, split at paragraph, "
               "line or word boundaries." % bc.MESSAGE_MAX_CHARS)
    parser.add_argument("dialog", metavar="DIALOG", nargs="?", help="chatN, N or userN")
    parser.add_argument("text", metavar="TEXT", nargs="*",
                        help="the message; '-' or nothing (with piped input) reads stdin")
    parser.add_argument("--json", action="store_true",
                        help="print {\"dialog_id\", \"message_id\", \"message_ids\"} as JSON")
    parser.add_argument("--wait-delivered", nargs="?", type=float, const=0.0, default=None, metavar="SEC",
                        help="wait for the portal's verdict (default B24_DELIVERY_WAIT_SEC, 300 s) and print it: "
                             "delivered, not delivered: REASON, unconfirmed, or sent (no delivery reports); "
                             "exit 4 not delivered, 5 unconfirmed")
    parser.add_argument("--force", action="store_true",
                        help="send even when the WhatsApp 24-hour window is closed (the portal will then "
                             "report it not delivered)")
    parser.add_argument("--take", action="store_true",
                        help="if the dialog waits in your Open Lines queue, take it first "
                             "(imopenlines.operator.answer), then send")
    parser.add_argument("--file", action="append", default=[], metavar="PATH",
                        help="send this file (repeatable; each is one file message, TEXT is the first one's "
                             "caption; up to B24_MAX_FILE_MB, default 100)")
    parser.add_argument("--session", metavar="ACTION",
                        help="perform one operator action instead of sending: " + b24session.USAGE)
    bc.add_common_arguments(parser, quiet_help="print no message id; only errors, on stderr")
    args = parser.parse_intermixed_args(argv)       # DIALOG --file PATH TEXT: options between the words
    if args.dialog is None and not args.check:
        parser.error("the following arguments are required: DIALOG")
    if args.json and args.quiet:
        parser.error("--json and --quiet contradict each other")
    if args.wait_delivered is not None and not 0 <= args.wait_delivered <= 86400:
        parser.error("--wait-delivered: expected seconds from 1 to 86400")
    if args.session is not None:
        try:
            args.action = b24session.parse_action(args.session)
        except bc.UsageError as exc:
            parser.error(str(exc))
        if args.text or args.file or args.wait_delivered is not None:
            parser.error("--session performs an action: no TEXT, --file or --wait-delivered with it")
    return args


def check_window(client: bc.Client, dialog_id: str, force: bool) -> str:
    """Before sending into an Open Lines dialog: its connector ("" if unknown), after making sure its
    WhatsApp reply window is open -- a closed one refuses the send (exit 4) unless *force*."""
    if not dialog_id.startswith("chat"):
        return ""
    try:
        chat = bc.as_map(client.call("im.dialog.get", {"DIALOG_ID": dialog_id}))
    except bc.APIError:
        return ""                  # no access to read it: the send will say what is wrong
    window = delivery.window_of(chat)
    if window.closed() and not force:
        err = bc.B24Error("%s: the WhatsApp window is closed since %s (portal time, %s): nothing sent -- the "
                          "customer must write first (--force sends anyway; it will not be delivered)" % (
                              bc.display_dialog_id(dialog_id),
                              time.strftime("%Y-%m-%d %H:%M", time.localtime(window.closes_at)), window.why()))
        err.exit_code = bc.EXIT_NOT_DELIVERED
        raise err
    return bc.DialogInfo.from_chat(dialog_id, chat).connector


def wait_delivered(client: bc.Client, dialog_id: str, ids: list, connector: str, seconds: float) -> list:
    """The verdict on each sent part (``sent`` at once where the chat's connector reports nothing)."""
    if not delivery.reports_delivery(connector):
        return [delivery.Verdict(dialog_id, i, delivery.SENT) for i in ids]
    watch = delivery.DeliveryWatch(client, wait=seconds or client.config.delivery_wait)
    for i in ids:
        watch.add(dialog_id, i)
    verdicts: list = []
    while watch.busy():
        verdicts.extend(watch.check())
        if watch.busy():
            time.sleep(min(client.config.poll_sec, 1.0))
    return sorted(verdicts, key=lambda v: v.message_id)


def verdict_code(verdicts: list) -> tuple:
    """``(exit code, the worst verdict)`` of the parts."""
    rank = {delivery.FAILED: 3, delivery.REFUSED: 3, delivery.UNCONFIRMED: 2, delivery.SENT: 1, delivery.DELIVERED: 0}
    worst = max(verdicts, key=lambda v: rank[v.status])
    code = {3: bc.EXIT_NOT_DELIVERED, 2: bc.EXIT_UNCONFIRMED}.get(rank[worst.status], bc.EXIT_OK)
    return code, worst


def read_text(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.file and not args.text:
        return ""                  # files without a caption
    if args.text == ["-"] or not args.text:
        if not args.text and (stdin is None or stdin.isatty()):
            raise bc.UsageError("no text given: pass TEXT, or pipe it on stdin with '-'")
        try:
            data = stdin.read()
        except UnicodeDecodeError:
            raise bc.UsageError("stdin is not UTF-8 text") from None
    else:
        data = " ".join(args.text)
    if args.file and not data.strip():
        return ""
    return bc.check_text(data)


class Interrupted(bc.B24Error):
    """Ctrl-C or SIGTERM during a send: what was posted is known and said."""


def send_all(client: bc.Client, dialog_id: str, parts: list, take: bool, stop: list | None = None) -> list:
    """Send *parts* in order (texts, or ``(OutFile, caption)`` pairs); on failure say what failed and which
    parts went out.

    *stop* fills with a signal number when Ctrl-C or SIGTERM arrives: the part in flight is
    finished (and checked), no further part is sent, and :class:`Interrupted` says what was posted.
    """
    ids: list = []
    stop = [] if stop is None else stop
    for part in parts:
        if stop:
            break
        try:
            try:
                ids.append(send_part(client, dialog_id, part))
            except (bc.NotMemberError, FileRefused) as exc:
                if not take or ids or not isinstance(exc, bc.NotMemberError) and not exc.not_member:
                    raise
                # CANCELED means nothing was posted: take the dialog, then send once more
                bc.take_dialog(client, dialog_id)
                take = False
                ids.append(send_part(client, dialog_id, part))
        except bc.B24Error as exc:
            text = describe(exc, dialog_id)
            if ids:
                text += " (parts 1-%d of %d were sent as %s; the rest was not)" % (
                    len(ids), len(parts), ", ".join(map(str, ids)))
            err = bc.B24Error(text)
            err.exit_code = exc.exit_code       # the exit-code table holds: a missing scope is 2
            raise err from None
    if stop:
        name = "Ctrl-C" if stop[0] == signal.SIGINT else "SIGTERM"
        if ids:
            text = "interrupted by %s: %s posted as %s%s" % (
                name, "the message was" if len(parts) == 1 else "parts 1-%d of %d were" % (len(ids), len(parts)),
                ", ".join(map(str, ids)), "" if len(ids) == len(parts) else "; the rest was not sent")
        else:
            text = "interrupted by %s before anything was posted; nothing was sent" % name
        err = Interrupted(text)
        err.exit_code = 128 + stop[0]
        err.ids = ids
        raise err
    return ids


class FileRefused(bc.B24Error):
    """The portal refused a file; ``not_member`` when it is because we are not in the chat."""

    def __init__(self, text: str, not_member: bool):
        super().__init__(text)
        self.not_member = not_member


def send_part(client: bc.Client, dialog_id: str, part) -> int:
    """One text message, or one file message ``(OutFile, caption)``; its id."""
    if isinstance(part, str):
        return bc.send_text(client, dialog_id, part)
    f, caption = part
    try:
        return b24files.send_file(client, dialog_id, f, caption=caption)
    except bc.APIError as exc:
        if isinstance(exc, (bc.AuthError, bc.NotFoundError)) or exc.retryable:
            raise
        refused = FileRefused("%s: %s not sent: %s" % (bc.display_dialog_id(dialog_id), f.name, bc.format_error(exc)),
                              exc.code in ("ACCESS_ERROR", "ACCESS_DENIED", "CANCELED"))
        refused.exit_code = exc.exit_code
        raise refused from None


def describe(exc: BaseException, dialog_id: str) -> str:
    """One line for each failure a script user can meet."""
    shown = bc.display_dialog_id(dialog_id)
    if isinstance(exc, bc.NotMemberError):
        return ("%s: you are not a member of this chat (CANCELED) -- if it waits in your queue, take "
                "it (--take), or join the session, or have it assigned to you; a closed session "
                "needs the customer to write again" % shown)
    if isinstance(exc, bc.ScopeError):
        return "the webhook lacks the 'im' scope: add it to the incoming webhook in Bitrix24"
    if isinstance(exc, bc.AuthError):
        return ("the portal rejected the webhook (%s): it was revoked, or B24_WEBHOOK_BASE is wrong"
                % exc.code)
    if isinstance(exc, bc.NotFoundError) or (isinstance(exc, bc.APIError) and exc.code in (
            "CHAT_ID", "USER_NOT_FOUND", "DIALOG_ID_EMPTY")):
        return "%s: no such dialog (%s)" % (shown, exc.code)
    if isinstance(exc, bc.AccessDeniedError):
        return ("%s: no access (%s) -- ask to be assigned to this dialog or added to the line's "
                "queue" % (shown, exc.code))
    if isinstance(exc, bc.UnknownOutcomeError):
        return str(exc)
    if isinstance(exc, FileRefused):
        text = str(exc)
        return text + (" -- you are not a member of this chat (--take, or join the session)" if exc.not_member
                       else "")
    if isinstance(exc, (bc.ServerError, bc.TransportError, bc.RateLimitError)):
        return "%s: not sent: %s" % (shown, bc.what_came_back(exc))
    return bc.format_error(exc)


def check_files(doctor: bc.Doctor, environ: dict, client: bc.Client | None) -> None:
    """``--check``: which way files go."""
    if client is None:
        return
    try:
        route = b24files.file_route(client)
    except bc.B24Error as exc:
        doctor.warn("files: could not read the webhook's scopes (%s)" % bc.format_error(exc))
        return
    if route == "disk":
        doctor.ok("files: the Disk route (scope disk): im.disk.file.commit with a TEMPLATE_ID, safe to retry")
    else:
        doctor.ok("files: one call (im.v2.File.upload; no disk scope): a lost answer is settled by looking for "
                  "the file -- add the disk scope for the idempotent route")


def main(argv: list | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = _parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    out = out or sys.stdout
    bc.setup_logging(-1 if args.quiet else args.verbose, json_lines=args.log_json)

    def body() -> int:
        if args.check:
            return bc.run_doctor(args, extra=check_files)
        dialog_id = bc.parse_dialog_id(args.dialog)
        if (args.take or args.session) and not dialog_id.startswith("chat"):
            raise bc.UsageError("--%s works for Open Lines chats (chatN) only, not %s" % (
                "session" if args.session else "take", args.dialog))
        cfg = bc.load_config_from_args(args)
        client = bc.Client(cfg)
        if args.session:
            if args.take and args.action[0] != "answer":
                b24session.perform(client, dialog_id, "answer")
            line = b24session.perform(client, dialog_id, *args.action)
            if args.json:
                out.write(json.dumps({"dialog_id": bc.display_dialog_id(dialog_id), "session": args.action[0],
                                      "target": args.action[1] or None, "done": True}) + "\n")
            elif not args.quiet:
                out.write(line + "\n")
            out.flush()
            return bc.EXIT_OK
        files = [b24files.read_local(path, cfg.max_file_mb) for path in args.file]   # all, before anything goes
        text = read_text(args, stdin)
        if files:
            parts: list = [(f, text if i == 0 else "") for i, f in enumerate(files)]
        else:
            parts = bc.split_text(text)
        stop: list = []

        def on_signal(signum: int, frame: Any) -> None:
            if not stop:
                stop.append(signum)    # the send in flight is finished and checked first
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        try:
            connector = check_window(client, dialog_id, args.force)
        except bc.B24Error as exc:
            if args.json and exc.exit_code == bc.EXIT_NOT_DELIVERED:
                out.write(json.dumps({"dialog_id": bc.display_dialog_id(dialog_id), "message_ids": [],
                                      "message_id": None, "delivery": delivery.REFUSED, "reason": str(exc)}) + "\n")
                out.flush()
            raise
        try:
            ids = send_all(client, dialog_id, parts, args.take, stop)
        except Interrupted as exc:
            if exc.ids and not args.quiet:
                out.write("".join("%d\n" % i for i in exc.ids))
                out.flush()
            raise
        code, worst = bc.EXIT_OK, None
        if not args.json and not args.quiet:
            out.write("".join("%d\n" % i for i in ids))
            out.flush()
        if args.wait_delivered is not None:
            code, worst = verdict_code(wait_delivered(client, dialog_id, ids, connector, args.wait_delivered))
            if not args.json and not args.quiet:
                out.write(worst.describe() + "\n")
        if args.json:
            doc = {"dialog_id": bc.display_dialog_id(dialog_id), "message_ids": ids, "message_id": ids[0]}
            if worst is not None:
                doc.update(delivery=worst.status, reason=worst.reason or None)
            out.write(json.dumps(doc) + "\n")
        out.flush()
        return code

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
