"""``imopenlines.*``: lines, sessions, operators (fact sheet §11)."""
from __future__ import annotations

import re
from typing import Any

from .world import SESSION_NEW, RestError, _int_param, _iso, _yes


class Imopenlines:
    """``imopenlines.*``: lines, sessions, operators (fact sheet §11)."""

    METHODS = {
        "imopenlines.config.list.get": ("m_imopenlines_config_list_get", "imopenlines", False),
        "imopenlines.session.history.get": ("m_imopenlines_session_history_get", "imopenlines", False),
        "imopenlines.dialog.get": ("m_imopenlines_dialog_get", "imopenlines", False),
        "imopenlines.operator.answer": ("m_imopenlines_operator_answer", "imopenlines", False),
        "imopenlines.session.join": ("m_imopenlines_session_join", "imopenlines", False),
        "imopenlines.operator.finish": ("m_imopenlines_operator_finish", "imopenlines", False),
        "imopenlines.operator.transfer": ("m_imopenlines_operator_transfer", "imopenlines", False),
    }

    def m_imopenlines_config_list_get(self, ctx: dict, p: dict) -> Any:
        params = p.get("PARAMS") if isinstance(p.get("PARAMS"), dict) else {}
        options = p.get("OPTIONS") if isinstance(p.get("OPTIONS"), dict) else {}
        if p.get("PARAMS") not in (None, "") and not isinstance(p.get("PARAMS"), dict):
            raise RestError(400, "INVALID_FORMAT", "PARAMS must be an array")
        rows = []
        for line in sorted(self.lines.values(), key=lambda x: x["id"]):
            row = {"ID": str(line["id"]), "ACTIVE": "Y" if line["active"] else "N",
                   "LINE_NAME": line["name"], "CRM": "Y", "QUEUE_TYPE": "evenly",
                   "DATE_CREATE": _iso(self.clock() - 300 * 86400), "CHECK_AVAILABLE": "N",
                   **self.line_settings(line)}
            if _yes(options.get("QUEUE")):
                row["QUEUE"] = [str(u) for u in line["queue"]]
                row["QUEUE_USERS_FIELDS"] = {str(u): {"USER_NAME": self._full_name(u),
                                                      "USER_WORK_POSITION": self.users[u]["position"],
                                                      "USER_AVATAR": "", "USER_AVATAR_ID": "0"}
                                             for u in line["queue"]}
            if _yes(options.get("CONFIG_QUEUE")):
                row["CONFIG_QUEUE"] = [{"ENTITY_ID": str(u), "ENTITY_TYPE": "user"} for u in line["queue"]]
            rows.append(row)
        select = params.get("select")
        if isinstance(select, (list, dict)) and select:
            fields = list(select.values()) if isinstance(select, dict) else select
            keep = set(fields) | {"QUEUE", "QUEUE_USERS_FIELDS", "CONFIG_QUEUE"}
            rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
        return rows

    def _history_allowed(self, chat: dict, uid: int) -> bool:
        session = self.sessions.get(chat["session_id"])
        return uid in chat["members"] or (session and session["operator"] == uid) or \
            self.users.get(uid, {}).get("admin", False)

    def m_imopenlines_session_history_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        sid = _int_param(p.get("SESSION_ID"), 0)
        chat_id = _int_param(p.get("CHAT_ID"), 0)
        if not sid and not chat_id:
            raise RestError(400, "MISSING_REQUIRED_PARAM", "SESSION_ID or CHAT_ID is required")
        if sid:
            session = self.sessions.get(sid)
            if not session:
                raise RestError(400, "INVALID_SESSION_ID", "Session not found")
            chat = self.chats[session["chat_id"]]
        else:
            chat = self.chats.get(chat_id)
            if not chat or chat["type"] != "lines":
                raise RestError(400, "CHAT_ID", "Chat not found")
            sessions = [s for s in self.sessions.values() if s["chat_id"] == chat["id"]]
            if not sessions:
                raise RestError(400, "INVALID_SESSION_ID", "No session in this chat")
            session = max(sessions, key=lambda s: s["id"])
        if not self._history_allowed(chat, uid):
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this session history")
        later = [s["created"] for s in self.sessions.values()
                 if s["chat_id"] == chat["id"] and s["id"] > session["id"]]
        end = min(later) if later else float("inf")
        ids = [i for i in chat["message_ids"] if session["created"] <= self.messages[i]["date"] < end]
        message = {}
        for i in sorted(ids, reverse=True):
            m = self.messages[i]
            message[str(i)] = {"id": str(i), "chatid": str(chat["id"]), "senderid": str(m["author_id"]),
                               "recipientid": "chat%d" % chat["id"], "date": _iso(m["date"]),
                               "text": m["text"], "textlegacy": m["text"], "params": m["params"] or []}
        users = {}
        for i in ids:
            a = self.messages[i]["author_id"]
            if a and str(a) not in users:
                u = self._user_out(a)
                users[str(a)] = {"id": a, "name": u["name"], "firstName": u["first_name"],
                                 "lastName": u["last_name"], "connector": u["connector"],
                                 "bot": u["bot"], "phones": u["phones"]}
        return {"chatId": chat["id"], "canJoin": "N", "canVoteHead": "N", "sessionId": session["id"],
                "sessionVoteHead": 0, "sessionCommentHead": "", "userId": "chat%d" % chat["id"],
                "message": message, "usersMessage": {"chat%d" % chat["id"]: [int(i) for i in ids]},
                "users": users, "openlines": {}, "userInGroup": {}, "woUserInGroup": {},
                "chat": {str(chat["id"]): {"id": chat["id"], "name": chat["title"],
                                           "entityType": chat["entity_type"],
                                           "entityId": chat["entity_id"]}},
                "userBlockChat": {}, "userInChat": {str(chat["id"]): sorted(chat["members"])}, "files": []}

    def m_imopenlines_dialog_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = None
        if p.get("CHAT_ID") not in (None, ""):
            chat = self.chats.get(_int_param(p.get("CHAT_ID"), -1) or -1)
        elif p.get("DIALOG_ID") not in (None, ""):
            m = re.fullmatch(r"chat(\d+)", str(p.get("DIALOG_ID")))
            chat = self.chats.get(int(m.group(1))) if m else None
        elif p.get("SESSION_ID") not in (None, ""):
            s = self.sessions.get(_int_param(p.get("SESSION_ID"), -1) or -1)
            chat = self.chats.get(s["chat_id"]) if s else None
        elif p.get("USER_CODE") not in (None, ""):
            code = str(p.get("USER_CODE"))
            code = code[5:] if code.startswith("imol|") else code
            chat = next((c for c in self.chats.values() if c["entity_id"] == code), None)
        else:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        if not chat or chat["type"] != "lines" or not self._can_read(chat, uid):
            raise RestError(400, "ACCESS_ERROR", "You do not have access to the specified dialog")
        return self._dialog_object(chat, uid)

    def _session_chat(self, ctx: dict, p: dict) -> dict:
        """The Open Lines chat named by ``CHAT_ID`` that the caller may act on (read access)."""
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), -1) or -1)
        if not chat:
            raise RestError(400, "CHAT_ID", "Chat not found")
        if chat["type"] != "lines":
            raise RestError(400, "CHAT_TYPE", "Not an Open Lines chat")
        if not self._can_read(chat, ctx["user"]):
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this chat")
        return chat

    def m_imopenlines_operator_answer(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        if not self.sessions.get(chat["session_id"]) or chat["owner"] == ctx["user"]:
            raise RestError(400, "", "")     # no session to load, or already yours: an empty error (§16)
        self.take_chat(chat["id"], ctx["user"])
        self._post(chat, 0, "%s took the conversation" % self._full_name(ctx["user"]))
        return True

    def m_imopenlines_session_join(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        self.join(chat["id"], ctx["user"])
        return True

    def m_imopenlines_operator_finish(self, ctx: dict, p: dict) -> Any:
        chat = self._session_chat(ctx, p)
        if ctx["user"] not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "You are not an operator of this chat")
        self.close_session(chat["id"])
        return True

    def m_imopenlines_operator_transfer(self, ctx: dict, p: dict) -> Any:
        """``TRANSFER_ID`` = ``queue<lineId>`` (back to that line's queue: the session waits again,
        operators leave) or a user id (that user takes over)."""
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        if p.get("TRANSFER_ID") in (None, ""):
            raise RestError(400, "TRANSFER_ID_EMPTY", "Transfer ID can't be empty")
        chat = self._session_chat(ctx, p)
        if ctx["user"] not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "You are not an operator of this chat")
        target = str(p.get("TRANSFER_ID"))
        session = self.sessions.get(chat["session_id"])
        m = re.fullmatch(r"queue(\d+)", target)
        if m:
            line = self.lines.get(int(m.group(1)))
            if not line:
                raise RestError(400, "OPERATOR_WRONG", "No such line")
            for uid in [u for u in chat["members"] if u != chat["customer_id"]]:
                del chat["members"][uid]
            chat["owner"] = 0
            chat["line_id"] = line["id"]
            if session:
                session.update(status=SESSION_NEW, operator=0, line_id=line["id"])
                session.pop("bot", None)            # a bot that held it is out with the others
            chat["offered_to"] = (line["queue"] or [None])[0] if line.get("offer") == "one" else None
            chat["offered_at"] = self.clock()
            self._post(chat, 0, "The conversation was transferred to the queue of %s" % line["name"])
            return True
        uid = _int_param(target, 0) or 0
        if uid not in self.users:
            raise RestError(400, "OPERATOR_WRONG", "Wrong operator")
        chat["members"].pop(ctx["user"], None)
        self.take_chat(chat["id"], uid)
        self._post(chat, 0, "The conversation was transferred to %s" % self._full_name(uid))
        return True
