"""Push sources: the event queue (im.v2.Event), the HTTP receiver, the chat bot -- polling as the safety net.

Everything over real HTTP on 127.0.0.1: the emulator POSTs its events to the
bridge's receiver the way the portal does (form-encoded, ``auth[...]``, no
retries), and the bridge runs as a subprocess.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import b24common as bc
import b24push as push
from tests.support import PortalCase, free_port
from tests.test_bridge import BridgeHarness

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))



def post(port: int, body: bytes, *, ctype: str = "application/x-www-form-urlencoded", path: str = "/b24",
         method: str = "POST", headers: dict | None = None) -> tuple:
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=body if method == "POST" else None,
                                 method=method, headers=dict({"Content-Type": ctype}, **(headers or {})))
    try:
        with _DIRECT.open(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def form(data: dict) -> bytes:
    return urllib.parse.urlencode(_pairs(data)).encode()


def _pairs(data, prefix=""):
    out = []
    for k, v in data.items():
        name = "%s[%s]" % (prefix, k) if prefix else k
        out.extend(_pairs(v, name) if isinstance(v, dict) else [(name, str(v))])
    return out


class Parsing(unittest.TestCase):
    """The receiver's reading of Bitrix24's POSTs (no network needed for these)."""

    def test_php_bracket_keys_nest(self) -> None:
        pairs = urllib.parse.parse_qsl("event=ONIMBOTMESSAGEADD&data[PARAMS][DIALOG_ID]=chat5&data[PARAMS][MESSAGE_ID]=9"
                                       "&data[BOT][41][BOT_ID]=41&auth[application_token]=t&a[]=1&a[]=2")
        got = push.parse_php_form(pairs)
        self.assertEqual(got["data"]["PARAMS"], {"DIALOG_ID": "chat5", "MESSAGE_ID": "9"})
        self.assertEqual(got["data"]["BOT"]["41"]["BOT_ID"], "41")
        self.assertEqual(got["a"], {"0": "1", "1": "2"})
        self.assertEqual(push.push_hints(got), [push.Hint("chat5", 9, adopt=True)], "the bot is in it: ours to read")

    def test_openline_events_as_the_source_and_as_the_docs_show_them(self) -> None:
        inbound = {"event": "ONOPENLINEMESSAGEADD", "data": {"DATA": {"connector": {"line_id": "3"},
                                                                       "message": {"id": "wamid.X", "text": "hi"}}}}
        listed = {"event": "ONOPENLINEMESSAGEADD", "data": {"DATA": {"0": {"message": {"id": "wamid.X"}}}}}
        outbound = {"event": "ONOPENLINEMESSAGEADD",
                    "data": {"DATA": {"message": {"id": "88100", "chat_id": "1771", "user_id": "7"}}}}
        self.assertEqual(push.push_hints(inbound), [push.SCAN], "no IM chat id: look everywhere")
        self.assertEqual(push.push_hints(listed), [push.SCAN])
        self.assertEqual(push.push_hints(outbound), [push.Hint("chat1771", 88100)])
        self.assertEqual(push.push_hints({"event": "ONSESSIONSTART", "data": {}}), [push.SCAN], "no chat id")
        self.assertEqual(push.push_hints({"event": "ONCRMLEADADD", "data": {}}), [])


class EventQueueOnTheEmulator(PortalCase):
    """``im.v2.Event`` as the fact sheet describes it, and the source that reads it."""

    def call(self, method: str, **params):
        status, body = self.portal.handle_rest("7", self.portal.code, method, params)
        self.assertEqual(status, 200, body)
        return body["result"]

    def test_member_chats_only_offsets_acknowledge_and_24_hours(self) -> None:
        self.assertEqual(self.call("im.v2.Event.get")["events"], [], "nothing is recorded before subscribe")
        self.assertTrue(self.call("im.v2.Event.subscribe"))
        self.assertTrue(self.call("im.v2.Event.subscribe"), "subscribe is idempotent")
        member, queued = self.ids["lines_member"], self.ids["queued"]
        m1 = self.portal.customer_message(member, "one")["message_id"]
        self.portal.customer_message(queued, "waiting in the queue: no event")
        m2 = self.portal.customer_message(member, "two")["message_id"]
        first = self.call("im.v2.Event.get", limit=1)
        self.assertEqual([e["data"]["message"]["id"] for e in first["events"]], [m1])
        self.assertTrue(first["hasMore"])
        ev = first["events"][0]
        self.assertEqual((ev["type"], ev["data"]["chat"]["dialogId"], ev["data"]["chat"]["type"]),
                         ("ONIMV2MESSAGEADD", "chat%d" % member, "lines"))
        self.assertNotIn("role", ev["data"]["chat"], "the event's chat is the shortened one")
        again = self.call("im.v2.Event.get")
        self.assertEqual([e["data"]["message"]["id"] for e in again["events"]], [m1, m2],
                         "without an offset nothing is acknowledged")
        rest = self.call("im.v2.Event.get", offset=first["nextOffset"])
        self.assertEqual([e["data"]["message"]["id"] for e in rest["events"]], [m2])
        self.assertEqual(self.call("im.v2.Event.get")["events"][0]["data"]["message"]["id"], m2,
                         "the offset removed the first event for every reader")
        # 24 hours later the rest is gone (the portal's own clock)
        now = time.time()
        self.portal.clock = lambda: now + 24 * 3600 + 60
        self.assertEqual(self.call("im.v2.Event.get")["events"], [])

    def test_the_source_pages_while_has_more_and_filters_what_is_not_ours(self) -> None:
        client = self.client()
        ok, _why = push.event_source_available(client)
        self.assertTrue(ok)
        member = self.ids["lines_member"]
        ids = [self.portal.customer_message(member, "m%d" % i)["message_id"] for i in range(push.EVENTS_PAGE + 20)]
        self.portal.operator_message(self.ids["group"], 9, "a team chat: not an Open Lines dialog")
        src = push.EventQueueSource(client, interval=0.2)
        stop = threading.Event()
        first = src.next_batch(stop)
        self.assertTrue(first.more)
        self.assertEqual(first.hints, [push.Hint("chat%d" % member, i) for i in ids[:push.EVENTS_PAGE]])
        src.ack(first)
        second = src.next_batch(stop)
        self.assertFalse(second.more)
        self.assertEqual([h.message_id for h in second.hints], ids[push.EVENTS_PAGE:], "the team chat is filtered out")
        src.ack(second)
        src.interval = 0.01
        self.assertIsNone(src.next_batch(stop), "nothing new")
        self.assertEqual(self.portal.event_queues[7]["events"], [], "passing the offset acknowledged it all")

    def test_errors_back_off_and_a_revoked_webhook_is_handed_up(self) -> None:
        client = self.client(B24_MAX_RETRIES="0")
        self.assertTrue(push.event_source_available(client)[0])
        src = push.EventQueueSource(client, interval=0.05)
        stop = threading.Event()
        self.portal.fault("http500", count=2, method="im.v2.event.get")
        self.portal.customer_message(self.ids["lines_member"], "after the errors")
        started = time.monotonic()
        self.assertIsNone(src.next_batch(stop))
        self.assertIsNone(src.next_batch(stop))
        self.assertEqual(src.backoff.failures, 2)
        self.assertGreaterEqual(time.monotonic() - started, 0.05 * 2 + 0.05 * 4 - 0.02, "growing pauses")
        got = src.next_batch(stop)
        self.assertEqual(len(got.hints), 1)
        self.assertEqual(src.backoff.failures, 0)
        self.portal.set_webhook(active=False)
        revoked = src.next_batch(stop)
        self.assertIsInstance(revoked.error, bc.AuthError, "the host decides: exit 2")

    def test_a_portal_without_the_event_queue_is_polled(self) -> None:
        for method in ("subscribe", "get"):
            name = "im.v2.event." + method
            self.addCleanup(type(self.portal).METHODS.__setitem__, name, type(self.portal).METHODS.pop(name))
        client = self.client(B24_SOURCE="auto")
        for subscribe in (True, False):
            ok, why = push.event_source_available(client, subscribe=subscribe)
            self.assertFalse(ok)
            self.assertIn("ERROR_METHOD_NOT_FOUND", why)
        sources = push.choose_sources(client, self_id=7, interval=0.5)
        self.assertEqual([s.name for s in sources], ["poll"])
        with self.assertRaises(bc.ConfigError) as cm:
            push.choose_sources(self.client(B24_SOURCE="events"), self_id=7, interval=0.5)
        self.assertIn("B24_SOURCE=poll", str(cm.exception))

    def test_auto_skips_the_event_queue_for_a_queue_operator(self) -> None:
        # user 7 is in the queues of lines 1 and 3: a waiting chat there produces no event
        self.assertEqual([s.name for s in push.choose_sources(self.client(), self_id=7, interval=0.5)], ["poll"])
        # and the probe left no subscription behind: the portal would keep every event of the user a day
        self.assertNotIn(7, self.portal.event_queues)
        self.assertEqual(self.portal.counts["im.v2.event.subscribe"], 0)
        for line in self.portal.lines.values():
            line["queue"] = [u for u in line["queue"] if u != 7]
        sources = push.choose_sources(self.client(), self_id=7, interval=0.5)
        self.assertEqual([s.name for s in sources], ["events", "poll"])
        self.assertIn(7, self.portal.event_queues, "subscribed once it is used")
        self.assertEqual(sources[-1].every, bc.DEFAULT_RECONCILE_SEC)

    def test_imbot_needs_a_client_id_from_a_webhook(self) -> None:
        self.portal.set_webhook(scopes=["im", "imopenlines", "imbot"])
        status, body = self.portal.handle_rest("7", self.portal.code, "imbot.register", {
            "CODE": "x", "TYPE": "O", "EVENT_HANDLER": "http://127.0.0.1:9/", "PROPERTIES": {"NAME": "A"}})
        self.assertEqual((status, body["error"]), (403, "ACCESS_DENIED"))
        bot = self.call("imbot.register", CODE="x", TYPE="O", EVENT_HANDLER="http://127.0.0.1:9/",
                        CLIENT_ID="c1", PROPERTIES={"NAME": "A"})
        self.assertEqual(self.call("imbot.register", CODE="x", TYPE="O", EVENT_HANDLER="http://127.0.0.1:9/",
                                   CLIENT_ID="c1", PROPERTIES={"NAME": "A"}), bot, "the same code: the same bot")
        status, body = self.portal.handle_rest("7", self.portal.code, "imbot.message.add", {
            "BOT_ID": bot, "CLIENT_ID": "other", "DIALOG_ID": "chat%d" % self.ids["lines_member"], "MESSAGE": "x"})
        self.assertEqual(body["error"], "APP_ID_ERROR")


class QuietWorld(BridgeHarness):
    """No chat waits in a queue (their sessions are closed), so nothing makes the scan run fast:
    what arrives before the reconciliation scan arrived by push."""

    def setUp(self) -> None:
        super().setUp()
        for chat in list(self.portal.chats.values()):
            if chat["type"] == "lines" and self.portal.in_queue_for(chat, 7):
                self.portal.close_session(chat["id"])

    def answered(self, chat: int, text: str) -> bool:
        return ("Echo: %s" % text) in self.texts(chat)

    def asked(self, text: str) -> int:
        return sum(1 for r in self.bot.received if r["payload"]["text"] == text)


class EventQueueBridge(QuietWorld):

    def test_events_deliver_and_what_the_queue_lost_comes_with_the_reconciliation(self) -> None:
        proc = self.start_bridge(B24_SOURCE="events", B24_POLL_SEC="0.3", B24_RECONCILE_SEC="4")
        self.assertTrue(proc.wait_stderr("source: events", 5), proc.all_output())
        self.assertTrue(any("only ONE program may read it" in ln for ln in proc.stderr_lines))
        chat = self.ids["lines_member"]
        time.sleep(0.5)
        t0 = time.monotonic()
        self.portal.customer_message(chat, "by event")
        self.wait_for(lambda: self.answered(chat, "by event"), 5, "the evented message")
        self.assertLess(time.monotonic() - t0, 2.5, "well before the 4 s reconciliation")
        self.portal.behave(drop_events=1)
        self.portal.customer_message(chat, "lost by the queue")
        self.wait_for(lambda: self.answered(chat, "lost by the queue"), 12, "the reconciliation")
        self.assertGreater(self.portal.counts["im.v2.event.get"], 3)
        self.assertEqual((self.asked("by event"), self.asked("lost by the queue")), (1, 1))
        self.assertEqual(proc.stop(), 0)

    def test_the_event_offset_survives_kill_9_with_nothing_lost_or_doubled(self) -> None:
        rng = random.Random(11)
        chats = [self.ids["lines_member"], self.ids["lines_member2"]]
        sent = []
        db = os.path.join(self.tmp, "state", "bridge.db")
        for round_ in range(3):
            proc = self.start_bridge(B24_SOURCE="events", B24_POLL_SEC="0.2", B24_RECONCILE_SEC="30")
            for i in range(4):
                text = "r%d m%d" % (round_, i)
                self.portal.customer_message(rng.choice(chats), text)
                sent.append(text)
                time.sleep(rng.uniform(0.0, 0.25))
            proc.kill()                           # kill -9, somewhere in the middle
        proc = self.start_bridge(B24_SOURCE="events", B24_POLL_SEC="0.2", B24_RECONCILE_SEC="30")
        self.wait_for(lambda: all(any(self.answered(c, t) for c in chats) for t in sent), 20,
                      "every message answered")
        time.sleep(1.0)
        # a bot asked just before a kill -9 is asked again (same event_id); a reply is never posted twice
        for t in sent:
            ids = {r["payload"]["event_id"] for r in self.bot.received if r["payload"]["text"] == t}
            self.assertEqual(len(ids), 1, "%s: one event_id however often it was asked" % t)
        for c in chats:
            echoes = [x for x in self.texts(c) if x.startswith("Echo: r")]
            self.assertEqual(len(echoes), len(set(echoes)), "a reply was posted twice in chat%d" % c)
        self.assertEqual(sorted(x[len("Echo: "):] for c in chats for x in self.texts(c) if x.startswith("Echo: r")),
                         sorted(sent), "every message answered, once")
        with sqlite3.connect(db) as conn:
            saved = dict(conn.execute("SELECT key, value FROM meta"))
        offset = json.loads(saved["sources"])["events"]
        self.assertGreater(offset, 2001, "the event queue's offset is saved with the state")
        self.assertEqual(proc.stop(), 0)


class Receiver(QuietWorld):
    """``B24_LISTEN``: the emulator's outgoing webhook POSTs to the bridge."""

    def start_with_receiver(self, **env):
        self.port = free_port()
        hook = self.portal.outgoing_webhook("http://127.0.0.1:%d/b24" % self.port)
        env = dict(dict(B24_LISTEN="127.0.0.1:%d" % self.port, B24_APP_TOKEN=hook["application_token"],
                        B24_POLL_SEC="5", B24_RECONCILE_SEC="60"), **env)
        proc = self.start_bridge(**env)
        self.assertTrue(proc.wait_stderr("receiving Bitrix24 events", 5), proc.all_output())
        self.token = hook["application_token"]
        time.sleep(0.5)                            # past the scan every start begins with
        return proc

    def spooled(self) -> int:
        with sqlite3.connect(os.path.join(self.tmp, "state", "bridge.receiver.sqlite")) as conn:
            return conn.execute("SELECT COUNT(*) FROM hints").fetchone()[0]

    def test_a_pushed_message_is_answered_within_a_poll_interval_and_once(self) -> None:
        proc = self.start_with_receiver(B24_SOURCE="events")   # two sources see the same message
        chat = self.ids["lines_member"]
        t0 = time.monotonic()
        sent = self.portal.customer_message(chat, "pushed")
        self.wait_for(lambda: self.answered(chat, "pushed"), 4, "the pushed message")
        self.assertLess(time.monotonic() - t0, 3.0, "not the 5 s poll, not the 60 s reconciliation")
        # the portal's queue server sends it again, and a replayed outbound event names it too
        body = {"event": "ONOPENLINEMESSAGEADD", "data": {"DATA": {"message": {
            "id": sent["message_id"], "chat_id": chat, "user_id": 7}}}, "auth": {"application_token": self.token}}
        self.assertEqual(post(self.port, form(body))[0], 200)
        time.sleep(1.5)
        self.assertEqual(self.asked("pushed"), 1, "seen by the receiver and the event queue, asked once")
        self.assertEqual(self.spooled(), 0, "handled hints leave the spool")
        self.assertEqual(self.portal.push_stats()["failed"], 0, "every POST got its 200")
        self.assertEqual(proc.stop(), 0)

    def test_the_echo_of_our_own_reply_costs_no_read(self) -> None:
        proc = self.start_with_receiver(BRIDGE_TRACK_DELIVERY="0")
        chat = self.ids["lines_member"]
        reads = []
        for i in range(3):
            self.portal.reset_stats()
            self.portal.customer_message(chat, "echo %d" % i)
            self.wait_for(lambda n=i: self.answered(chat, "echo %d" % n), 4, "the answer")
            time.sleep(1.0)                         # the reply's own ONOPENLINEMESSAGEADD arrives meanwhile
            methods = [e["method"] for e in self.portal.stats()["log"]]
            reads.append(methods.count("im.dialog.messages.get"))
            posted_at = max(i for i, m in enumerate(methods) if m in ("im.message.add", "batch"))
            self.assertEqual(posted_at, len(methods) - 1, "nothing read after the reply was posted: %s" % methods)
        self.assertEqual(reads, [1, 1, 1], "one read per answered message: the customer's, not our reply's")
        self.assertGreaterEqual(self.portal.push_stats()["sent"], 6, "both events were pushed each time")
        self.assertEqual(proc.stop(), 0)

    def test_session_events_name_their_chat(self) -> None:
        body = {"event": "ONSESSIONSTART", "data": {"DATA": {"connector": {"chat_id": "1771", "line_id": "3"},
                                                             "chat": {"chat_id": "1771"}}}}
        self.assertEqual(push.push_hints(body), [push.Hint("chat1771")])
        legacy = {"event": "ONIMBOTMESSAGEADD", "data": {"PARAMS": {"DIALOG_ID": "chat5", "MESSAGE_ID": "9"}},
                  "auth": {"application_token": "key"}}
        self.assertEqual(push.push_hints(legacy), [push.Hint("chat5", 9, adopt=True)])

    def test_forged_oversized_and_malformed_posts_are_refused_and_nothing_is_processed(self) -> None:
        proc = self.start_with_receiver()
        chat = self.ids["lines_member"]
        self.portal.behave(drop_push=10)            # the real events get lost: only ours arrive
        sent = self.portal.customer_message(chat, "only a forger knows")
        forged = {"event": "ONOPENLINEMESSAGEADD", "data": {"DATA": {"message": {
            "id": sent["message_id"], "chat_id": chat}}}, "auth": {"application_token": "f" * 32}}
        self.assertEqual(post(self.port, form(forged))[0], 401)
        del forged["auth"]
        self.assertEqual(post(self.port, form(forged))[0], 401)
        self.assertEqual(post(self.port, b"x" * (push.RECEIVER_MAX_BODY + 1))[0], 413)
        self.assertEqual(post(self.port, b"event=ONOPENLINEMESSAGEADD&\xff\xfe=1")[0], 400)
        self.assertEqual(post(self.port, b"no_equals_sign&x")[0], 400)
        self.assertEqual(post(self.port, b"data[a]=1")[0], 400, "no event name")
        self.assertEqual(post(self.port, b"{not json", ctype="application/json")[0], 400)
        self.assertEqual(post(self.port, b"", method="GET")[0], 405)
        time.sleep(1.0)
        self.assertEqual(self.spooled(), 0)
        self.assertEqual(self.bot.received, [], "nothing forged or broken reached the bot")
        self.assertTrue(proc.wait_stderr("refused an event", 2))
        self.assertNotIn("f" * 32, proc.all_output())
        # the genuine token works, JSON too
        genuine = dict(forged, auth={"application_token": self.token})
        status, _ = post(self.port, json.dumps(genuine).encode(), ctype="application/json")
        self.assertEqual(status, 200)
        self.wait_for(lambda: self.answered(chat, "only a forger knows"), 4, "the genuine event")
        self.assertEqual(proc.stop(), 0)

    def test_events_lost_in_delivery_come_with_the_reconciliation(self) -> None:
        proc = self.start_with_receiver(B24_POLL_SEC="0.3", B24_RECONCILE_SEC="3")
        chat = self.ids["lines_member2"]
        self.portal.behave(drop_push=2)            # the queue server loses it (no retries)
        t0 = time.monotonic()
        self.portal.customer_message(chat, "never pushed")
        self.wait_for(lambda: self.answered(chat, "never pushed"), 10, "the reconciliation scan")
        self.assertGreater(time.monotonic() - t0, 0.5)
        self.assertEqual(self.portal.push_stats()["dropped"], 2)
        self.assertEqual(self.asked("never pushed"), 1)
        self.assertEqual(proc.stop(), 0)

    def test_without_a_token_the_receiver_does_not_start(self) -> None:
        proc = self.run_script("b24_ol_bridge.py", env=self.bridge_env(B24_LISTEN=str(free_port())))
        self.assertOneLineError(proc, 2, "B24_APP_TOKEN")
        check = self.run_script("b24_ol_bridge.py", "--check", env=self.bridge_env(B24_LISTEN=str(free_port())))
        self.assertEqual(check.returncode, 1, check.stdout)
        self.assertIn("\u2717 B24_LISTEN is set but B24_APP_TOKEN is not", check.stdout)
        self.assertIn("source: B24_SOURCE=auto", check.stdout)


