"""``im.dialog.*`` and ``im.chat.get``: reading a dialog (fact sheet §8, §10)."""
from __future__ import annotations

import bisect
import re
from typing import Any

from .world import RestError, _int_param, _iso, _yes


class ImDialog:
    """``im.dialog.*`` and ``im.chat.get``: reading a dialog (fact sheet §8, §10)."""

    METHODS = {
        "im.dialog.messages.get": ("m_im_dialog_messages_get", "im", True),
        "im.dialog.read": ("m_im_dialog_read", "im", True),
        "im.dialog.users.list": ("m_im_dialog_users_list", "im", True),
        "im.dialog.get": ("m_im_dialog_get", "im", True),
        "im.chat.get": ("m_im_chat_get", "im", True),
    }

    def m_im_dialog_messages_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p, chat_id=True)
        first, last = p.get("FIRST_ID"), p.get("LAST_ID")
        for name, value in (("FIRST_ID", first), ("LAST_ID", last)):
            if value is not None and not re.fullmatch(r"\d+", str(value)):
                raise RestError(400, name + "_STRING", "%s can't be string" % name)
        limit = _int_param(p.get("LIMIT"), 20)
        limit = 20 if limit is None else limit
        unlimited = limit <= 0
        limit = min(limit, 50)
        member = chat["members"].get(uid)
        start_id = member["start_id"] if member else 0
        every = chat["message_ids"]        # ascending: slices, not a pass over a long chat's every message
        ids = every[bisect.bisect_right(every, start_id):] if first is None else []
        if first is not None:
            begin = bisect.bisect_right(every, max(int(first), start_id))
            rows = every[begin:] if unlimited else every[begin:begin + limit]        # ascending
        elif last is not None and int(last) > 0:
            rows = [i for i in ids if i < int(last)][::-1]
            rows = rows if unlimited else rows[:limit]        # descending
        elif last is not None:
            rows = ids[::-1] if unlimited else ids[::-1][:limit]
        else:
            counter = 0
            if member:
                counter = self._unread(ids, member["last_read"], uid)
            if unlimited:
                rows = ids[::-1]
            elif counter and counter <= limit:
                rows = ids[::-1][:limit + counter]
            elif counter > limit:
                unread = [i for i in ids if i > member["last_read"]]
                first_unread = unread[:limit]
                older = [i for i in ids if i < first_unread[0]][::-1][:limit]
                rows = first_unread[::-1] + older
            else:
                rows = ids[::-1][:limit]
        msgs = [self._message_out(self.messages[i], uid, chat) for i in rows]
        authors = []
        for m in msgs:
            if m["author_id"] and m["author_id"] not in authors:
                authors.append(m["author_id"])
        # media: the files of these messages, in the same order as the messages
        files = [self._file_out(f) for m in msgs for f in (m["params"] or {}).get("FILE_ID", [])
                 if isinstance(m["params"], dict) and f in self.files]
        return {"chat_id": chat["id"], "messages": msgs,
                "users": [self._user_out(a) for a in authors if a in self.users], "files": files}

    def _file_out(self, fid: int) -> dict:
        f = self.files[fid]
        url = "%s/bitrix/services/main/ajax.php?action=disk.api.file.download&fileId=%d" % (self.public_url, fid)
        return {"id": fid, "chatId": f["chatId"], "date": _iso(f["date"]), "type": f["type"],
                "name": f["name"], "extension": f["extension"], "size": f["size"], "image": (
                    {"width": 1280, "height": 960} if f["type"] == "image" else False),
                "status": "done", "progress": 100, "authorId": f["authorId"],
                "authorName": self._full_name(f["authorId"]), "urlPreview": url if f["type"] == "image" else "",
                "urlShow": url + "&show=1", "urlDownload": url, "viewerAttrs": None}

    def m_im_dialog_read(self, ctx: dict, p: dict) -> Any:
        chat = self._resolve_dialog(p.get("DIALOG_ID"), ctx["user"])
        member = chat["members"].get(ctx["user"])
        if member and chat["message_ids"]:
            upto = _int_param(p.get("MESSAGE_ID"), 0) or chat["message_ids"][-1]
            member["last_read"] = max(member["last_read"], upto)
            member["bumped"] = self.clock()     # a read bumps the recent row too (fact sheet §7.2)
        return {"dialogId": str(p.get("DIALOG_ID")), "chatId": chat["id"], "counter": 0}

    def m_im_dialog_users_list(self, ctx: dict, p: dict) -> Any:
        chat = self._readable_chat(ctx, p)
        members = [u for u in chat["members"] if self.users.get(u, {}).get("active")]
        if _yes(p.get("SKIP_EXTERNAL")):
            allowed = set(str(p.get("SKIP_EXTERNAL_EXCEPT_TYPES") or "").split(","))
            members = [u for u in members if self.users[u]["kind"] == "employee"
                       or (self.users[u]["kind"] == "bot" and "bot" in allowed)
                       or (self.users[u]["kind"] == "connector" and "imconnector" in allowed)]
        limit = min(max(_int_param(p.get("LIMIT"), 50) or 50, 1), 200)
        if p.get("LAST_ID") not in (None, ""):
            last = _int_param(p.get("LAST_ID"), 0) or 0
            rows = sorted(u for u in members if u > last)[:limit]
            return [self._user_out(u) for u in rows]
        offset = _int_param(p.get("OFFSET"), None)
        if offset is None:
            offset = _int_param(p.get("START"), 0) or 0
        rows = members[offset:offset + limit]
        extra = {"total": len(members)}
        if offset + limit < len(members):
            extra["next"] = offset + limit
        return [self._user_out(u) for u in rows], extra

    def _dialog_object(self, chat: dict, uid: int) -> dict:
        out = self._chat_out(chat, uid, full=True, recent_role=False)
        ids = chat["message_ids"]
        member = chat["members"].get(uid)
        out.update({
            "description": "", "counter": 0, "message_count": len(ids),
            "unread_id": 0, "last_message_id": ids[-1] if ids else 0, "last_id": ids[-1] if ids else 0,
            "marked_id": 0, "disk_folder_id": 0, "is_new": False,
            "readed_list": [], "last_message_views": {"message_id": 0, "first_viewers": [],
                                                     "count_of_viewers": 0},
            "dialog_id": "chat%d" % chat["id"] if chat["type"] != "private" else
            str([u for u in chat["private_pair"] if u != uid][0]),
        })
        if member:
            out["counter"] = self._unread(ids, member["last_read"], uid)
        return out

    def m_im_dialog_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p)
        return self._dialog_object(chat, uid)

    def m_im_chat_get(self, ctx: dict, p: dict) -> Any:
        if p.get("ENTITY_TYPE") is not None or p.get("ENTITY_ID") is not None:
            for chat in self.chats.values():
                if chat["entity_type"] == p.get("ENTITY_TYPE") and chat["entity_id"] == p.get("ENTITY_ID"):
                    return {"ID": chat["id"]}
            return None
        uid = ctx["user"]
        chat = self._readable_chat(ctx, p, chat_id=True)
        return self._dialog_object(chat, uid)
