"""The FIRST_ID poller over real HTTP: completeness, order, exactly-once, cost."""
from __future__ import annotations

import json
import time

import b24push as push
from tests.support import PortalCase, bc, mp


class IgnoresSyncDate(mp.Portal):
    """A portal whose im.recent.get ignores LAST_SYNC_DATE (the poller must notice)."""

    def m_im_recent_get(self, ctx, p):
        p = {k: v for k, v in p.items() if k not in ("LAST_SYNC_DATE", "LAST_UPDATE")}
        return super().m_im_recent_get(ctx, p)


class PollerCase(PortalCase):
    def cost(self, fn) -> tuple:
        self.portal.reset_stats()
        out = fn()
        st = self.portal.stats()
        return out, st["requests"], st["bytes_total"]


class Completeness(PollerCase):
    def test_120_messages_between_two_polls_come_once_in_order(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        sent = [self.portal.customer_message(chat, "msg %03d" % i)["message_id"] for i in range(120)]
        got = p.poll()
        self.assertEqual([m.id for m in got], sent)
        self.assertEqual([m.text for m in got], ["msg %03d" % i for i in range(120)])
        self.assertEqual(p.poll(), [])

    def test_many_dialogs_interleaved_oldest_first(self) -> None:
        p = self.poller()
        chats = [self.ids["lines_member"], self.ids["lines_member2"], self.ids["queued"]]
        sent = []
        for i in range(30):
            sent.append(self.portal.customer_message(chats[i % 3], "x%d" % i)["message_id"])
        got = p.poll()
        self.assertEqual([m.id for m in got], sent)
        self.assertEqual(p.poll(), [])

    def test_nothing_old_is_replayed_and_new_dialogs_are_marked(self) -> None:
        p = self.poller()
        self.assertEqual(p.poll(), [])
        new = self.portal.new_conversation(1, "Nora Example", "+10000000160", "first")
        self.portal.customer_message(new["chat_id"], "second")
        got = p.poll()
        self.assertEqual([(m.text, m.author_kind, m.new_dialog) for m in got],
                         [("Conversation started", "system", True), ("first", "customer", False),
                          ("second", "customer", False)])
        m = got[1]
        self.assertEqual((m.dialog_id, m.customer_name, m.customer_phone, m.line_id),
                         (new["dialog_id"], "Nora Example", "+10000000160", 1))

    def test_who_wrote(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "from customer")
        self.portal.operator_message(chat, 9, "from Pavel")
        self.portal.operator_message(chat, 15, "from the bot")
        bc.send_text(self.client(), "chat%d" % chat, "from us")
        kinds = [(m.text, m.author_kind, m.author_name) for m in p.poll()]
        self.assertIn(("from customer", "customer", "Ivan Petrov"), kinds)
        self.assertIn(("from Pavel", "operator", "Pavel Orlov"), kinds)
        self.assertIn(("from the bot", "bot", "Welcome Bot"), kinds)
        self.assertIn(("from us", "self", "Olga Sidorova"), kinds)
        # only LINES dialogs: the group chat and the private dialog are ignored
        self.portal.operator_message(self.ids["group"], 9, "group chatter")
        self.assertEqual(p.poll(), [])

    def test_session_closed_then_customer_returns(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        self.portal.close_session(chat)
        self.assertEqual([m.author_kind for m in p.poll()], [])   # we left: nothing readable changed for us
        self.portal.customer_message(chat, "hello again")
        got = p.poll()
        self.assertEqual([m.text for m in got][-1], "hello again")
        self.assertFalse(any(m.new_dialog for m in got))

    def test_joined_telegram_dialog_without_phone(self) -> None:
        p = self.poller()
        self.portal.join(self.ids["foreign"], 7)
        self.portal.customer_message(self.ids["foreign"], "tg")
        got = p.poll()
        self.assertEqual([(m.author_kind, m.new_dialog) for m in got], [("system", True), ("customer", False)])
        self.assertEqual((got[1].text, got[1].customer_phone, got[1].customer_name), ("tg", "", "Telegram User"))

    def test_fault_in_the_middle_loses_nothing(self) -> None:
        p = self.poller(bc.Client(self.config(), sleep=lambda s: None))
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "before")
        self.portal.fault("http502", count=20, method="batch")
        with self.assertRaises(bc.ServerError):
            bc.Poller.poll(p)
        self.portal.clear_faults()
        self.portal.customer_message(chat, "after")
        self.assertEqual([m.text for m in p.poll()], ["before", "after"])


class StateAndReplay(PollerCase):
    def test_resume_from_state(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "seen")
        self.assertEqual(len(p.poll()), 1)
        state = p.to_state()
        self.portal.customer_message(chat, "while away 1")
        self.portal.new_conversation(3, "Away Customer", "+10000000170", "while away 2")
        q = bc.Poller(self.client(), self_id=7)
        q.load_state(state)
        got = q.start()
        self.assertEqual([m.text for m in got if m.author_kind == "customer"], ["while away 1", "while away 2"])
        self.assertEqual(q.poll(), [])

    def test_only_acked_messages_move_the_saved_cursor(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        for t in ("a", "b", "c"):
            self.portal.customer_message(chat, t)
        got = p.poll(auto_ack=False)
        p.ack(got[0])
        state = p.to_state()
        q = bc.Poller(self.client(), self_id=7)
        q.load_state(state)
        self.assertEqual([m.text for m in q.start()], ["b", "c"])

    def test_watermark_waits_for_every_ack_even_across_polls(self) -> None:
        p = self.poller()
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "first")
        first = p.poll(auto_ack=False)
        saved = p.to_state()["watermark"]
        time.sleep(1.1)                       # the portal clock moves on
        self.portal.customer_message(chat, "second")
        second = p.poll(auto_ack=False)
        for m in second:
            p.ack(m)
        self.assertEqual(p.to_state()["watermark"], saved, "'first' is still unacknowledged")
        self.assertLess(p.to_state()["cursors"]["chat%d" % chat], first[0].id, "the cursor waits for 'first'")
        p.ack(first[0])
        self.assertGreater(p.to_state()["watermark"], saved)
        self.assertEqual(p.to_state()["cursors"]["chat%d" % chat], second[0].id)

    def test_rewind_by_count_and_time(self) -> None:
        p = self.poller()
        chat = "chat%d" % self.ids["lines_member"]
        p.rewind(count=2)
        got = [m for m in p.poll() if m.dialog_id == chat]
        self.assertEqual([m.text for m in got], ["Hi Ivan, let me check.", "Thanks!\nOrder A-1042"])
        p2 = self.poller()
        p2.rewind(since=time.time() - 2400)      # the queued chat's messages are 30 minutes old
        got = p2.poll()
        self.assertEqual({m.dialog_id for m in got}, {"chat%d" % self.ids["queued"]})


    def test_rewind_pages_back_beyond_one_page(self) -> None:
        chat = self.ids["lines_member"]
        for i in range(70):
            self.portal.customer_message(chat, "busy %02d" % i)
        p = self.poller()
        p.rewind(count=60)
        got = [m.text for m in p.poll() if m.dialog_id == "chat%d" % chat]
        self.assertEqual(got, ["busy %02d" % i for i in range(10, 70)])
        p = self.poller()
        p.rewind(since=time.time() - 60)
        got = [m.text for m in p.poll() if m.dialog_id == "chat%d" % chat]
        self.assertEqual(got, ["busy %02d" % i for i in range(70)])


class Cost(PollerCase):
    def test_idle_cycle_is_one_request_and_does_not_grow_with_dialogs(self) -> None:
        figures = {}
        for n in (10, 1000):
            self.portal.add_dialogs(n - len(self.portal.chats) + 2 if n == 10 else n - 10)
            p = self.poller()
            p.poll()
            _out, requests, nbytes = self.cost(p.poll)
            figures[n] = (requests, nbytes)
        self.assertEqual(figures[10][0], 1)
        self.assertEqual(figures[1000][0], 1)
        self.assertLess(figures[1000][1], figures[10][1] * 1.1 + 100)

    def test_changed_dialogs_cost_at_most_two_requests(self) -> None:
        chats = self.portal.add_dialogs(60)
        p = self.poller()
        for n in (1, 10, 50):
            with self.subTest(changed=n):
                for c in chats[:n]:
                    self.portal.customer_message(c, "hi")
                got, requests, _bytes = self.cost(p.poll)
                self.assertEqual(len(got), n)
                self.assertLessEqual(requests, 2)

    def test_a_chat_waiting_in_the_queue_costs_one_item_a_cycle(self) -> None:
        # §7: a waiting chat is appended to every recent answer; the scan's two (head and sync) would
        # carry it twice, and it is in every idle cycle for as long as it waits
        p = self.poller()
        p.poll()
        _out, _requests, before = self.cost(p.poll)
        for n in range(20):
            self.portal.new_conversation(1, "Queue Customer%d" % n, None, "anyone?")
        p.poll()
        _out, requests, after = self.cost(p.poll)
        self.assertEqual(requests, 1)
        future = "2099-01-01T00:00:00+00:00"                # no member row is this new: only the waiting chats
        waiting = [i for i in self.client().call("im.recent.get", {"LAST_SYNC_DATE": future}) if "last_id" not in i]
        self.assertEqual(len(waiting), 21)
        item = len(json.dumps(waiting[-1]))
        self.assertLess((after - before) / 20, 1.5 * item, "each waiting chat once per cycle")

    def test_the_teams_own_chats_cost_the_scan_nothing(self) -> None:
        # group chats and private dialogs are never read (Open Lines only): their rows are not asked for
        p = self.poller()
        p.poll()
        _out, _requests, quiet = self.cost(p.poll)
        self.portal.operator_message(self.ids["group"], 9, "team chatter")
        self.portal.operator_message(self.ids["private"], 9, "a word between colleagues")
        out, requests, busy = self.cost(p.poll)
        self.assertEqual((out, requests), ([], 1))
        self.assertLess(busy, quiet + 200)

    def test_portal_ignoring_last_sync_date_still_gets_everything(self) -> None:
        self.use_portal(IgnoresSyncDate())
        chats = self.portal.add_dialogs(300)
        p = self.poller()
        self.assertEqual(p.poll(), [])             # notices, falls back to scanning the list
        self.assertFalse(p.uses_sync)
        _out, requests, _bytes = self.cost(p.poll)
        self.assertEqual(requests, 1)
        for n in (1, 40):
            for c in chats[:n]:
                self.portal.customer_message(c, "x")
            got = p.poll()
            self.assertEqual(len(got), n)
        self.portal.customer_message(self.portal.world_ids["queued"], "queue still seen")
        self.assertEqual([m.text for m in p.poll()], ["queue still seen"])


class Queue(PollerCase):
    def check_waiting_ends(self, p: bc.Poller) -> None:
        queued = self.ids["queued"]
        p.poll()
        self.assertTrue(p.has_waiting())
        self.portal.take_chat(queued, 9)          # another operator answers: out of our sight from now on
        p.poll()
        self.assertFalse(p.has_waiting(), "a chat taken by someone else waits no more")
        self.assertFalse(p.to_state()["dialogs"].get("chat%d" % queued, {}).get("waiting"))
        new = self.portal.new_conversation(1, "Nora Example", None, "hello?")
        self.assertEqual([m.waiting for m in p.poll()][-1:], [True])
        self.portal.take_chat(new["chat_id"], 7)   # we answer it (no message since)
        p.poll()
        self.assertFalse(p.has_waiting())

    def test_a_chat_taken_from_the_queue_waits_no_more(self) -> None:
        self.check_waiting_ends(self.poller())

    def test_so_too_when_the_portal_ignores_last_sync_date(self) -> None:
        self.use_portal(IgnoresSyncDate())
        p = self.poller()
        p.poll()
        self.assertFalse(p.uses_sync)
        self.check_waiting_ends(p)


class BotHeld(PollerCase):
    """Dialogs our chat bot holds: in no recent list, re-read by the scan (what finds a lost bot event)."""

    def test_quiet_bot_chats_are_rechecked_a_few_dozen_a_scan_live_ones_every_scan(self) -> None:
        self.portal.users[7]["admin"] = True            # reads the bot's chats by permission (§17)
        self.portal.set_limits(rate=1000, burst=100000)
        chats = []
        for n in range(100):
            chats.append(self.portal.new_conversation(1, "Bot Customer%d" % n, None, "hi")["chat_id"])
            self.portal.take_chat(chats[-1], 9)         # in no list of ours
        clock = [time.monotonic()]
        p = self.poller(self.client(B24_RATE_PER_SEC="100", B24_RATE_BURST="10000"))
        p.monotonic = lambda: clock[0]
        p.poll()
        got = p.poll(hints=[push.Hint("chat%d" % c, 0, adopt=True) for c in chats])   # the bot's events
        self.assertEqual(len({m.dialog_id for m in got}), 100)

        def scan() -> tuple:
            self.portal.reset_stats()
            out = p.poll()
            return out, self.portal.stats()["sub_counts"].get("im.dialog.messages.get", 0)

        self.assertEqual(scan(), ([], 100), "news within the hour: each re-read at every scan")
        clock[0] += bc.ADOPTED_LIVE_SEC + 1         # past the hour (exactly an hour on: float rounding may fall short)
        lost = self.portal.customer_message(chats[0], "its event was lost")["message_id"]
        found, reads = [], []
        for _ in range(3):                                # 100 quiet ones, 40 a scan
            out, n = scan()
            found += [m.id for m in out]
            reads.append(n)
        self.assertEqual(reads, [40, 40, 40])
        self.assertEqual(found, [lost], "late, not lost")
        # a message brings the dialog back to life: re-read at every scan again
        self.assertEqual(scan()[1], 41)
        again = self.portal.customer_message(chats[0], "and again, no event")["message_id"]
        self.assertEqual([m.id for m in scan()[0]], [again])


class OwnPosts(PollerCase):
    """A dialog whose only news is our own post is read later (Poller.posted), never lost."""

    def setUp(self) -> None:
        super().setUp()
        self.chat = self.portal.add_dialogs(1)[0]
        self.did = "chat%d" % self.chat
        self.portal.take_chat(self.chat, 7)
        self.portal.take_chat(self.ids["queued"], 9)
        self.p = self.poller()
        self.p.own_read_delay = 1.5
        self.posting = self.client()
        self.portal.customer_message(self.chat, "question")
        self.assertEqual([m.text for m in self.p.poll()], ["question"])

    def post(self, text: str) -> int:
        mid = bc.send_text(self.posting, self.did, text)
        self.p.posted(self.did, mid)
        return mid

    def test_our_post_alone_is_read_once_when_due(self) -> None:
        self.portal.reset_stats()
        mine = self.post("answer")
        self.p.poll()
        self.assertEqual(self.reads(), 0, "read at once")
        time.sleep(1.6)
        self.p.poll()
        self.assertEqual(self.reads(), 1)
        self.assertEqual(self.p.fetched[self.did], mine)
        self.p.poll()
        self.assertEqual(self.reads(), 1, "read again")

    def test_a_post_that_went_after_a_scan_waits_twice_as_long_unless_one_went_alone(self) -> None:
        self.portal.reset_stats()
        self.p.posted(self.did, bc.send_text(self.posting, self.did, "answer"), after=bc.Poller.SCAN_CALLS)
        self.p.poll()
        time.sleep(1.6)
        self.p.poll()
        self.assertEqual(self.reads(), 0, "read after the single delay")
        time.sleep(1.5)
        self.p.poll()
        self.assertEqual(self.reads(), 1, "not read after twice the delay")
        # a post that went without a scan in the dialog: the single delay again, for the two of them
        self.p.posted(self.did, bc.send_text(self.posting, self.did, "after the scan"), after=bc.Poller.SCAN_CALLS)
        self.p.poll()
        self.post("on its own")
        time.sleep(1.6)
        self.p.poll()
        self.assertEqual(self.reads(), 2)

    def test_a_read_due_rides_in_the_scan_batch(self) -> None:
        hidden = self.portal.customer_message(self.chat, "written as we answered")["message_id"]
        mine = self.post("answer")
        self.p.poll()
        time.sleep(1.6)
        self.portal.reset_stats()
        got = [m.id for m in self.p.poll()]
        st = self.portal.stats()
        self.assertEqual(got, [hidden, mine])
        self.assertEqual((st["requests"], self.reads()), (1, 1), "one request: the scan and the read")
        # more than a page behind: the read riding with the scan is continued on its own
        mine = self.post("another answer")
        self.p.poll()
        time.sleep(1.6)
        burst = [self.portal.customer_message(self.chat, "burst %d" % i)["message_id"] for i in range(70)]
        self.portal.reset_stats()
        got = [m.id for m in self.p.poll()]
        self.assertEqual(got, [mine] + burst)
        self.assertEqual(self.portal.stats()["requests"], 2)
        self.assertEqual(self.p.poll(), [])

    def test_a_customer_message_hidden_behind_our_post_comes_when_due(self) -> None:
        hidden = self.portal.customer_message(self.chat, "written as we answered")["message_id"]
        self.post("answer")
        self.assertEqual([m.id for m in self.p.poll() if m.author_kind == "customer"], [])
        time.sleep(1.6)
        self.assertEqual([m.id for m in self.p.poll() if m.author_kind == "customer"], [hidden], "late, not lost")

    def test_a_message_known_to_wait_is_not_put_off_behind_our_post(self) -> None:
        self.p.own_read_delay = 30.0
        waiting = self.portal.customer_message(self.chat, "seen, not read")["message_id"]
        self.portal.fault("http400", count=1, method="im.dialog.messages.get")     # its read is refused
        self.assertEqual(self.p.poll(), [])
        mine = self.post("answer to the question before")
        self.assertEqual([m.id for m in self.p.poll()], [waiting, mine], "read at once, not 30 s later")

    def test_a_message_seen_in_the_list_is_never_history_however_late_its_read(self) -> None:
        # the list showed it while the dialog was in sight: a read that comes after the scans' reach
        # (a refused read, then our post put off) still delivers it
        self.p.sweep_margin = 1.0                        # a minute on a real portal
        waiting = self.portal.customer_message(self.chat, "seen, not read")["message_id"]
        self.portal.fault("http400", count=1, method="im.dialog.messages.get")
        self.assertEqual(self.p.poll(), [])
        time.sleep(2.5)                                  # older than the reach of every scan now
        self.p.poll()
        mine = self.post("answer")
        got = [m.id for m in self.p.poll()]
        time.sleep(1.6)
        got += [m.id for m in self.p.poll()]
        self.assertEqual(got, [waiting, mine])

    def test_the_next_message_reads_ours_with_it_at_once(self) -> None:
        hidden = self.portal.customer_message(self.chat, "written as we answered")["message_id"]
        self.post("answer")
        self.p.poll()
        nxt = self.portal.customer_message(self.chat, "thanks")["message_id"]
        self.portal.reset_stats()
        got = [m.id for m in self.p.poll() if m.author_kind == "customer"]
        self.assertEqual(got, [hidden, nxt])
        self.assertEqual(self.reads(), 1)
