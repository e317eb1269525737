"""What a business expects from a bot bridge: human takeover, handoff, signed requests, routes,
debounced bursts, the payload contract, taking or joining, and replies in batches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import mock_bot_server
import olbridge.bot as botlib
from tests.support import PY, script
from tests.test_bridge import BRIDGE, TOKEN, BridgeHarness

SECRET = "s3cret-shared-with-the-bot"


class Business(BridgeHarness):
    def echoes(self, chat: int) -> list:
        return [t for t in self.texts(chat) if t.startswith("Echo: ")]

    def test_a_person_writing_pauses_the_bot_and_a_late_answer_is_dropped(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.delay = {"slow question": 3.0}
        proc = self.start_bridge()
        self.portal.customer_message(chat, "slow question")
        self.wait_for(lambda: len(self.bot.received) == 1, what="the bot call")
        self.portal.operator_message(chat, 9, "Pavel here, I will handle this")       # a person steps in
        self.assertTrue(proc.wait_stderr("the bot's answer is not posted", 15), proc.all_output())
        self.assertEqual(self.echoes(chat), [])
        self.portal.customer_message(chat, "thanks Pavel")
        self.assertTrue(proc.wait_stderr("a person wrote in this dialog; the bot pauses", 10), proc.all_output())
        time.sleep(1)
        self.assertEqual(len(self.bot.received), 1, "paused: the bot is not asked")
        # someone typing as the webhook user (not the bridge) pauses it too
        other = self.ids["lines_member2"]
        subprocess.run([PY, script("b24_send_message.py"), "chat%d" % other, "typed by a person"],
                       env=self.env(), capture_output=True, timeout=30, cwd=self.tmp)
        self.assertTrue(proc.wait_stderr("someone as the webhook user wrote", 10), proc.all_output())
        self.portal.customer_message(other, "hello?")
        time.sleep(2)
        self.assertEqual(self.echoes(other), [])
        self.assertEqual(proc.stop(), 0)

    def test_the_pause_ends_on_time_and_at_a_new_session(self) -> None:
        chat, other = self.ids["lines_member"], self.ids["lines_member2"]
        proc = self.start_bridge(BRIDGE_HUMAN_PAUSE_MIN="0.05")          # 3 s
        self.portal.operator_message(chat, 9, "a person")
        self.portal.operator_message(other, 9, "a person")
        self.assertTrue(proc.wait_stderr("the bot pauses here until", 10), proc.all_output())
        self.portal.customer_message(chat, "during the pause")
        time.sleep(4)
        self.portal.customer_message(chat, "after the pause")
        self.wait_for(lambda: "Echo: after the pause" in self.texts(chat), what="the bot back after the pause")
        self.assertNotIn("Echo: during the pause", self.texts(chat))
        self.assertEqual(proc.stop(), 0)
        proc = self.start_bridge(BRIDGE_HUMAN_PAUSE_MIN="60")
        self.portal.operator_message(other, 9, "a person again")
        time.sleep(1.5)
        self.portal.close_session(other)
        self.portal.customer_message(other, "a new conversation")      # a new session: the bot is back
        self.portal.take_chat(other, 7)
        self.portal.customer_message(other, "anyone?")
        self.wait_for(lambda: "Echo: anyone?" in self.texts(other), what="the bot in the new session")
        self.assertEqual(proc.stop(), 0)

    def test_handoff_transfers_to_the_queue_and_the_bot_stays_out(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.handoff_word = "human"
        proc = self.start_bridge(BRIDGE_HANDOFF_TO="queue")
        self.portal.customer_message(chat, "I want a human")
        self.wait_for(lambda: "A person will take over from here." in self.texts(chat), what="the last text")
        self.assertTrue(proc.wait_stderr("transferred to the queue of line 3", 10), proc.all_output())
        self.assertNotIn(7, self.portal.chats[chat]["members"])
        self.assertEqual(self.portal.sessions[self.portal.chats[chat]["session_id"]]["status"], 0)
        self.portal.customer_message(chat, "hello, anyone?")
        time.sleep(2)
        self.assertEqual(len(self.bot.received), 1, "the bot stays out of the handed-over session")
        self.assertEqual(proc.stop(), 0)

    def test_signed_requests_forged_or_stale_are_refused_by_the_bot(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.secret = SECRET
        proc = self.start_bridge(BOT_HTTP_SECRET=SECRET)
        self.portal.customer_message(chat, "signed")
        self.wait_for(lambda: "Echo: signed" in self.texts(chat), what="the signed request answered")
        headers = self.bot.received[0]["headers"]
        self.assertTrue(headers[botlib.SIGNATURE_HEADER].startswith("sha256="))
        self.assertEqual(proc.stop(), 0)
        self.assertNotIn(SECRET, proc.all_output())
        proc = self.start_bridge(BOT_HTTP_SECRET="not-the-right-secret-at-all")
        self.portal.customer_message(chat, "forged")
        self.assertTrue(proc.wait_stderr("answered HTTP 401", 15), proc.all_output())
        self.assertIn("bad signature", self.bot.rejected)
        self.assertEqual(proc.stop(), 0)
        body = b'{"text": "replayed"}'
        old = botlib.sign_request(SECRET, body, now=time.time() - 3600)
        self.assertEqual(botlib.verify_signature(SECRET, body, old[botlib.TIMESTAMP_HEADER], old[botlib.SIGNATURE_HEADER]),
                         "stale timestamp (a replay?)")
        fresh = botlib.sign_request(SECRET, body)
        self.assertEqual(botlib.verify_signature(SECRET, body, fresh[botlib.TIMESTAMP_HEADER], fresh[botlib.SIGNATURE_HEADER]), "")
        self.assertEqual(botlib.verify_signature(SECRET, body + b" ", fresh[botlib.TIMESTAMP_HEADER],
                                             fresh[botlib.SIGNATURE_HEADER]), "bad signature")

    def test_routes_pick_the_bot_per_line(self) -> None:
        sales = mock_bot_server.BotServer(token=TOKEN).start()
        self.addCleanup(sales.stop)
        sales.replies = lambda text: ["Sales bot: %s" % text]
        support, line1 = self.ids["lines_member"], self.ids["lines_member2"]    # lines 3 and 1
        self.portal.join(self.ids["foreign"], 7)                                  # line 5: no route
        proc = self.start_bridge(BOT_HTTP_URL=None, BOT_ROUTES="3=%s,1=%s" % (self.bot.url, sales.url))
        self.portal.customer_message(support, "to support")
        self.portal.customer_message(line1, "to sales")
        self.portal.customer_message(self.ids["foreign"], "to nobody")
        self.wait_for(lambda: "Echo: to support" in self.texts(support), what="the support bot")
        self.wait_for(lambda: "Sales bot: to sales" in self.texts(line1), what="the sales bot")
        self.assertTrue(proc.wait_stderr("line 5 has no bot", 10), proc.all_output())
        self.assertEqual([r["payload"]["text"] for r in self.bot.received], ["to support"])
        self.assertEqual(proc.stop(), 0)

    def test_a_burst_is_one_bot_turn(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge(BRIDGE_DEBOUNCE_SEC="1.5")
        ids = [self.portal.customer_message(chat, t)["message_id"] for t in ("hi", "I have a question", "about my order")]
        self.wait_for(lambda: self.echoes(chat), timeout=20, what="the answer")
        time.sleep(1)
        self.assertEqual(len(self.bot.received), 1)
        p = self.bot.received[0]["payload"]
        self.assertEqual(p["text"], "hi\nI have a question\nabout my order")
        self.assertEqual(p["message_ids"], ids)
        self.assertEqual(self.echoes(chat), ["Echo: hi\nI have a question\nabout my order"])
        self.assertEqual(proc.stop(), 0)

    def test_the_contract_event_id_attempt_idempotency_crm_session(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.fail_next = 1
        proc = self.start_bridge()
        sent = self.portal.customer_message(chat, "contract")
        self.wait_for(lambda: "Echo: contract" in self.texts(chat), timeout=20, what="the answer after a retry")
        first, second = self.bot.received[0], self.bot.received[1]
        self.assertEqual(first["payload"]["event_id"], second["payload"]["event_id"])
        self.assertEqual((first["payload"]["attempt"], second["payload"]["attempt"]), (1, 2))
        self.assertEqual(second["headers"]["Idempotency-Key"], second["payload"]["event_id"])
        p = second["payload"]
        self.assertEqual((p["sender"], p["message_ids"]), ("chat%d" % chat, [sent["message_id"]]))
        self.assertEqual(p["crm"]["lead"], self.portal.chats[chat]["crm_lead"])
        self.assertEqual(p["session_id"], self.portal.chats[chat]["session_id"])
        self.assertEqual(proc.stop(), 0)

    def test_bridge_take_join_and_concurrency(self) -> None:
        queued = self.ids["queued"]
        proc = self.start_bridge(BRIDGE_TAKE="join", BRIDGE_MAX_CONCURRENCY="3")
        self.assertTrue(proc.wait_stderr("(3 dialogs side by side)", 5), proc.all_output())
        self.portal.customer_message(queued, "join me")
        self.wait_for(lambda: "Echo: join me" in self.texts(queued), what="the answer after joining")
        self.assertIn("Olga Sidorova joined the conversation", self.texts(queued))
        self.assertEqual(proc.stop(), 0)

    def test_replies_go_out_in_batches_in_order_and_survive_a_lost_batch_answer(self) -> None:
        self.portal.set_limits(rate=1000, burst=100000)
        chats = self.portal.add_dialogs(12)
        self.bot.delay = {}
        proc = self.start_bridge(B24_RATE_PER_SEC="50", B24_RATE_BURST="1000")
        self.portal.reset_stats()
        self.portal.fault("drop_after", count=1, method="batch")     # one batch answer is lost
        for n in range(3):
            for c in chats:
                self.portal.customer_message(c, "m%d" % n)
        want = ["Echo: m0", "Echo: m1", "Echo: m2"]
        self.wait_for(lambda: all(self.echoes(c) == want for c in chats), timeout=60, what="every reply, in order")
        time.sleep(1)
        for c in chats:
            self.assertEqual(self.echoes(c), want, "chat%d" % c)
        log = [r for r in self.portal.stats()["log"]]
        self.assertLess(self.portal.stats()["counts"].get("im.message.add", 0), 12,
                        "most replies went out inside batches")
        self.assertTrue(any(r["method"] == "batch" for r in log))
        self.assertEqual(proc.stop(), 0)

    def test_when_the_budget_binds_the_first_answers_wait_for_those_on_their_way(self) -> None:
        # a bucket of one request: every request waits for the one before (the budget is what limits us);
        # half the answers come at once, half 0.6 s later -- one batch for all, not one for each half
        self.portal.set_limits(rate=1000, burst=100000)
        chats = self.portal.add_dialogs(8)
        self.bot.delay = {"slow %d" % c: 0.6 for c in chats[:4]}
        proc = self.start_bridge(B24_RATE_PER_SEC="2", B24_RATE_BURST="2", BRIDGE_MAX_CONCURRENCY="8")
        self.portal.reset_stats()
        with self.portal.lock:             # all eight in one scan
            for c in chats:
                self.portal.customer_message(c, ("slow %d" if c in chats[:4] else "quick %d") % c)
        self.wait_for(lambda: all(len(self.echoes(c)) == 1 for c in chats), timeout=20, what="every answer")

        def posts() -> list:
            return [r for r in self.portal.stats()["log"] if "im.message.add" in (r.get("calls") or [r["method"]])]
        # the portal logs a request once its answer is ready, a moment after the messages are in the chats
        self.wait_for(posts, timeout=5, what="the post request in the portal's log")
        time.sleep(0.5)
        self.assertEqual(len(posts()), 1, posts())
        self.assertEqual(proc.stop(), 0)


class MockBot(BridgeHarness):
    def test_flags_by_hand(self) -> None:
        p = subprocess.Popen([PY, script("mock_bot_server.py"), "--multi", "2", "--log-json", "--secret", SECRET],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.tmp)
        self.addCleanup(p.kill)
        url = p.stdout.readline().strip().split("=", 1)[1]
        chat = self.ids["lines_member"]
        proc = self.start_bridge(BOT_HTTP_URL=url, BOT_HTTP_AUTH=None, BOT_HTTP_SECRET=SECRET)
        self.portal.customer_message(chat, "twice please")
        self.wait_for(lambda: "Echo: twice please (2/2)" in self.texts(chat), what="two replies")
        self.assertEqual(json.loads(p.stdout.readline())["text"], "twice please")
        self.assertEqual(proc.stop(), 0)
        check = self.run_script(BRIDGE, "--check", env=self.bridge_env(BOT_HTTP_URL=url, BOT_HTTP_AUTH=None,
                                                                      BOT_HTTP_SECRET=SECRET))
        self.assertIn("refuses a request with a wrong signature (HTTP 401)", check.stdout)





class PausesInSight(BridgeHarness):
    echoes = Business.echoes

    """The human-takeover pause can be seen (metrics, --paused) and lifted (--resume, a reload with 0)."""

    def test_paused_dialogs_are_listed_counted_and_resumed(self) -> None:
        from tests.test_push import free_port
        chat = self.ids["lines_member"]
        health = free_port()
        proc = self.start_bridge(BRIDGE_HTTP_LISTEN=str(health))
        self.portal.operator_message(chat, 9, "Pavel here")
        self.portal.customer_message(chat, "thanks Pavel")
        self.assertTrue(proc.wait_stderr("a person wrote in this dialog; the bot pauses", 10), proc.all_output())
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                "http://127.0.0.1:%d/metrics" % health, timeout=10) as resp:
            metrics = resp.read().decode()
        self.assertIn('b24_bridge_paused_dialogs{why="person wrote"} 1', metrics)
        self.assertIn("b24_bridge_paused_total 1", metrics)
        listed = self.run_script(BRIDGE, "--paused", env=self.bridge_env())
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("chat%d" % chat, listed.stdout)
        self.assertIn("a person wrote; paused until", listed.stdout)
        resumed = self.run_script(BRIDGE, "--resume", "chat%d" % chat, env=self.bridge_env())
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        self.assertIn("the bot answers again (told the running bridge", resumed.stdout)
        time.sleep(1.5)
        self.portal.customer_message(chat, "and now the bot?")
        self.wait_for(lambda: "Echo: and now the bot?" in self.echoes(chat), 15, "the bot back after --resume")
        self.assertIn("the bot is paused in no dialog", self.run_script(BRIDGE, "--paused", env=self.bridge_env()).stdout)
        self.assertEqual(proc.stop(), 0)

    def test_a_reload_with_the_pause_set_to_zero_lifts_the_pauses(self) -> None:
        chat = self.ids["lines_member"]
        env_file = os.path.join(self.tmp, "bridge.env")
        with open(env_file, "w") as fh:
            fh.write("BRIDGE_HUMAN_PAUSE_MIN=30\n")
        proc = self.start_bridge("--env-file", env_file)
        self.portal.operator_message(chat, 9, "Pavel here")
        self.portal.customer_message(chat, "thanks Pavel")
        self.assertTrue(proc.wait_stderr("a person wrote in this dialog; the bot pauses", 10), proc.all_output())
        with open(env_file, "w") as fh:
            fh.write("BRIDGE_HUMAN_PAUSE_MIN=0\n")
        proc.popen.send_signal(signal.SIGHUP)
        self.assertTrue(proc.wait_stderr("the bot is back in 1 paused dialog", 10), proc.all_output())
        self.portal.customer_message(chat, "bot again?")
        self.wait_for(lambda: "Echo: bot again?" in self.echoes(chat), 15, "the bot back after the reload")
        self.assertEqual(proc.stop(), 0)


class TakeWithTheBotDown(BridgeHarness):
    def test_taken_once_and_handed_back_to_the_queue_during_an_outage(self) -> None:
        chat = self.ids["queued"]
        import socket
        down = socket.socket()                            # the bot is down all along: its port is held (so no
        down.bind(("127.0.0.1", 0))                       # other test's server can take it) and refuses
        self.addCleanup(down.close)
        proc = self.start_bridge("--take", BRIDGE_OUTAGE_HANDBACK_MIN="0.05", BRIDGE_RETRY_FIRST_SEC="0.3",
                                 BRIDGE_FALLBACK_TEXT="A person will answer you soon.",
                                 BOT_HTTP_URL="http://127.0.0.1:%d/bot" % down.getsockname()[1])
        self.portal.customer_message(chat, "is anybody there?")
        self.assertTrue(proc.wait_stderr("went back to the queue", 20), proc.all_output())
        texts = [m["text"] for m in self.portal.chat_messages(chat)]
        self.assertEqual(sum(1 for t in texts if t.endswith("picked conversation")), 1, texts)
        self.assertEqual(texts.count("A person will answer you soon."), 1, texts)
        self.assertTrue(any("resubmitted to the queue" in t for t in texts), texts)
        self.assertTrue(self.portal.in_queue_for(self.portal.chats[chat], 7), "waits in the queue again")
        self.portal.customer_message(chat, "hello?")           # the bot stays out of this session
        time.sleep(1.5)
        texts = [m["text"] for m in self.portal.chat_messages(chat)]
        self.assertEqual(sum(1 for t in texts if t.endswith("picked conversation")), 1, texts)
        self.assertEqual(proc.stop(), 0)
