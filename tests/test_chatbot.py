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

import b24common as bc
from tests.support import PortalCase, free_port
from tests.test_push import QuietWorld, post

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
        # the emulator counts a call once it has answered it: the state above can be seen a moment before
        self.wait_for(lambda: "imopenlines.bot.session.operator" in self.portal.stats()["counts"], 2,
                      "the bot's own session method")
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

    def test_a_lost_answer_is_found_by_its_template_id_and_not_posted_twice(self) -> None:
        saved, proc = self.bot_ready()
        self.portal.fault("drop_after", count=1, method="imbot.v2.Chat.Message.send")   # sent, answer lost
        chat = self.portal.new_conversation(LINE, "Lou Lost", None, "did you get it?")["chat_id"]
        self.wait_for(lambda: self.answered(chat, "did you get it?"), 6, "the answer")
        time.sleep(1.5)
        self.assertEqual(self.by_bot(chat, saved["bot_id"]), ["Echo: did you get it?"], "posted once")
        self.assertEqual(self.asked("did you get it?"), 1, "the bot is not asked again either")
        self.assertEqual(proc.stop(), 0)

    def test_kill_9_while_the_bot_is_busy_three_rounds_nothing_lost_nothing_twice(self) -> None:
        saved = self.register()
        self.attach()
        env = dict(B24_POLL_SEC="0.2", B24_RECONCILE_SEC="30")
        chats = [self.portal.new_conversation(LINE, "K%d" % i, None, "start %d" % i)["chat_id"] for i in range(3)]
        sent = ["start %d" % i for i in range(3)]
        for round_ in range(3):
            proc = self.start_bridge(**env)
            for i in range(4):
                text = "r%d m%d" % (round_, i)
                self.portal.customer_message(chats[(round_ + i) % 3], text)
                sent.append(text)
                time.sleep(0.07 * i)
            proc.kill()                            # kill -9 mid-traffic
            for chat in chats:                     # the customers go on while the bridge is down
                text = "while down %d/%d" % (round_, chat)
                self.portal.customer_message(chat, text)
                sent.append(text)
        proc = self.start_bridge(**env)
        self.wait_for(lambda: all(any(self.answered(c, t) for c in chats) for t in sent), 20, "every answer")
        time.sleep(1.0)
        posted = [x[len("Echo: "):] for c in chats for x in self.by_bot(c, saved["bot_id"])]
        self.assertEqual(sorted(posted), sorted(sent), "every message answered as the bot, each once")
        self.assertEqual(proc.stop(), 0)

    def test_the_legacy_bot_moves_to_fetch_mode_and_its_posts_stop(self) -> None:
        url = "http://127.0.0.1:%d/bot-events" % free_port()
        legacy = self.register(url)
        self.assertEqual((legacy["mode"], self.portal.bots[legacy["bot_id"]]["event_mode"]), ("webhook", "webhook"))
        moved = self.register()
        self.assertIn("moved to fetch mode", self.reg_output)
        self.assertEqual((moved["bot_id"], moved["client_id"], moved["mode"]),
                         (legacy["bot_id"], legacy["client_id"], "fetch"), "the same bot, its key kept")
        self.assertEqual(self.portal.bots[legacy["bot_id"]]["event_mode"], "fetch")
        self.attach()
        proc = self.start_bridge(B24_POLL_SEC="0.3", B24_RECONCILE_SEC="30")
        chat = self.portal.new_conversation(LINE, "Vera One", None, "hello moved bot")["chat_id"]
        self.wait_for(lambda: self.answered(chat, "hello moved bot"), 5, "the answer")
        self.assertEqual(self.by_bot(chat, legacy["bot_id"]), ["Echo: hello moved bot"])
        self.assertEqual(self.portal.push_stats()["sent"], 0, "no POSTs once in fetch mode")
        self.assertEqual(proc.stop(), 0)
        bad = self.run_script("b24_ol_bridge.py", "--register-bot", url, env=self.bridge_env())
        self.assertOneLineError(bad, 2, "fetches its events", "--unregister-bot")

    def test_what_goes_wrong_is_said_in_one_line(self) -> None:
        none_yet = self.run_script("b24_ol_bridge.py", "--attach-bot", "3", env=self.bridge_env())
        self.assertOneLineError(none_yet, 2, "--register-bot first")
        saved = self.register()
        self.portal.permissions(7, lines_modify=False)
        refused = self.run_script("b24_ol_bridge.py", "--attach-bot", "3", env=self.bridge_env())
        self.assertOneLineError(refused, 2, "may not change Open Line 3", "permission to modify lines")
        self.assertIsNone(self.portal.lines[LINE]["bot"])
        self.portal.permissions(7, lines_modify=True)
        self.assertOneLineError(self.run_script("b24_ol_bridge.py", "--attach-bot", "99", env=self.bridge_env()),
                                2, "did not change line 99")
        self.assertOneLineError(self.run_script("b24_ol_bridge.py", "--attach-bot", "x", env=self.bridge_env()),
                                2, "--attach-bot")
        check = self.run_script("b24_ol_bridge.py", "--check", env=self.bridge_env())
        self.assertIn("is the chat bot of no line", check.stdout)
        self.assertNotIn(saved["client_id"], check.stdout + check.stderr)
        # chat-bot.json lost: registering again would get the old bot bound to a key we no longer have
        os.unlink(os.path.join(self.tmp, "state", "chat-bot.json"))
        for extra in ((), ("http://127.0.0.1:%d/e" % free_port(),)):
            again = self.run_script("b24_ol_bridge.py", "--register-bot", *extra, env=self.bridge_env())
            self.assertOneLineError(again, 2, "already registered", "chat-bot.json", "BRIDGE_BOT_CODE")
        mine = self.register(BRIDGE_BOT_CODE="second_bridge")
        self.assertNotEqual(mine["bot_id"], saved["bot_id"])
        gone = self.run_script("b24_ol_bridge.py", "--unregister-bot", env=self.bridge_env())
        self.assertEqual(gone.returncode, 0, gone.stderr)
        self.assertNotIn(mine["bot_id"], self.portal.bots)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "state", "chat-bot.json")))

    def test_a_file_in_the_answer_goes_as_the_bot(self) -> None:
        self.bot.file_word = "catalog"
        saved, proc = self.bot_ready()
        chat = self.portal.new_conversation(LINE, "Cat Alog", None, "the catalog please")["chat_id"]
        self.wait_for(lambda: any(m["params"].get("FILE_ID") for m in self.portal.chat_messages(chat)
                                  if isinstance(m["params"], dict)), 6, "the file")
        msg = [m for m in self.portal.chat_messages(chat) if isinstance(m["params"], dict) and m["params"].get("FILE_ID")]
        self.assertEqual([(m["author_id"], m["text"]) for m in msg], [(saved["bot_id"], "The catalog")])
        self.assertEqual(self.by_bot(chat, saved["bot_id"]), ["Here is our catalog.", "The catalog"])
        self.wait_for(lambda: "imbot.v2.file.upload" in self.portal.stats()["counts"], 2,
                      "the upload counted (the emulator counts a call once it has answered it)")
        self.assertEqual(proc.stop(), 0)

    def test_a_slow_bot_shows_typing_in_the_chat(self) -> None:
        self.bot.delay = {"think hard": 2.5}
        saved, proc = self.bot_ready()
        chat = self.portal.new_conversation(LINE, "Tara Type", None, "quick")["chat_id"]
        self.wait_for(lambda: self.answered(chat, "quick"), 5, "the quick answer")
        self.assertEqual(self.portal.typing_shown(), [], "a quick bot costs no typing request")
        self.portal.customer_message(chat, "think hard")
        self.wait_for(lambda: self.answered(chat, "think hard"), 8, "the slow answer")
        shown = self.portal.typing_shown()
        self.assertEqual([(t["bot_id"], t["chat_id"]) for t in shown], [(saved["bot_id"], chat)], "shown once")
        self.assertEqual(proc.stop(), 0)


