"""The operator's console: b24_send_message.py --session ACTION and the chat's /answer /skip /transfer /close
/spam /intercept /join /status /file /save -- each with its confirmation and its refusal, against the
emulator's operator actions (fact sheet §16)."""
from __future__ import annotations

import os

from tests.test_chat_tty import ChatHarness

SEND = "b24_send_message.py"


class SessionActions(ChatHarness):
    """One action per run, the same exit codes as sending."""

    def act(self, chat: int, action: str, **env):
        return self.run_script(SEND, "chat%d" % chat, "--session", action, env=self.env(**env) if env else None)

    def new_chat(self, line: int = 3, name: str = "Walk In") -> int:
        return self.portal.new_conversation(line, name, None, "hello?")["chat_id"]

    def test_take_transfer_and_close_a_whole_conversation(self) -> None:
        chat = self.new_chat()
        session = self.portal.chats[chat]["session_id"]
        done = self.act(chat, "answer")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "chat%d: you took the conversation" % chat)
        self.assertEqual((self.portal.chats[chat]["owner"], self.portal.sessions[session]["status"]), (7, 10))
        again = self.act(chat, "answer")
        self.assertOneLineError(again, 1, "answer refused", "already yours")
        self.assertOneLineError(self.act(chat, "transfer=9999"), 1, "transfer refused", "OPERATOR_WRONG")
        moved = self.act(chat, "transfer=11")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn("transferred to user 11", moved.stdout)
        self.assertEqual((self.portal.chats[chat]["owner"], 7 in self.portal.chats[chat]["members"]), (11, False),
                         "user 11 answers at once; we leave")
        closed = self.act(chat, "close")          # not its operator: another.finish, the line lets us (JOIN)
        self.assertEqual(closed.returncode, 0, closed.stderr)
        self.assertEqual(self.portal.sessions[session]["status"], 60)
        self.assertTrue(any("ended current conversation" in t for t in self.texts(chat)),
                        "someone else's conversation: another.finish")

    def texts(self, chat: int) -> list:
        return [m["text"] for m in self.portal.chat_messages(chat)]

    def test_skip_spam_intercept_join_and_the_queue(self) -> None:
        chat = self.new_chat(name="Queue One")
        skipped = self.act(chat, "skip")
        self.assertEqual(skipped.returncode, 0, skipped.stderr)
        self.assertFalse(self.portal.in_queue_for(self.portal.chats[chat], 7), "not offered to us again")
        other = self.new_chat(name="Queue Two")
        self.assertEqual(self.act(other, "transfer=queue1").returncode, 0)
        self.assertEqual(self.portal.chats[other]["line_id"], 1, "re-queued on line 1")
        self.portal.take_chat(other, 9)                       # an operator has it
        joined = self.act(other, "join")
        self.assertEqual(joined.returncode, 0, joined.stderr)
        self.assertEqual((self.portal.chats[other]["owner"], 7 in self.portal.chats[other]["members"]), (9, True))
        taken = self.act(other, "intercept")
        self.assertEqual(taken.returncode, 0, taken.stderr)
        self.assertEqual(self.portal.chats[other]["owner"], 7)
        self.assertTrue(any("took conversation from" in t for t in self.texts(other)))
        spam = self.act(other, "spam")
        self.assertEqual(spam.returncode, 0, spam.stderr)
        self.assertEqual(self.portal.sessions[self.portal.chats[other]["session_id"] or
                                              max(s for s in self.portal.sessions if
                                                  self.portal.sessions[s]["chat_id"] == other)]["status"], 65)
        foreign = self.ids["foreign"]                          # a line we are not in: no access
        self.assertOneLineError(self.act(foreign, "join"), 1, "join refused", "ACCESS_DENIED")
        self.assertOneLineError(self.act(foreign, "intercept"), 1, "intercept refused", "OPERATOR_WRONG")
        self.assertOneLineError(self.act(foreign, "close"), 1, "close refused", "ACCESS_DENIED")
        self.assertOneLineError(self.act(foreign, "spam"), 1, "spam refused", "ACCESS_DENIED")
        self.assertOneLineError(self.act(foreign, "answer"), 1, "answer refused", "ACCESS_DENIED")
        self.assertOneLineError(self.act(foreign, "transfer=queue3"), 1, "transfer refused", "OPERATOR_WRONG")
        self.assertOneLineError(self.act(self.ids["closed"], "skip"), 1, "skip refused", "without a reason")

    def test_bad_actions_are_usage_errors(self) -> None:
        chat = self.ids["lines_member"]
        for action, needle in (("dance", "expected one of"), ("transfer", "transfer to whom"),
                               ("close=now", "takes no value")):
            with self.subTest(action=action):
                self.assertOneLineError(self.act(chat, action), 2, needle)
        self.assertOneLineError(self.run_script(SEND, "chat%d" % chat, "--session", "close", "text"), 2, "no TEXT")
        self.assertOneLineError(self.run_script(SEND, "user9", "--session", "close"), 2, "chatN")


class ConsoleChat(ChatHarness):
    """The same from the terminal chat, plus files."""

    def test_a_whole_conversation_from_the_terminal(self) -> None:
        chat = self.portal.new_conversation(3, "Tess Terminal", None, "I need help")["chat_id"]
        p = self.open_chat("chat%d" % chat)
        p.expect("waiting in the queue, nobody has answered")
        start = p.expect("/help for commands")
        p.send("/help\r")
        p.expect("/transfer X", start=start)
        p.send("/answer\r")
        p.expect("(you took the conversation)", start=start)
        p.expect(": yours", start=start)
        p.send("we are on it\r")
        self.wait_for_text(chat, "we are on it")
        path = os.path.join(self.tmp, "terms.pdf")
        with open(path, "wb") as fh:
            fh.write(b"%PDF-1.4 terms")
        p.send("/file %s here are the terms\r" % path)
        self.wait_for_text(chat, "here are the terms")
        p.expect("You: [document #1: terms.pdf, application/pdf, 14 B] here are the terms", start=start)
        p.send("/file %s\r" % os.path.join(self.tmp, "nope.pdf"))
        p.expect("no such file", start=start)
        self.portal.customer_media(chat, "file", "contract.pdf", size=3000, caption="signed")
        p.expect("#", start=start)
        p.expect("contract.pdf, application/pdf, 3 KB", start=start)
        p.send("/save 2 %s\r" % os.path.join(self.tmp, "saved"))
        p.expect("(saved", start=start)
        with open(os.path.join(self.tmp, "saved", "contract.pdf"), "rb") as fh:
            self.assertEqual(len(fh.read()), 3000)
        p.send("/save 9\r")
        p.expect("N is the number of a file", start=start)
        p.send("/transfer nobody\r")
        p.expect("transfer to whom", start=start)
        p.send("/transfer 9999\r")
        p.expect("transfer refused: You can not redirect to this operator", start=start)
        p.send("/close\r")
        p.expect("the conversation is closed", start=start)
        p.expect("no open session", start=start)
        self.assertNotIn(7, self.portal.chats[chat]["members"])
        p.send("/skip\r")
        p.expect("skip refused", start=start)
        p.send("\x04")               # (the close's system message may be printed just now: see _eof_between_inputs)
        self.assertEqual(p.wait(), 0)