class ChatBot(QuietWorld):
    """``--register-bot``: an Open Lines chat bot whose events come to the receiver; replies as the bot."""

    def test_register_answer_as_the_bot_and_unregister(self) -> None:
        port = free_port()
        url = "http://127.0.0.1:%d/bot-events" % port
        refused = self.run_script("b24_ol_bridge.py", "--register-bot", url, env=self.bridge_env())
        self.assertOneLineError(refused, 2, "imbot scope")
        self.portal.set_webhook(scopes=["im", "imopenlines", "imbot"])
        reg = self.run_script("b24_ol_bridge.py", "--register-bot", url, env=self.bridge_env())
        self.assertEqual(reg.returncode, 0, reg.stderr)
        self.assertIn("registered", reg.stdout)
        with open(os.path.join(self.tmp, "state", "chat-bot.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        self.assertNotIn(saved["client_id"], reg.stdout + reg.stderr, "the CLIENT_ID is a secret")
        bot_id = saved["bot_id"]
        self.portal.line_bot(3, bot_id)            # chosen as the line's chat bot in its settings
        # a chat the bot holds is in no operator's queue: the webhook user reads it by permission
        self.portal.users[7]["admin"] = True
        proc = self.start_bridge(B24_LISTEN="127.0.0.1:%d" % port, B24_POLL_SEC="5", B24_RECONCILE_SEC="4")
        self.assertTrue(proc.wait_stderr("replies go as the chat bot", 5), proc.all_output())
        new = self.portal.new_conversation(3, "Rita Example", "+10000000170", "hello bot")
        chat = new["chat_id"]
        self.wait_for(lambda: self.answered(chat, "hello bot"), 5, "the bot's answer")
        reply = self.portal.chat_messages(chat)[-1]
        self.assertEqual(reply["author_id"], bot_id, "posted by the chat bot")
        self.assertEqual(self.asked("hello bot"), 1)
        # the portal's own POSTs carry the CLIENT_ID as auth[application_token]; the URL's copy proves nothing
        forged = {"event": "ONIMBOTMESSAGEADD", "data": {"PARAMS": {"DIALOG_ID": "chat%d" % chat, "MESSAGE_ID": 1}}}
        self.assertEqual(post(port, form(forged), path="/bot-events?CLIENT_ID=%s" % saved["client_id"])[0], 401)
        self.portal.customer_message(chat, "and again")     # after the bot's answer: still ours
        self.wait_for(lambda: self.answered(chat, "and again"), 5, "the second answer")
        self.portal.behave(drop_push=1)                     # an event lost: the reconciliation re-reads
        self.portal.customer_message(chat, "lost event")
        self.wait_for(lambda: self.answered(chat, "lost event"), 12, "the reconciliation of the bot's dialog")
        self.assertEqual((self.asked("and again"), self.asked("lost event")), (1, 1))
        self.assertEqual(self.portal.push_stats()["failed"], 0, "every POST got its 200")
        self.assertNotIn(saved["client_id"], proc.all_output())
        self.assertEqual(proc.stop(), 0)
        gone = self.run_script("b24_ol_bridge.py", "--unregister-bot", env=self.bridge_env())
        self.assertEqual(gone.returncode, 0, gone.stderr)
        self.assertIn("removed", gone.stdout)
        self.assertNotIn(bot_id, self.portal.bots)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "state", "chat-bot.json")))


