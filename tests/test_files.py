"""Files both ways: the sender's --file, the bridge posting the files a bot's answer carries, and the emulator's
file routes (fact sheet §18).  Everything over real HTTP on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import os
import time
import unittest

import b24common as bc
from tests.support import PortalCase
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

    def test_kill_9_between_two_file_parts_posts_each_once(self) -> None:
        self._kill_between_files(["im", "imopenlines", "user", "disk"])      # the Disk route: uuids

    def _kill_between_files(self, scopes: list) -> None:
        self.portal.set_webhook(scopes=scopes)
        self.bot.files.update({"a.pdf": b"%PDF a", "b.pdf": b"%PDF b"})
        base = "http://127.0.0.1:%d" % self.bot.server_address[1]
        self.bot.raw = lambda text: (200, "application/json", json.dumps({"reply_text": "two files", "files": [
            {"url": base + "/files/a.pdf"}, {"url": base + "/files/b.pdf"}]}).encode())
        chat = self.ids["lines_member"]
        for round_ in range(2):
            proc = self.start_bridge(BRIDGE_RETRY_FIRST_SEC="0.2")
            self.portal.behave(message_add_delay=0.4)       # each commit takes a while: room for a kill
            before = len(self.file_messages(chat))
            self.portal.customer_message(chat, "files please %d" % round_)
            self.wait_for(lambda b=before: len(self.file_messages(chat)) > b, 10, "the first file")
            proc.kill()                                      # between the first file and the second
            self.portal.behave(message_add_delay=0.0)
        proc = self.start_bridge(BRIDGE_RETRY_FIRST_SEC="0.2")
        try:
            self.wait_for(lambda: len(self.file_messages(chat)) >= 4, 25, "every file")
        except AssertionError:
            dead = os.path.join(self.tmp, "state", "bridge.dead-letters.jsonl")
            raise AssertionError("%s\n%s\n%s\n%s" % (
                [n for n, _c, _t, _a in self.file_messages(chat)], self.texts(chat)[-8:],
                open(dead).read()[-2000:] if os.path.exists(dead) else "no dead letters",
                "\n".join(p.all_output()[-1500:] for p in self.procs))) from None
        time.sleep(1.0)
        contents = [c for _n, c, _t, _a in self.file_messages(chat)]    # the chat's folder renames repeats
        self.assertEqual(contents, [b"%PDF a", b"%PDF b"] * 2, "each file once, in order")
        self.assertEqual(self.texts(chat).count("two files"), 2)
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


class PortalFiles(PortalCase):
    """The emulator's file routes as the fact sheet gives them (§18)."""

    def call(self, method: str, **params):
        return self.client().call(method, params)

    def refused(self, code: str, method: str, **params) -> None:
        with self.assertRaises(bc.APIError) as ctx:
            self.call(method, **params)
        self.assertEqual(ctx.exception.code, code)

    def test_the_look_for_a_lost_upload_starts_at_the_newest_message_whatever_is_unread(self) -> None:
        # without FIRST_ID/LAST_ID the portal answers the first *unread* messages (fact sheet §8): with three
        # unread, "the newest id" read that way is an older one, and the look after a lost answer starts there
        import b24files
        chat = self.ids["lines_member"]
        newest = [self.portal.customer_message(chat, "unread %d" % n)["message_id"] for n in range(3)][-1]
        self.assertEqual(b24files._last_id(self.client(), "chat%d" % chat), newest)

    def test_the_three_steps_upload_in_place_or_copy_and_silent_mode(self) -> None:
        chat = self.ids["lines_member"]
        content = base64.b64encode(b"%PDF-1.4 x").decode()
        with self.assertRaises(bc.ScopeError):             # disk.folder.uploadfile needs the disk scope
            self.call("disk.folder.uploadfile", id=1, data={"NAME": "a.pdf"}, fileContent=["a.pdf", content])
        self.portal.set_webhook(scopes=["im", "imopenlines", "user", "disk"])
        folder = self.call("im.disk.folder.get", DIALOG_ID="chat%d" % chat)["ID"]
        disk = self.call("disk.folder.uploadfile", id=folder, data={"NAME": "a.pdf"}, fileContent=["a.pdf", content])
        self.refused("FILES_ERROR", "im.disk.file.commit", DIALOG_ID="chat%d" % chat)
        self.refused("SAVE_ERROR", "im.disk.file.commit", DIALOG_ID="chat%d" % chat, UPLOAD_ID=999999)
        uuid = bc.new_template_id()
        done = self.call("im.disk.file.commit", DIALOG_ID="chat%d" % chat, UPLOAD_ID=disk["ID"], MESSAGE="here",
                         TEMPLATE_ID=uuid)
        self.assertEqual(self.call("im.disk.file.commit", DIALOG_ID="chat%d" % chat, UPLOAD_ID=disk["ID"],
                                   TEMPLATE_ID=uuid)["MESSAGE_ID"], done["MESSAGE_ID"], "the uuid: the same message")
        msg = self.portal.messages[done["MESSAGE_ID"]]
        self.assertEqual((msg["text"], msg["uuid"], "upload%d" % disk["ID"] in done["FILES"]), ("here", uuid, True))
        # FILE_ID copies any readable Disk file; SILENT_MODE=Y keeps it from the customer
        quiet = self.call("im.disk.file.commit", DIALOG_ID="chat%d" % chat, FILE_ID=disk["ID"], SILENT_MODE="Y")
        self.assertIn("disk%d" % disk["ID"], quiet["FILES"])
        self.assertEqual(self.portal.messages[quiet["MESSAGE_ID"]]["params"].get("SILENT_CONNECTOR"), "Y")
        self.assertNotIn("SENDING", self.portal.messages[quiet["MESSAGE_ID"]]["params"], "never handed to WhatsApp")
        queued = self.ids["queued"]                        # readable (our queue), not a member
        self.call("im.disk.folder.get", DIALOG_ID="chat%d" % queued)
        self.refused("ACCESS_ERROR", "im.disk.file.commit", DIALOG_ID="chat%d" % queued, FILE_ID=disk["ID"])

    def test_one_call_uploads_limits_and_downloads(self) -> None:
        chat = self.ids["lines_member"]
        up = self.call("im.v2.File.upload", dialogId="chat%d" % chat,
                       fields={"name": "n.txt", "content": base64.b64encode(b"note").decode()})
        self.assertEqual(self.portal.messages[up["messageId"]]["params"]["FILE_ID"], [up["file"]["id"]])
        self.portal.max_file_bytes = 3000          # 100 MB on a real portal
        self.refused("FILE_TOO_LARGE", "im.v2.File.upload", dialogId="chat%d" % chat,
                     fields={"name": "big.bin", "content": base64.b64encode(b"x" * 3100).decode()})
        link = self.call("im.v2.File.download", dialogId="chat%d" % chat, fileId=up["file"]["id"])["downloadUrl"]
        token = link.split("token=", 1)[1]
        self.assertEqual(self.portal.download(token), b"note")


if __name__ == "__main__":
    unittest.main()
