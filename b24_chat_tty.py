#!/usr/bin/env python3
"""Chat in one Bitrix24 dialog from the terminal: type to send, replies appear as they come.

Usage examples::

    python3 b24_chat_tty.py                # pick one of your recent Open Lines dialogs
    python3 b24_chat_tty.py chat1778       # or go straight to a dialog (1778 works too)
    python3 b24_chat_tty.py user9          # a private dialog
    python3 b24_chat_tty.py chat1778 --history 50 --no-bell

Commands inside the chat: /help /who /status /history N /more /multi /file /save
/answer /skip /transfer /close /spam /intercept /join /switch /quit.
New messages appear while you type without disturbing the line you are
editing. Settings: ``B24_WEBHOOK_BASE`` (required), ``B24_POLL_SEC`` (default 2).
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import logging
import os
import shlex
import signal
import sys
import termios
import threading
import time
from typing import Any, Callable, Mapping, TextIO

import b24common as bc
import b24delivery as delivery
import b24files
import b24session

try:
    import readline
except ImportError:  # pragma: no cover - Python built without readline
    readline = None  # type: ignore[assignment]

log = logging.getLogger("b24_chat_tty")

PROMPT = "> "
MULTI_PROMPT = ". "
HISTORY_LENGTH = 1000
COMMANDS = [
    ("/help", "this list"),
    ("/who", "the customer (name, phone) and who else is in the dialog"),
    ("/history N", "show the last N messages again (default 20)"),
    ("/more", "older messages, a page at a time"),
    ("/multi", "write several lines; a line with only '.' sends, Ctrl-D cancels"),
    ("/status", "the session: waiting, whose it is, the WhatsApp window"),
    ("/file PATH [caption]", "send a file (a photo, a PDF...) with an optional caption"),
    ("/save N [DIR]", "download file #N shown in the chat (into DIR, default here)"),
    ("/answer", "take this dialog (from the queue), so you can write in it (/take too)"),
    ("/skip", "pass it to the next operator in the queue"),
    ("/transfer X", "hand it to user X (a number) or to queueN (the queue of line N)"),
    ("/close", "finish the session (someone else's too, where your permissions allow)"),
    ("/spam", "mark the conversation as spam (it is closed)"),
    ("/intercept", "take it over from the operator who has it"),
    ("/join", "join the conversation; its operator stays"),
    ("//text", "send a message that starts with a slash (/text)"),
    ("/switch", "back to the list of dialogs"),
    ("/quit", "leave (Ctrl-D too; Ctrl-C on an empty line)"),
]
COLORS = {"customer": "32", "self": "36", "operator": "33", "bot": "35", "system": "2",
          "note": "2", "error": "31", "title": "1"}


class DialogReader:
    """Reads one dialog: newest N, older pages (``LAST_ID``), new ones (``FIRST_ID``)."""

    def __init__(self, client: bc.Client, dialog_id: str, *, self_id: int):
        self.client = client
        self.dialog_id = dialog_id
        self.factory = bc.MessageFactory(self_id)
        self.info = bc.DialogInfo(dialog_id, is_lines=dialog_id.startswith("chat"))
        self.cursor = 0

    def load_info(self) -> bc.DialogInfo:
        """``im.dialog.get`` -> title (the other person's name for a private dialog), line, customer."""
        chat = bc.as_map(self.client.call("im.dialog.get", {"DIALOG_ID": self.dialog_id}))
        self.info = bc.DialogInfo.from_chat(self.dialog_id, chat)
        return self.info

    def _get(self, params: dict) -> list:
        params = dict(params, DIALOG_ID=self.dialog_id)
        msgs, users, files = bc.messages_of(self.client.call("im.dialog.messages.get", params))
        self.factory.learn(users, self.info, files)
        msgs.sort(key=lambda m: bc.as_int(m.get("id")))
        return [self.factory.make(m, self.dialog_id, self.info) for m in msgs]

    def newest(self, count: int) -> list:
        """The newest *count* messages, oldest first; moves the cursor to the newest."""
        out: list = []
        last = 0
        while len(out) < count:
            want = min(bc.MESSAGES_PAGE, count - len(out))
            page = self._get({"LAST_ID": last, "LIMIT": want})
            if not page:
                break
            out = page + out
            last = page[0].id
            if len(page) < want:
                break
        out = out[-count:] if count else []
        if out:
            self.cursor = max(self.cursor, out[-1].id)
        elif not self.cursor:
            latest = self._get({"LAST_ID": 0, "LIMIT": 1})
            self.cursor = latest[-1].id if latest else 0
        return out

    def older(self, before_id: int, count: int) -> list:
        """Up to *count* messages older than *before_id*, oldest first."""
        out: list = []
        while len(out) < count and before_id > 0:
            page = self._get({"LAST_ID": before_id, "LIMIT": min(bc.MESSAGES_PAGE, count - len(out))})
            if not page:
                break
            out = page + out
            before_id = page[0].id
        return out[-count:]

    def new(self) -> list:
        """Messages after the cursor, oldest first, all of them (pages of 50)."""
        out: list = []
        while True:
            page = [m for m in self._get({"FIRST_ID": self.cursor, "LIMIT": bc.MESSAGES_PAGE})
                    if m.id > self.cursor]
            if not page:
                return out
            out.extend(page)
            self.cursor = page[-1].id
            if len(page) < bc.MESSAGES_PAGE:
                return out



def _parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="b24_chat_tty.py",
        description="Chat in one Bitrix24 dialog from the terminal.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  b24_chat_tty.py               choose from your recent Open Lines dialogs\n"
               "  b24_chat_tty.py chat1778      open that dialog (1778 works too; userN: private)\n"
               "\ncommands in the chat:\n" + "\n".join("  %-12s %s" % c for c in COMMANDS))
    parser.add_argument("dialog", nargs="?", metavar="DIALOG", help="chatN, N or userN (default: choose)")
    parser.add_argument("--history", type=int, default=20, metavar="N",
                        help="messages shown when a dialog opens (default 20)")
    parser.add_argument("--no-bell", action="store_true", help="no terminal bell on a new customer message")
    bc.add_common_arguments(parser, poll=True)
    args = parser.parse_args(argv)
    if not 0 <= args.history <= 1000:
        parser.error("--history: expected a count from 0 to 1000")
    return args