class ReaderSources(QuietWorld):

    def test_the_reader_follows_the_event_queue(self) -> None:
        proc = self.start_script("b24_openlines_reader.py", env=self.env(
            B24_SOURCE="events", B24_POLL_SEC="0.3", B24_RECONCILE_SEC="30"))
        self.assertTrue(proc.wait_stderr("source: events", 10), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "to the reader")
        lines = proc.read_lines(1, 5)
        self.assertTrue(lines and "to the reader" in lines[0], lines)
        self.assertEqual(proc.stop(), 0)


if __name__ == "__main__":
    unittest.main()


class ReadmePushMode(BridgeHarness):
    """The README's "try all of it locally" steps, as a newcomer runs them (free ports instead of 8088/8089)."""

    def test_the_local_walkthrough_works_as_printed(self) -> None:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as fh:
            block = fh.read().split("Try all of it locally", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        self.assertIn("python3 mock_b24_portal.py --port 8088 &", block)
        self.assertIn("_control/outgoing_webhook -d '{\"url\": \"http://127.0.0.1:8089/b24\"}'", block)
        self.assertIn("B24_LISTEN=127.0.0.1:8089 B24_APP_TOKEN=... python3 b24_ol_bridge.py", block)
        self.assertIn("_control/customer_message -d '{\"chat_id\": 1778, \"text\": \"hi\"}'", block)
        portal_port, listen = free_port(), free_port()
        portal = self.start_script("mock_b24_portal.py", "--port", str(portal_port))
        first = portal.read_lines(1, 10)
        self.assertTrue(first and first[0].startswith("B24_WEBHOOK_BASE="), first)
        base = first[0].split("=", 1)[1]
        status, text = post(portal_port, json.dumps({"url": "http://127.0.0.1:%d/b24" % listen}).encode(),
                            ctype="application/json", path="/_control/outgoing_webhook")
        self.assertEqual(status, 200, text)
        token = json.loads(text)["result"]["application_token"]
        proc = self.start_script("b24_ol_bridge.py", env=self.bridge_env(
            B24_WEBHOOK_BASE=base, B24_LISTEN="127.0.0.1:%d" % listen, B24_APP_TOKEN=token, B24_POLL_SEC="30"))
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        t0 = time.monotonic()
        status, text = post(portal_port, json.dumps({"chat_id": 1778, "text": "hi"}).encode(),
                            ctype="application/json", path="/_control/customer_message")
        self.assertEqual(status, 200, text)
        self.wait_for(lambda: any(r["payload"]["text"] == "hi" for r in self.bot.received), 10, "the bot")
        self.assertLess(time.monotonic() - t0, 5, "pushed, not the 30 s poll")
        self.assertNotIn(token, proc.all_output())
        self.assertEqual(proc.stop(), 0)
