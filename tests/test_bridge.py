"""b24_ol_bridge.py as a subprocess: emulator + mock bot in this process, over real HTTP."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time

import mock_bot_server
from tests.support import PortalCase

BRIDGE = "b24_ol_bridge.py"
TOKEN = "Bearer bot-token-s3cr3t"


class BridgeHarness(PortalCase):
    """An emulator and a mock bot; the bridge as a subprocess."""

    def setUp(self) -> None:
        super().setUp()
        self.bot = mock_bot_server.BotServer(token=TOKEN).start()
        self.addCleanup(self.bot.stop)

    def bridge_env(self, **extra) -> dict:
        env = dict(BOT_HTTP_URL=self.bot.url, BOT_HTTP_AUTH=TOKEN, BOT_HTTP_TIMEOUT_SEC=10,
                   B24_BUSINESS_PHONE="+10000000001")
        env.update(extra)
        return self.env(**env)

    def start_bridge(self, *args: str, **env):
        proc = self.start_script(BRIDGE, *args, env=self.bridge_env(**env))
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        self.addCleanup(lambda: self.assertNotIn("bot-token-s3cr3t", proc.all_output()))
        return proc

    def texts(self, chat: int) -> list:
        return [m["text"] for m in self.portal.chat_messages(chat)]


class Bridge(BridgeHarness):

    def test_customer_message_gets_the_bots_reply(self) -> None:
        proc = self.start_bridge()
        chat = self.ids["lines_member"]
        sent = self.portal.customer_message(chat, "Where is my order?")
        self.wait_for(lambda: "Echo: Where is my order?" in self.texts(chat), what="the reply")
        got = self.bot.received[0]
        self.assertEqual(got["authorization"], TOKEN)
        p = got["payload"]
        self.assertEqual((p["platform"], p["direction"], p["dialog_id"], p["message_id"], p["text"], p["message"]),
                         ("bitrix24", "inbound", "chat%d" % chat, sent["message_id"], "Where is my order?",
                          "Where is my order?"))
        self.assertEqual((p["customer_phone"], p["phone"], p["business_phone"], p["customer_name"]),
                         ("+10000000101", "+10000000101", "+10000000001", "Ivan Petrov"))
        self.assertFalse(p["new_dialog"])
        self.assertEqual((p["sender"], p["metadata"]["dialog_id"], p["attempt"]), ("chat%d" % chat, "chat%d" % chat, 1))
        self.assertEqual(got["payload"]["event_id"], self.bot.received[0]["payload"]["event_id"])
        reply = self.portal.chat_messages(chat)[-1]
        self.assertEqual(reply["author_id"], 7)
        self.assertIsNotNone(reply["uuid"], "replies carry a TEMPLATE_ID")
        new = self.portal.new_conversation(3, "Nora Example", "+10000000160", "hi, new here")
        self.portal.take_chat(new["chat_id"], 7)          # an operator assigned it to the webhook user
        self.wait_for(lambda: len(self.bot.received) == 2, what="the new dialog's message")
        self.assertEqual(self.bot.received[-1]["payload"]["text"], "hi, new here")
        self.assertTrue(self.bot.received[-1]["payload"]["new_dialog"])
        time.sleep(1)
        self.assertEqual(len(self.bot.received), 2, "our own replies are not forwarded")
        self.assertEqual(proc.stop(), 0)

    def test_in_a_conversation_our_reply_is_read_with_the_next_message(self) -> None:
        # the bridge tells the poller what it posted (Poller.posted): no read for our reply alone
        chat = self.ids["lines_member"]
        self.start_bridge()
        self.portal.customer_message(chat, "one")
        self.wait_for(lambda: "Echo: one" in self.texts(chat), what="the first reply")
        time.sleep(1.0)                                  # a few poll cycles (0.3 s): our reply is not read
        self.portal.reset_stats()
        for text in ("two", "three", "four"):
            self.portal.customer_message(chat, text)
            self.wait_for(lambda t=text: "Echo: %s" % t in self.texts(chat), what="the reply to " + text)
            time.sleep(1.0)
        reads = self.reads()
        self.assertLessEqual(reads, 4, "a read for each customer message, our replies riding along: %d" % reads)
        self.assertEqual(self.texts(chat)[-6:], ["two", "Echo: two", "three", "Echo: three", "four", "Echo: four"])

    def reads_of_two_turns(self, gap: float, **env) -> tuple:
        """The bridge answers a message, the customer writes again *gap* seconds after the reply:
        ``(reads before that message, reads once it is answered)``."""
        chat = self.ids["lines_member"]
        self.start_bridge(**env)
        self.portal.customer_message(chat, "one")
        self.wait_for(lambda: "Echo: one" in self.texts(chat), what="the first reply")
        self.portal.reset_stats()
        time.sleep(gap)
        before = self.reads()
        self.portal.customer_message(chat, "two")
        self.wait_for(lambda: "Echo: two" in self.texts(chat), what="the second reply")
        return before, self.reads()

    def test_our_reply_waits_for_the_customer_up_to_the_own_read_delay(self) -> None:
        # the customer answers 6.5 s after our reply: inside BRIDGE_OWN_READ_DELAY_SEC, so one read brings
        # both (a 5 s put-off, as before 0.5.5, read our reply alone first: two reads)
        self.assertEqual(self.reads_of_two_turns(6.5, BRIDGE_OWN_READ_DELAY_SEC="8"), (0, 1),
                         "the customer's message and our reply before it in one read")

    def test_a_reply_that_went_with_the_scan_waits_twice_as_long(self) -> None:
        # at poll 1 s a reply rides in the next scan's request, after the scan: nothing but a message written
        # in between can hide behind it, so its read waits 2 x BRIDGE_OWN_READ_DELAY_SEC for the customer
        self.assertEqual(self.reads_of_two_turns(4.5, B24_POLL_SEC="1", BRIDGE_OWN_READ_DELAY_SEC="3"), (0, 1),
                         "not read on its own: with the customer's message")

    def test_a_reply_goes_in_the_request_of_the_scan_due_next(self) -> None:
        # a batch may mix methods: a reply due just before a scan (or a read) shares its request -- at light
        # load: a scan a second keeps the budget mostly unspent (at 0.3 s it would fill a quarter in seconds)
        chat = self.ids["lines_member"]
        self.start_bridge(B24_POLL_SEC="1")
        self.portal.customer_message(chat, "warm up")
        self.wait_for(lambda: "Echo: warm up" in self.texts(chat), what="the first reply")
        self.portal.reset_stats()
        for text in ("one", "two", "three"):
            self.portal.customer_message(chat, text)
            self.wait_for(lambda t=text: "Echo: %s" % t in self.texts(chat), what="the reply to " + text)
            time.sleep(0.5)
        posts = [e["calls"] for e in self.portal.stats()["log"] if "im.message.add" in e.get("calls", ())]
        self.assertEqual(sum(c.count("im.message.add") for c in posts), 3, posts)
        for calls in posts:
            self.assertTrue(set(calls) - {"im.message.add"}, "a reply went alone: %s" % posts)
            # the reads first: the scan does not see a reply before the bridge knows its id
            self.assertEqual(calls[-1], "im.message.add", calls)
        self.assertEqual(self.texts(chat)[-6:], ["one", "Echo: one", "two", "Echo: two", "three", "Echo: three"])

    def test_a_reply_that_a_batch_would_alter_goes_alone(self) -> None:
        # inside a batch "$result[...]" is a reference to another command's result (fact sheet §4)
        chat = self.ids["lines_member"]
        self.start_bridge()
        text = "costs $time[q0_head][start] or $result[q0_head][hasMore] in PHP"   # names the scan has in it
        self.portal.customer_message(chat, text)
        self.wait_for(lambda: any("Echo: costs" in t for t in self.texts(chat)), what="the reply")
        self.assertIn("Echo: " + text, self.texts(chat))

    def test_reply_shapes_and_several_replies_in_order(self) -> None:
        chat = self.ids["lines_member2"]
        self.bot.replies = lambda text: ["one for %s" % text, "two for %s" % text]
        for shape in ("replies", "messages", "rasa", "reply_text"):
            self.bot.shape = shape
            proc = self.start_bridge()
            self.portal.customer_message(chat, shape)
            want = ["one for %s" % shape, "two for %s" % shape]
            if shape == "reply_text":
                want = ["one for reply_text\ntwo for reply_text"]
            self.wait_for(lambda want=want: self.texts(chat)[-len(want):] == want, what=shape)
            self.assertEqual(proc.stop(), 0)
        self.bot.shape = "none"
        proc = self.start_bridge()
        before = len(self.texts(chat))
        self.portal.customer_message(chat, "no answer expected")
        self.wait_for(lambda: len(self.bot.received) == 5, what="the bot call")
        time.sleep(0.5)
        self.assertEqual(len(self.texts(chat)), before + 1)
        self.assertEqual(proc.stop(), 0)

    def test_order_within_a_dialog_and_a_slow_dialog_does_not_block_others(self) -> None:
        self.bot.delay = {"slow one": 3.0}
        proc = self.start_bridge()
        a, b = self.ids["lines_member"], self.ids["lines_member2"]
        self.portal.customer_message(a, "slow one")
        self.portal.customer_message(a, "after the slow one")
        time.sleep(0.8)
        self.portal.customer_message(b, "quick")
        self.wait_for(lambda: "Echo: quick" in self.texts(b), timeout=2.5, what="the quick reply")
        self.assertNotIn("Echo: slow one", self.texts(a), "b was answered while a's bot turn was still running")
        self.wait_for(lambda: "Echo: after the slow one" in self.texts(a), what="a's replies")
        replies = [t for t in self.texts(a) if t.startswith("Echo:")]
        self.assertEqual(replies, ["Echo: slow one", "Echo: after the slow one"])
        self.assertEqual(proc.stop(), 0)

    def test_bot_failures_are_retried(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge()
        self.bot.fail_next = 2                  # two 500s, then fine: retried
        self.portal.customer_message(chat, "try again please")
        self.wait_for(lambda: "Echo: try again please" in self.texts(chat), timeout=20, what="the retried reply")
        self.assertEqual(proc.stop(), 0)

    def test_wrong_bot_token_is_reported_without_the_token(self) -> None:
        proc = self.start_bridge(BOT_HTTP_AUTH="Bearer wrong-token-value")
        self.portal.customer_message(self.ids["lines_member"], "hello")
        self.assertTrue(proc.wait_stderr("answered HTTP 401", 20), proc.all_output())
        self.assertNotIn("wrong-token-value", proc.all_output())
        self.assertEqual(proc.stop(), 0)

    def test_queued_dialog_needs_take(self) -> None:
        queued = self.ids["queued"]
        proc = self.start_bridge()
        self.portal.customer_message(queued, "anyone?")
        self.assertTrue(proc.wait_stderr("lets the bridge take queued dialogs", 20), proc.all_output())
        self.assertEqual(proc.stop(), 0)
        proc = self.start_bridge("--take")
        self.portal.customer_message(queued, "anyone now?")
        self.wait_for(lambda: "Echo: anyone now?" in self.texts(queued), what="the reply after taking")
        self.assertIn(7, self.portal.chats[queued]["members"])
        self.assertEqual(proc.stop(), 0)

    def test_kill_9_mid_reply_neither_loses_nor_doubles(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.delay = {"crash here": 2.0}
        proc = self.start_bridge()
        self.portal.customer_message(chat, "crash here")
        self.wait_for(lambda: len(self.bot.received) == 1, what="the bot call")
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.kill()
        self.portal.customer_message(chat, "while down")
        proc = self.start_bridge()
        self.wait_for(lambda: "Echo: while down" in self.texts(chat), timeout=20, what="catch-up")
        self.assertEqual(self.texts(chat).count("Echo: crash here"), 1)
        self.assertEqual(self.texts(chat).count("Echo: while down"), 1)
        self.assertEqual(proc.stop(), 0)

    def test_sigterm_lets_the_reply_in_progress_finish(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.delay = {"slow": 0.8}        # a reply in progress gets STOP_GRACE_SEC (1.5 s) to finish
        proc = self.start_bridge()
        self.portal.customer_message(chat, "slow")
        self.portal.customer_message(chat, "queued behind it")
        self.wait_for(lambda: len(self.bot.received) == 1, what="the bot call")
        started = time.monotonic()
        self.assertEqual(proc.stop(timeout=30), 0)
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("Echo: slow", self.texts(chat))
        self.assertNotIn("Echo: queued behind it", self.texts(chat))
        proc = self.start_bridge()
        self.wait_for(lambda: "Echo: queued behind it" in self.texts(chat), what="the rest after a restart")
        self.assertEqual(self.texts(chat).count("Echo: slow"), 1)
        self.assertEqual(proc.stop(), 0)

    def test_portal_trouble_while_replying_is_waited_out(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("http502", count=2, method="im.message.add")
        proc = self.start_bridge(B24_MAX_RETRIES=0)
        self.portal.customer_message(chat, "through the storm")
        self.wait_for(lambda: "Echo: through the storm" in self.texts(chat), timeout=20, what="the reply")
        time.sleep(1)
        self.assertEqual(self.texts(chat).count("Echo: through the storm"), 1)
        time.sleep(0.5)
        self.assertEqual(self.texts(chat).count("Echo: through the storm"), 1)
        self.assertEqual(len(self.bot.received), 1, "the bot is asked once; only the posting is retried")
        self.assertEqual(proc.stop(), 0)

    def test_a_reply_sent_twice_after_a_crash_is_posted_once(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("drop_after", count=1, method="im.message.add")   # posted, answer lost
        proc = self.start_bridge(B24_MAX_RETRIES=0)
        self.portal.customer_message(chat, "exactly once")
        self.wait_for(lambda: "Echo: exactly once" in self.texts(chat), what="the reply")
        time.sleep(1)
        self.assertEqual(self.texts(chat).count("Echo: exactly once"), 1)
        self.assertEqual(proc.stop(), 0)

    def test_once_and_restart_forward_only_new_messages(self) -> None:
        chat = self.ids["lines_member"]
        first = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertEqual(self.bot.received, [], "history is not forwarded")
        self.portal.customer_message(chat, "between runs")
        second = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual([r["payload"]["text"] for r in self.bot.received], ["between runs"])
        self.assertIn("Echo: between runs", self.texts(chat))
        third = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertEqual(len(self.bot.received), 1)
        self.assertNotIn("bot-token-s3cr3t", first.stderr + second.stderr + third.stderr)

    def test_systemd_notify_and_watchdog(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = "b24test-%d" % os.getpid()
        sock.bind("\0" + name)
        sock.settimeout(15)
        self.addCleanup(sock.close)
        proc = self.start_bridge(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="600000")
        got = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (any("WATCHDOG=1" in g for g in got)
                                                  and any("STATUS=polling" in g for g in got)):
            got.append(sock.recv(4096).decode())
        self.assertTrue(got[0].startswith("READY=1"), got)
        self.assertIn("STATUS=starting: signing in to 127.0.0.1", got[0])
        self.assertTrue(any("STATUS=polling 127.0.0.1" in g for g in got), got)
        self.assertTrue(any("WATCHDOG=1" in g for g in got), got)
        self.assertEqual(proc.stop(), 0)
        rest = []
        while not any("STOPPING=1" in g for g in rest):
            rest.append(sock.recv(4096).decode())     # times out (fails) if it never comes

    def test_bad_configuration(self) -> None:
        cases = [
            ({"BOT_HTTP_URL": None}, "BOT_HTTP_URL is not set"),
            ({"BOT_HTTP_URL": "not-a-url"}, "BOT_HTTP_URL"),
            ({"BOT_HTTP_TIMEOUT_SEC": "forever"}, "BOT_HTTP_TIMEOUT_SEC"),
            ({"B24_BUSINESS_PHONE": "call us"}, "B24_BUSINESS_PHONE"),
        ]
        for env, needle in cases:
            with self.subTest(env=env):
                proc = self.run_script(BRIDGE, "--once", env=self.bridge_env(**env))
                self.assertOneLineError(proc, 2, needle)
                self.assertNotIn("bot-token-s3cr3t", proc.stderr)
        proc = self.run_script(BRIDGE, "--workers", "0", env=self.bridge_env())
        self.assertOneLineError(proc, 2, "--workers")
        help_ = self.run_script(BRIDGE, "--help", env=self.bridge_env())
        self.assertIn("--take", help_.stdout)
        self.assertNotIn("bot-token-s3cr3t", help_.stdout)

    def test_state_file_records_progress(self) -> None:
        proc = self.start_bridge()
        chat = self.ids["lines_member"]
        m = self.portal.customer_message(chat, "remember me")
        self.wait_for(lambda: "Echo: remember me" in self.texts(chat), what="the reply")
        self.assertEqual(proc.stop(), 0)
        db = sqlite3.connect(os.path.join(self.tmp, "state", "bridge.db"))
        self.addCleanup(db.close)
        cursor = db.execute("SELECT cursor FROM dialogs WHERE dialog = ?", ("chat%d" % chat,)).fetchone()[0]
        self.assertGreaterEqual(cursor, m["message_id"])
        self.assertEqual(db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0], 0, "nothing left in flight")
        for name in ("bridge.db", "bridge.db-wal"):
            self.assertEqual(oct(os.stat(os.path.join(self.tmp, "state", name)).st_mode & 0o777), "0o600")
