"""b24_openlines_reader.py as a subprocess against the emulator."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

from tests.support import PY, PortalCase, PtyProc, script

READER = "b24_openlines_reader.py"


class Reader(PortalCase):
    def start_reader(self, *args: str, env: dict | None = None):
        proc = self.start_script(READER, *args, env=env)
        self.assertTrue(proc.wait_stderr("watching", 20), proc.all_output())
        return proc

    def test_prints_new_customer_messages(self) -> None:
        proc = self.start_reader()
        self.assertTrue(proc.wait_stderr("signed in as Olga Sidorova (id 7) on 127.0.0.1; polling every 0.3 s"))
        self.assertTrue(proc.wait_stderr("'WhatsApp Support': you are in its queue"))
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "Is my order ready?")
        self.portal.operator_message(chat, 9, "operators are not shown by default")
        self.portal.customer_message(chat, "[b]Order[/b] A-1042[br]second line")
        new = self.portal.new_conversation(1, "Nora Example", "+10000000160", "first words")
        lines = proc.read_lines(4)
        self.assertEqual(len(lines), 4, proc.all_output())
        self.assertTrue(lines[0].startswith("[chat%d] Is my order ready?  -- Ivan Petrov +10000000101, " % chat),
                        lines[0])
        self.assertTrue(lines[1].startswith("[chat%d] Order A-1042  -- Ivan Petrov" % chat), lines[1])
        self.assertEqual(lines[2], " " * len("[chat%d] " % chat) + "second line")
        self.assertTrue(lines[3].startswith("[NEW DIALOG %s] first words  -- Nora Example +10000000160" % new["dialog_id"]),
                        lines[3])
        self.assertEqual(proc.stop(), 0)

    def test_all_and_json(self) -> None:
        proc = self.start_reader("--all", "--json")
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "from customer")
        self.portal.operator_message(chat, 9, "from Pavel")
        rows = [json.loads(line) for line in proc.read_lines(2)]
        self.portal.close_session(chat)   # we lose access: nothing more, and no crash
        self.assertEqual([(r["author_kind"], r["text"]) for r in rows],
                         [("customer", "from customer"), ("operator", "from Pavel")])
        r = rows[0]
        for key in ("dialog_id", "chat_id", "message_id", "date", "author_id", "author_kind", "author_name",
                    "customer_phone", "line_id", "text", "new_dialog"):
            self.assertIn(key, r)
        self.assertEqual((r["dialog_id"], r["chat_id"], r["customer_phone"], r["line_id"], r["new_dialog"]),
                         ("chat%d" % chat, chat, "+10000000101", 3, False))
        self.assertEqual(proc.stop(), 0)

    def test_once_with_state_resumes_exactly(self) -> None:
        state = os.path.join(self.tmp, "r.json")
        first = self.run_script(READER, "--once", "--state", state)
        self.assertEqual((first.returncode, first.stdout), (0, ""), first.stderr)
        chat = self.ids["lines_member2"]
        self.portal.customer_message(chat, "one")
        self.portal.customer_message(self.ids["queued"], "two")
        second = self.run_script(READER, "--once", "--state", state, "--json")
        self.assertEqual([json.loads(x)["text"] for x in second.stdout.splitlines()], ["one", "two"])
        third = self.run_script(READER, "--once", "--state", state)
        self.assertEqual(third.stdout, "")
        self.assertEqual(oct(os.stat(state).st_mode & 0o777), "0o600")
        default = self.run_script(READER, "--once", "--state")
        self.assertEqual(default.returncode, 0, default.stderr)
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "state", "reader.json")))

    def test_state_of_another_portal_or_user_is_refused(self) -> None:
        state = os.path.join(self.tmp, "other.json")
        with open(state, "w") as fh:
            json.dump({"portal": "portal.example.invalid", "user_id": 7, "cursors": {"chat1": 5}}, fh)
        proc = self.run_script(READER, "--once", "--state", state)
        self.assertOneLineError(proc, 2, "belongs to user 7 on portal.example.invalid")

    def test_history_options(self) -> None:
        proc = self.run_script(READER, "--once", "--since-minutes", "45")
        self.assertIn("Price list please", proc.stdout)
        self.assertNotIn("Do you deliver on Sundays?", proc.stdout)   # three hours old
        proc = self.run_script(READER, "--once", "--replay", "1", "--all")
        self.assertEqual(len(proc.stdout.strip().splitlines()), 3 + 1, proc.stdout)  # + one continuation line

    def test_state_survives_kill_9_without_skipping(self) -> None:
        state = os.path.join(self.tmp, "chaos.json")
        rng = random.Random(3)
        posted: list = []
        printed: list = []
        kills = 0
        chats = [self.ids["lines_member"], self.ids["lines_member2"], self.ids["queued"]]
        deadline = time.monotonic() + 40
        while kills < 6 and time.monotonic() < deadline:
            proc = self.start_reader("--state", state, "--json")
            for _ in range(rng.randint(3, 8)):
                posted.append(self.portal.customer_message(rng.choice(chats), "n%d" % len(posted))["message_id"])
                time.sleep(rng.uniform(0.0, 0.15))
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.kill()
            kills += 1
            printed.extend(json.loads(x)["message_id"] for x in proc.stdout_lines)
        final = self.run_script(READER, "--once", "--state", state, "--json")
        printed.extend(json.loads(x)["message_id"] for x in final.stdout.splitlines())
        self.assertEqual(sorted(set(printed)), sorted(posted), "every message printed, none skipped")
        self.assertLessEqual(len(printed) - len(set(printed)), kills, "at most one repeat per kill")
        self.assertEqual(sorted(printed), printed if len(printed) == len(set(printed)) else sorted(printed))

    def test_messages_print_in_the_order_they_were_written_across_dialogs(self) -> None:
        """A dialog's read can meet a message written after the scan that sent it there; printing it at
        once would put it before a message another dialog got earlier, which this cycle did not read."""
        a, b = self.ids["lines_member"], self.ids["lines_member2"]
        proc = self.start_reader("--json")
        self.portal.fault("latency", count=1, method="im.dialog.messages.get", seconds=1.5)
        first = self.portal.customer_message(a, "a1")["message_id"]
        deadline = time.monotonic() + 10
        while self.portal.stats()["faults_pending"] and time.monotonic() < deadline:
            time.sleep(0.02)             # until the read of a1's dialog has begun (it takes 1.5 s)
        self.assertEqual(self.portal.stats()["faults_pending"], 0)
        second = self.portal.customer_message(b, "b1")["message_id"]
        third = self.portal.customer_message(a, "a2")["message_id"]
        got = [json.loads(x)["message_id"] for x in proc.read_lines(3, timeout=15)]
        self.assertEqual(got, [first, second, third])
        self.assertEqual(proc.stop(), 0)

    def test_sigterm_restarts_never_repeat(self) -> None:
        state = os.path.join(self.tmp, "term.json")
        posted, printed = [], []
        for round_ in range(3):
            proc = self.start_reader("--state", state, "--json")
            for i in range(4):
                posted.append(self.portal.customer_message(self.ids["lines_member"], "r%d-%d" % (round_, i))["message_id"])
            got = proc.read_lines(4)
            self.assertEqual(proc.stop(), 0)
            printed.extend(json.loads(x)["message_id"] for x in got)
        self.assertEqual(printed, posted)

    def test_transient_failures_back_off_and_carry_on(self) -> None:
        proc = self.start_reader(env=self.env(B24_MAX_RETRIES=0))
        self.portal.fault("http502", count=3, method="batch")
        self.assertTrue(proc.wait_stderr("trying again in", 10), proc.all_output())
        self.portal.customer_message(self.ids["lines_member"], "after the storm")
        lines = proc.read_lines(1, timeout=30)
        self.assertTrue(lines and "after the storm" in lines[0], proc.all_output())
        self.assertNotIn("Traceback", proc.all_output())
        self.assertEqual(proc.stop(), 0)

    def test_revoked_webhook_stops_with_exit_2(self) -> None:
        proc = self.start_reader()
        self.portal.set_webhook(active=False)
        rc = proc.popen.wait(20)
        proc.stop()
        self.assertEqual(rc, 2, "a revoked webhook is a credential mistake: exit 2")
        errors = [x for x in proc.stderr_lines if "error" in x]
        self.assertEqual(len(errors), 1, proc.all_output())
        self.assertIn("rejected", errors[0])

    def test_scope_problems(self) -> None:
        self.portal.set_webhook(scopes=["imopenlines"])
        proc = self.run_script(READER, "--once")
        self.assertOneLineError(proc, 2, "lacks the 'im' scope")
        self.portal.set_webhook(scopes=["im"])
        proc = self.run_script(READER, "--once")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("lacks the 'imopenlines' scope", proc.stderr)
        self.portal.lines[1]["queue"].remove(7)
        self.portal.lines[3]["queue"].remove(7)
        self.portal.set_webhook(scopes=["im", "imopenlines"])
        proc = self.run_script(READER, "--once")
        self.assertIn("you are in no Open Lines queue", proc.stderr)

    def test_bad_input(self) -> None:
        corrupt = os.path.join(self.tmp, "corrupt.json")
        with open(corrupt, "w") as fh:
            fh.write("{oops")
        cases = [
            (("--since-minutes", "-1"), {}, "--since-minutes"),
            (("--since-minutes", "soon"), {}, "invalid float value"),
            (("--replay", "0"), {}, "--replay"),
            (("--interval", "0"), {}, "--interval"),
            (("--nope",), {}, "unrecognized arguments"),
            (("--once",), {"B24_POLL_SEC": "x"}, "B24_POLL_SEC"),
            (("--once",), {"B24_WEBHOOK_BASE": "https://portal.example.invalid/nope"}, "/rest/<user_id>/<code>/"),
            (("--once", "--env-file", "/nonexistent.env"), {}, "no such file"),
            (("--once", "--state", corrupt), {}, "not valid JSON"),
        ]
        for argv, env, needle in cases:
            with self.subTest(argv=argv, env=env):
                self.assertOneLineError(self.run_script(READER, *argv, env=self.env(**env)), 2, needle)

    def test_output_into_a_closed_pipe_is_quiet(self) -> None:
        cmd = "%s %s --once --replay 20 --all | head -n 1" % (PY, script(READER))
        proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, env=self.env(),
                              timeout=60, cwd=self.tmp)
        self.assertEqual(len(proc.stdout.splitlines()), 1)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertNotIn("Broken pipe", proc.stderr)

    def test_demo_without_a_portal_on_a_terminal_only(self) -> None:
        env = self.env(B24_WEBHOOK_BASE=None, B24_POLL_SEC=None)
        term = PtyProc([PY, script(READER)], env, self.tmp)
        self.addCleanup(term.kill)
        term.expect("running the built-in demo", 20)
        term.expect("] ", 30)                       # a message line
        os.kill(term.pid, signal.SIGTERM)
        self.assertEqual(term.wait(15), 0)
        # off a terminal (cron, a pipe, a service) a missing webhook is a mistake, not a demo
        proc = self.run_script(READER, "--once", env=env)
        self.assertOneLineError(proc, 2, "B24_WEBHOOK_BASE is not set", "not on a terminal")

    def test_help(self) -> None:
        proc = self.run_script(READER, "--help")
        self.assertEqual(proc.returncode, 0)
        for needle in ("--since-minutes", "--state", "--json", "--demo", "examples:"):
            self.assertIn(needle, proc.stdout)
