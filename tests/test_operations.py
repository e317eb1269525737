"""Running the bridge for months: systemd units, a watchdog that means alive, outages waited out,
SIGHUP, --check, health and metrics, JSON logs, and never the demo by accident."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request

from tests.support import ROOT, free_port, mp, script
from tests.test_bridge import BRIDGE, BridgeHarness

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))



class Notify:
    """A NOTIFY_SOCKET that records every datagram with its arrival time."""

    def __init__(self, case: unittest.TestCase):
        self.name = "b24test-%d-%d" % (os.getpid(), id(self))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.got: list = []
        self.done = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        case.addCleanup(self.close)

    def _pump(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data))

    def close(self) -> None:
        self.done.set()
        self.sock.close()

    @property
    def env(self) -> dict:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def pings(self, since: float = 0.0) -> list:
        return [t for t, d in list(self.got) if "WATCHDOG=1" in d and t >= since]

    def statuses(self) -> list:
        return [d for _t, d in list(self.got) if "STATUS=" in d]


class Operations(BridgeHarness):
    def portal_down(self) -> int:
        port = self.server.server_address[1]
        self.server.stop()
        return port

    def portal_up(self, port: int) -> None:
        self.server = mp.PortalServer(self.portal, port).start()
        self.addCleanup(self.server.stop)

    def test_a_long_portal_outage_is_waited_out_with_the_watchdog_fed(self) -> None:
        notify = Notify(self)
        chat = self.ids["lines_member"]
        # the outage lasts more than twice the time after which a thread that shows no progress counts as
        # stuck (BRIDGE_STUCK_SEC), and the pauses between tries reach their cap (B24_BACKOFF_MAX_SEC)
        outage = 12
        proc = self.start_bridge(WATCHDOG_USEC="2000000", B24_MAX_RETRIES="1", BRIDGE_STUCK_SEC="5",
                                 B24_BACKOFF_MAX_SEC="2", **notify.env)
        port = self.portal_down()
        down_at = time.monotonic()
        time.sleep(outage)
        self.portal.customer_message(chat, "written during the outage")
        self.portal_up(port)
        self.wait_for(lambda: "Echo: written during the outage" in self.texts(chat), timeout=90,
                      what="the catch-up after the outage")
        pings = notify.pings(down_at)
        gaps = [b - a for a, b in zip([down_at] + pings, pings)]
        self.assertGreater(len(pings), outage * 25 // 30, "the watchdog was fed throughout")
        self.assertLess(max(gaps), 2.0, gaps)
        self.assertTrue(any("portal unreachable since" in d for d in notify.statuses()), notify.statuses()[-3:])
        self.assertEqual(proc.stop(), 0)

    def test_start_up_with_the_portal_down_then_up(self) -> None:
        notify = Notify(self)
        port = self.portal_down()
        proc = self.start_script(BRIDGE, env=self.bridge_env(WATCHDOG_USEC="2000000", B24_MAX_RETRIES="1",
                                                             **notify.env))
        self.assertTrue(proc.wait_stderr("signing in: ", 15), proc.all_output())
        time.sleep(3)
        self.assertIsNone(proc.popen.poll(), "it waits, it does not exit")
        self.assertTrue(notify.got and notify.got[0][1].startswith("READY=1"))
        self.assertTrue(any("portal unreachable since" in d for d in notify.statuses()), notify.statuses())
        self.assertGreaterEqual(len(notify.pings()), 3)
        self.portal_up(port)
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 60), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "hello after the start")
        self.wait_for(lambda: "Echo: hello after the start" in self.texts(chat), what="the reply")
        self.assertEqual(proc.stop(), 0)

    def test_a_revoked_webhook_exits_with_the_configuration_status(self) -> None:
        self.portal.set_webhook(active=False)
        proc = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertOneLineError(proc, 2, "webhook was rejected")

    def test_a_stuck_worker_stops_the_watchdog(self) -> None:
        notify = Notify(self)
        chat = self.ids["lines_member"]
        self.bot.raw = lambda text: (200, "application/json", b'{"reply_text": "' + b"z" * 200 + b'"}')
        self.bot.trickle = 0.1                          # 20 s for the answer, no progress meanwhile
        proc = self.start_bridge(WATCHDOG_USEC="1000000", BRIDGE_STUCK_SEC="3", BOT_HTTP_TIMEOUT_SEC="60",
                                 **notify.env)
        self.portal.customer_message(chat, "get stuck")
        self.assertTrue(proc.wait_stderr("made no progress for", 15), proc.all_output())
        quiet_from = time.monotonic()
        time.sleep(2.5)
        self.assertEqual(notify.pings(quiet_from + 0.3), [], "no pings while a worker is stuck")
        proc.kill()

    def test_sighup_reloads_a_valid_file_and_refuses_an_invalid_one(self) -> None:
        import mock_bot_server
        other = mock_bot_server.BotServer().start()
        self.addCleanup(other.stop)
        other.replies = lambda text: ["Other bot: %s" % text]
        env_file = os.path.join(self.tmp, "bridge.env")
        with open(env_file, "w") as fh:
            fh.write("BOT_HTTP_URL=%s\nBOT_HTTP_AUTH='%s'\n" % (self.bot.url, self.bot.token))
        env = self.bridge_env(BOT_HTTP_URL=None, BOT_HTTP_AUTH=None, BOT_HTTP_TIMEOUT_SEC=None)
        proc = self.start_script(BRIDGE, "--env-file", env_file, env=env)
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "first")
        self.wait_for(lambda: "Echo: first" in self.texts(chat), what="the first bot")
        with open(env_file, "w") as fh:
            fh.write("BOT_HTTP_URL=%s\n" % other.url)
        proc.popen.send_signal(signal.SIGHUP)
        self.assertTrue(proc.wait_stderr("reloaded the settings", 10), proc.all_output())
        self.portal.customer_message(chat, "second")
        self.wait_for(lambda: "Other bot: second" in self.texts(chat), what="the reloaded bot")
        with open(env_file, "w") as fh:
            fh.write("BOT_HTTP_URL=%s\nBOT_HTTP_TIMEOUT_SEC=forever\n" % self.bot.url)
        proc.popen.send_signal(signal.SIGHUP)
        self.assertTrue(proc.wait_stderr("reload refused", 10), proc.all_output())
        self.assertIn("BOT_HTTP_TIMEOUT_SEC", [ln for ln in proc.stderr_lines if "reload refused" in ln][0])
        self.portal.customer_message(chat, "third")
        self.wait_for(lambda: "Other bot: third" in self.texts(chat), what="the running settings kept")
        self.assertIsNone(proc.popen.poll())
        self.assertEqual(proc.stop(), 0)

    def test_healthz_and_metrics(self) -> None:
        port = free_port()
        chat = self.ids["lines_member"]
        proc = self.start_bridge(BRIDGE_HTTP_LISTEN=str(port))
        base = "http://127.0.0.1:%d" % port
        with OPENER.open(base + "/healthz", timeout=5) as resp:
            self.assertEqual((resp.status, resp.read()), (200, b"ok\n"))
        for i in range(3):
            self.portal.customer_message(chat, "count me %d" % i)
        self.wait_for(lambda: len([t for t in self.texts(chat) if t.startswith("Echo: count me")]) == 3,
                      what="three replies")

        def metrics() -> str:
            with OPENER.open(base + "/metrics", timeout=5) as resp:
                return resp.read().decode()
        # the portal has the third reply a moment before the bridge has written it down
        self.wait_for(lambda: "\nb24_bridge_backlog_messages 0\n" in metrics(), what="the backlog written down")
        text = metrics()
        self.assertNotIn(self.portal.code, text)
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        self.assertEqual(values["b24_bridge_messages_received_total"], 3)
        self.assertEqual(values["b24_bridge_replies_posted_total"], 3)
        self.assertEqual(values["b24_bridge_bot_latency_seconds_count"], 3)
        self.assertEqual(values['b24_bridge_bot_latency_seconds_bucket{le="+Inf"}'], 3)
        self.assertEqual(values["b24_bridge_backlog_messages"], 0)
        self.assertGreater(values["b24_bridge_portal_requests_total"], 3)
        self.assertEqual(values["b24_bridge_messages_answered_total"], 3)
        self.assertAlmostEqual(values["b24_bridge_requests_per_answered_message"],
                               values["b24_bridge_portal_requests_total"] / 3, delta=1.0)
        self.assertEqual(values["b24_bridge_oldest_unanswered_seconds"], 0, "nothing waits")
        self.assertGreater(values["b24_bridge_last_poll_success_timestamp_seconds"], time.time() - 30)
        for path, code in (("/", 404), ("/anything", 404)):
            with self.assertRaises(urllib.error.HTTPError) as ctx:
                OPENER.open(base + path, timeout=5)
            self.assertEqual(ctx.exception.code, code)
            ctx.exception.close()
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            OPENER.open(urllib.request.Request(base + "/healthz", data=b"x", method="POST"), timeout=5)
        self.assertEqual(ctx.exception.code, 405)
        ctx.exception.close()
        # a locked state database makes it unhealthy, with the reason
        db = sqlite3.connect(os.path.join(self.tmp, "state", "bridge.db"), isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        self.portal.customer_message(chat, "while locked")

        def unhealthy() -> bool:
            try:
                OPENER.open(base + "/healthz", timeout=5).close()
                return False
            except urllib.error.HTTPError as exc:
                body = exc.read().decode()
                exc.close()
                return exc.code == 503 and "state database" in body
        self.wait_for(unhealthy, timeout=30, what="503 from /healthz")
        db.execute("ROLLBACK")
        db.close()
        self.wait_for(lambda: "Echo: while locked" in self.texts(chat), timeout=30, what="the reply after")
        self.assertEqual(proc.stop(), 0)

    def test_json_logs(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.start_script(BRIDGE, "--log-json", env=self.bridge_env())
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        sent = self.portal.customer_message(chat, "log me")
        self.wait_for(lambda: "Echo: log me" in self.texts(chat), what="the reply")
        self.assertEqual(proc.stop(), 0)
        rows = [json.loads(ln) for ln in proc.stderr_lines if ln.strip()]
        about = [r for r in rows if r["message_id"] == sent["message_id"]]
        self.assertTrue(about, rows)
        self.assertEqual(about[0]["dialog"], "chat%d" % chat)
        self.assertEqual(set(about[0]), {"time", "level", "logger", "dialog", "message_id", "event"})

    def test_never_the_demo_by_accident(self) -> None:
        cases = [({"B24_WEBHOOK_BASE": None}, "BOT_HTTP_AUTH is set"),
                 ({"B24_WEBHOOK_BASE": None, "B24_WEBHOOK_URL": "x", "BOT_HTTP_URL": None,
                   "BOT_HTTP_AUTH": None, "BOT_HTTP_TIMEOUT_SEC": None}, "did you mean B24_WEBHOOK_BASE"),
                 ({"B24_WEBHOOK_BASE": None, "BOT_HTTP_URL": None, "BOT_HTTP_AUTH": None,
                   "BOT_HTTP_TIMEOUT_SEC": None, "INVOCATION_ID": "abc"}, "running under systemd")]
        for env, needle in cases:
            with self.subTest(env=env):
                proc = self.run_script(BRIDGE, env=self.bridge_env(**env), timeout=30)
                self.assertOneLineError(proc, 2, "B24_WEBHOOK_BASE is not set", needle)
                self.assertNotIn("demo", proc.stdout)

    def test_a_state_database_busy_at_start_is_waited_for(self) -> None:
        state = os.path.join(self.tmp, "state")
        first = self.run_script(BRIDGE, "--once", env=self.bridge_env())
        self.assertEqual(first.returncode, 0, first.stderr)
        db = sqlite3.connect(os.path.join(state, "bridge.db"), isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        proc = self.start_script(BRIDGE, env=self.bridge_env())
        self.assertTrue(proc.wait_stderr("cannot write the state database", 30), proc.all_output())
        self.assertIsNone(proc.popen.poll(), "a busy disk is not a configuration error")
        db.execute("ROLLBACK")
        db.close()
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 60), proc.all_output())
        self.assertEqual(proc.stop(), 0)


class Doctor(BridgeHarness):
    def check(self, *args: str, **env) -> subprocess.CompletedProcess:
        return self.run_script(BRIDGE, "--check", *args, env=self.bridge_env(**env), timeout=60)

    def test_a_healthy_setup(self) -> None:
        proc = self.check()
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        marks = [ln.split(" ", 1)[0] for ln in proc.stdout.splitlines()]
        self.assertNotIn("\u2717", marks, proc.stdout)
        for needle in ("configuration:", "webhook: 127.0.0.1 answers", "scopes: im, imopenlines",
                       "line 3 'WhatsApp Support': the webhook user is in its queue", "state folder",
                       "bot on 127.0.0.1 (BOT_HTTP_URL) answers"):
            self.assertIn(needle, proc.stdout)
        self.assertNotIn(TOKEN_WORD, proc.stdout)

    def test_each_broken_setup(self) -> None:
        blocker = os.path.join(self.tmp, "a-file")
        open(blocker, "w").close()
        cases = [
            ({"B24_WEBHOOK_BASE": self.server.webhook_base.replace(self.portal.code, "wrongcode")},
             "webhook: the portal rejects it"),
            ({"BOT_HTTP_URL": "http://127.0.0.1:%d/bot" % free_port()}, "bot: bot on 127.0.0.1 does not answer"),
            ({"BOT_HTTP_AUTH": "Bearer nope"}, "answers HTTP 401"),
            ({"B24_STATE_DIR": os.path.join(blocker, "sub")}, "state folder"),
            ({"BOT_HTTP_TIMEOUT_SEC": "soon"}, "configuration: BOT_HTTP_TIMEOUT_SEC"),
        ]
        for env, needle in cases:
            with self.subTest(env=env):
                proc = self.check(**env)
                self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
                bad = [ln for ln in proc.stdout.splitlines() if ln.startswith("\u2717")]
                self.assertTrue(any(needle in ln for ln in bad), proc.stdout)
                self.assertNotIn("Traceback", proc.stderr)
        self.portal.set_webhook(scopes=["imopenlines"])
        proc = self.check()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("'im' is missing", proc.stdout)
        self.portal.set_webhook(scopes=["im", "imopenlines"])
        for line in self.portal.lines.values():
            line["queue"] = [u for u in line["queue"] if u != 7]
        proc = self.check()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("in no line's queue", proc.stdout)

    def test_other_scripts_have_a_doctor_too(self) -> None:
        for name, args in (("b24_openlines_reader.py", ["--check", "--state"]),
                           ("b24_send_message.py", ["--check"]), ("b24_chat_tty.py", ["--check"])):
            with self.subTest(script=name):
                proc = self.run_script(name, *args, env=self.env(), timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
                self.assertIn("webhook: 127.0.0.1 answers", proc.stdout)


TOKEN_WORD = "bot-token-s3cr3t"


class Units(unittest.TestCase):
    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed")
    def test_units_verify(self) -> None:
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        plain = os.path.join(ROOT, "deploy", "b24-ol-bridge.service")
        template = os.path.join(ROOT, "deploy", "b24-ol-bridge@.service")
        shutil.copy(template, folder)
        os.symlink("b24-ol-bridge@.service", os.path.join(folder, "b24-ol-bridge@acme.service"))
        for unit in (plain, os.path.join(folder, "b24-ol-bridge@acme.service")):
            with self.subTest(unit=os.path.basename(unit)):
                proc = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True,
                                      timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
                self.assertNotIn(os.path.basename(unit), proc.stderr, proc.stderr)

    def test_units_name_what_the_readme_says(self) -> None:
        for name in ("b24-ol-bridge.service", "b24-ol-bridge@.service"):
            with open(os.path.join(ROOT, "deploy", name)) as fh:
                text = fh.read()
            for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2",
                           "StartLimitIntervalSec=0", "ProtectSystem=strict", "ProtectHome=yes",
                           "NoNewPrivileges=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                           "SystemCallFilter=@system-service", "ExecReload="):
                self.assertIn(needle, text, name)
        self.assertTrue(os.path.exists(script("b24_ol_bridge.py")))




class Stopping(BridgeHarness):
    def test_sigterm_is_heard_while_a_method_waits_for_its_time_budget(self) -> None:
        # every im.recent.get costs more than the whole budget: after the first scan the bridge must wait
        # for the budget's reset (minutes away) -- and a SIGTERM still ends it at once, with nothing lost
        proc = self.start_bridge(B24_POLL_SEC="0.3", B24_OPERATING_LIMIT_SEC="1")
        self.portal.set_limits(operating_limit=1, method_cost={"im.recent.get": 5, "batch": 5})
        self.assertTrue(proc.wait_stderr("operating-time budget", 20), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "written while the budget is spent")
        time.sleep(0.5)
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        self.assertEqual(proc.popen.wait(15), 0, proc.all_output())
        self.assertLess(time.monotonic() - started, 3.0, "stop did not wait for the portal")
        self.assertNotIn("Traceback", proc.all_output())
        # nothing lost: the next run, with the budget back, answers it
        self.portal.set_limits(operating_limit=420, method_cost={})
        self.portal.operating.clear()
        again = self.start_bridge(B24_POLL_SEC="0.3")
        self.wait_for(lambda: "Echo: written while the budget is spent" in self.texts(chat), 20, "the answer")
        self.assertEqual(again.stop(), 0)
