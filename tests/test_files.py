"""Files both ways: the sender's --file, the bridge posting the files a bot's answer carries, and the emulator's
file routes (fact sheet §18).  Everything over real HTTP on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import os
import time
import unittest

from tests.test_bridge import BridgeHarness

SEND = "b24_send_message.py"


class BridgeFiles(BridgeHarness):
    """A bot's answer with files: fetched by the bridge, posted after the texts, each once."""

    def file_messages(self, chat: int) -> list:
        out = []
        for m in self.portal.chat_messages(chat):
            ids = m["params"].get("FILE_ID") if isinstance(m["params"], dict) else None
            for fid in ids or []:
                f = self.portal.files[fid]
                out.append((f["name"], self.portal.file_content(fid), m["text"], m["author_id"]))
        return out

    def test_url_base64_and_rasa_files_are_posted_after_the_text_and_a_bad_one_is_a_dead_letter(self) -> None:
        pdf = b"%PDF-1.4 price list"
        self.bot.files["prices.pdf"] = pdf
        base = "http://127.0.0.1:%d" % self.bot.server_address[1]

        def answer(text: str) -> tuple:
            if text == "rasa":
                return 200, "application/json", json.dumps([{"text": "a photo"},
                                                            {"image": base + "/files/prices.pdf"}]).encode()
            return 200, "application/json", json.dumps({"reply_text": "three files", "files": [
                {"url": base + "/files/prices.pdf", "caption": "prices"},
                {"url": base + "/files/missing.pdf"},
                {"base64": base64.b64encode(b"hello file").decode(), "name": "note.txt", "mime": "text/plain"}]}).encode()
        self.bot.raw = answer
        proc = self.start_bridge(BRIDGE_RETRY_FIRST_SEC="0.2")
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "send me files")
        self.wait_for(lambda: len(self.file_messages(chat)) == 2, 10, "the two good files")
        texts = self.texts(chat)
        self.assertLess(texts.index("three files"), len(texts) - 2, "the text goes first")
        self.assertEqual([(n, c, t, a) for n, c, t, a in self.file_messages(chat)],
                         [("prices.pdf", pdf, "prices", 7), ("note.txt", b"hello file", "", 7)])
        self.assertTrue(proc.wait_stderr("file 2 of the answer is not posted", 5), proc.all_output())
        with open(os.path.join(self.tmp, "state", "bridge.dead-letters.jsonl"), encoding="utf-8") as fh:
            dead = [json.loads(x) for x in fh]
        self.assertTrue(any("HTTP 404" in d["reason"] for d in dead), dead)
        self.assertEqual([auth for path, auth in self.bot.file_gets], [self.bot.token, self.bot.token],
                         "the bot's own host gets its auth")
        self.portal.customer_message(chat, "rasa")
        self.wait_for(lambda: len(self.file_messages(chat)) == 3, 10, "the Rasa image " + proc.all_output()[-1500:])
        self.assertEqual(self.texts(chat)[-2], "a photo")
        time.sleep(1.0)
        self.assertEqual(len(self.file_messages(chat)), 3, "each file once")
        self.assertEqual(os.listdir(os.path.join(self.tmp, "state", "bridge.files")), [], "posted files are let go")
        self.assertEqual(proc.stop(), 0)


class SenderFiles(BridgeHarness):

    def setUp(self) -> None:
        super().setUp()
        self.pdf = os.path.join(self.tmp, "invoice.pdf")
        with open(self.pdf, "wb") as fh:
            fh.write(b"%PDF-1.4 invoice 42")
        self.jpg = os.path.join(self.tmp, "photo.jpg")
        with open(self.jpg, "wb") as fh:
            fh.write(os.urandom(2048))

    def files_in(self, chat: int) -> list:
        out = []
        for m in self.portal.chat_messages(chat):
            for fid in (m["params"].get("FILE_ID") if isinstance(m["params"], dict) else None) or []:
                out.append((m["id"], self.portal.files[fid]["name"], m["text"], m["uuid"]))
        return out

    def test_one_and_several_files_with_a_caption_by_either_route(self) -> None:
        chat = self.ids["lines_member"]
        for scopes, route in ((["im", "imopenlines", "user"], "upload"), (["im", "imopenlines", "user", "disk"], "disk")):
            with self.subTest(route=route):
                self.portal.set_webhook(scopes=scopes)
                before = len(self.files_in(chat))
                proc = self.run_script(SEND, "chat%d" % chat, "--file", self.pdf, "--file", self.jpg, "Your", "invoice")
                self.assertEqual(proc.returncode, 0, proc.stderr)
                ids = [int(x) for x in proc.stdout.split()]
                got = self.files_in(chat)[before:]
                self.assertEqual([(i, n, t) for i, n, t, _u in got],
                                 [(ids[0], "invoice.pdf", "Your invoice"), (ids[1], "photo.jpg", "")])
                self.assertEqual(bool(got[0][3]), route == "disk", "the Disk route carries a TEMPLATE_ID")
                check = self.run_script(SEND, "--check")
                self.assertIn("files: the Disk route" if route == "disk" else "files: one call", check.stdout)

    def test_a_lost_answer_posts_the_file_once_by_either_route(self) -> None:
        chat = self.ids["lines_member"]
        for scopes, method in ((["im", "imopenlines", "user"], "im.v2.File.upload"),
                               (["im", "imopenlines", "user", "disk"], "im.disk.file.commit")):
            with self.subTest(method=method):
                self.portal.set_webhook(scopes=scopes)
                before = len(self.files_in(chat))
                self.portal.fault("drop_after", count=1, method=method)
                proc = self.run_script(SEND, "chat%d" % chat, "--file", self.pdf)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(len(self.files_in(chat)) - before, 1, "posted once")
                self.assertEqual(int(proc.stdout.split()[0]), self.files_in(chat)[-1][0])

    def test_missing_unreadable_and_too_big_files_send_nothing(self) -> None:
        chat = self.ids["lines_member"]
        before = self.texts(chat)
        self.assertOneLineError(self.run_script(SEND, "chat%d" % chat, "--file", self.pdf, "--file",
                                                os.path.join(self.tmp, "nope.pdf"), "hi"), 2, "nope.pdf", "no such file")
        self.assertOneLineError(self.run_script(SEND, "chat%d" % chat, "--file", self.jpg,
                                                env=self.env(B24_MAX_FILE_MB="0.001")), 2, "photo.jpg", "B24_MAX_FILE_MB")
        os.chmod(self.pdf, 0)
        if os.geteuid() != 0:               # root reads anything
            self.assertOneLineError(self.run_script(SEND, "chat%d" % chat, "--file", self.pdf), 2, "permission denied")
        self.assertOneLineError(self.run_script(SEND, "chat%d" % chat, "--file", self.tmp), 2, "not a file")
        self.assertEqual(self.texts(chat), before, "nothing sent")

    def test_files_wait_for_their_delivery_too(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.delivery(chat, "fail", reason="Recipient has blocked the business number")
        proc = self.run_script(SEND, "chat%d" % chat, "--file", self.pdf, "--wait-delivered", "10", "--json")
        self.assertEqual(proc.returncode, 4, proc.stderr)
        doc = json.loads(proc.stdout)
        self.assertEqual((doc["delivery"], len(doc["message_ids"])), ("failed", 1))


if __name__ == "__main__":
    unittest.main()