class ReadmeChatBot(QuietWorld):
    """The README's chat bot walkthrough, as a newcomer runs it (a free port instead of 8088)."""

    def test_the_walkthrough_works_as_printed(self) -> None:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as fh:
            block = fh.read().split("the emulator plays the portal, its bots and its lines", 1)[1]
        block = block.split("```sh\n", 1)[1].split("```", 1)[0]
        for needle in ("python3 mock_b24_portal.py --port 8088 &",
                       """_control/webhook -d '{"scopes": ["im", "imopenlines", "imbot", "user"]}'""",
                       "python3 b24_ol_bridge.py --register-bot && python3 b24_ol_bridge.py --attach-bot 3",
                       """_control/new_conversation -d '{"line_id": 3, "name": "Test Customer", "text": "hi"}'"""):
            self.assertIn(needle, block)
        port = free_port()
        portal = self.start_script("mock_b24_portal.py", "--port", str(port))
        first = portal.read_lines(1, 10)
        self.assertTrue(first and first[0].startswith("B24_WEBHOOK_BASE="), first)
        env = self.bridge_env(B24_WEBHOOK_BASE=first[0].split("=", 1)[1], B24_POLL_SEC="0.5")

        def control(name: str, body: dict) -> dict:
            status, text = post(port, json.dumps(body).encode(), ctype="application/json", path="/_control/" + name)
            self.assertEqual(status, 200, text)
            return json.loads(text)["result"]
        control("webhook", {"scopes": ["im", "imopenlines", "imbot", "user"]})
        for argv in (("--register-bot",), ("--attach-bot", "3")):
            done = self.run_script("b24_ol_bridge.py", *argv, env=env)
            self.assertEqual(done.returncode, 0, done.stderr)
        proc = self.start_script("b24_ol_bridge.py", env=env)
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        new = control("new_conversation", {"line_id": 3, "name": "Test Customer", "text": "hi"})
        self.wait_for(lambda: any(r["payload"]["text"] == "hi" for r in self.bot.received), 10, "the bot")

        def texts() -> list:
            status, text = post(port, b"", path="/_control/messages?chat_id=%d" % new["chat_id"], method="GET")
            return [m["text"] for m in json.loads(text)["result"]]
        self.wait_for(lambda: "Echo: hi" in texts(), 10, "the answer in the chat")
        self.assertEqual(proc.stop(), 0)


