"""The bridge keeps its promises: nothing lost through bot outages, crashes and portal quirks."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time

import olbridge.bot as botlib
import olbridge.bridge
from tests.support import PortalCase, bc
from tests.test_bridge import BRIDGE
from tests.test_bridge import BridgeHarness as BridgeCase


class Promises(BridgeCase):
    def dead_letters(self) -> list:
        path = os.path.join(self.tmp, "state", "bridge.dead-letters.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def test_a_bot_redeploy_loses_nothing_and_other_dialogs_go_on(self) -> None:
        a, b = self.ids["lines_member"], self.ids["lines_member2"]
        proc = self.start_bridge()
        self.bot.fail_next = 10 ** 6                 # the bot is down (HTTP 500)
        for i in range(3):
            self.portal.customer_message(a, "during the outage %d" % i)
        self.assertTrue(proc.wait_stderr("trying again in", 15), proc.all_output())
        time.sleep(4)                                # several retries later
        self.bot.fail_next = 0                       # redeployed
        want = ["Echo: during the outage %d" % i for i in range(3)]
        self.wait_for(lambda: [t for t in self.texts(a) if t.startswith("Echo:")] == want, timeout=40,
                      what="every message answered, in order")
        self.portal.customer_message(b, "all good")
        self.wait_for(lambda: "Echo: all good" in self.texts(b), what="the other dialog")
        self.assertEqual(self.dead_letters(), [])
        self.assertEqual(proc.stop(), 0)

    def test_past_the_retry_window_a_dead_letter_the_fallback_text_and_replay(self) -> None:
        chat = self.ids["lines_member"]
        other = self.ids["lines_member2"]
        proc = self.start_bridge(BRIDGE_RETRY_HOURS="0.0012", BRIDGE_FALLBACK_TEXT="We will get back to you soon.")
        self.bot.fail_next = 10 ** 6
        self.portal.customer_message(chat, "nobody home")
        self.portal.customer_message(other, "me neither")
        self.wait_for(lambda: len(self.dead_letters()) == 2, timeout=30, what="two dead letters")
        self.wait_for(lambda: "We will get back to you soon." in self.texts(chat), what="the fallback text")
        letter = [d for d in self.dead_letters() if d["dialog_id"] == "chat%d" % chat][0]
        self.assertEqual((letter["payload"]["text"], letter["stage"]), ("nobody home", "bot"))
        self.assertIn("HTTP 500", letter["reason"])
        self.assertEqual(proc.stop(), 0)
        self.bot.fail_next = 0
        proc = self.start_bridge("--replay-dead", "--dialog", "chat%d" % chat)
        self.wait_for(lambda: "Echo: nobody home" in self.texts(chat), what="the replayed message")
        self.assertEqual([d["dialog_id"] for d in self.dead_letters()], ["chat%d" % other])
        self.assertEqual(proc.stop(), 0)
        self.assertEqual(self.texts(chat).count("We will get back to you soon."), 1)

    def test_unusable_answers_are_retried_then_dead_letters_never_tracebacks(self) -> None:
        chat = self.ids["lines_member"]
        cases = {
            "four-oh-four": (404, "application/json", b'{"error": "no such route"}'),
            "not json": (200, "application/json", b"{oops"),
            "odd shape": (200, "application/json", b'{"status": "ok"}'),
            "deep": (200, "application/json", b"[" * 200000 + b"]" * 200000),
            "huge": (200, "text/plain", b"x" * (2 * 1048576)),
        }
        self.bot.raw = lambda text: cases.get(text, (200, "application/json", b'{"reply_text": "fine"}'))
        proc = self.start_bridge(BRIDGE_RETRY_FIRST_SEC="0.2")
        for text in cases:
            self.portal.customer_message(chat, text)
        self.wait_for(lambda: len(self.dead_letters()) == len(cases), timeout=60, what="a dead letter each")
        reasons = {d["payload"]["text"]: d["reason"] for d in self.dead_letters()}
        self.assertIn("HTTP 404", reasons["four-oh-four"])
        self.assertIn("not valid JSON", reasons["not json"])
        self.assertIn("status", reasons["odd shape"])
        self.assertIn("nested too deeply", reasons["deep"])
        self.assertIn("BOT_MAX_REPLY_BYTES", reasons["huge"])
        self.assertEqual(sum(1 for r in self.bot.received if r["payload"]["text"] == "odd shape"), 3)
        self.assertNotIn("Traceback", proc.all_output())
        self.assertEqual(proc.stop(), 0)

    def test_handoff_is_an_answer_not_an_error(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.raw = lambda text: (200, "application/json",
                                     json.dumps({"handoff": True, "text": "A person will take over."}).encode())
        proc = self.start_bridge()
        self.portal.customer_message(chat, "I want a human")
        self.wait_for(lambda: "A person will take over." in self.texts(chat), what="the handoff text")
        self.assertTrue(proc.wait_stderr("handed the dialog over", 5), proc.all_output())
        self.assertEqual(self.dead_letters(), [])
        self.assertEqual(proc.stop(), 0)

    def test_a_trickling_bot_is_cut_at_the_deadline_and_asked_again(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.raw = lambda text: (200, "application/json", json.dumps({"reply_text": "slowly " * 40}).encode())
        self.bot.trickle = 0.05                      # 280 bytes over 14 s
        proc = self.start_bridge(BOT_HTTP_TIMEOUT_SEC="2")
        self.portal.customer_message(chat, "hello?")
        self.assertTrue(proc.wait_stderr("no complete answer within BOT_HTTP_TIMEOUT_SEC=2", 15), proc.all_output())
        self.bot.trickle = 0
        self.wait_for(lambda: any(t.startswith("slowly") for t in self.texts(chat)), timeout=20, what="the answer")
        self.assertEqual(proc.stop(), 0)

    def test_long_answers_are_split_and_capped(self) -> None:
        chat = self.ids["lines_member"]
        paragraph = ("word " * 199 + "end.\n\n")                 # 1,000 characters
        self.bot.replies = lambda text: [paragraph * (10 if text == "long" else 100)]
        proc = self.start_bridge()
        self.portal.customer_message(chat, "long")
        self.wait_for(lambda: sum(1 for t in self.texts(chat) if t.startswith("word")) == 3, what="3 messages")
        self.assertTrue(all(len(t) <= 4096 for t in self.texts(chat)))
        self.portal.customer_message(chat, "very long")
        self.assertTrue(proc.wait_stderr("posting the first 10, the rest is cut", 15), proc.all_output())
        self.wait_for(lambda: sum(1 for t in self.texts(chat) if t.startswith("word")) == 13, what="10 more")
        time.sleep(1)
        self.assertEqual(sum(1 for t in self.texts(chat) if t.startswith("word")), 13)
        self.assertEqual(proc.stop(), 0)

    def test_one_refused_part_does_not_drop_the_rest(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.replies = lambda text: ["part one", "part two", "part three"]
        self.bot.shape = "replies"
        proc = self.start_bridge()
        self.portal.fault("http400", count=1, method="im.message.add")
        self.portal.customer_message(chat, "three answers please")
        self.wait_for(lambda: "part three" in self.texts(chat), what="the last part")
        texts = self.texts(chat)
        self.assertEqual(texts.count("part one") + texts.count("part two"), 1, "exactly one part was refused")
        self.assertEqual(len(self.dead_letters()), 1)
        self.assertIn("refused", self.dead_letters()[0]["reason"])
        self.assertEqual(proc.stop(), 0)

    def test_a_dialog_that_comes_into_sight_replays_no_history(self) -> None:
        foreign = self.ids["foreign"]
        for i in range(20):
            self.portal.customer_message(foreign, "old question %d" % i, when=time.time() - 4000 + i)
        proc = self.start_bridge()
        time.sleep(1)
        self.portal.join(foreign, 7)                  # a supervisor adds the webhook user
        self.portal.customer_message(foreign, "new question")
        self.wait_for(lambda: "Echo: new question" in self.texts(foreign), what="the new message's answer")
        time.sleep(1)
        self.assertEqual([r["payload"]["text"] for r in self.bot.received], ["new question"])
        self.assertEqual(proc.stop(), 0)

    def test_a_dialog_we_cannot_post_to_is_logged_once_and_the_bot_not_asked(self) -> None:
        queued = self.ids["queued"]
        proc = self.start_bridge()
        for i in range(3):
            self.portal.customer_message(queued, "waiting %d" % i)
        self.assertTrue(proc.wait_stderr("the bot is not asked while", 15), proc.all_output())
        time.sleep(1.5)
        self.assertEqual(self.bot.received, [])
        self.assertEqual(sum("the bot is not asked while" in ln for ln in proc.stderr_lines), 1)
        self.assertEqual(proc.stop(), 0)

    def test_new_dialog_means_a_new_session(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge()
        self.portal.customer_message(chat, "same session")
        self.wait_for(lambda: len(self.bot.received) == 1, what="the first message")
        self.portal.close_session(chat)
        self.portal.customer_message(chat, "back next week")        # a new session, in the queue
        self.portal.take_chat(chat, 7)
        self.portal.customer_message(chat, "still there?")
        self.wait_for(lambda: len(self.bot.received) == 3, what="the new session's messages")
        got = [(r["payload"]["text"], r["payload"]["new_dialog"], r["payload"]["session_id"]) for r in self.bot.received]
        self.assertFalse(got[0][1])
        self.assertNotEqual(got[0][2], got[2][2])
        self.assertEqual(sum(1 for g in got if g[1]), 1, got)
        self.assertTrue([g for g in got if g[1]][0][0] in ("back next week", "still there?"))
        self.assertEqual(proc.stop(), 0)

    def test_a_second_bridge_on_the_same_state_refuses_to_start(self) -> None:
        first = self.start_bridge()
        second = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertOneLineError(second, 2, "another bridge (pid %d)" % first.popen.pid)
        self.assertEqual(first.stop(), 0)

    def test_the_demo_never_touches_the_real_state(self) -> None:
        state = os.path.join(self.tmp, "state")
        first = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertEqual(first.returncode, 0, first.stderr)
        before = {n: os.stat(os.path.join(state, n)).st_mtime_ns for n in os.listdir(state)}
        demo = self.run_script(BRIDGE, "--demo", "--once", env=self.bridge_env())
        self.assertEqual(demo.returncode, 0, demo.stderr)
        after = {n: os.stat(os.path.join(state, n)).st_mtime_ns for n in os.listdir(state)}
        self.assertEqual(before, after)

    def test_restart_posts_the_rest_of_the_same_answer_on_a_forgetful_portal(self) -> None:
        chat = self.ids["lines_member"]
        n = [0]

        def replies(text: str) -> list:
            n[0] += 1
            return ["%s answer %d part %d" % (text, n[0], i) for i in (1, 2, 3)]
        self.bot.replies = replies
        self.bot.shape = "replies"
        proc = self.start_bridge()
        self.portal.behave(message_add_delay=1.0)
        self.portal.customer_message(chat, "crash")
        self.wait_for(lambda: "crash answer 1 part 1" in self.texts(chat), timeout=20, what="the first part")
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.kill()
        time.sleep(1.2)                           # a part in flight when we died lands meanwhile
        self.portal.forget_uuids()                # only our own records can prevent a double post now
        self.portal.behave(message_add_delay=0)
        proc = self.start_bridge()
        self.wait_for(lambda: "crash answer 1 part 3" in self.texts(chat), timeout=20, what="the rest")
        time.sleep(1)
        replies_posted = [t for t in self.texts(chat) if "answer" in t]
        self.assertEqual(replies_posted, ["crash answer 1 part 1", "crash answer 1 part 2", "crash answer 1 part 3"])
        self.assertEqual(len(self.bot.received), 1, "the bot was not asked again")
        self.assertEqual(proc.stop(), 0)

    def test_a_locked_state_database_stops_no_worker(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge()
        self.portal.customer_message(chat, "before the lock")
        self.wait_for(lambda: "Echo: before the lock" in self.texts(chat), what="the first reply")
        db = sqlite3.connect(os.path.join(self.tmp, "state", "bridge.db"), isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")             # another program holds the database (as a full disk would)
        self.portal.customer_message(chat, "during the lock")
        self.assertTrue(proc.wait_stderr("cannot write the state database", 20), proc.all_output())
        db.execute("ROLLBACK")
        db.close()
        self.wait_for(lambda: "Echo: during the lock" in self.texts(chat), timeout=30, what="the reply after")
        self.portal.customer_message(chat, "after the lock")
        self.wait_for(lambda: "Echo: after the lock" in self.texts(chat), timeout=20, what="the dialog served again")
        self.assertEqual(proc.stop(), 0)

    def test_a_slow_scan_does_not_hold_up_replies(self) -> None:
        chat = self.ids["lines_member"]
        self.bot.delay = {"slow bot": 1.0}
        proc = self.start_bridge()
        self.portal.customer_message(chat, "slow bot")
        self.wait_for(lambda: len(self.bot.received) == 1, what="the bot call")
        self.portal.fault("latency", count=3, method="im.recent.get", seconds=4)     # the next scans hang
        started = time.monotonic()
        self.wait_for(lambda: "Echo: slow bot" in self.texts(chat), timeout=10, what="the reply")
        self.assertLess(time.monotonic() - started, 3.5, "the reply waited for the scan")
        self.assertEqual(proc.stop(timeout=30), 0)

    def test_idle_dialogs_are_forgotten_safely(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge(BRIDGE_FORGET_DAYS="0.00003")     # 2.6 s
        self.portal.customer_message(chat, "remember")
        self.wait_for(lambda: "Echo: remember" in self.texts(chat), what="the reply")
        time.sleep(4)
        mark = len(proc.stderr_lines)
        self.assertFalse(any("chat%d" % chat in ln and "forgot" in ln for ln in proc.stderr_lines),
                         "a dialog active within the last scans' margin is never forgotten")
        self.portal.clock = lambda: time.time() + 600        # ten quiet minutes pass on the portal
        self.wait_for(lambda: any("forgot" in ln and "chat%d" % chat in ln for ln in proc.stderr_lines[mark:]),
                      timeout=20,
                      what="the idle dialog forgotten")
        self.portal.customer_message(chat, "back again")
        self.wait_for(lambda: "Echo: back again" in self.texts(chat), what="the dialog back")
        time.sleep(1.5)
        self.assertEqual([r["payload"]["text"] for r in self.bot.received], ["remember", "back again"])
        self.assertEqual(self.texts(chat).count("Echo: remember"), 1)
        self.assertEqual(proc.stop(), 0)


class KillNineLoop(BridgeCase):
    def test_twenty_kills_while_300_messages_arrive_on_a_forgetful_portal_with_late_rows(self) -> None:
        self.portal.set_limits(rate=1000, burst=100000)
        chats = self.portal.add_dialogs(20)
        env = dict(B24_RATE_PER_SEC="100", B24_RATE_BURST="5000")
        texts = ["m%d-%d" % (c, i) for i in range(15) for c in chats]
        random.Random(7).shuffle(texts)
        first = self.run_script(BRIDGE, "--once", env=self.bridge_env(**env))       # start from now
        self.assertEqual(first.returncode, 0, first.stderr)
        stop = threading.Event()

        def feed() -> None:
            for t in texts:
                if stop.is_set():
                    return
                self.portal.customer_message(int(t[1:].split("-")[0]), t)
                time.sleep(0.06)
        self.portal.behave(row_lag=1.5)                 # rows later than a poll interval (fact sheet 7.2)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        self.addCleanup(stop.set)
        rng = random.Random(11)
        for _ in range(20):
            proc = self.start_bridge(**env)
            time.sleep(rng.uniform(0.2, 0.9))
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.kill()
            self.portal.forget_uuids()
        feeder.join(60)
        proc = self.start_bridge(**env)
        want = {"Echo: " + t for t in texts}

        def all_answered() -> bool:
            got = set()
            for c in chats:
                got.update(t for t in self.texts(c) if t.startswith("Echo: "))
            return want <= got
        self.wait_for(all_answered, timeout=120, what="every message answered")
        time.sleep(1)
        self.assertEqual(proc.stop(), 0)
        asked = {r["payload"]["text"] for r in self.bot.received}
        self.assertEqual(asked, set(texts), "every message reached the bot")
        for c in chats:
            echoes = [t for t in self.texts(c) if t.startswith("Echo: ")]
            self.assertEqual(len(echoes), len(set(echoes)), "a reply was posted twice in chat%d" % c)


class Internals(PortalCase):
    def test_a_method_waiting_for_its_budget_holds_up_no_other(self) -> None:
        release = threading.Event()
        wall = [time.time()]
        limiter = bc.RateLimiter(rate=100, burst=1000, sleep=lambda s: release.wait(min(s, 0.2)),
                                 wallclock=lambda: wall[0])
        spent = bc.api_error("OPERATION_TIME_LIMIT", "budget spent", 503, "im.recent.get")
        limiter.note_refused(spent, ["im.recent.get"], 600)
        waiting = threading.Thread(target=limiter.acquire, args=(["im.recent.get"],), daemon=True)
        waiting.start()
        time.sleep(0.3)
        started = time.monotonic()
        limiter.acquire(["im.message.add"])
        self.assertLess(time.monotonic() - started, 0.5)
        wall[0] += 601                                # the budget's ten minutes are over
        release.set()
        waiting.join(5)
        self.assertFalse(waiting.is_alive())

    def test_waiting_for_a_budget_counts_as_progress(self) -> None:
        beats: list = []
        client = self.client()
        client.on_progress = lambda: beats.append(time.monotonic())
        spent = bc.api_error("OPERATION_TIME_LIMIT", "budget spent", 503, "im.recent.get")
        client.limiter.note_refused(spent, ["im.recent.get"], 0.3)
        started = time.monotonic()
        client.call("im.recent.get")
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertGreater(len(beats), 3, "the wait beat the heart, not only the request")

    def test_split_text_is_linear(self) -> None:
        text = "word " * 2_000_000                   # 10 MB
        started = time.monotonic()
        parts = bc.split_text(text, 4096)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual("".join(p.replace(" ", "") for p in parts), "word" * 2_000_000)
        self.assertTrue(all(len(p) <= 4096 for p in parts))

    def test_plain_http_to_a_remote_bot_is_warned_about(self) -> None:
        cfg = bc.Config.from_env({"B24_WEBHOOK_BASE": self.server.webhook_base,
                                  "BOT_HTTP_URL": "http://192.0.2.10:8080/bot"})   # never contacted
        records: list = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("b24_ol_bridge").addHandler(handler)
        self.addCleanup(logging.getLogger("b24_ol_bridge").removeHandler, handler)
        olbridge.bridge.sign_in(bc.Client(cfg), botlib.BotClient(cfg))
        self.assertTrue(any("unencrypted" in r.getMessage() for r in records))
        loopback = bc.Config.from_env({"B24_WEBHOOK_BASE": self.server.webhook_base,
                                       "BOT_HTTP_URL": "http://127.0.0.1:9/bot"})
        self.assertFalse(botlib.BotClient(loopback).insecure_remote)




class HardenedReplays(BridgeCase):
    dead_letters = Promises.dead_letters

    def test_replay_posts_the_refused_part_and_answers_no_other_dialog(self) -> None:
        chat, other = self.ids["lines_member"], self.ids["lines_member2"]
        self.bot.raw = lambda text: (200, "application/json",
                                     json.dumps({"replies": ["one " + text, "two", "three"]}).encode())
        self.portal.fault("http400", count=1, method="im.message.add")      # the first part is refused
        proc = self.start_bridge()
        self.portal.customer_message(chat, "hi")
        self.wait_for(lambda: "three" in self.texts(chat) and len(self.dead_letters()) == 1, what="a dead letter")
        self.assertNotIn("one hi", self.texts(chat))
        self.assertEqual(proc.stop(), 0)
        self.portal.customer_message(other, "not now")
        replay = self.run_script(BRIDGE, "--replay-dead", "--dialog", "chat%d" % chat, "--once",
                                 env=self.bridge_env())
        self.assertEqual(replay.returncode, 0, replay.stderr)
        texts = self.texts(chat)
        self.assertEqual([texts.count(t) for t in ("one hi", "two", "three")], [1, 1, 1], texts)
        self.assertEqual(self.dead_letters(), [])
        self.assertNotIn("not now", [r["payload"]["text"] for r in self.bot.received])

    def test_a_400_on_the_poll_is_a_failed_round_not_an_exit(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_bridge(B24_BACKOFF_MAX_SEC="1")
        self.portal.fault("http400", count=1, method="batch")
        self.portal.customer_message(chat, "after a 400")
        self.wait_for(lambda: "Echo: after a 400" in self.texts(chat), 20, "the answer after a 400")
        self.assertIsNone(proc.popen.poll())
        self.assertEqual(proc.stop(), 0)

    def test_once_gives_up_on_an_unreachable_portal(self) -> None:
        self.server.stop()
        started = time.monotonic()
        proc = self.run_script(BRIDGE, "--once", env=self.bridge_env(BRIDGE_ONCE_PATIENCE_SEC="2",
                                                                    B24_BACKOFF_MAX_SEC="1", B24_MAX_RETRIES="0"))
        self.assertLess(time.monotonic() - started, 20)
        self.assertOneLineError(proc, 1, "--once: the portal did not answer for 2 s")


class AnotherPortal(BridgeCase):
    def test_cursors_of_another_portal_are_not_trusted(self) -> None:
        import mock_b24_portal as mp
        chat = self.ids["lines_member"]
        proc = self.start_bridge()
        for n in range(8):                       # the first portal's dialog moves well ahead
            self.portal.customer_message(chat, "first portal %d" % n)
        self.wait_for(lambda: "Echo: first portal 7" in self.texts(chat), what="the first portal's answers")
        self.assertEqual(proc.stop(), 0)
        # a new emulator on another port of the same host, same user: the README's later walkthroughs
        other = mp.serve()
        self.addCleanup(other.stop)
        env = self.bridge_env(B24_WEBHOOK_BASE=other.webhook_base)
        proc = self.start_script(BRIDGE, env=env)
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        other.portal.customer_message(chat, "hello from the second portal")
        texts = lambda: [m["text"] for m in other.portal.chat_messages(chat)]     # noqa: E731
        self.wait_for(lambda: "Echo: hello from the second portal" in texts(), 20, "the second portal's answer")
        self.assertTrue(proc.wait_stderr("written against another portal", 5), proc.all_output())
        self.assertEqual(proc.stop(), 0)
