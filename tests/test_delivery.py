"""Whether each answer reached the customer (fact sheet §13, §19): the emulator's connector, window and
deletes, the shared verdicts, and the sender saying them (exit 4 not delivered or refused, 5 unconfirmed)."""
from __future__ import annotations

import json
import time
import unittest

import b24delivery as delivery
from tests.support import PortalCase, bc

SEND = "b24_send_message.py"


class EmulatorDelivery(PortalCase):
    """The emulator follows §13: marks, notices, the window, the 300 s rule, soft deletes."""

    def params_after(self, chat: int, mid: int, seconds: float = 0.6) -> dict:
        time.sleep(seconds)
        return next(m["params"] for m in self.portal.chat_messages(chat) if m["id"] == mid)

    def test_sending_then_delivered_with_the_connectors_id(self) -> None:
        chat = self.ids["lines_member2"]
        mid = bc.send_text(self.client(), "chat%d" % chat, "hello")
        first = next(m["params"] for m in self.portal.chat_messages(chat) if m["id"] == mid)
        self.assertEqual(first.get("SENDING"), "Y")
        later = self.params_after(chat, mid)
        self.assertNotIn("SENDING", later)
        self.assertTrue(later["CONNECTOR_MID"][0].startswith("wamid."))

    def test_a_connector_error_and_the_providers_text(self) -> None:
        chat = self.ids["lines_member2"]
        self.portal.delivery(chat, mode="fail", reason="Recipient phone number not on WhatsApp")
        mid = bc.send_text(self.client(), "chat%d" % chat, "hello")
        params = self.params_after(chat, mid)
        self.assertEqual(params.get("IS_DELIVERED"), "N")
        self.assertNotIn("SENDING", params)
        notice = self.portal.chat_messages(chat)[-1]
        self.assertEqual(notice["author_id"], 0)
        self.assertTrue(notice["text"].startswith("Message could not be delivered"))
        self.assertIn("Recipient phone number not on WhatsApp", notice["text"])

    def test_the_window_opens_with_each_customer_message_and_a_closed_one_refuses(self) -> None:
        chat = self.ids["lines_member2"]                      # a whatsappbyedna line
        client = self.client()
        fields = bc.as_map(client.call("im.dialog.get", {"DIALOG_ID": "chat%d" % chat}))["entity_data_1"].split("|")
        self.assertEqual(len(fields), 10)
        self.assertEqual(fields[9], "DEFAULT")
        self.assertGreater(int(fields[8]), time.time() + 20 * 3600)
        self.portal.window(chat, close=True, reason="expired")
        window = delivery.window_of(bc.as_map(client.call("im.dialog.get", {"DIALOG_ID": "chat%d" % chat})))
        self.assertTrue(window.closed())
        mid = bc.send_text(client, "chat%d" % chat, "too late")      # im.message.add still returns an id
        params = self.params_after(chat, mid)
        self.assertEqual(params.get("SENDING"), "Y", "SENDING stays for good")
        self.assertEqual(self.portal.chat_messages(chat)[-1]["text"], "Error sending message")
        self.portal.customer_message(chat, "I am back")
        window = delivery.window_of(bc.as_map(client.call("im.dialog.get", {"DIALOG_ID": "chat%d" % chat})))
        self.assertFalse(window.closed())
        self.assertIn("window closes in 23 h", window.describe())

    def test_no_window_and_no_reports_where_the_connector_has_none(self) -> None:
        chat = self.ids["lines_member"]                       # a REST connector: no window bookkeeping (§13.4)
        chat_obj = bc.as_map(self.client().call("im.dialog.get", {"DIALOG_ID": "chat%d" % chat}))
        self.assertEqual(delivery.window_of(chat_obj).closes_at, 0)
        group = self.ids["group"]
        mid = bc.send_text(self.client(), "chat%d" % group, "team note")
        self.assertEqual(self.params_after(group, mid, 0.4), [])
        self.portal.add_line(9, "Site chat", [7], connector="livechat")       # live chat reports nothing
        live = self.portal.new_conversation(9, "Visitor", None, "hi from the site")["chat_id"]
        self.portal.take_chat(live, 7)
        proc = self.run_script(SEND, "chat%d" % live, "hello visitor", "--wait-delivered")
        self.assertEqual((proc.returncode, proc.stdout.split("\n")[1]), (0, "sent"), proc.stderr)
        mid = int(proc.stdout.split()[0])
        self.assertEqual(self.params_after(live, mid, 0.4), [])

    def test_stuck_then_the_300_s_notice_once_per_chat(self) -> None:
        chat = self.ids["lines_member2"]
        self.portal.delivery(chat, mode="stuck", timeout=1.0)
        client = self.client()
        first = bc.send_text(client, "chat%d" % chat, "one")
        bc.send_text(client, "chat%d" % chat, "two")
        self.assertEqual(self.params_after(chat, first, 1.6).get("SENDING"), "Y")
        notices = [m["text"] for m in self.portal.chat_messages(chat) if m["author_id"] == 0]
        self.assertEqual(notices.count("Your message was not delivered. Customer is still waiting for reply."), 1)

    def test_soft_deletes_and_edits_keep_the_id(self) -> None:
        chat = self.ids["lines_member"]
        sent = self.portal.customer_message(chat, "my card number is 1234")
        self.portal.delete_message(sent["message_id"])
        got = next(m for m in self.portal.chat_messages(chat) if m["id"] == sent["message_id"])
        self.assertEqual(got["params"], {"IS_DELETED": "Y"})
        self.assertEqual(got["text"], "This message has been deleted.")
        other = self.portal.customer_message(chat, "helo")
        self.portal.edit_message(other["message_id"], "hello")
        got = next(m for m in self.portal.chat_messages(chat) if m["id"] == other["message_id"])
        self.assertEqual((got["text"], got["params"].get("IS_EDITED")), ("hello", "Y"))