class PortalSide(PortalCase):
    """The emulator's Chatbots 2.0 and welcome-bot rules, as the fact sheet gives them (§12.1, §14, §15)."""

    def setUp(self) -> None:
        super().setUp()
        self.portal.set_webhook(scopes=["im", "imopenlines", "imbot", "user"])
        self.api = self.client()

    def call(self, method: str, **params):
        return self.api.call(method, params)

    def refused(self, code: str, method: str, **params) -> None:
        with self.assertRaises(bc.APIError) as ctx:
            self.call(method, **params)
        self.assertEqual(ctx.exception.code, code, method)

    def bot(self, token: str = "tok-1", code: str = "helper", mode: str = "fetch") -> int:
        return self.call("imbot.v2.Bot.register", botToken=token, fields={
            "code": code, "type": "openline", "eventMode": mode, "properties": {"name": "Helper"}})["bot"]["id"]

    def test_bots_belong_to_their_token_and_codes_are_idempotent(self) -> None:
        self.refused("BOT_TOKEN_INVALID_LENGTH", "imbot.v2.Bot.register", botToken="x" * 41,
                     fields={"code": "c", "properties": {"name": "n"}})
        self.refused("BOT_TOKEN_NOT_SPECIFIED", "imbot.v2.Bot.register", fields={"code": "c"})
        self.refused("BOT_PROPERTIES_REQUIRED", "imbot.v2.Bot.register", botToken="t", fields={"code": "c"})
        bot_id = self.bot()
        self.assertEqual(self.bot(), bot_id, "the same code and owner: the same bot, unchanged")
        self.refused("BOT_CODE_ALREADY_TAKEN", "imbot.v2.Bot.register", botToken="tok-2",
                     fields={"code": "helper", "properties": {"name": "Other"}})
        self.refused("BOT_OWNERSHIP_ERROR", "imbot.v2.Event.get", botId=bot_id, botToken="tok-2")
        self.refused("BOT_ID_REQUIRED", "imbot.v2.Event.get", botToken="tok-1")
        # a v1 bot's CLIENT_ID owns it as a botToken (§14.1, §14.6)
        v1 = self.call("imbot.register", CODE="old", TYPE="O", CLIENT_ID="legacy-key",
                       EVENT_HANDLER="http://127.0.0.1:9/x", PROPERTIES={"NAME": "Old"})
        moved = self.call("imbot.v2.Bot.update", botId=v1, botToken="legacy-key", fields={"eventMode": "fetch"})
        self.assertEqual(moved["bot"]["eventMode"], "fetch")
        # a taken v1 code comes back as the old bot, silently, for another CLIENT_ID (§12)
        self.assertEqual(self.call("imbot.register", CODE="old", CLIENT_ID="new-key", EVENT_HANDLER="http://127.0.0.1:9/x",
                                   PROPERTIES={"NAME": "Old"}), v1)
        self.refused("APP_ID_ERROR", "imbot.message.add", BOT_ID=v1, CLIENT_ID="new-key", DIALOG_ID="chat1", MESSAGE="x")

    def test_line_settings_do_not_merge_and_the_bot_holds_new_sessions(self) -> None:
        bot_id = self.bot()
        self.assertTrue(self.call("imopenlines.config.update", CONFIG_ID=3, PARAMS={
            "WELCOME_BOT_ENABLE": "Y", "WELCOME_BOT_ID": bot_id, "WELCOME_BOT_JOIN": "always",
            "WELCOME_BOT_TIME": 0, "WELCOME_BOT_LEFT": "queue"}))
        got = self.call("imopenlines.config.get", CONFIG_ID=3)
        self.assertEqual((got["WELCOME_BOT_ID"], got["WELCOME_BOT_TIME"], got["MODIFY_USER_ID"]), (str(bot_id), "0", "7"))
        # the pitfall: without ENABLE=Y in the same call, id, time and leave fall back
        self.assertTrue(self.call("imopenlines.config.update", CONFIG_ID=3, PARAMS={"WELCOME_BOT_TIME": 0}))
        got = self.call("imopenlines.config.get", CONFIG_ID=3)
        self.assertEqual((got["WELCOME_BOT_ENABLE"], got["WELCOME_BOT_ID"], got["WELCOME_BOT_TIME"]), ("N", "0", "600"))
        self.assertIs(self.call("imopenlines.config.update", CONFIG_ID=99, PARAMS={}), False, "unknown line: false")
        self.refused("CONFIG_ID_EMPTY", "imopenlines.config.update", PARAMS={})
        self.portal.permissions(7, lines_modify=False)
        with self.assertRaises(bc.AccessDeniedError):
            self.call("imopenlines.config.update", CONFIG_ID=3, PARAMS={})
        self.portal.line_bot(3, bot_id, time=0)
        new = self.portal.new_conversation(3, "Quinn Queue", None, "hello")
        chat = self.portal.chats[new["chat_id"]]
        self.assertEqual((chat["owner"], self.portal.sessions[new["session_id"]]["operator"]), (bot_id, bot_id))
        self.assertFalse(self.portal.in_queue_for(chat, 7), "held by the bot: in nobody's queue")
        events = self.call("imbot.v2.Event.get", botId=bot_id, botToken="tok-1")
        self.assertEqual([e["type"] for e in events["events"]], ["ONIMBOTV2JOINCHAT", "ONIMBOTV2MESSAGEADD"])
        self.assertEqual(events["events"][1]["data"]["user"]["connector"], True)
        # the webhook user reads it by the JOIN permission (in the line's queue), without being a member
        self.assertTrue(self.call("im.dialog.messages.get", DIALOG_ID="chat%d" % chat["id"])["messages"])
        # the bot session's own methods: to the queue, the bot leaves (LEFT=queue)
        self.refused("CHAT_ID_EMPTY", "imopenlines.bot.session.operator")
        self.assertTrue(self.call("imopenlines.bot.session.operator", CHAT_ID=chat["id"]))
        self.assertNotIn(bot_id, chat["members"])
        self.assertTrue(self.portal.in_queue_for(chat, 7))
        self.refused("WRONG_CHAT", "imopenlines.bot.session.operator", CHAT_ID=chat["id"])
        self.refused("ACCESS_DENIED", "imbot.v2.Chat.Message.send", botId=bot_id, botToken="tok-1",
                     dialogId="chat%d" % chat["id"], fields={"message": "too late"})

    def test_transfer_from_the_bot_to_a_person_and_event_offsets(self) -> None:
        bot_id = self.bot()
        self.portal.line_bot(3, bot_id, time=0)
        chat = self.portal.new_conversation(3, "Uma User", None, "hi")["chat_id"]
        with self.assertRaises(bc.AccessDeniedError):
            self.call("imopenlines.bot.session.transfer", CHAT_ID=chat, TRANSFER_ID=11)
        self.assertTrue(self.call("imopenlines.bot.session.transfer", CHAT_ID=chat, TRANSFER_ID=11, CLIENT_ID="tok-1",
                                  LEAVE="N"))
        c = self.portal.chats[chat]
        self.assertEqual((c["owner"], 11 in c["members"], bot_id in c["members"]), (11, True, False),
                         "the person answers at once; the welcome bot leaves (LEFT=queue)")
        first = self.call("imbot.v2.Event.get", botId=bot_id, botToken="tok-1", limit=2)
        self.assertTrue(first["hasMore"], "a full page says there may be more")
        rest = self.call("imbot.v2.Event.get", botId=bot_id, botToken="tok-1", offset=first["nextOffset"])
        self.assertEqual((rest["events"], rest["nextOffset"], rest["hasMore"]), ([], first["nextOffset"], False),
                         "nextOffset is never null: the offset sent when nothing came back")
        self.refused("USER_NOT_SUBSCRIBED", "imbot.v2.Event.get", botId=bot_id, botToken="tok-1", withUserEvents=True)

    def test_the_bot_uploads_a_file_into_its_chat(self) -> None:
        bot_id = self.bot()
        self.portal.line_bot(3, bot_id, time=0)
        chat = self.portal.new_conversation(3, "Fay File", None, "send me the invoice")["chat_id"]
        up = self.call("imbot.v2.File.upload", botId=bot_id, botToken="tok-1", dialogId="chat%d" % chat,
                       fields={"name": "invoice.pdf", "content": "JVBERi0xLjQK", "message": "your invoice"})
        self.assertEqual((up["file"]["name"], up["file"]["size"], up["dialogId"]), ("invoice.pdf", 9, "chat%d" % chat))
        self.assertNotIn("urlDownload", up["file"], "the bot's file object is the short one")
        msg = self.portal.messages[up["messageId"]]
        self.assertEqual((msg["author_id"], msg["text"], msg["params"]["FILE_ID"]),
                         (bot_id, "your invoice", [up["file"]["id"]]))
        self.refused("FILE_INVALID_CONTENT", "imbot.v2.File.upload", botId=bot_id, botToken="tok-1",
                     dialogId="chat%d" % chat, fields={"name": "x.pdf", "content": "not base64!"})
        self.refused("FILE_EMPTY", "imbot.v2.File.upload", botId=bot_id, botToken="tok-1",
                     dialogId="chat%d" % chat, fields={"name": "x.pdf"})
        self.refused("ACCESS_DENIED", "im.v2.File.upload", dialogId="chat%d" % chat,
                     fields={"name": "x.pdf", "content": "JVBERi0xLjQK"})      # the webhook user is no member


if __name__ == "__main__":
    unittest.main()
