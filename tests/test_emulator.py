"""The emulator behaves like the fact sheet (docs/bitrix24-api.md), over raw HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from tests.support import PortalCase, control

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Raw(PortalCase):
    def http(self, method: str, params=None, *, form: bool = False, body: bytes | None = None,
             base: str | None = None, ctype: str = "application/json") -> tuple:
        url = (base or self.server.webhook_base) + method
        if body is None and params is not None:
            if form:
                body = urllib.parse.urlencode(params, doseq=True).encode()
                ctype = "application/x-www-form-urlencoded"
            else:
                body = json.dumps(params).encode()
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": ctype})
        try:
            with OPENER.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def messages(self, **params) -> list:
        params.setdefault("DIALOG_ID", "chat%d" % self.chat)
        status, body = self.http("im.dialog.messages.get", params)
        self.assertEqual(status, 200, body)
        return [m["id"] for m in body["result"]["messages"]]

    def setUp(self) -> None:
        super().setUp()
        self.chat = self.ids["lines_member"]
        for i in range(60):
            self.portal.customer_message(self.chat, "m%d" % i)
        self.all_ids = [m["id"] for m in self.portal.chat_messages(self.chat)]

    def test_first_id_ascending_last_id_descending(self) -> None:
        ids = self.all_ids
        self.assertEqual(self.messages(FIRST_ID=ids[3], LIMIT=5), ids[4:9])
        self.assertEqual(self.messages(FIRST_ID=0, LIMIT=3), ids[:3])
        self.assertEqual(self.messages(LAST_ID=ids[10], LIMIT=3), [ids[9], ids[8], ids[7]])
        self.assertEqual(self.messages(LAST_ID=0, LIMIT=2), [ids[-1], ids[-2]])
        self.assertEqual(len(self.messages(FIRST_ID=0, LIMIT=500)), 50)
        self.assertEqual(self.messages(FIRST_ID=0, LIMIT=0), ids)
        self.assertEqual(self.messages(FIRST_ID=ids[0], LAST_ID=ids[5], LIMIT=2), ids[1:3])
        self.assertEqual(self.messages(FIRST_ID=ids[-1]), [])

    def test_unread_rule_without_first_or_last_id(self) -> None:
        # 60+ unread customer messages, LIMIT 5: the FIRST 5 unread then 5 older read ones, descending
        got = self.messages(LIMIT=5)
        member = self.portal.chats[self.chat]["members"][7]
        unread = [i for i in self.all_ids if i > member["last_read"]]
        older = [i for i in self.all_ids if i < unread[0]]
        self.assertEqual(got, unread[:5][::-1] + older[::-1][:5])

    def test_bad_ids_and_dialogs(self) -> None:
        status, body = self.http("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.chat, "FIRST_ID": "1a"})
        self.assertEqual((status, body["error"]), (400, "FIRST_ID_STRING"))
        self.assertNotIn("time", body)
        status, body = self.http("im.dialog.messages.get", {})
        self.assertEqual((status, body["error"]), (400, "DIALOG_ID_EMPTY"))
        status, body = self.http("im.dialog.messages.get", {"DIALOG_ID": "chat999999"})
        self.assertEqual((status, body["error"]), (403, "ACCESS_ERROR"))
        # a JSON body that does not parse is "no parameters", not a parse error
        status, body = self.http("im.dialog.messages.get", body=b"{not json")
        self.assertEqual((status, body["error"]), (400, "DIALOG_ID_EMPTY"))

    def test_auth_and_method_errors(self) -> None:
        wrong = self.server.webhook_base.replace(self.portal.code, "x" * 16)
        self.assertEqual(self.http("profile", {}, base=wrong)[0], 401)
        self.assertEqual(self.http("profile", {}, base=wrong)[1]["error"], "INVALID_CREDENTIALS")
        self.assertEqual(self.http("nope.method", {}, base=wrong)[1]["error"], "ERROR_METHOD_NOT_FOUND")
        status, body = self.http("profile", {}, base=self.server.url + "/rest/")
        self.assertEqual((status, body["error"]), (401, "NO_AUTH_FOUND"))
        status, body = self.http("event.bind", {"event": "ONOPENLINEMESSAGEADD", "handler": "https://h.invalid/"})
        self.assertEqual((status, body["error"]), (403, "WRONG_AUTH_TYPE"))
        self.portal.set_webhook(scopes=["im"])
        status, body = self.http("imopenlines.config.list.get", {})
        self.assertEqual((status, body["error"]), (401, "insufficient_scope"))

    def test_method_names_suffix_get_and_form_encoding(self) -> None:
        status, body = self.http("PROFILE.json", None)
        self.assertEqual((status, body["result"]["ID"]), (200, "7"))
        self.assertIn("time", body)
        status, body = self.http("im.dialog.messages.get",
                                 {"dialog_id": "chat%d" % self.chat, "last_id": "0", "limit": "1"}, form=True)
        self.assertEqual(body["result"]["messages"][0]["id"], self.all_ids[-1])
        status, body = self.http("imopenlines.config.list.get",
                                 {"OPTIONS[QUEUE]": "Y", "PARAMS[select][]": ["ID", "LINE_NAME"]}, form=True)
        self.assertEqual(status, 200, body)
        self.assertEqual(set(body["result"][0]), {"ID", "LINE_NAME", "QUEUE", "QUEUE_USERS_FIELDS"})
        self.assertIn("7", body["result"][0]["QUEUE"])

    def test_message_add(self) -> None:
        uuid = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
        status, body = self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "a[br]b",
                                                    "TEMPLATE_ID": uuid})
        self.assertEqual(status, 200)
        self.assertIsInstance(body["result"], int)
        again = self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "a[br]b",
                                             "TEMPLATE_ID": uuid})[1]["result"]
        self.assertEqual(again, body["result"])
        stored = self.portal.chat_messages(self.chat)[-1]
        self.assertEqual((stored["text"], stored["uuid"]), ("a\nb", uuid))
        long_id = self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.chat, "MESSAGE": "x" * 20010})[1]["result"]
        self.assertEqual(self.portal.messages[long_id]["text"], "x" * 20000 + " (...)")
        status, body = self.http("im.message.add", {"DIALOG_ID": "chat%d" % self.ids["queued"], "MESSAGE": "hi"})
        self.assertEqual((status, body["error"]), (400, "CANCELED"))
        status, body = self.http("im.message.add", {"DIALOG_ID": "chat99999", "MESSAGE": "hi"})
        self.assertEqual((status, body["error"]), (400, "CHAT_ID"))

    def test_recent_list_shapes_and_queue_items(self) -> None:
        status, body = self.http("im.recent.list", {"LIMIT": 1})
        # fact sheet §7.1: `next` counts the appended in-queue item too (1 paged + 1 waiting)
        self.assertEqual((body["total"], body["next"]), (-1, 2))
        items = body["result"]["items"]
        self.assertTrue(body["result"]["hasMore"])
        queued = [i for i in items if i["chat_id"] == self.ids["queued"]]
        self.assertEqual(len(items), 2, "one paged item plus the in-queue chat appended")
        self.assertEqual(queued[0]["counter"], 1)
        self.assertNotIn("date_last_activity", queued[0])
        self.assertNotIn("last_id", queued[0])
        self.assertIn("date_update", queued[0])
        self.assertEqual(queued[0]["user"], {"id": 0})
        top = items[0]
        self.assertEqual(top["chat_id"], self.chat)
        self.assertEqual(top["chat"]["entity_type"], "LINES")
        self.assertEqual(top["lines"]["status"], 25)  # customer wrote after the operator
        self.assertEqual(top["chat"]["role"], "OWNER")
        self.assertEqual(top["chat"]["entity_id"].split("|")[3], str(top["user"]["id"]))
        status, body = self.http("im.recent.list", {"LIMIT": 200})
        self.assertNotIn("next", body)
        ids = [i["chat_id"] for i in body["result"]["items"]]
        self.assertNotIn(self.ids["foreign"], ids)
        self.assertNotIn(self.ids["closed"], ids)

    def test_recent_get_only_openlines_and_sync(self) -> None:
        body = self.http("im.recent.get", {"ONLY_OPENLINES": "Y"})[1]
        self.assertEqual(body["result"][0]["chat_id"], self.ids["queued"])
        self.assertTrue(all(i["chat"]["type"] == "lines" for i in body["result"]))
        since = body["result"][1]["date_update"]
        self.portal.customer_message(self.ids["lines_member2"], "late")
        body = self.http("im.recent.get", {"LAST_SYNC_DATE": since})[1]
        self.assertIn(self.ids["lines_member2"], [i["chat_id"] for i in body["result"]])

    def test_batch_references_and_limits(self) -> None:
        cmd = {"me": "profile", "dialog": "im.dialog.get?DIALOG_ID=chat%d" % self.chat,
               "msgs": "im.dialog.messages.get?DIALOG_ID=$result[dialog][dialog_id]&LAST_ID=0&LIMIT=1",
               "nested": "batch?cmd[x]=profile", "bad": "im.dialog.get?DIALOG_ID=chat%d" % self.ids["foreign"]}
        status, body = self.http("batch", {"halt": 0, "cmd": cmd})
        res = body["result"]
        self.assertEqual(res["result"]["msgs"]["messages"][0]["id"], self.all_ids[-1])
        self.assertEqual(res["result_error"]["nested"]["error"], "ERROR_BATCH_METHOD_NOT_ALLOWED")
        self.assertEqual(res["result_error"]["bad"]["error"], "ACCESS_ERROR")
        self.assertIn("me", res["result_time"])
        big = {"c%d" % i: "profile" for i in range(52)}
        res = self.http("batch", {"cmd": big})[1]["result"]
        self.assertEqual(len(res["result"]), 50)
        self.assertEqual(res["result_error"]["c51"]["error"], "ERROR_BATCH_LENGTH_EXCEEDED")
        form = self.http("batch", {"cmd[a]": "im.dialog.messages.get?DIALOG_ID=chat%d&LAST_ID=0&LIMIT=1" % self.chat},
                         form=True)[1]["result"]
        self.assertEqual(len(form["result"]["a"]["messages"]), 1)
        self.assertEqual(form["result_error"], [], "an empty map is encoded as [] like PHP does")

    def test_sessions_queue_and_membership(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.close_session(chat)
        self.assertEqual(self.portal.chats[chat]["members"].keys() - {self.portal.chats[chat]["customer_id"]}, set())
        ids = [i["chat_id"] for i in self.http("im.recent.list", {"LIMIT": 200})[1]["result"]["items"]]
        self.assertNotIn(chat, ids)
        self.portal.customer_message(chat, "I'm back")
        item = [i for i in self.http("im.recent.list", {})[1]["result"]["items"] if i["chat_id"] == chat][0]
        self.assertEqual(item["counter"], 1)       # back in the queue: readable, not writable
        self.assertEqual(self.http("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % chat, "LAST_ID": 0})[0], 200)
        self.assertEqual(self.http("im.message.add", {"DIALOG_ID": "chat%d" % chat, "MESSAGE": "x"})[1]["error"],
                         "CANCELED")
        self.assertIs(self.http("imopenlines.operator.answer", {"CHAT_ID": chat})[1]["result"], True)
        self.assertEqual(self.http("im.message.add", {"DIALOG_ID": "chat%d" % chat, "MESSAGE": "x"})[0], 200)
        status, body = self.http("imopenlines.dialog.get", {"CHAT_ID": self.ids["foreign"]})
        self.assertEqual((status, body["error"]), (400, "ACCESS_ERROR"))
        hist = self.http("imopenlines.session.history.get", {"CHAT_ID": chat})[1]["result"]
        self.assertEqual(hist["userId"], "chat%d" % chat)
        self.assertTrue(all(isinstance(k, str) and m["chatid"] == str(chat) for k, m in hist["message"].items()))

    def test_message_ids_are_global_and_increasing(self) -> None:
        a = self.portal.customer_message(self.ids["lines_member"], "a")["message_id"]
        b = self.portal.customer_message(self.ids["queued"], "b")["message_id"]
        c = self.portal.operator_message(self.ids["group"], 9, "c")["message_id"]
        self.assertLess(a, b)
        self.assertLess(b, c)

    def test_control_api_over_http(self) -> None:
        new = control(self.server, "new_conversation", line_id=3, name="Ann Example", phone="+10000000150",
                      text="first words")
        self.assertTrue(new["dialog_id"].startswith("chat"))
        control(self.server, "fault", kind="http500", count=1)
        self.assertEqual(self.http("profile", {})[0], 500)
        self.assertEqual(self.http("profile", {})[0], 200)
        stats = control(self.server, "stats")
        self.assertEqual(stats["counts"]["profile"], 2)
        msgs = control(self.server, "messages", chat_id=new["chat_id"])
        self.assertEqual([m["text"] for m in msgs], ["Conversation started", "first words"])
        self.assertEqual(msgs[0]["author_id"], 0)
