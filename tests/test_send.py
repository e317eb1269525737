"""b24_send_message.py as a subprocess against the emulator."""
from __future__ import annotations

import json
import os
import subprocess

from tests.support import PY, PortalCase, script

SEND = "b24_send_message.py"


class Send(PortalCase):
    def texts(self, chat: int) -> list:
        return [m["text"] for m in self.portal.chat_messages(chat)]

    def test_send_prints_the_new_id(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.run_script(SEND, "chat%d" % chat, "Your order has shipped")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        mid = int(proc.stdout.strip())
        self.assertEqual(self.portal.messages[mid]["text"], "Your order has shipped")
        self.assertEqual(self.portal.messages[mid]["author_id"], 7)
        proc = self.run_script(SEND, str(chat), "words", "are", "joined")
        self.assertEqual(self.texts(chat)[-1], "words are joined")

    def test_stdin_json_and_quiet(self) -> None:
        chat = self.ids["lines_member"]
        proc = self.run_script(SEND, "chat%d" % chat, "-", input="line 1\nline 2\n\n  indented\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(chat)[-1], "line 1\nline 2\n\n  indented")
        proc = self.run_script(SEND, "chat%d" % chat, input="no dash, piped\n")
        self.assertEqual(self.texts(chat)[-1], "no dash, piped")
        proc = self.run_script(SEND, "chat%d" % chat, "as json", "--json")
        data = json.loads(proc.stdout)
        self.assertEqual(data["dialog_id"], "chat%d" % chat)
        self.assertEqual(data["message_ids"], [data["message_id"]])
        proc = self.run_script(SEND, "chat%d" % chat, "quiet one", "--quiet")
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr), (0, "", ""))
        self.assertEqual(self.texts(chat)[-1], "quiet one")
        proc = self.run_script(SEND, "user9", "private hello")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(self.ids["private"])[-1], "private hello")

    def test_long_text_is_split_in_order(self) -> None:
        chat = self.ids["lines_member"]
        paragraphs = ["paragraph %d " % i + ("lorem ipsum " * 150).strip() for i in range(25)]
        text = "\n\n".join(paragraphs)
        self.assertGreater(len(text), 40000)
        proc = self.run_script(SEND, "chat%d" % chat, "-", input=text)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        ids = [int(x) for x in proc.stdout.split()]
        self.assertEqual(len(ids), 3)
        self.assertEqual(ids, sorted(ids))
        parts = [self.portal.messages[i]["text"] for i in ids]
        self.assertTrue(all(len(p) <= 20000 for p in parts))
        self.assertEqual("\n\n".join(parts), text)
        self.assertTrue(all(p.startswith("paragraph") for p in parts), "split at paragraph boundaries")

    def test_not_a_member_says_what_to_do_and_take_works(self) -> None:
        queued = self.ids["queued"]
        before = self.texts(queued)
        proc = self.run_script(SEND, "chat%d" % queued, "hello")
        self.assertOneLineError(proc, 1, "CANCELED", "--take", "join")
        self.assertEqual(self.texts(queued), before)
        proc = self.run_script(SEND, "--take", "chat%d" % queued, "hello, I'm on it")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(queued)[-1], "hello, I'm on it")
        self.assertIn(7, self.portal.chats[queued]["members"])
        closed = self.ids["closed"]
        proc = self.run_script(SEND, "--take", "chat%d" % closed, "too late")
        self.assertEqual(proc.returncode, 1)
        self.assertNotIn("too late", self.texts(closed))

    def test_portal_side_failures(self) -> None:
        cases = [
            (("chat999999", "x"), "no such dialog"),
            (("user99999", "x"), "no such dialog"),
        ]
        for argv, needle in cases:
            with self.subTest(argv=argv):
                self.assertOneLineError(self.run_script(SEND, *argv), 1, needle)
        self.portal.set_webhook(scopes=["imopenlines"])
        self.assertOneLineError(self.run_script(SEND, "chat%d" % self.ids["lines_member"], "x"), 2,
                                "lacks the 'im' scope")
        self.portal.set_webhook(scopes=["im"], active=False)
        self.assertOneLineError(self.run_script(SEND, "chat%d" % self.ids["lines_member"], "x"), 2,
                                "rejected the webhook")

    def test_unknown_outcome_is_resent_with_the_same_template_id(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("drop", count=1, method="im.message.add")
        proc = self.run_script(SEND, "chat%d" % chat, "maybe")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(chat).count("maybe"), 1)
        # an attempt that died after the uuid was recorded: refused as a duplicate until the
        # record expires, then posted -- once
        self.portal.behave(fail_after_uuid=1, uuid_ttl=1.5)
        proc = self.run_script(SEND, "chat%d" % chat, "stuck for a while")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(chat).count("stuck for a while"), 1)
        self.portal.fault("drop_after", count=1, method="im.message.add")
        proc = self.run_script(SEND, "chat%d" % chat, "made it")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.texts(chat).count("made it"), 1)
        self.assertEqual(int(proc.stdout), self.portal.chat_messages(chat)[-1]["id"])

    def test_usage_mistakes_send_nothing(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        count = len(self.portal.messages)
        cases = [
            ((), None, "the following arguments are required"),
            (("abc", "x"), None, "expected chatN"),
            (("chat0", "x"), None, "expected chatN"),
            (("-5", "x"), None, "expected chatN"),
            ((chat, ""), None, "the text is empty"),
            ((chat, "-"), "   \n\n", "the text is empty"),
            ((chat,), "", "the text is empty"),
            ((chat, "x", "--json", "--quiet"), None, "contradict"),
            (("user9", "x", "--take"), None, "--take works for Open Lines chats"),
            ((chat, "x", "--env-file", "/nonexistent/.env"), None, "--env-file /nonexistent/.env"),
            ((chat, "x", "--bogus"), None, "unrecognized arguments"),
        ]
        for argv, stdin, needle in cases:
            with self.subTest(argv=argv):
                self.assertOneLineError(self.run_script(SEND, *argv, input=stdin), 2, needle)
        self.assertEqual(len(self.portal.messages), count)

    def test_invalid_utf8_is_refused(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        count = len(self.portal.messages)
        proc = subprocess.run([PY, script(SEND), chat, os.fsdecode(b"bad \xff byte")], capture_output=True,
                              text=True, env=self.env(), timeout=60, cwd=self.tmp)
        self.assertOneLineError(proc, 2, "not valid UTF-8")
        proc = subprocess.run([PY, script(SEND), chat, "-"], input=b"bad \xff byte", capture_output=True,
                              env=self.env(), timeout=60, cwd=self.tmp)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        self.assertOneLineError(proc, 2, "not UTF-8")
        self.assertEqual(len(self.portal.messages), count)

    def test_configuration_mistakes(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        cases = [
            ({"B24_WEBHOOK_BASE": None}, "B24_WEBHOOK_BASE is not set"),
            ({"B24_WEBHOOK_BASE": "http://portal.example.invalid/rest/7/abcdef123456/"}, "https:// only"),
            ({"B24_POLL_SEC": "soon"}, "B24_POLL_SEC"),
        ]
        for env, needle in cases:
            with self.subTest(env=env):
                self.assertOneLineError(self.run_script(SEND, chat, "x", env=self.env(**env)), 2, needle)
        envfile = self.tmp + "/bad.env"
        with open(envfile, "w") as fh:
            fh.write("B24_POLL_SEC=2\nB24_WEBHOOK_BASE='unterminated\n")
        proc = self.run_script(SEND, chat, "x", "--env-file", envfile)
        self.assertOneLineError(proc, 2, "%s:2: unterminated single-quoted value" % envfile)

    def test_env_file_is_read_and_environment_wins(self) -> None:
        chat = "chat%d" % self.ids["lines_member"]
        envfile = self.tmp + "/.env"
        with open(envfile, "w") as fh:
            fh.write("# my settings\nexport B24_WEBHOOK_BASE=\"%s\"\n" % self.server.webhook_base)
        env = self.env(B24_WEBHOOK_BASE=None, PYTHON_DOTENV_DISABLED=None)
        proc = self.run_script(SEND, chat, "via .env", env=env, cwd=self.tmp)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # a closed port on loopback: nothing leaves this machine
        env = self.env(B24_WEBHOOK_BASE="https://localhost:9/rest/7/zzzz1111/", B24_MAX_RETRIES=0)
        proc = self.run_script(SEND, chat, "x", "--env-file", envfile, env=env)
        self.assertEqual(proc.returncode, 1, "the real environment must win over the file")
        self.assertIn("on localhost: cannot connect", proc.stderr)

    def test_help_has_examples_and_no_secret(self) -> None:
        proc = self.run_script(SEND, "--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("examples:", proc.stdout)
        self.assertIn("--take", proc.stdout)
        self.assertEqual(self.run_script(SEND, "--version").returncode, 0)
