"""The bridge as the line's own chat bot (Chatbots 2.0, fetch mode): register, attach, answer, hand over.

The emulator keeps the bot's events in its queue (``imbot.v2.Event.get``) and
plays the line's welcome-bot rules (fact sheet §14, §15): who holds a
session, when the bot lets go.  The bridge runs as a subprocess.
"""
from __future__ import annotations

import json
import os
import time
import unittest

from tests.test_push import QuietWorld

LINE = 3


class FetchBot(QuietWorld):
    """A bridge whose replies go as its own Open Lines bot."""

    def setUp(self) -> None:
        super().setUp()
        self.portal.set_webhook(scopes=["im", "imopenlines", "imbot", "user"])

    def register(self, *extra: str, **env) -> dict:
        reg = self.run_script("b24_ol_bridge.py", "--register-bot", *extra, env=self.bridge_env(**env))
        self.assertEqual(reg.returncode, 0, reg.stderr)
        with open(os.path.join(self.tmp, "state", "chat-bot.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        self.assertNotIn(saved["client_id"], reg.stdout + reg.stderr, "the bot's key is a secret")
        self.reg_output = reg.stdout
        return saved

    def attach(self, line: int = LINE, **env) -> str:
        done = self.run_script("b24_ol_bridge.py", "--attach-bot", str(line), env=self.bridge_env(**env))
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def bot_ready(self, *args: str, **env) -> tuple:
        saved = self.register()
        self.attach(**env)
        proc = self.start_bridge(*args, **dict(dict(B24_POLL_SEC="0.3", B24_RECONCILE_SEC="30"), **env))
        self.assertTrue(proc.wait_stderr("source: bot", 5), proc.all_output())
        return saved, proc

    def by_bot(self, chat: int, bot_id: int) -> list:
        return [m["text"] for m in self.portal.chat_messages(chat) if m["author_id"] == bot_id]

    def test_two_commands_make_the_bridge_the_lines_bot(self) -> None:
        saved = self.register()
        self.assertEqual(saved["mode"], "fetch")
        self.assertLessEqual(len(saved["client_id"]), 40, "the platform refuses longer bot tokens")
        bot = self.portal.bots[saved["bot_id"]]
        self.assertEqual((bot["event_mode"], bot["openline"], bot["type"]), ("fetch", True, "openline"))
        self.assertIn("no public URL", self.reg_output)
        self.assertEqual(self.register()["bot_id"], saved["bot_id"], "registering again: the same bot")
        self.assertEqual(len(self.portal.bots), 1)
        out = self.attach()
        self.assertIn("chat bot %d (ours)" % saved["bot_id"], out)
        line = self.portal.lines[LINE]
        self.assertEqual((line["bot"], line["bot_join"], line["bot_time"], line["bot_left"]),
                         (saved["bot_id"], "always", 0, "queue"))
        proc = self.start_bridge(B24_POLL_SEC="0.3", B24_RECONCILE_SEC="30")
        self.assertTrue(proc.wait_stderr("source: bot", 5), proc.all_output())
        new = self.portal.new_conversation(LINE, "Rita Example", "+10000000170", "hello bot")
        chat = new["chat_id"]
        self.wait_for(lambda: self.answered(chat, "hello bot"), 5, "the bot's answer")
        reply = self.portal.chat_messages(chat)[-1]
        self.assertEqual(reply["author_id"], saved["bot_id"], "posted by the chat bot")
        self.assertTrue(reply["uuid"], "with a templateId")
        self.portal.customer_message(chat, "and again")
        self.wait_for(lambda: self.answered(chat, "and again"), 5, "the second answer")
        time.sleep(1.0)
        self.assertEqual((self.asked("hello bot"), self.asked("and again")), (1, 1))
        self.assertEqual(self.by_bot(chat, saved["bot_id"]), ["Echo: hello bot", "Echo: and again"], "each once")
        self.assertEqual(self.portal.push_stats()["sent"], 0, "no POSTs: nothing needs a public URL")
        self.assertNotIn(saved["client_id"], proc.all_output())
        self.assertEqual(proc.stop(), 0)

    def test_handoff_a_zero_an_operator_and_the_bots_time_end_the_answers_of_that_session(self) -> None:
        self.bot.handoff_word = "human"
        saved, proc = self.bot_ready(B24_RECONCILE_SEC="1.5")
        bot_id = saved["bot_id"]
        chats = {}
        for name in ("handoff", "zero", "operator"):
            chats[name] = self.portal.new_conversation(LINE, "Cust %s" % name, None, "hi from %s" % name)["chat_id"]
        for name, chat in chats.items():
            self.wait_for(lambda c=chat, n=name: self.answered(c, "hi from %s" % n), 5, "the first answers")
        # the bot hands over: the bot session ends through the bot's own session method
        self.portal.customer_message(chats["handoff"], "get me a human")
        self.wait_for(lambda: "A person will take over from here." in self.texts(chats["handoff"]), 5, "handoff")
        self.wait_for(lambda: bot_id not in self.portal.chats[chats["handoff"]]["members"], 5, "the bot leaving")
        session = self.portal.sessions[self.portal.chats[chats["handoff"]]["session_id"]]
        self.assertEqual((session["status"], session["operator"]), (5, 0), "waiting for the line's operators")
        self.assertIn("imopenlines.bot.session.operator", self.portal.stats()["counts"])
        # the customer types "0": not answered, and the portal hands the chat to the operators
        self.portal.customer_message(chats["zero"], "0")
        # an operator takes a chat from the bot (the bot leaves: WELCOME_BOT_LEFT=queue)
        self.portal.take_chat(chats["operator"], 11)
        self.assertNotIn(bot_id, self.portal.chats[chats["operator"]]["members"])
        time.sleep(0.5)
        for name, chat in chats.items():
            self.portal.customer_message(chat, "still there, %s?" % name)
        time.sleep(3.5)                               # two reconciliation scans read every chat again
        for name in chats:
            self.assertEqual(self.asked("still there, %s?" % name), 0, name)
        self.assertEqual(self.asked("0"), 0, "a 0 is for the portal, not the bot")
        log = proc.all_output()
        self.assertIn("the customer typed 0", log)
        self.assertIn("operator 11 has it now", log)
        # a new session with the bot: answered again
        self.portal.close_session(chats["zero"])
        self.portal.customer_message(chats["zero"], "back again")
        self.wait_for(lambda: self.answered(chats["zero"], "back again"), 6, "the new session's answer")
        self.assertEqual(self.by_bot(chats["zero"], bot_id)[-1], "Echo: back again")
        self.assertEqual(proc.stop(), 0)

    def test_when_the_bots_time_runs_out_its_chat_goes_to_the_queue_and_the_answers_stop(self) -> None:
        saved, proc = self.bot_ready(BRIDGE_BOT_TIME="2", B24_RECONCILE_SEC="1")
        self.assertEqual(self.portal.lines[LINE]["bot_time"], 2)
        chat = self.portal.new_conversation(LINE, "Tim Out", None, "quick question")["chat_id"]
        self.wait_for(lambda: self.answered(chat, "quick question"), 5, "the answer in time")
        time.sleep(2.5)
        self.portal.customer_message(chat, "after the time")   # the bot is out: the line's operators have it
        self.assertNotIn(saved["bot_id"], self.portal.chats[chat]["members"])
        self.assertTrue(self.portal.in_queue_for(self.portal.chats[chat], 7), "waiting in the queue")
        time.sleep(3)
        self.assertEqual(self.asked("after the time"), 0)
        self.assertNotIn("Echo: after the time", self.texts(chat))
        self.assertEqual(proc.stop(), 0)
        check = self.run_script("b24_ol_bridge.py", "--check", env=self.bridge_env())
        self.assertIn("loses each chat after 2 s", check.stdout)


if __name__ == "__main__":
    unittest.main()
