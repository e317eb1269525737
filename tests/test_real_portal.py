"""What a real portal does that a convenient emulator would not (fact sheet §7-§9).

Each behaviour is shown twice: the emulator does it (raw HTTP), and the
poller / sender / reader / bridge survive it.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from unittest import mock

from tests import test_emulator
from tests.support import PortalCase, bc
from tests.test_poller import IgnoresSyncDate


class PortalFacts(PortalCase):
    """The emulator reproduces the fact sheet where the poller depends on it."""

    http = test_emulator.Raw.http
    messages = test_emulator.Raw.messages

    def setUp(self) -> None:
        super().setUp()
        self.chat = self.ids["lines_member"]

    def test_next_counts_in_queue_items(self) -> None:
        # §7.1: next = OFFSET + count(items), in-queue items included; OFFSET += LIMIT is the way
        for _ in range(3):
            self.portal.new_conversation(1, "Waiting Customer", None, "hello?")
        status, body = self.http("im.recent.list", {"LIMIT": 2, "OFFSET": 0})
        waiting = [i for i in body["result"]["items"] if "last_id" not in i]
        self.assertEqual(len(waiting), 4)          # the world's queued chat + 3 new ones
        self.assertEqual(body["next"], 2 + 4)

    def test_recent_get_appends_in_queue_items_whatever_the_date(self) -> None:
        since = "2099-01-01T00:00:00+03:00"      # later than everything: no member row qualifies
        status, body = self.http("im.recent.get", {"LAST_SYNC_DATE": since})
        self.assertEqual(status, 200)
        self.assertEqual([i["chat_id"] for i in body["result"]], [self.ids["queued"]])
        item = body["result"][0]
        self.assertNotIn("last_id", item)
        self.assertIn("date_update", item)
        # an unparsable date is silently ignored: the default 30-day list, no error
        status, body = self.http("im.recent.get", {"LAST_SYNC_DATE": "yesterday-ish"})
        self.assertEqual(status, 200)
        self.assertIn(self.ids["lines_member"], [i["chat_id"] for i in body["result"]])

    def test_in_queue_date_update_follows_new_messages(self) -> None:
        queued = self.ids["queued"]
        before = [i for i in self.http("im.recent.get", {})[1]["result"] if i["chat_id"] == queued][0]
        self.portal.customer_message(queued, "still waiting")
        after = [i for i in self.http("im.recent.get", {})[1]["result"] if i["chat_id"] == queued][0]
        self.assertGreater(bc.parse_date(after["date_update"]), bc.parse_date(before["date_update"]))

    def test_recent_row_is_written_after_the_message(self) -> None:
        self.portal.behave(row_lag=0.6)
        sent = self.portal.customer_message(self.chat, "lagging row")["message_id"]
        self.assertIn(sent, self.messages(LAST_ID=0, LIMIT=1))     # the message is there at once
        top = self.http("im.recent.list", {"LIMIT": 1})[1]["result"]["items"][0]
        self.assertNotEqual(top["message"]["id"], sent)             # its row is not, yet
        time.sleep(0.7)
        top = self.http("im.recent.list", {"LIMIT": 1})[1]["result"]["items"][0]
        self.assertEqual(top["message"]["id"], sent)

    def test_media_message_shape(self) -> None:
        got = self.portal.customer_media(self.chat, "image", "receipt.jpg", 235520, "")
        status, body = self.http("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.chat, "LAST_ID": 0,
                                                            "LIMIT": 1})
        msg = body["result"]["messages"][0]
        self.assertEqual((msg["id"], msg["text"], msg["params"]["FILE_ID"]), (got["message_id"], "", [got["file_id"]]))
        f = body["result"]["files"][0]
        self.assertEqual((f["id"], f["type"], f["name"], f["size"]), (got["file_id"], "image", "receipt.jpg", 235520))
        self.assertTrue(f["urlDownload"].startswith(self.server.url))

    def test_duplicated_uuid_while_in_flight_and_when_stuck(self) -> None:
        uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
        self.portal.behave(message_add_delay=1.0)
        first: list = []
        t = threading.Thread(target=lambda: first.append(self.http("im.message.add", {
            "DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "slow", "TEMPLATE_ID": uuid})))
        t.start()
        time.sleep(0.3)
        status, body = self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "slow",
                                                    "TEMPLATE_ID": uuid})
        self.assertEqual((status, body["error"]), (400, "MESSAGE_DUPLICATED_BY_UUID"))
        t.join()
        self.assertEqual(first[0][0], 200)
        self.portal.behave(message_add_delay=0)
        self.assertEqual(self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "slow",
                                                      "TEMPLATE_ID": uuid})[1]["result"], first[0][1]["result"])
        # an attempt that died after recording the uuid blocks it until the record's TTL
        stuck = "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"
        self.portal.behave(fail_after_uuid=1, uuid_ttl=0.5)
        args = {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "stuck", "TEMPLATE_ID": stuck}
        self.assertEqual(self.http("im.message.add", args)[0], 500)
        self.assertEqual(self.http("im.message.add", args)[1]["error"], "MESSAGE_DUPLICATED_BY_UUID")
        time.sleep(0.6)
        self.assertEqual(self.http("im.message.add", args)[0], 200)

    def test_one_at_a_time_queue(self) -> None:
        self.portal.add_line(8, "WhatsApp Strict", [9, 7], offer="one")
        c = self.portal.new_conversation(8, "Strict Customer", None, "anyone?")
        ids = [i["chat_id"] for i in self.http("im.recent.get", {})[1]["result"]]
        self.assertNotIn(c["chat_id"], ids)            # offered to operator 9 first
        self.portal.offer(c["chat_id"], 7)
        item = [i for i in self.http("im.recent.get", {})[1]["result"] if i["chat_id"] == c["chat_id"]][0]
        self.assertNotIn("last_id", item)


class RealPortalPoller(PortalCase):
    def test_pinned_chats_and_waiting_dialogs_skip_nothing_on_the_paged_path(self) -> None:
        # §7.1: with 8 pinned chats the first page holds only them; `next` counts the waiting
        # dialogs, so following it skips the most recently active unpinned dialog for good
        self.use_portal(IgnoresSyncDate())
        chats = self.portal.add_dialogs(20)
        for c in chats[:8]:
            self.portal.pin(c)
        for _ in range(2):
            self.portal.new_conversation(1, "Waiting Customer", None, "waiting")
        p = self.poller()
        self.assertEqual(p.poll(), [])
        self.assertFalse(p.uses_sync)
        target = self.ids["lines_member"]          # the most recently active unpinned dialog
        for n in range(3):
            self.portal.customer_message(target, "are you there? %d" % n)
            got = [m.text for m in p.poll() if m.dialog_id == "chat%d" % target]
            self.assertEqual(got, ["are you there? %d" % n])

    def test_full_scan_pages_do_not_skip_dialogs(self) -> None:
        chats = self.portal.add_dialogs(450)
        for _ in range(5):
            self.portal.new_conversation(1, "Waiting Customer", None, "waiting")
        p = self.poller()
        missing = ["chat%d" % c for c in chats if "chat%d" % c not in p.cursors]
        self.assertEqual(missing, [])

    def test_thirty_changed_dialogs_with_four_waiting_in_one_cycle_two_requests(self) -> None:
        chats = self.portal.add_dialogs(40)
        for _ in range(3):
            self.portal.new_conversation(1, "Waiting Customer", None, "waiting")
        p = self.poller()
        p.poll()
        for c in chats[:30]:
            self.portal.customer_message(c, "burst")
        self.portal.reset_stats()
        got = p.poll()
        self.assertEqual(sorted(m.dialog_id for m in got), sorted("chat%d" % c for c in chats[:30]))
        self.assertEqual(self.portal.stats()["requests"], 2)

    def test_a_quiet_waiting_dialog_keeps_the_one_batch_path(self) -> None:
        # a dialog waiting for ten minutes: its in-queue item is older than any LAST_SYNC_DATE
        self.portal.new_conversation(1, "Patient Customer", None, "hello?", when=time.time() - 600)
        p = self.poller()
        for _ in range(5):
            self.portal.reset_stats()
            self.assertEqual(p.poll(), [])
            self.assertTrue(p.uses_sync)
            self.assertEqual(self.portal.stats()["requests"], 1)
        self.portal.customer_message(self.ids["lines_member"], "news")
        self.assertEqual([m.text for m in p.poll()], ["news"])
        self.assertTrue(p.uses_sync)

    def test_late_recent_rows_lose_nothing(self) -> None:
        # one message per dialog, so a missed row is never rescued by a later message
        chats = self.portal.add_dialogs(16)
        self.portal.take_chat(self.ids["queued"], 9)     # nothing waits: the one-batch path throughout
        p = self.poller()
        self.portal.behave(row_lag=1.5)
        sent, got = [], []
        for a, b in zip(chats[::2], chats[1::2]):
            # two at once: the first one's row never tops the list (im.recent.list LIMIT=1)
            sent.append(self.portal.customer_message(a, "lag")["message_id"])
            sent.append(self.portal.customer_message(b, "lag")["message_id"])
            for _ in range(2):
                time.sleep(0.2)
                got.extend(m.id for m in p.poll() if m.author_kind == "customer")
        time.sleep(1.6)
        for _ in range(2):
            got.extend(m.id for m in p.poll() if m.author_kind == "customer")
        self.assertTrue(p.uses_sync)
        self.assertEqual(sorted(got), sent)

    def test_a_row_behind_what_was_read_is_a_late_row_not_another_portal(self) -> None:
        # a dialog that keeps getting messages while its rows come late: a read brings messages whose
        # rows are not written yet, so a later row ends before what was read -- as it does when the state
        # belongs to another portal; taken for that, the dialog was read again from the last scan on
        chat, other = self.portal.add_dialogs(2)
        self.portal.take_chat(self.ids["queued"], 9)
        p = self.poller()
        p.sweep_every = 1.0                              # rows come back with sweeps often (a minute on a real portal)
        p.poll()
        self.portal.behave(row_lag=1.2)
        sent, got = [], []
        for n in range(8):
            sent.append(self.portal.customer_message(chat, "m%d" % n)["message_id"])
            if n % 3 == 0:
                self.portal.customer_message(other, "o%d" % n)      # tops the list: a read of chat or not
            time.sleep(0.3)
            got.extend(m.id for m in p.poll() if m.dialog_id == "chat%d" % chat)
        self.portal.behave(row_lag=0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got.extend(m.id for m in p.poll() if m.dialog_id == "chat%d" % chat)
            time.sleep(0.3)
        self.assertEqual(got, sent, "each message once, in order")

    def test_a_row_written_very_late_comes_with_the_sweep(self) -> None:
        chat = self.portal.add_dialogs(1)[0]
        self.portal.take_chat(self.ids["queued"], 9)     # nothing waits: the one-batch path throughout
        p = self.poller()
        p.sweep_every = 4.0                              # a minute on a real portal
        p.poll()
        self.portal.behave(row_lag=6.0)                  # later than the near margin (SYNC_NEAR_SEC)
        sent = self.portal.customer_message(chat, "very late row")["message_id"]
        got, deadline = [], time.monotonic() + 14
        while not got and time.monotonic() < deadline:
            got = [m.id for m in p.poll() if m.author_kind == "customer"]
            time.sleep(0.5)
        self.assertEqual(got, [sent], "late, not lost")

    def test_a_row_later_than_one_sweep_period_comes_with_the_next_sweep(self) -> None:
        # written after the first sweep that could have had it, dated before the reach of the one after
        # that asks back only its margin from itself: the next sweep asks back from the one before it
        chat, other = self.portal.add_dialogs(2)
        self.portal.take_chat(self.ids["queued"], 9)
        with mock.patch.object(bc, "SYNC_MARGIN_SEC", 5.0):     # a minute on a real portal
            p = self.poller()
            p.sweep_every = 4.0                          # likewise
            p.poll()                                     # a sweep
            time.sleep(0.3)
            # within the margin, but visible only after the next sweep, and missed by the near scans
            # (with a second to spare: the portal's dates are whole seconds)
            self.portal.behave(row_lag=4.5)
            sent = self.portal.customer_message(chat, "later than a sweep")["message_id"]
            self.portal.behave(row_lag=0)
            self.portal.customer_message(other, "on top of the list")   # im.recent.list LIMIT=1 shows this one
            got, deadline = [], time.monotonic() + 13
            while not got and time.monotonic() < deadline:
                got = [m.id for m in p.poll() if m.author_kind == "customer" and m.dialog_id == "chat%d" % chat]
                time.sleep(0.25)
        self.assertEqual(got, [sent], "late, not lost")

    def test_a_busy_minute_is_not_paid_for_every_cycle(self) -> None:
        chats = self.portal.add_dialogs(40)
        self.portal.take_chat(self.ids["queued"], 9)
        p = self.poller()
        p.poll()                                         # the first scan sweeps wide
        self.portal.reset_stats()
        p.poll()
        quiet = self.portal.stats()["bytes_total"]
        for c in chats:
            self.portal.customer_message(c, "busy")
        self.assertEqual(len([m for m in p.poll() if m.author_kind == "customer"]), 40)
        time.sleep(bc.SYNC_NEAR_SEC + 1.5)               # the burst is older than the near margin now (whole seconds)
        self.assertEqual(p.poll(), [])                   # this scan still asks back to the one before the burst
        time.sleep(0.5)
        self.portal.reset_stats()
        self.assertEqual(p.poll(), [])
        after = self.portal.stats()["bytes_total"]
        self.assertLess(after, 2 * quiet, "idle cost after a burst: %d bytes against %d when quiet" % (after, quiet))

    def test_media_reaches_reader_json_and_text(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        self.portal.customer_media(chat, "image", "receipt.jpg", 235520, "")
        self.portal.customer_media(chat, "audio", "voice.ogg", 48000, "listen")
        got = p.poll()
        photo, voice = got
        self.assertEqual(photo.text, "[photo: receipt.jpg, 230 KB]")
        self.assertEqual(photo.display_text, "[photo: receipt.jpg, 230 KB]")
        self.assertEqual(voice.text, "listen")
        self.assertEqual(voice.display_text, "[audio: voice.ogg, 47 KB] listen")
        att = photo.to_json()["attachments"][0]
        self.assertEqual((att["type"], att["name"], att["size"], att["extension"], att["mime"]),
                         ("photo", "receipt.jpg", 235520, "jpg", "image/jpeg"))
        self.assertTrue(att["url_download"].startswith(self.server.url))

    def test_a_dialog_transferred_in_does_not_replay_its_history(self) -> None:
        # Pavel's Telegram dialog has history; the webhook user is added to it much later
        p = self.poller()
        foreign = self.ids["foreign"]
        for i in range(60):
            self.portal.customer_message(foreign, "old %d" % i, when=time.time() - 3000 + i)
        self.assertEqual(p.poll(), [])
        self.portal.join(foreign, 7)
        self.portal.customer_message(foreign, "new after the join")
        got = [(m.author_kind, m.text) for m in p.poll()]
        self.assertEqual(got, [("system", "Olga Sidorova joined the conversation"),
                               ("customer", "new after the join")])

    def test_a_waiting_session_offered_late_is_delivered_from_its_start(self) -> None:
        self.portal.add_line(8, "WhatsApp Strict", [9, 7], offer="one")
        p = self.poller()
        c = self.portal.new_conversation(8, "Strict Customer", None, "anyone?", when=time.time() - 300)
        self.portal.customer_message(c["chat_id"], "hello??", when=time.time() - 200)
        self.assertEqual(p.poll(), [])                 # offered to operator 9 only
        self.portal.offer(c["chat_id"], 7)
        got = [m.text for m in p.poll() if m.author_kind == "customer"]
        self.assertEqual(got, ["anyone?", "hello??"])


class RealPortalScripts(PortalCase):
    def test_reader_prints_media_lines_and_json(self) -> None:
        proc = self.start_script("b24_openlines_reader.py")
        self.assertTrue(proc.wait_stderr("watching", 20), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_media(chat, "image", "receipt.jpg", 235520, "is this right?")
        line = proc.read_lines(1)[0]
        self.assertTrue(line.startswith("[chat%d] [photo: receipt.jpg, 230 KB] is this right?  -- Ivan Petrov"
                                        % chat), line)
        proc.stop()
        proc = self.start_script("b24_openlines_reader.py", "--json")
        self.assertTrue(proc.wait_stderr("watching", 20), proc.all_output())
        self.portal.customer_media(chat, "file", "invoice.pdf", 1048576 * 2, "")
        row = json.loads(proc.read_lines(1)[0])
        self.assertEqual(row["text"], "[document: invoice.pdf, 2.0 MB]")
        self.assertEqual(row["attachments"][0]["mime"], "application/pdf")
        proc.stop()

    def test_slow_first_attempt_is_posted_exactly_once(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.behave(message_add_delay=2.5)
        client = bc.Client(self.config(B24_HTTP_TIMEOUT_SEC=1))
        mid = bc.send_text(client, "chat%d" % chat, "slow but once", patience=10)
        time.sleep(0.5)
        texts = [m for m in self.portal.chat_messages(chat) if m["text"] == "slow but once"]
        self.assertEqual([m["id"] for m in texts], [mid])

    def test_control_api_reaches_the_new_world_actions(self) -> None:
        req = urllib.request.Request("%s/_control/customer_media" % self.server.url, method="POST",
                                     data=json.dumps({"chat_id": self.ids["lines_member"], "kind": "video",
                                                      "name": "clip.mp4", "size": 5000}).encode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=5) as resp:
            self.assertIn("file_id", json.loads(resp.read())["result"])