class Verdicts(PortalCase):
    """The shared tracker: one batch a check for all dialogs in flight, none when nothing is."""

    def test_one_batch_for_many_dialogs_and_nothing_when_idle(self) -> None:
        client = self.client()
        watch = delivery.DeliveryWatch(client, wait=30)
        before = client.requests
        self.assertEqual(watch.check(), [])
        self.assertEqual(client.requests, before, "nothing in flight: no request")
        a, b = self.ids["lines_member"], self.ids["lines_member2"]
        self.portal.delivery(b, mode="fail", reason="blocked by the customer")
        for chat in (a, b, a):
            watch.add("chat%d" % chat, bc.send_text(client, "chat%d" % chat, "hi"))
        time.sleep(0.6)
        before = client.requests
        verdicts = watch.check()
        self.assertEqual(client.requests, before + 1, "one batch for every dialog in flight")
        self.assertEqual(sorted(v.status for v in verdicts), ["delivered", "delivered", "failed"])
        self.assertEqual(next(v for v in verdicts if v.status == "failed").reason, "blocked by the customer")
        self.assertFalse(watch.busy())


class SenderSaysIt(PortalCase):
    def send(self, *args: str, **env):
        return self.run_script(SEND, *args, env=self.env(**env))

    def test_delivered_not_delivered_unconfirmed_and_sent(self) -> None:
        chat = "chat%d" % self.ids["lines_member2"]
        proc = self.send(chat, "hello", "--wait-delivered")
        self.assertEqual((proc.returncode, proc.stdout.split("\n")[1]), (0, "delivered"), proc.stderr)
        self.portal.delivery(self.ids["lines_member2"], mode="fail", reason="Recipient blocked the number")
        proc = self.send(chat, "hello", "--wait-delivered")
        self.assertEqual(proc.returncode, 4, proc.stderr)
        self.assertIn("not delivered: Recipient blocked the number", proc.stdout)
        proc = self.send(chat, "hello", "--wait-delivered", "--json")
        doc = json.loads(proc.stdout)
        self.assertEqual((doc["delivery"], doc["reason"]), ("failed", "Recipient blocked the number"))
        self.portal.delivery(self.ids["lines_member2"], mode="stuck")
        proc = self.send(chat, "hello", "--wait-delivered", "1")
        self.assertEqual(proc.returncode, 5, proc.stderr)
        self.assertIn("unconfirmed after 1 s", proc.stdout)
        proc = self.send("chat%d" % self.ids["group"], "team", "--wait-delivered")
        self.assertEqual((proc.returncode, proc.stdout.split("\n")[1]), (0, "sent"), proc.stderr)

    def test_a_closed_window_refuses_and_force_sends_anyway(self) -> None:
        chat = self.ids["lines_member2"]
        self.portal.window(chat, close=True, reason="opted_out")
        before = len(self.portal.chat_messages(chat))
        proc = self.send("chat%d" % chat, "are you there?")
        self.assertOneLineError(proc, 4, "window is closed", "the customer opted out", "--force")
        self.assertEqual(len(self.portal.chat_messages(chat)), before, "nothing posted")
        proc = self.send("chat%d" % chat, "are you there?", "--json")
        self.assertEqual(json.loads(proc.stdout)["delivery"], "refused")
        proc = self.send("chat%d" % chat, "are you there?", "--force", "--wait-delivered")
        self.assertEqual(proc.returncode, 4, proc.stderr)
        self.assertIn("not delivered: refused", proc.stdout)
        # a channel without a window is unaffected
        proc = self.send("chat%d" % self.ids["lines_member"], "fine")
        self.assertEqual(proc.returncode, 0, proc.stderr)


