"""Safe terminals and one clear line for every mistake: reader, sender, chat, the README."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

from tests.support import PY, ROOT, PortalCase, script
from tests.test_chat_tty import ChatHarness as ChatTTY

READER, SEND, CHAT, BRIDGE = "b24_openlines_reader.py", "b24_send_message.py", "b24_chat_tty.py", "b24_ol_bridge.py"
HOSTILE = "hi\x1b[2J\x1b]0;pwned\x07 there\r[chat1] fake line\x9b31m"


class CustomerTextIsShownNotObeyed(ChatTTY):
    def test_reader_text_mode_shows_controls_json_keeps_them(self) -> None:
        proc = self.start_script(READER)
        self.assertTrue(proc.wait_stderr("watching", 20), proc.all_output())
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, HOSTILE + "\nsecond line")
        evil = self.portal.new_conversation(3, "Evil\x1b[31m Name", None, "x")
        self.portal.take_chat(evil["chat_id"], 7)
        lines = proc.read_lines(3)
        self.assertEqual(proc.stop(), 0)
        self.assertFalse(any(re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", ln) for ln in lines), lines)
        self.assertIn("hi^[[2J^[]0;pwned^G there\u240d[chat1] fake line<U+009B>31m", lines[0])
        self.assertEqual(lines[1], " " * len("[chat%d] " % chat) + "second line")
        self.assertIn("Evil^[[31m Name", lines[2])
        proc = self.start_script(READER, "--json")
        self.assertTrue(proc.wait_stderr("watching", 20), proc.all_output())
        self.portal.customer_message(chat, HOSTILE)
        row = json.loads(proc.read_lines(1)[0])
        self.assertEqual(row["text"], HOSTILE.replace("\r", "\r"))
        self.assertEqual(proc.stop(), 0)

    def test_chat_view_and_picker_show_controls(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, HOSTILE)
        p = self.open_chat()
        p.expect("Number (q to leave)")
        self.assertNotIn("\x1b[2J", p.text)
        self.assertNotIn("\x1b]0;", p.text)
        p.send("1\r")
        p.expect("pwned^G there\u240d[chat1] fake line")
        self.portal.customer_message(chat, "live \x1b[2J one")
        p.expect("live ^[[2J one")
        self.assertNotIn("\x1b[2J", p.text)
        self.assertNotIn("\x1b]0;", p.text)


class Mistakes(PortalCase):
    def test_malformed_urls_are_configuration_errors_everywhere(self) -> None:
        base = self.server.webhook_base
        code = self.portal.code
        bad = {
            "https://[::1/rest/7/%s/" % code: "broken IPv6 address",
            "http://127.0.0.1:99999/rest/7/%s/" % code: "port that is not a number",
            "http://127.0.0.1:port/rest/7/%s/" % code: "port that is not a number",
            base + "extra/path/": "extra path after",
            base.replace("http://", "http://user:secret@"): "must not carry a user name or password",
        }
        runs = [(READER, ["--once"]), (SEND, ["chat1", "x"]), (CHAT, ["chat1"]), (BRIDGE, ["--once"])]
        self.portal.reset_stats()
        for url, needle in bad.items():
            for name, args in runs:
                with self.subTest(url=url.replace(code, "CODE"), script=name):
                    env = self.env(B24_WEBHOOK_BASE=url, BOT_HTTP_URL="http://127.0.0.1:9/bot")
                    proc = self.run_script(name, *args, env=env, input="", timeout=30)
                    self.assertOneLineError(proc, 2, needle)
                    self.assertNotIn("secret", proc.stderr)
        for url, needle in (("http://[::1/bot", "broken IPv6 address"), ("http://127.0.0.1:0/bot", "port"),
                            ("http://u:p@127.0.0.1/bot", "user name or password")):
            with self.subTest(bot_url=url):
                proc = self.run_script(BRIDGE, "--once", env=self.env(BOT_HTTP_URL=url), timeout=30)
                self.assertOneLineError(proc, 2, "BOT_HTTP_URL", needle)
        self.assertEqual(self.portal.stats()["requests"], 0, "no request was sent")

    def test_reader_on_a_full_disk_and_a_closed_pipe(self) -> None:
        env = self.env()
        full = subprocess.run("%s %s --replay 3 --once > /dev/full" % (PY, script(READER)), shell=True, env=env,
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)
        self.assertOneLineError(full, 1, "cannot write the output (No space left on device)")
        closed = subprocess.run("%s %s --replay 3 --once -q | head -n 1" % (PY, script(READER)), shell=True,
                                env=env, capture_output=True, text=True, timeout=60, cwd=self.tmp)
        self.assertEqual(closed.stderr, "")
        self.assertEqual(len(closed.stdout.splitlines()), 1)

    def test_the_exit_code_table_holds_for_every_script(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        runs = {READER: ["--once"], SEND: [chat, "exit code check"], CHAT: [chat], BRIDGE: ["--once"]}
        bad_env = os.path.join(self.tmp, "bad.env")
        with open(bad_env, "w") as fh:
            fh.write("this is not a line\n")
        for name, args in runs.items():
            extra = {"BOT_HTTP_URL": "http://127.0.0.1:%d/bot" % self.server.server_address[1]} \
                if name == BRIDGE else {}
            with self.subTest(script=name, case="0 done"):
                proc = self.run_script(name, *args, env=self.env(**extra), input="", timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stderr)
            with self.subTest(script=name, case="2 bad option"):
                proc = self.run_script(name, *(args + ["--no-such-option"]), env=self.env(**extra), input="")
                self.assertEqual(proc.returncode, 2, proc.stderr)
            with self.subTest(script=name, case="2 bad .env line"):
                proc = self.run_script(name, *(args + ["--env-file", bad_env]), env=self.env(**extra), input="")
                self.assertOneLineError(proc, 2, "bad.env:1: expected NAME=value")
            with self.subTest(script=name, case="2 missing im scope"):
                self.portal.set_webhook(scopes=["imopenlines"])
                proc = self.run_script(name, *args, env=self.env(**extra), input="")
                self.portal.set_webhook(scopes=["im", "imopenlines", "user"])
                self.assertEqual(proc.returncode, 2, proc.stderr)
            with self.subTest(script=name, case="2 revoked webhook"):
                self.portal.set_webhook(active=False)
                proc = self.run_script(name, *args, env=self.env(**extra), input="")
                self.portal.set_webhook(active=True)
                self.assertEqual(proc.returncode, 2, proc.stderr)
            with self.subTest(script=name, case="1 portal unreachable"):
                env = self.env(B24_WEBHOOK_BASE=self.server.webhook_base.replace(
                    ":%d/" % self.server.server_address[1], ":1/"), B24_MAX_RETRIES="0", **extra)
                if name == BRIDGE:
                    continue       # the bridge waits an outage out instead (tests/test_operations.py)
                proc = self.run_script(name, *args, env=env, input="", timeout=60)
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)

    def test_dotenv_messages_in_plain_words(self) -> None:
        path = os.path.join(self.tmp, "vars.env")
        with open(path, "w") as fh:
            fh.write("B24_WEBHOOK_BASE=${NOT_DEFINED_ANYWHERE}\n")
        proc = self.run_script(READER, "--once", "--env-file", path, env=self.env(B24_WEBHOOK_BASE=None))
        self.assertOneLineError(proc, 2, "vars.env:1: `${NOT_DEFINED_ANYWHERE}`: NOT_DEFINED_ANYWHERE is not "
                                         "defined above or in the environment")
        with open(path, "w") as fh:
            fh.write("B24_WEBHOOK_BASE %s\n" % self.server.webhook_base)
        proc = self.run_script(READER, "--once", "--env-file", path, env=self.env(B24_WEBHOOK_BASE=None))
        self.assertOneLineError(proc, 2, "vars.env:1:", "expected NAME=value")
        self.assertNotIn(self.portal.code, proc.stderr)


class Sender(PortalCase):
    def texts(self, chat: int) -> list:
        return [m["text"] for m in self.portal.chat_messages(chat)]

    def test_failures_on_the_way_are_resent_and_said_plainly(self) -> None:
        chat = self.ids["lines_member"]
        for kind in ("http500", "http502", "html", "malformed", "drop"):
            with self.subTest(fault=kind):
                self.portal.fault(kind, count=1, method="im.message.add")
                proc = self.run_script(SEND, "chat%d" % chat, "after %s" % kind)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(self.texts(chat).count("after %s" % kind), 1)
        self.portal.fault("http500", count=1000, method="im.message.add")
        proc = self.run_script(SEND, "chat%d" % chat, "never", env=self.env(B24_SEND_PATIENCE_SEC="2"))
        self.portal.clear_faults()
        self.assertOneLineError(proc, 1, "HTTP 500")
        self.assertNotIn("never", self.texts(chat))

    def test_ctrl_c_or_sigterm_during_a_send_says_what_happened(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.behave(message_add_delay=1.5)
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            with self.subTest(signal=sig):
                asked = len(self.portal.uuids)
                p = subprocess.Popen([PY, script(SEND), "chat%d" % chat, "mid-flight %d" % sig], env=self.env(),
                                     cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                # the send is on the portal (its uuid is recorded first); a loaded machine starts slowly
                self.wait_for(lambda asked=asked: len(self.portal.uuids) > asked, timeout=20, what="the send on the portal")
                time.sleep(0.3)
                p.send_signal(sig)
                out, err = p.communicate(timeout=30)
                self.assertEqual(p.returncode, code, err)
                ids = [int(x) for x in out.split()]
                self.assertEqual(len(ids), 1, out + err)
                self.assertIn("the message was posted as %d" % ids[0], err)
                self.assertEqual(self.texts(chat).count("mid-flight %d" % sig), 1)

    def test_nul_bytes_are_refused_by_sender_and_chat_alike(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        proc = self.run_script(SEND, chat, "-", input="a\x00b")
        self.assertOneLineError(proc, 2, "NUL byte")
        p = subprocess.run([PY, script(CHAT), chat], input=b"first\nwith \x00 nul\nlast\n", env=self.env(),
                           capture_output=True, timeout=60, cwd=self.tmp)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(b"NUL byte", p.stdout + p.stderr)
        texts = self.texts(self.ids["lines_member"])
        self.assertIn("first", texts)
        self.assertIn("last", texts)


class ChatEdges(ChatTTY):
    def test_pipe_mode_survives_a_non_utf8_line_and_echoes_the_last_lines(self) -> None:
        chat = self.ids["lines_member"]
        p = subprocess.run([PY, script(CHAT), "chat%d" % chat, "--history", "0"],
                           input=b"one\n\xff\xfe broken\ntwo\nthree\n", env=self.env(), capture_output=True,
                           timeout=60, cwd=self.tmp)
        self.assertEqual(p.returncode, 0, p.stderr)
        out = p.stdout.decode()
        self.assertIn("input line 2 is not valid UTF-8 text; not sent", out + p.stderr.decode())
        for text in ("one", "two", "three"):
            self.assertIn(text, [m["text"] for m in self.portal.chat_messages(chat)])
            self.assertIn("You: %s" % text, out)
        self.assertNotIn("----", out, "--history 0 prints no day header")

    def test_multi_terminator_and_commands_are_not_recalled(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        p.expect("/help for commands")
        p.send("plain message\r")
        self.wait_for_text(chat, "plain message")
        p.send("/multi\r")
        p.expect("Ctrl-D cancels")
        p.send("line a\r")
        p.send("line b\r")
        p.send(".\r")
        self.wait_for_text(chat, "line a\nline b")
        p.send("/who\r")
        p.expect("customer:")
        p.send("\x1b[A\r")                 # arrow up + Enter: the last *message* again, not '.', not /who
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            texts = [m["text"] for m in self.portal.chat_messages(chat)]
            if texts.count("plain message") == 2:
                break
            time.sleep(0.05)
        texts = [m["text"] for m in self.portal.chat_messages(chat)]
        self.assertNotIn(".", texts)
        self.assertNotIn("/who", texts)
        self.assertEqual(texts.count("plain message"), 2)

    def test_slash_slash_take_and_the_picker_reprompts(self) -> None:
        queued = self.ids["queued"]
        p = self.open_chat()
        p.expect("Number (q to leave)")
        p.send("chat99999\r")
        p.expect("chat99999: no such dialog, or no access to it")
        p.expect("Number (q to leave)", start=len(p.text) - 200)
        p.send("chat%d\r" % queued)
        p.expect("/help for commands")
        p.send("/take\r")
        p.expect("you took the conversation")
        p.send("//etc is a path\r")
        self.wait_for_text(queued, "/etc is a path")
        self.assertIn(7, self.portal.chats[queued]["members"])

    def test_log_lines_use_the_status_area(self) -> None:
        chat = self.ids["lines_member"]
        p = self.open_chat("chat%d" % chat)
        start = p.expect("/help for commands")
        self.portal.fault("drop_after", count=1, method="im.message.add")
        p.send("arrives anyway\r")
        self.wait_for_text(chat, "arrives anyway")
        p.expect("the message did arrive", start=start)
        screen = p.text[start:]
        self.assertNotIn("INFO", screen, "log lines are not printed raw in the middle of the chat")
        self.assertRegex(screen, r"\(chat\d+: the message did arrive \(id \d+\)\)")


class ReadmeExamples(PortalCase):
    @staticmethod
    def readme() -> str:
        with open(os.path.join(ROOT, "README.md")) as fh:
            return fh.read()

    def test_every_file_the_readme_names_exists(self) -> None:
        names = set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|md|service|jsonl?|example))`", self.readme()))
        names |= set(re.findall(r"\b((?:deploy|docs|bench|tests)/[\w.@-]+)", self.readme()))
        missing = [n for n in sorted(names) if "/" in n or n.endswith((".py", ".md", ".example", ".service"))
                   if not os.path.exists(os.path.join(ROOT, n)) and n not in ("bridge.db",)]
        missing = [n for n in missing if not n.startswith(("b24-ol-bridge@NAME", "/"))]
        self.assertEqual(missing, [])

    @__import__("unittest").skipUnless(shutil.which("curl"), "curl is not installed")
    def test_curl_check_runs_as_printed(self) -> None:
        lines = [ln for ln in self.readme().splitlines()
                 if ln.startswith(("set -a;", 'curl -sS "${B24_WEBHOOK_BASE%/}'))]
        self.assertEqual(len(lines), 3, lines)
        with open(os.path.join(self.tmp, ".env"), "w") as fh:
            fh.write("B24_WEBHOOK_BASE=%s\n" % self.server.webhook_base)
        proc = subprocess.run(["bash", "-c", "\n".join(ln.split("  #")[0] for ln in lines)], cwd=self.tmp,
                              capture_output=True, text=True, timeout=30,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "no_proxy": "*"})
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn('"im"', proc.stdout)
        self.assertIn("Olga", proc.stdout)

    def test_python_snippet_runs_with_pythonpath(self) -> None:
        block = self.readme().split("```python\n", 1)[1].split("```", 1)[0]
        code = block.replace("<the printed URL>", self.server.webhook_base)
        self.portal.customer_message(self.ids["lines_member"], "from the snippet")
        runner = "import threading, time, os\nthreading.Timer(4, lambda: os._exit(0)).start()\n" + code
        env = self.env(PYTHONPATH=ROOT)
        proc = subprocess.run([PY, "-c", runner], cwd=self.tmp, env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


