"""b24_chat_tty.py on a real pseudo-terminal (and once with piped input)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

from tests.support import PY, PortalCase, PtyProc, script

CHAT = "b24_chat_tty.py"


class ChatHarness(PortalCase):
    """The chat on a real pty, against the emulator."""

    def open_chat(self, *args: str, **env) -> PtyProc:
        env.setdefault("TERM", "xterm")
        env.setdefault("NO_COLOR", "1")
        p = PtyProc([PY, script(CHAT)] + list(args), self.env(**env), self.tmp)
        self.addCleanup(self._finish, p)
        return p

    def _finish(self, p: PtyProc) -> None:
        p.kill()
        self.assertNoSecret(p.text)
        self.assertNotIn("Traceback", p.text)

    def wait_for_text(self, chat: int, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in [m["text"] for m in self.portal.chat_messages(chat)]:
                return
            time.sleep(0.05)
        self.fail("%r never reached chat %d" % (text, chat))



class ChatTTY(ChatHarness):
    def test_half_typed_line_survives_an_incoming_message(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        p.expect("Hi Ivan, let me check.")
        start = p.expect("/help for commands")
        p.send("hello wor")
        p.expect("hello wor", start=start)
        self.portal.customer_message(chat, "new from customer")
        after = p.expect("new from customer")
        p.expect("> hello wor", start=after)     # the half line is drawn again below the message
        p.send("ld\r")
        self.wait_for_text(chat, "hello world")
        p.expect("You: hello world")
        p.send("\x04")                            # Ctrl-D on an empty line
        self.assertEqual(p.wait(), 0)

    def test_a_ctrl_d_typed_while_a_send_is_under_way_ends_the_chat(self) -> None:
        # the line editor is away while the message goes out: the terminal is in canonical mode, where a
        # Ctrl-D is an end-of-file mark the editor never sees as a key (it was lost; the chat stayed)
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        start = p.expect("/help for commands")
        self.portal.behave(message_add_delay=1.5)
        self.addCleanup(self.portal.behave, message_add_delay=0)
        p.send("a slow one\r")
        p.expect("a slow one", start=start)
        time.sleep(0.5)
        p.send("\x04")
        self.assertEqual(p.wait(10), 0)
        self.wait_for_text(chat, "a slow one")

    def test_no_typed_line_is_lost_whenever_the_editor_is_interrupted(self) -> None:
        """The poll thread interrupts the line editor (SIGUSR1) to print above it.  An interruption handled
        just after Enter must not throw the finished line away -- it did, now and then, when a message came
        at that instant -- nor may one on top of another, or of a Ctrl-C, crash the chat.  Here the
        interruptions come every few milliseconds while lines are typed and dropped with Ctrl-C."""
        chat = self.ids["lines_member"]
        self.portal.set_limits(rate=100, burst=1000)          # the lines, not the request budget, are tested
        p = self.open_chat("chat%d" % chat, B24_RATE_PER_SEC=100, B24_RATE_BURST=1000)
        p.expect("/help for commands")
        stop = threading.Event()

        def interrupt() -> None:
            while not stop.wait(0.002):
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    return
        pest = threading.Thread(target=interrupt, daemon=True)
        pest.start()
        self.addCleanup(stop.set)
        sent = ["line %d" % i for i in range(40)]
        for text in sent:
            p.send(text + "\r")
            time.sleep(0.02)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = [m["text"] for m in self.portal.chat_messages(chat) if m["text"].startswith("line ")]
            if len(got) >= len(sent):
                break
            time.sleep(0.1)
        self.assertEqual(got, sent, "every typed line is sent, once, in order")
        for n in range(20):                      # Ctrl-C on a half-typed line drops the text and stays
            mark = len(p.text)
            p.send("draft %d" % n)
            seen = p.expect("\x1b[J> draft %d" % n, start=mark)     # drawn again by the chat: it has the text
            p.send("\x03")
            p.expect("\x1b[J> \r", start=seen)   # an empty line drawn again: the Ctrl-C was taken
        p.send("the last line\r")
        self.wait_for_text(chat, "the last line")
        stop.set()
        pest.join()
        self.assertFalse([m for m in self.portal.chat_messages(chat) if m["text"].startswith("draft")])
        p.expect('delivered: "the last line"')     # the last thing to print: Ctrl-D comes to a quiet line
        p.send("\x04")
        self.assertEqual(p.wait(), 0)

    def test_history_day_separator_colours_and_bell(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat, "--history", "3", NO_COLOR=None)
        p.expect("----", timeout=15)
        start = p.expect("/help for commands")
        self.assertNotIn("Conversation started", p.text, "only the last 3 messages")
        self.assertIn("\x1b[32m", p.text, "customer lines are coloured on a terminal")
        self.portal.customer_message(chat, "ding")
        p.expect("ding", start=start)
        p.expect("\a", start=start)
        p.send("/quit\r")
        self.assertEqual(p.wait(), 0)
        q = self.open_chat("chat%d" % chat, "--no-bell")
        start = q.expect("/help for commands")
        self.portal.customer_message(chat, "quiet ding")
        q.expect("quiet ding", start=start)
        time.sleep(0.3)
        self.assertNotIn("\a", q.text[start:])
        self.assertIsNone(re.search(r"\x1b\[3\dm", q.text), "NO_COLOR means no colour")
        q.send("/quit\r")
        self.assertEqual(q.wait(), 0)

    def test_commands(self) -> None:
        chat = self.ids["lines_member"]
        for i in range(30):
            self.portal.customer_message(chat, "filler %02d" % i)
        p = self.open_chat("chat%d" % chat, "--history", "5")
        p.expect("/help for commands")
        p.send("/help\r")
        pos = p.expect("/multi")
        p.send("/who\r")
        pos = p.expect("customer: Ivan Petrov, +10000000101", start=pos)
        pos = p.expect("you: Olga Sidorova", start=pos)
        p.send("/more\r")
        pos = p.expect("---- older ----", start=pos)
        pos = p.expect("filler 05", start=pos)
        p.send("/history 2\r")
        pos = p.expect("filler 28", start=pos)
        p.send("/nonsense\r")
        pos = p.expect("unknown command /nonsense", start=pos)
        p.send("/history x\r")
        pos = p.expect("/history takes a count", start=pos)
        p.send("/multi\r")
        p.expect("a line with only '.' sends", start=pos)
        p.send("first line\r")
        p.send("second line\r")
        p.send(".\r")
        self.wait_for_text(chat, "first line\nsecond line")
        p.send("/quit\r")
        self.assertEqual(p.wait(), 0)

    def test_failed_send_keeps_the_text(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        start = p.expect("/help for commands")
        self.portal.close_session(chat)
        p.send("please retry me\r")
        pos = p.expect("! not sent:", start=start)
        pos = p.expect("CANCELED", start=pos)
        p.expect("> please retry me", start=pos)      # offered again, ready to send
        self.portal.customer_message(chat, "I'm back")
        self.portal.take_chat(chat, 7)
        p.send("\r")
        self.wait_for_text(chat, "please retry me")
        p.expect('delivered: "please retry me"', start=pos)   # its mark is in (it redraws the input line)
        p.send("\x04")
        self.assertEqual(p.wait(), 0)

    def test_picker_then_switch(self) -> None:
        p = self.open_chat()
        listing_end = p.expect("Number (q to leave):")
        listing = p.text[:listing_end]
        self.assertIn("Ivan Petrov +10000000101  [WhatsApp Support]", listing)
        self.assertIn("(waiting in queue)", listing)
        m = re.search(r"(\d+)\. chat%d\s+Chen Wei" % self.ids["queued"], listing)
        self.assertIsNotNone(m, listing)
        p.send("99\r")
        p.expect("'99' is not on the list")
        p.send(m.group(1) + "\r")
        pos = p.expect("Chen Wei - WhatsApp Sales")
        p.expect("not write yet", start=pos)
        p.send("/switch\r")
        pos = p.expect("Number (q to leave):", start=pos)
        p.send("q\r")
        self.assertEqual(p.wait(), 0)

    def test_ctrl_c_clears_then_leaves_and_history_persists(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        p.expect("/help for commands")
        p.send("kept in history\r")
        self.wait_for_text(chat, "kept in history")
        p.send("half typed")
        p.expect("half typed")
        p.send("\x03")                     # Ctrl-C with text: the line is dropped, the chat stays
        time.sleep(0.5)
        self.assertIsNone(p.returncode)
        p.send("\x03")                     # Ctrl-C on an empty line: leave
        self.assertEqual(p.wait(), 130)
        hist = os.path.join(self.tmp, "state", "chat_history")
        with open(hist, encoding="utf-8") as fh:
            self.assertIn("kept in history", fh.read())
        q = self.open_chat("chat%d" % chat)
        q.expect("/help for commands")
        q.send("\x1b[A")                   # arrow up: the last line from the previous run
        q.expect("kept in history", start=len(q.text) - 40 if len(q.text) > 40 else 0)
        q.send("\x15\x04")                 # clear the line, Ctrl-D
        self.assertEqual(q.wait(), 0)

    def test_sigterm_and_sighup_leave_quietly_and_keep_history(self) -> None:
        chat = self.ids["lines_member"]
        for sig in (signal.SIGTERM, signal.SIGHUP):
            p = self.open_chat("chat%d" % chat)
            p.expect("/help for commands")
            p.send("line before %s\r" % sig.name)
            self.wait_for_text(chat, "line before %s" % sig.name)
            os.kill(p.pid, sig)
            self.assertEqual(p.wait(), 0)
            self.assertNotIn("Traceback", p.text)
            with open(os.path.join(self.tmp, "state", "chat_history"), encoding="utf-8") as fh:
                self.assertIn("line before %s" % sig.name, fh.read())

    def test_piped_input_sends_lines_plainly(self) -> None:
        chat = self.ids["lines_member"]
        proc = subprocess.run([PY, script(CHAT), "chat%d" % chat], input="from a pipe\n/who\n", text=True,
                              capture_output=True, env=self.env(TERM="xterm"), timeout=60, cwd=self.tmp)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.wait_for_text(chat, "from a pipe")
        self.assertIn("customer: Ivan Petrov", proc.stdout)
        self.assertNotIn("\x1b[", proc.stdout)
        self.assertNoSecret(proc.stdout + proc.stderr)

    def test_bad_input(self) -> None:
        cases = [
            (("--history", "-1"), 2, "--history"),
            (("chatX",), 2, "expected chatN"),
            (("chat999999",), 1, "no such dialog, or no access"),
            (("chat%d" % self.ids["foreign"],), 1, "no such dialog, or no access"),
            ((), 2, "give a DIALOG when input is not a terminal"),
        ]
        for argv, code, needle in cases:
            with self.subTest(argv=argv):
                proc = self.run_script(CHAT, *argv, input="")
                self.assertOneLineError(proc, code, needle)


class DeliveryMarks(ChatHarness):
    def test_each_line_gets_its_verdict_and_the_window_is_shown(self) -> None:
        chat = self.ids["lines_member2"]                     # WhatsApp: a window, delivery reports
        p = self.open_chat("chat%d" % chat)
        p.expect("window closes in 2")                       # opened by the customer's last message
        at = p.expect("/help for commands")
        p.send("this one arrives\r")
        at = p.expect('\u2713 delivered: "this one arrives"', start=at)
        self.portal.delivery(chat, mode="fail", reason="Recipient has blocked the business number")
        p.send("this one does not\r")
        p.expect('! not delivered: Recipient has blocked the business number: "this one does not"', start=at)
        p.expect("Message could not be delivered", start=at)      # the portal's own notice, shown
        group = self.ids["group"]                            # no delivery reports: "sent" at once
        q = self.open_chat("chat%d" % group)
        q.expect("/help for commands")
        q.send("team note\r")
        q.expect('\u2713 sent: "team note"')