class BridgeWorld(PortalCase):
    """An emulator, the mock bot, and the bridge as a subprocess with its health listener."""

    def setUp(self) -> None:
        super().setUp()
        import mock_bot_server
        self.bot = mock_bot_server.BotServer().start()
        self.addCleanup(self.bot.stop)

    def bridge(self, **env):
        from tests.support import free_port
        self.health = free_port()
        env.setdefault("BRIDGE_DELIVERY_CHECK_SEC", "0.5")
        env.setdefault("BRIDGE_OWN_READ_DELAY_SEC", "1")     # our replies are read (and judged) 1 s later
        proc = self.start_script("b24_ol_bridge.py", env=self.env(
            BOT_HTTP_URL=self.bot.url, BRIDGE_HTTP_LISTEN=str(self.health), **env))
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        return proc

    def metrics(self) -> str:
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open("http://127.0.0.1:%d/metrics" % self.health, timeout=10) as resp:
            return resp.read().decode()

    def dead_letters(self) -> list:
        import os
        path = os.path.join(self.tmp, "state", "bridge.dead-letters.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def wait(self, cond, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        self.fail("timed out waiting for " + what)


class BridgeFollowsItsAnswers(BridgeWorld):
    """Every part the bridge posts is followed: a failure is logged, counted, dead-lettered, told to the bot,
    handed to the queue -- and a kill -9 while parts are in flight loses no verdict."""

    def test_an_undelivered_answer_is_logged_counted_kept_told_and_handed_over(self) -> None:
        chat = self.ids["lines_member2"]
        self.portal.delivery(chat, mode="fail", reason="Recipient has blocked the business number")
        proc = self.bridge(BOT_DELIVERY_EVENTS="1", BRIDGE_UNDELIVERED_TO="queue")
        self.portal.customer_message(chat, "hello?")
        self.wait(lambda: any(d["stage"] == "delivery" for d in self.dead_letters()), "the dead letter")
        letter = next(d for d in self.dead_letters() if d["stage"] == "delivery")
        self.assertIn("not delivered: Recipient has blocked the business number", letter["reason"])
        asked = next(r["payload"] for r in self.bot.received if r["payload"].get("text") == "hello?")
        # what the failure needs is read back from the store: the reply, its source, the event
        self.assertEqual((letter["answer"], letter["payload"]["event_id"]), (["Echo: hello?"], asked["event_id"]))
        self.assertEqual(letter["message_id"], asked["message_id"])
        self.assertTrue(proc.wait_stderr("not delivered: Recipient has blocked", 5))
        self.assertIn('b24_bridge_replies_undelivered_total{reason="blocked"} 1', self.metrics())
        self.wait(lambda: any(r["payload"].get("type") == "delivery" for r in self.bot.received), "the bot's notice")
        notice = next(r["payload"] for r in self.bot.received if r["payload"].get("type") == "delivery")
        self.assertEqual((notice["status"], notice["dialog_id"], notice["event_id"]),
                         ("failed", "chat%d" % chat, asked["event_id"]))
        self.assertIn("blocked", notice["reason"])
        self.wait(lambda: self.portal.in_queue_for(self.portal.chats[chat], 7), "the hand-over to the queue")
        self.assertEqual(proc.stop(), 0)

    def test_delivered_answers_are_counted_and_kill_9_loses_no_verdict(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.bridge()
        self.portal.customer_message(chat, "one")
        self.wait(lambda: 'b24_bridge_replies_delivered_total 1' in self.metrics(), "the delivered count")
        self.portal.delivery(chat, mode="fail", reason="provider outage", delay=1.0)
        self.portal.customer_message(chat, "two")
        self.wait(lambda: "Echo: two" in [m["text"] for m in self.portal.chat_messages(chat)], "the answer")
        proc.kill()                                   # kill -9 while the verdict is still to come
        again = self.bridge()
        self.wait(lambda: any(d["stage"] == "delivery" for d in self.dead_letters()), "the verdict after kill -9")
        self.assertIn("provider outage", self.dead_letters()[-1]["reason"])
        self.assertEqual(again.stop(), 0)

    def test_a_reply_read_before_its_delivery_mark_is_checked_seconds_later_not_after_the_own_read_delay(self) -> None:
        chat = self.ids["lines_member"]
        # the customer answers before the connector's mark on our reply comes (3 s): the poller's read of
        # their message has our reply still sending, and no read of the poller brings it again
        self.portal.delivery(chat, mode="fail", reason="provider outage", delay=3.0)
        proc = self.bridge(BRIDGE_OWN_READ_DELAY_SEC="15")       # a reply read with nothing else: 30 s on
        self.portal.customer_message(chat, "one")
        self.wait(lambda: "Echo: one" in [m["text"] for m in self.portal.chat_messages(chat)], "the answer")
        replied = time.monotonic()
        self.portal.customer_message(chat, "two")
        self.wait(lambda: ["Echo: one"] in [d["answer"] for d in self.dead_letters()], "the verdict", timeout=15)
        self.assertLess(time.monotonic() - replied, 15)
        self.assertEqual(proc.stop(), 0)


class DeletedMessages(BridgeWorld):
    def test_a_deleted_message_never_reaches_the_bot_and_the_race_is_read_again(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.bridge()
        with self.portal.lock:                   # written and deleted before the bridge could read it
            gone = self.portal.customer_message(chat, "my card number is 1234")
            self.portal.delete_message(gone["message_id"])
        self.assertTrue(proc.wait_stderr("deleted by the customer; not forwarded", 15), proc.all_output())
        # the race (§19): the row is read before its params are written -- it looks deleted, then is not
        with self.portal.lock:
            late = self.portal.customer_message(chat, "a photo of the receipt")
            msg = self.portal.messages[late["message_id"]]
            kept = (msg["text"], msg["params"])
            msg["text"], msg["params"] = "This message has been deleted.", {"IS_DELETED": "Y"}
        time.sleep(0.6)                          # the bridge reads it as deleted...
        with self.portal.lock:
            msg["text"], msg["params"] = kept    # ...and its params arrive
        self.wait(lambda: "Echo: a photo of the receipt" in [m["text"] for m in self.portal.chat_messages(chat)],
                  "the answer to the message that only looked deleted")
        texts = [r["payload"].get("text") for r in self.bot.received]
        self.assertNotIn("my card number is 1234", texts)
        self.assertNotIn("This message has been deleted.", texts)
        self.assertEqual(texts.count("a photo of the receipt"), 1)
        self.assertEqual(proc.stop(), 0)

    def test_the_reader_shows_deleted(self) -> None:
        chat = self.ids["lines_member"]
        sent = self.portal.customer_message(chat, "oops")
        self.portal.delete_message(sent["message_id"])
        proc = self.run_script("b24_openlines_reader.py", "--since-minutes", "5", "--once")
        self.assertIn("[chat%d] [deleted]" % chat, proc.stdout)
        self.assertNotIn("This message has been deleted", proc.stdout)
        proc = self.run_script("b24_openlines_reader.py", "--since-minutes", "5", "--once", "--json")
        docs = [json.loads(line) for line in proc.stdout.splitlines()]
        gone = next(d for d in docs if d["message_id"] == sent["message_id"])
        self.assertEqual((gone["deleted"], gone["text"]), (True, None))


class ReaderSaysIt(PortalCase):
    def test_the_reader_reports_the_fate_of_your_messages(self) -> None:
        chat = self.ids["lines_member2"]
        self.portal.delivery(chat, mode="fail", reason="Recipient has blocked the business number")
        for json_mode in (True, False):
            with self.subTest(json=json_mode):
                proc = self.start_script("b24_openlines_reader.py", *(["--json"] if json_mode else []))
                time.sleep(0.8)
                sent = self.run_script(SEND, "chat%d" % chat, "a reply from a script")
                mid = int(sent.stdout.split()[0])
                want = '"type": "delivery"' if json_mode else "[chat%d] ! not delivered" % chat
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not any(want in ln for ln in proc.stdout_lines):
                    time.sleep(0.1)
                line = next((ln for ln in proc.stdout_lines if want in ln), None)
                self.assertIsNotNone(line, proc.all_output())
                if json_mode:
                    doc = json.loads(line)
                    self.assertEqual((doc["message_id"], doc["status"]), (mid, "failed"))
                    self.assertEqual(doc["reason"], "Recipient has blocked the business number")
                else:
                    self.assertIn("not delivered: Recipient has blocked the business number", line)
                proc.stop()


class WindowWhileThinking(unittest.TestCase):
    """An answer is not posted once 24 hours passed since the customer's message on a window connector."""

    def test_the_rule(self) -> None:
        from olbridge.asker import Asker
        from olbridge.store import Row

        def row(connector: str, hours_ago: float) -> Row:
            date = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - hours_ago * 3600))
            return Row(("chat1", 5, json.dumps({"connector": connector, "date": date}), "new", None, 0, 0, 0,
                        None, 0, None, 0))
        self.assertIn("24 hours passed", Asker._window_closed(row("whatsappbyedna", 25)))
        self.assertEqual(Asker._window_closed(row("whatsappbyedna", 23)), "")
        self.assertEqual(Asker._window_closed(row("olchat_wa_connector_2", 48)), "", "no window there")