class _StatusLog(logging.Handler):
    """While the chat owns the terminal, log lines go to its status area, never mid-screen."""

    def __init__(self, chat: Chat):
        super().__init__()
        self.chat = chat

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = bc.redact(record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never break the chat
            return
        self.chat.inbox.append("(%s)" % text)
        self.chat._notify()


_SIGINT = int(signal.SIGINT)      # compared in a handler that may look up nothing but plain names


def _stop_exception(kind: type) -> BaseException:
    """What a noted Ctrl-C (KeyboardInterrupt) or stop (SystemExit) raises."""
    return KeyboardInterrupt() if kind is KeyboardInterrupt else SystemExit(bc.EXIT_OK)


class _NewMessages(Exception):
    """Raised inside input() by the SIGUSR1 handler: there is something to print."""


def _local(ts: float | None) -> _dt.datetime | None:
    return _dt.datetime.fromtimestamp(ts) if ts is not None else None


class Screen:
    """Everything that is written to the terminal goes through here."""

    def __init__(self, out: TextIO, color: bool):
        self.out = out
        self.color = color
        self.lock = threading.Lock()
        self.last_day: _dt.date | None = None
        self.on_message: Callable[[bc.Message], None] | None = None    # sees each message before it is shown

    def paint(self, text: str, role: str) -> str:
        if not self.color or role not in COLORS:
            return text
        return "\x1b[%sm%s\x1b[0m" % (COLORS[role], text)

    def write(self, text: str) -> None:
        with self.lock:
            self.out.write(text)
            self.out.flush()

    def line(self, text: str, role: str = "") -> None:
        """One line; whatever part of it came from the portal cannot steer the terminal."""
        self.write(self.paint(bc.visible(text), role) + "\n")

    def message_lines(self, msg: bc.Message) -> str:
        if self.on_message is not None:
            self.on_message(msg)
        when = _local(msg.timestamp)
        out = []
        if when and when.date() != self.last_day:
            self.last_day = when.date()
            out.append(self.paint("---- %s ----" % when.strftime("%A, %Y-%m-%d"), "note"))
        stamp = when.strftime("%H:%M") if when else "--:--"
        name = bc.visible(msg.author_name)
        who = {"self": "You", "system": "*"}.get(msg.author_kind, name)
        if msg.author_kind in ("operator", "bot"):
            who = "%s (%s)" % (name, msg.author_kind)
        text_lines = bc.visible((msg.display_text or "").replace("\r\n", "\n")).split("\n")
        head = "%s %s: " % (stamp, who)
        role = msg.author_kind
        out.append(self.paint(head, role) + text_lines[0] if role != "system"
                   else self.paint(head + text_lines[0], role))
        out.extend(" " * len(head) + t for t in text_lines[1:])
        return "\n".join(out)

    def messages(self, msgs: list) -> None:
        if msgs:
            self.write("".join(self.message_lines(m) + "\n" for m in msgs))


class Chat:
    """One chat session: the picker, the dialog view, the input loop."""

    def __init__(self, client: bc.Client, args: argparse.Namespace, screen: Screen, stdin: TextIO,
                 interval: float, history_file: str | None):
        self.client, self.args, self.screen, self.stdin = client, args, screen, stdin
        self.interval = interval
        self.watch = delivery.DeliveryWatch(client)   # your lines, until the portal says they arrived
        self.sent_texts: dict = {}                     # message id -> the text, for the mark
        self.window = delivery.Window()
        self.follows = False
        self.tty = stdin.isatty() and readline is not None
        self.eof_key: bytes | None = None      # the terminal's Ctrl-D (VEOF), switched off between inputs
        self.me = client.whoami()
        self.inbox: collections.deque = collections.deque()   # what the poll thread has for the screen
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.reader: DialogReader | None = None
        self.reader_lock = threading.Lock()
        self.oldest = 0
        self.prefill = ""
        self.reading = False                   # inside input(): a signal may interrupt it
        self.leaving: BaseException | None = None   # raised out of input(), until ask() is out
        self.then: type | None = None          # what a signal handler wanted meanwhile (see _on_usr1)
        self.hooked = False                    # input() has not run our pre-input hook yet: readline swallows
                                               # an exception raised there, and the line is not set up
        self._again_pipe: tuple | None = None  # signals to send again (see _send_again)
        self.saved = ""
        self.interrupt_buffer = ""
        self.history_file = history_file
        self.line_names: dict | None = None
        self.input_lines = 0
        self.fetch_lock = threading.Lock()     # one DialogReader.new() at a time
        self.files: dict = {}                  # #N -> (dialog, attachment) for /save
        self.file_count = 0
        screen.on_message = self.number_files

    # -- terminal plumbing ------------------------------------------------------------
    # The handlers below raise out of input() with care:
    # * on its way out input() runs the pending handlers once more with the exception still set: any call
    #   that returns to a handler there is a SystemError, and even looking up a method fails with that
    #   exception.  So from the first raise until ask() is out SIGUSR1 stays blocked (_leave_input), and a
    #   handler that runs meanwhile touches nothing but our own attributes: it notes what it wanted
    #   (self.then) and, while input() is not yet out (self.reading), raises the exception in flight;
    #   once ask() is past input() it raises nothing, and ask() acts on the note (_left_input);
    # * readline swallows an exception raised in our pre-input hook, and until the hook has put back the
    #   half-typed line readline's buffer is not what the user sees: a handler that runs before the hook
    #   is done notes what it wanted and has input() interrupted again a moment later (_again);
    # * a SIGUSR1 handled inside the Ctrl-C or stop handler does not raise (that would replace theirs);
    # * between inputs the poll thread's lines go through a deque: a Ctrl-C raised inside a Queue's
    #   Python-level locking would leave its lock held and the chat stuck.
    def _on_usr1(self, signum: int, frame: Any) -> None:
        if self.leaving is not None:
            if self.reading:         # still on input()'s way out
                raise self.leaving
            return                   # ask() is past input(): _left_input() unblocks us
        if self.hooked or self._in_stop_handler(frame):
            return self._again()
        if not self.reading:
            return             # the next ask() prints what is queued (and the poll thread signals again)
        editing = self._editing()
        if self.then is not None:                    # a Ctrl-C or a stop that came during our hook
            self.interrupt_buffer = self._draft(editing)
            exc = _stop_exception(self.then)
            self.then = None
            self._leave_input(exc)
        if editing:
            self.saved = readline.get_line_buffer() if readline else ""
            self._leave_input(_NewMessages())

    def _on_stop(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C); SIGTERM, SIGHUP (the terminal closed, or we are asked to stop)."""
        kind = KeyboardInterrupt if signum == _SIGINT else SystemExit
        if self.leaving is not None or self.hooked:
            self.then = kind
            if self.leaving is None:
                return self._again()
            if self.reading:         # still on input()'s way out
                raise self.leaving
            return                   # ask() is past input(): _left_input() acts on the note
        if kind is KeyboardInterrupt:
            self.interrupt_buffer = self._draft(self.reading)
        self._raise_out(_stop_exception(kind))

    def _raise_out(self, exc: BaseException) -> None:
        if self.reading:
            self._leave_input(exc)
        raise exc

    def _again(self) -> None:
        if self._again_pipe is not None:
            os.write(self._again_pipe[1], b"!")

    def _send_again(self) -> None:
        """The thread that interrupts input() again, a moment after a signal came during our hook."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        main = threading.main_thread().ident
        assert self._again_pipe is not None and main is not None
        while os.read(self._again_pipe[0], 64):
            time.sleep(0.005)
            signal.pthread_kill(main, signal.SIGUSR1)

    def _in_stop_handler(self, frame: Any) -> bool:
        """Whether this SIGUSR1 is handled inside the Ctrl-C or stop handler: raising here would put our
        exception in place of theirs."""
        while frame is not None:
            if frame.f_code is Chat._on_stop.__code__:
                return True
            frame = frame.f_back
        return False

    def _leave_input(self, exc: BaseException) -> None:
        self.leaving = exc          # first: a handler that runs inside this one raises the same
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        raise exc

    def _left_input(self) -> None:
        """ask() is out of input(): SIGUSR1 may come again; what a handler noted meanwhile is done.
        Unblocked first, while self.leaving still says a handler is to note and return, not raise: a
        handler that raised before the unblock would leave SIGUSR1 blocked for good."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        was, then = self.leaving, self.then
        self.then = None             # (before leaving: a stop in between is at worst lost, never left
                                     # over to strike a later line)
        self.leaving = None
        if then is KeyboardInterrupt and isinstance(was, _NewMessages):
            self.interrupt_buffer = self.saved
        if then is not None:
            raise _stop_exception(then)

    def _draft(self, in_editor: bool) -> str:
        """The half-typed text a Ctrl-C drops: the editor's line, or what waits to be put back in it."""
        return readline.get_line_buffer() if (readline and in_editor) else self.prefill

    def _editing(self) -> bool:
        """Whether the line editor is at work.  Python runs a signal handler between two bytecodes, so it
        can run just after input() has returned a finished line; raising there would throw the line away.
        The editor keeps the terminal out of canonical mode exactly while it edits, so the mode tells."""
        try:
            return not termios.tcgetattr(self.stdin.fileno())[3] & termios.ICANON
        except (termios.error, OSError, ValueError):
            return True

    def _eof_between_inputs(self, on: bool) -> None:
        """The terminal's end-of-file key on (for the line editor, which takes its Ctrl-D from it) or off.
        Between two inputs the editor is away and the terminal is in canonical mode, where a Ctrl-D is no
        character but an end-of-file mark -- which the editor, back in raw mode, reads as nothing: a Ctrl-D
        typed while a command ran or messages were printed was lost.  With the key off there it stays a
        plain character, and the next input() reads it as the editor's Ctrl-D.  Switched on again before
        each input() and at the end (a Ctrl-C between the two calls leaves it on: the old behaviour)."""
        if self.eof_key is None:
            return
        try:
            attrs = termios.tcgetattr(self.stdin.fileno())
            attrs[6][termios.VEOF] = self.eof_key if on else b"\x00"     # 0: _POSIX_VDISABLE on Linux
            termios.tcsetattr(self.stdin.fileno(), termios.TCSANOW, attrs)
        except (termios.error, OSError, ValueError):
            pass

    def _pre_input(self) -> None:
        if self.prefill and readline:
            readline.insert_text(self.prefill)
            readline.redisplay()
        self.prefill = ""
        self.hooked = False

    def setup_terminal(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        if not self.tty:
            return
        root = logging.getLogger()
        handler = _StatusLog(self)
        handler.setLevel(root.level)
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(handler)
        try:
            self.eof_key = termios.tcgetattr(self.stdin.fileno())[6][termios.VEOF]
        except (termios.error, OSError, ValueError, IndexError):
            self.eof_key = None
        self._eof_between_inputs(False)
        self._again_pipe = os.pipe()
        threading.Thread(target=self._send_again, name="chat-signals", daemon=True).start()
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGINT, self._on_stop)
        readline.set_pre_input_hook(self._pre_input)
        readline.set_history_length(HISTORY_LENGTH)
        if self.history_file and os.path.exists(self.history_file):
            try:
                readline.read_history_file(self.history_file)
            except OSError as exc:
                log.warning("cannot read input history %s: %s", self.history_file, exc)

    def save_history(self) -> None:
        if not (self.tty and self.history_file):
            return
        try:
            os.makedirs(os.path.dirname(self.history_file), mode=0o700, exist_ok=True)
            readline.write_history_file(self.history_file)
            os.chmod(self.history_file, 0o600)
        except OSError as exc:
            log.warning("cannot save input history %s: %s", self.history_file, exc)

    def _notify(self) -> None:
        """Get queued lines printed: interrupt the line editor, or print straight away."""
        if self.tty:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        else:
            self.drain()

    def _clear_input_rows(self, text: str) -> None:
        """Erase the prompt and the half-typed text (they are drawn again after the messages)."""
        if os.environ.get("TERM") == "dumb":   # no cursor movement there: just start a new line
            self.screen.write("\n")
            return
        try:
            cols = os.get_terminal_size(self.screen.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            cols = 80
        rows = (len(PROMPT) + len(text)) // cols
        self.screen.write("\r" + ("\x1b[%dA" % rows if rows else "") + "\x1b[J")

    def drain(self) -> None:
        """Print whatever the poll thread queued."""
        while True:
            try:
                item = self.inbox.popleft()
            except IndexError:
                return
            if isinstance(item, list):
                self.screen.messages(item)
                if not self.args.no_bell and any(m.author_kind == "customer" for m in item):
                    self.screen.write("\a")
            else:
                self.screen.line(str(item), "note")

    def ask(self, prompt: str) -> str:
        """input() that lets the poll thread print above the line being edited."""
        while True:
            self.drain()
            if not self.tty:
                raw = self.stdin.buffer.readline() if hasattr(self.stdin, "buffer") else self.stdin.readline()
                if not raw:
                    raise EOFError
                self.input_lines += 1
                if isinstance(raw, bytes):
                    try:
                        raw = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.screen.line("! input line %d is not valid UTF-8 text; not sent" % self.input_lines,
                                         "error")
                        continue
                return raw.rstrip("\r\n")
            try:
                self._eof_between_inputs(True)
                try:
                    self.reading = self.hooked = True      # (hooked: until readline has run our hook)
                    return input(prompt)
                finally:
                    self.reading = self.hooked = False     # from here on handlers only take notes
                    self._eof_between_inputs(False)
            except UnicodeDecodeError:
                self.screen.line("! that input was not valid UTF-8 text; type it again", "error")
            except _NewMessages:         # (also when a handler raised it again on input()'s way out)
                self._clear_input_rows(self.saved)
                self.prefill = self.saved
            finally:
                if self.leaving is not None or self.then is not None:
                    self._left_input()

    # -- the poll thread ----------------------------------------------------------------
    def poll_loop(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})     # a SIGUSR1 from outside goes to input()
        backoff = bc.Backoff(self.interval, self.client.config.backoff_max)
        current = None
        delay = self.interval
        while not self.stop.is_set():
            self.wake.wait(delay)
            self.wake.clear()
            if self.stop.is_set():
                return
            with self.reader_lock:
                reader = self.reader
            if reader is None:
                continue
            if reader is not current:        # another dialog: its own fresh start
                current, delay = reader, self.interval
                backoff.succeeded()
            try:
                with self.fetch_lock:
                    msgs = reader.new()
                if backoff.failures:
                    self.inbox.append("(connection back)")
                backoff.succeeded()
                delay = self.interval
            except bc.TRANSIENT as exc:
                delay = backoff.failed()
                if backoff.failures == 1:
                    self.inbox.append("(cannot reach the portal: %s -- retrying)" % exc)
                    self._notify()
                continue
            except bc.B24Error as exc:
                backoff.failures = 5
                delay = backoff.failed()
                self.inbox.append("(cannot read new messages: %s)" % bc.format_error(exc))
                self._notify()
                continue
            with self.reader_lock:
                if reader is not self.reader:
                    continue
            if msgs:
                self.inbox.append(msgs)
            self._marks()
            if self.inbox:
                self._notify()   # also repeats a signal that came while nobody was reading

    def _marks(self) -> None:
        """A mark for each line you sent, as its verdict arrives: delivered, not delivered + why, sent."""
        if not self.watch.busy():
            return
        try:
            verdicts = self.watch.check()
        except bc.B24Error:
            return                     # asked again next round
        for v in verdicts:
            sign = "\u2713" if v.status in (delivery.DELIVERED, delivery.SENT) else "!"
            self.inbox.append('  %s %s: "%s"' % (sign, v.describe(),
                                              _short(self.sent_texts.pop(v.message_id, "")).replace("\n", " ")))

    # -- picker ----------------------------------------------------------------------------
    def _lines(self) -> dict:
        if self.line_names is None:
            self.line_names = {}
            try:
                rows = self.client.call("imopenlines.config.list.get",
                                        {"PARAMS": {"select": ["ID", "LINE_NAME"]}})
                for row in rows if isinstance(rows, list) else []:
                    self.line_names[bc.as_int(row.get("ID"))] = str(row.get("LINE_NAME") or "")
            except bc.APIError:
                pass
        return self.line_names

    def pick(self) -> str | None:
        """Show recent Open Lines dialogs; return the chosen dialog id (None: leave)."""
        res = bc.as_map(self.client.call("im.recent.list", {"LIMIT": 50}))
        items = [i for i in (res.get("items") or []) if isinstance(i, dict)]
        dialogs, seen = [], set()
        for item in items:
            info = bc.DialogInfo.from_chat(str(item.get("id")), item.get("chat"), item.get("title") or "")
            if not info.is_lines or info.dialog_id in seen:
                continue
            seen.add(info.dialog_id)
            user = item.get("user")
            if isinstance(user, dict) and bc.as_int(user.get("id")) == info.customer_id:
                info.learn_customer(user)
            dialogs.append((info, item))
        if not dialogs:
            self.screen.line("No Open Lines dialogs are visible to %s. Add this user to a line's queue or "
                             "join a chat in Bitrix24, or give a dialog id (chatN)." % self.me["name"], "note")
            return None
        self._fill_customers([info for info, _item in dialogs])
        lines = self._lines()
        self.screen.line("Your Open Lines dialogs:", "title")
        for n, (info, item) in enumerate(dialogs, 1):
            msg = bc.as_map(item.get("message"))
            when = _local(bc.parse_date(msg.get("date")))
            waiting = bc.waits_in_queue(item)
            unread = bc.as_int(item.get("counter"))
            name = info.customer_name or info.title.split(" - ")[0]
            text = bc.bbcode_to_text(msg.get("text")).replace("\n", " ")
            self.screen.line("%3d. %-9s %s%s  [%s]%s%s" % (
                n, info.dialog_id, name, (" " + info.customer_phone) if info.customer_phone else "",
                lines.get(info.line_id or 0) or "line %s" % info.line_id,
                "  (waiting in queue)" if waiting else "", ("  %d unread" % unread) if unread else ""))
            self.screen.line("      %s  %s" % (when.strftime("%d.%m %H:%M") if when else "",
                                               text[:70] + ("..." if len(text) > 70 else "")), "note")
        while True:
            try:
                choice = self.ask("Number (q to leave): ").strip()
            except EOFError:
                return None
            if choice.lower() in ("q", "/quit", "quit"):
                return None
            self._forget_last_input()
            if choice.isdigit() and 1 <= int(choice) <= len(dialogs):
                return dialogs[int(choice) - 1][0].dialog_id
            if choice.lower().startswith(("chat", "user")):
                try:
                    did = bc.parse_dialog_id(choice)
                    self.client.call("im.dialog.get", {"DIALOG_ID": did})
                    return did
                except bc.UsageError:
                    pass
                except (bc.AccessDeniedError, bc.NotFoundError, bc.BadRequestError):
                    self.screen.line("! %s: no such dialog, or no access to it -- pick from the list"
                                     % bc.visible(choice), "error")
                    continue
            if choice:
                self.screen.line("'%s' is not on the list: type 1 to %d, a dialog id, or q"
                                 % (choice, len(dialogs)), "error")

    def _forget_last_input(self) -> None:
        """Picker answers are not worth keeping in the input history."""
        if self.tty and readline.get_current_history_length():
            readline.remove_history_item(readline.get_current_history_length() - 1)

    def _fill_customers(self, infos: list) -> None:
        missing = [i for i in infos if i.customer_id and not i.customer_name][:50]
        if not missing:
            return
        try:
            res = self.client.batch({i.dialog_id: ("im.dialog.users.list", {"DIALOG_ID": i.dialog_id})
                                     for i in missing})
        except bc.B24Error:
            return
        for info in missing:
            users = res.results.get(info.dialog_id)
            for u in users if isinstance(users, list) else []:
                if isinstance(u, dict) and bc.as_int(u.get("id")) == info.customer_id:
                    info.learn_customer(u)

    # -- one dialog ------------------------------------------------------------------------
    def open(self, dialog_id: str) -> None:
        reader = DialogReader(self.client, dialog_id, self_id=self.me["id"])
        try:
            info = reader.load_info()
            history = reader.newest(self.args.history)
        except (bc.AccessDeniedError, bc.NotFoundError, bc.BadRequestError) as exc:
            raise bc.B24Error("%s: no such dialog, or no access to it (%s) -- check the id, or join the "
                              "chat in Bitrix24" % (bc.display_dialog_id(dialog_id), exc.code)) from None
        # no history shown: no day header for today's first live message either
        self.screen.last_day = None if history else _dt.date.today()
        self.oldest = history[0].id if history else 0
        title = info.title or bc.display_dialog_id(dialog_id)
        extra = " %s" % info.customer_phone if info.customer_phone else ""
        self.screen.line("== %s (%s)%s ==" % (title, bc.display_dialog_id(dialog_id), extra), "title")
        self.screen.messages(history)
        self.window = delivery.window_of({"entity_data_1": info.entity_data_1}) if info.is_lines \
            else delivery.Window()
        if self.window.describe():
            self.screen.line("(%s)" % self.window.describe(), "note")
        self.follows = delivery.reports_delivery(info.connector)
        if info.is_lines and not self._is_member(dialog_id):
            self.screen.line("(you can read this dialog but not write yet: it waits in the queue or its "
                             "session is closed -- /answer takes it, /join joins it)", "note")
        if info.is_lines:
            with self.reader_lock:
                self.reader = reader
            self.show_status()
        self.screen.line("(type a message and press Enter; /help for commands)", "note")
        with self.reader_lock:
            self.reader = reader
        self.wake.set()

    def _is_member(self, dialog_id: str) -> bool:
        try:
            users = self.client.call("im.dialog.users.list", {"DIALOG_ID": dialog_id})
        except bc.B24Error:
            return True
        return any(isinstance(u, dict) and bc.as_int(u.get("id")) == self.me["id"] for u in users or [])

    def who(self) -> None:
        assert self.reader is not None
        info = self.reader.info
        try:
            users = self.client.call("im.dialog.users.list", {"DIALOG_ID": self.reader.dialog_id})
        except bc.B24Error as exc:
            self.screen.line("! %s" % bc.format_error(exc), "error")
            return
        users = [u for u in users if isinstance(u, dict)] if isinstance(users, list) else []
        customers = [u for u in users if u.get("connector") is True]
        others = [u for u in users if u.get("connector") is not True]
        if info.is_lines:
            line = self._lines().get(info.line_id or 0) or ("line %s" % info.line_id)
            self.screen.line("Dialog %s on %s" % (self.reader.dialog_id, line), "title")
        for u in customers:
            phone = bc.user_phone(u) or info.customer_phone or "no phone"
            self.screen.line("  customer: %s, %s" % (u.get("name"), phone))
        if info.is_lines and not customers:
            self.screen.line("  customer: %s %s" % (info.customer_name or "?", info.customer_phone or ""))
        for u in others:
            kind = "bot" if u.get("bot") else "you" if bc.as_int(u.get("id")) == self.me["id"] else "operator"
            self.screen.line("  %s: %s%s" % (kind, u.get("name"),
                                              (", " + u["work_position"]) if u.get("work_position") else ""))

    def send(self, text: str) -> None:
        assert self.reader is not None
        try:
            bc.check_text(text)
            for part in bc.split_text(text):
                mid = bc.send_text(self.client, self.reader.dialog_id, part)
                self._follow(mid, part, '"%s"' % _short(part))
            if self.window.closed():
                self.screen.line("(%s: it will not be delivered)" % self.window.describe(), "note")
        except bc.B24Error as exc:
            reason = bc.format_error(exc)
            if isinstance(exc, bc.NotMemberError):
                reason = ("you are not a member of this dialog (CANCELED): take it or join it in "
                          "Bitrix24, then press Enter to send again")
            self.screen.line("! not sent: %s" % reason, "error")
            if "\n" not in text:
                self.prefill = text
            else:
                self.screen.line("(your text, to copy: %s)" % text.replace("\n", " / "), "note")
            return
        self.wake.set()

    def multi(self) -> str | None:
        self.screen.line("(several lines: a line with only '.' sends, Ctrl-D cancels)", "note")
        lines = []
        while True:
            try:
                line = self.ask(MULTI_PROMPT)
            except EOFError:
                self.screen.write("\n")
                self.screen.line("(cancelled)", "note")
                return None
            self._forget_last_input()        # lines of a /multi text, and its '.', are not recalled
            if line == ".":
                return "\n".join(lines)
            lines.append(line)

    def command(self, line: str) -> str | None:
        """Run a /command; return 'quit' or 'switch' to leave the dialog."""
        name, _, arg = line.strip().partition(" ")
        name = name.lower()
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name == "/switch":
            return "switch"
        if name == "/help":
            for cmd, text in COMMANDS:
                self.screen.line("  %-12s %s" % (cmd, text), "note")
        elif name == "/who":
            self.who()
        elif name == "/history":
            n = arg.strip() or "20"
            if not n.isdigit() or not 0 < int(n) <= 1000:
                self.screen.line("! /history takes a count from 1 to 1000", "error")
                return None
            assert self.reader is not None
            self.screen.last_day = None
            msgs = DialogReader(self.client, self.reader.dialog_id, self_id=self.me["id"]).newest(int(n))
            self.screen.messages(msgs)
        elif name == "/more":
            assert self.reader is not None
            older = self.reader.older(self.oldest, 20) if self.oldest else []
            if not older:
                self.screen.line("(no older messages)", "note")
            else:
                self.oldest = older[0].id
                self.screen.line("---- older ----", "note")
                self.screen.last_day = None
                self.screen.messages(older)
                self.screen.line("---- end of older ----", "note")
        elif name == "/multi":
            text = self.multi()
            if text and text.strip():
                self.send(text)
        elif name in ("/take", "/answer"):
            self.session_action("/answer", "")
        elif name in ("/skip", "/transfer", "/close", "/spam", "/intercept", "/join"):
            self.session_action(name, arg)
        elif name == "/status":
            self.show_status()
        elif name == "/file":
            self.send_file(arg)
        elif name == "/save":
            self.save_file(arg)
        else:
            self.screen.line("! unknown command %s -- /help lists them" % name, "error")
        return None

    # -- the operator's console -----------------------------------------------------------
    def session_action(self, name: str, arg: str) -> None:
        """/answer, /skip, /transfer X, /close, /spam, /intercept, /join: one call, one line."""
        assert self.reader is not None
        action = name[1:] + ("=" + arg.strip() if arg.strip() else "")
        try:
            done = b24session.perform(self.client, self.reader.dialog_id,
                                      *b24session.parse_action(action, "/" + name[1:]))
        except bc.B24Error as exc:
            self.screen.line("! %s" % exc, "error")
            return
        self.screen.line("(%s)" % done.split(": ", 1)[-1], "note")
        self.show_status()

    def show_status(self) -> None:
        """The session's state, its operator and the WhatsApp window, on one line."""
        assert self.reader is not None
        dialog_id = self.reader.dialog_id
        try:
            chat = bc.as_map(self.client.call("im.dialog.get", {"DIALOG_ID": dialog_id}))
            users = self.client.call("im.dialog.users.list", {"DIALOG_ID": dialog_id})
        except bc.B24Error as exc:
            self.screen.line("! status not read: %s" % bc.format_error(exc), "error")
            return
        self.screen.line("[%s]" % status_text(chat, users, self.me["id"]), "note")

    def send_file(self, arg: str) -> None:
        """/file PATH [caption]"""
        assert self.reader is not None
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            self.screen.line("! /file: %s" % exc, "error")
            return
        if not words:
            self.screen.line("! /file PATH [caption] -- which file?", "error")
            return
        try:
            f = b24files.read_local(os.path.expanduser(words[0]), self.client.config.max_file_mb, "/file")
            mid = b24files.send_file(self.client, self.reader.dialog_id, f, caption=" ".join(words[1:]))
        except bc.B24Error as exc:
            reason = str(exc) if isinstance(exc, bc.UsageError) else "%s not sent: %s" % (
                words[0], bc.format_error(exc))
            self.screen.line("! %s" % reason, "error")
            return
        self._follow(mid, "[%s]" % f.name, "%s (%s)" % (f.name, bc.human_size(len(f.data))))
        self.wake.set()

    def _follow(self, mid: int, label: str, shown: str) -> None:
        """A message we sent: followed until the portal's verdict (its mark shows *label*), or -- where the
        channel reports nothing -- said sent at once."""
        assert self.reader is not None
        if self.follows:
            self.watch.add(self.reader.dialog_id, mid)
            self.sent_texts[mid] = label
        else:
            self.screen.line("  \u2713 sent: %s" % shown, "note")

    def save_file(self, arg: str) -> None:
        """/save N [DIR]"""
        words = arg.split(None, 1)
        if not words or not words[0].lstrip("#").isdigit() or int(words[0].lstrip("#")) not in self.files:
            self.screen.line("! /save N [DIR] -- N is the number of a file shown in the chat (#N)", "error")
            return
        dialog_id, att = self.files[int(words[0].lstrip("#"))]
        folder = os.path.expanduser(words[1].strip()) if len(words) > 1 else os.getcwd()
        try:
            path = b24files.save_chat_file(self.client, dialog_id, {"id": att.get("id"), "name": att.get("name"),
                                                                     "urlDownload": att.get("url_download")}, folder)
        except (bc.B24Error, OSError) as exc:
            self.screen.line("! not saved: %s" % (bc.format_error(exc) if isinstance(exc, bc.B24Error) else exc),
                             "error")
            return
        self.screen.line("(saved %s, %s)" % (path, bc.human_size(os.path.getsize(path))), "note")

    def number_files(self, msg: bc.Message) -> None:
        """Give each file shown a number (#N) that /save takes."""
        for att in msg.attachments:
            if "n" not in att:
                self.file_count += 1
                att["n"] = self.file_count
                self.files[self.file_count] = (msg.dialog_id, att)

    def dialog_loop(self) -> str:
        while True:
            try:
                line = self.ask(PROMPT)
            except EOFError:
                if not self.tty:
                    self.final_echo()
                else:
                    self.screen.write("\n")
                return "quit"
            except KeyboardInterrupt:
                if self.interrupt_buffer.strip():
                    self.prefill = ""
                    self.screen.write("\n")      # Ctrl-C with text: drop the text, stay
                    continue
                self.screen.write("\n")
                return "interrupt"
            if not line.strip():
                continue
            if line.startswith("//"):
                self.send(line[1:])          # a message that starts with a slash
                continue
            if line.startswith("/"):
                self._forget_last_input()    # commands are not recalled into the message line
                action = self.command(line)
                if action:
                    return action
                continue
            self.send(line)

    def final_echo(self) -> None:
        """Pipe mode at end of input: print what the last lines became before leaving."""
        with self.reader_lock:
            reader = self.reader
        if reader is None:
            return
        try:
            with self.fetch_lock:
                msgs = reader.new()
        except bc.B24Error:
            return
        self.drain()
        self.screen.messages(msgs)

    def run(self, dialog_id: str | None) -> int:
        try:
            self.setup_terminal()
            threading.Thread(target=self.poll_loop, name="chat-poll", daemon=True).start()
            while True:
                if dialog_id is None:
                    try:
                        dialog_id = self.pick()
                    except KeyboardInterrupt:
                        self.screen.write("\n")
                        return bc.EXIT_INTERRUPTED
                    if dialog_id is None:
                        return bc.EXIT_OK
                self.open(dialog_id)
                action = self.dialog_loop()
                with self.reader_lock:
                    self.reader = None
                if action == "switch":
                    dialog_id = None
                    continue
                return bc.EXIT_INTERRUPTED if action == "interrupt" else bc.EXIT_OK
        finally:
            self.stop.set()
            self.wake.set()
            self._eof_between_inputs(True)
            self.save_history()


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def status_text(chat: Mapping, users: Any, me: int) -> str:
    """``session 3310: waiting in the queue; WhatsApp window open until 14:35`` -- from ``im.dialog.get``
    and ``im.dialog.users.list``."""
    info = bc.DialogInfo.from_chat("chat%s" % chat.get("id"), chat)
    names = {bc.as_int(u.get("id")): (str(u.get("name") or ""), bool(u.get("bot")))
             for u in (users if isinstance(users, list) else []) if isinstance(u, Mapping)}
    owner = bc.as_int(chat.get("owner"))
    if not info.session_id:
        state = "no open session (closed: it opens again when the customer writes)"
    elif not owner:
        state = "waiting in the queue, nobody has answered"
    elif owner == me:
        state = "yours"
    else:
        name, bot = names.get(owner, ("user %d" % owner, False))
        state = "with the chat bot %s" % name if bot else "operator: %s" % name
    text = "session %s: %s" % (info.session_id, state) if info.session_id else state
    window = delivery.window_of(chat)
    if window.closes_at:
        text += "; WhatsApp window %s %s" % ("closed since" if window.closed() else "open until",
                                              time.strftime("%Y-%m-%d %H:%M", time.localtime(window.closes_at)))
    return text


def use_color(out: TextIO, environ: Any = os.environ) -> bool:
    """Colour only on a terminal, never with NO_COLOR (no-color.org), never for TERM=dumb."""
    if environ.get("NO_COLOR"):
        return False
    if environ.get("TERM") == "dumb":
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def main(argv: list | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = _parse_args(argv)
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    bc.setup_logging(-1 if args.quiet else args.verbose, json_lines=args.log_json)

    def body() -> int:
        if args.check:
            return bc.run_doctor(args)
        dialog_id = bc.parse_dialog_id(args.dialog) if args.dialog else None
        cfg = bc.load_config_from_args(args)
        client = bc.Client(cfg)
        if dialog_id is None and not stdin.isatty():
            raise bc.UsageError("give a DIALOG when input is not a terminal (the picker needs one)")
        screen = Screen(out, use_color(out))
        history = os.path.join(cfg.state_dir or bc.default_state_dir(), "chat_history")
        chat = Chat(client, args, screen, stdin, args.interval or cfg.poll_sec, history)
        return chat.run(dialog_id)

    return bc.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
