"""``imopenlines.*``: lines, sessions, operators (fact sheet §11)."""
from __future__ import annotations

import re
from typing import Any

from .world import RestError, _int_param, _iso, _yes


class Imopenlines:
    """``imopenlines.*``: lines, sessions, operators (fact sheet §11)."""

    METHODS = {
        "imopenlines.config.list.get": ("m_imopenlines_config_list_get", "imopenlines", False),
        "imopenlines.session.history.get": ("m_imopenlines_session_history_get", "imopenlines", False),
        "imopenlines.dialog.get": ("m_imopenlines_dialog_get", "imopenlines", False),
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
        if not chat or chat["type"] != "lines" or not self._can_read(chat, uid):
            raise RestError(400, "ACCESS_ERROR", "You do not have access to the specified dialog")
        return self._dialog_object(chat, uid)
