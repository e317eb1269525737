"""``im.v2.Event.*``: a user's event queue read by polling (fact sheet §12; REST docs 2026).

``subscribe`` (idempotent) starts recording the webhook user's events;
``get`` returns them from ``offset`` on, and passing ``offset`` acknowledges
-- deletes for everybody -- every event before it: one queue per user, one
consumer.  Events are kept 24 hours.  Only chats the user is *part of*
produce events: a chat waiting in the user's Open Lines queue does not.
"""
from __future__ import annotations

from typing import Any

from .world import _int_param, _iso

EVENT_RETENTION_SEC = 24 * 3600
EVENTS_LIMIT_DEFAULT, EVENTS_LIMIT_MAX = 100, 1000


class ImV2Event:
    """``im.v2.Event.subscribe`` / ``unsubscribe`` / ``get``."""

    METHODS = {
        "im.v2.event.subscribe": ("m_im_v2_event_subscribe", "im", False),
        "im.v2.event.unsubscribe": ("m_im_v2_event_unsubscribe", "im", False),
        "im.v2.event.get": ("m_im_v2_event_get", "im", False),
    }

    def attach(self) -> None:
        self.event_queues: dict = {}      # user id -> {"events": [...]} while subscribed
        self.next_event_id = 2000
        self.hooks.append(self._v2_hook)

    def m_im_v2_event_subscribe(self, ctx: dict, p: dict) -> Any:
        self.event_queues.setdefault(ctx["user"], {"events": []})
        return True

    def m_im_v2_event_unsubscribe(self, ctx: dict, p: dict) -> Any:
        self.event_queues.pop(ctx["user"], None)
        return True

    def m_im_v2_event_get(self, ctx: dict, p: dict) -> Any:
        q = self.event_queues.get(ctx["user"])
        return self._read_events([q["events"]] if q is not None else [], p)    # not subscribed: empty, no error

    def _read_events(self, queues: list, p: dict) -> dict:
        """``offset`` acknowledges (deletes) every event before it in each of *queues*; the events from it
        on come back in id order.  ``nextOffset`` is never null, ``hasMore`` = a full page (fact sheet §12.1)."""
        offset = _int_param(p.get("offset"), 0) or 0
        limit = max(1, min(EVENTS_LIMIT_MAX, _int_param(p.get("limit"), EVENTS_LIMIT_DEFAULT) or 1))
        horizon = self.clock() - EVENT_RETENTION_SEC
        for events in queues:
            events[:] = [e for e in events if e["at"] >= horizon and e["eventId"] >= offset]
        out = sorted((e for events in queues for e in events), key=lambda e: e["eventId"])[:limit]
        return {"events": [{k: v for k, v in e.items() if k != "at"} for e in out],
                "nextOffset": max(offset, out[-1]["eventId"] + 1 if out else 0),
                "hasMore": len(out) >= limit}

    def _new_event(self, etype: str, data: dict) -> dict:
        self.next_event_id += 1
        return {"eventId": self.next_event_id, "type": etype, "date": _iso(self.clock()), "data": data,
                "at": self.clock()}

    # -- recording -------------------------------------------------------------------
    def _v2_hook(self, kind: str, chat: dict, info: dict) -> None:
        if not self.event_queues or kind not in ("message", "join"):
            return
        for uid, q in self.event_queues.items():
            if uid not in chat["members"]:
                continue         # only chats the user is part of (an in-queue chat is not)
            if self.drop_events > 0:
                self.drop_events -= 1
                continue
            if kind == "message":
                msg = info["msg"]
                data = {"message": self._v2_message(msg), "chat": self._v2_chat(chat),
                        "user": self._v2_user(msg["author_id"]), "language": "en"}
                etype = "ONIMV2MESSAGEADD"
            else:
                data = {"dialogId": "chat%d" % chat["id"], "chat": self._v2_chat(chat),
                        "user": self._v2_user(info["uid"]), "language": "en"}
                etype = "ONIMV2JOINCHAT"
            q["events"].append(self._new_event(etype, data))

    def _v2_message(self, msg: dict) -> dict:
        params = {k: v for k, v in (msg["params"] or {}).items() if k not in ("SENDING", "SENDING_TS")}
        return {"id": msg["id"], "chatId": msg["chat_id"], "chat_id": msg["chat_id"], "authorId": msg["author_id"],
                "author_id": msg["author_id"], "date": _iso(msg["date"]), "text": msg["text"],
                "isSystem": msg["author_id"] == 0, "uuid": msg["uuid"], "forward": None, "params": params,
                "viewedByOthers": False}

    def _v2_chat(self, chat: dict) -> dict:
        # the shortened chat of events: no role, no muteList
        return {"id": chat["id"], "dialogId": "chat%d" % chat["id"], "name": chat["title"], "type": chat["type"],
                "messageType": chat["message_type"], "owner": chat["owner"], "color": chat["color"],
                "avatar": "", "description": "", "extranet": False, "containsCollaber": False,
                "entityType": chat["entity_type"], "entityId": chat["entity_id"],
                "entityData1": self._entity_data_1(chat) if chat["type"] == "lines" else "",
                "entityData2": "", "entityData3": "", "entityLink": {}, "diskFolderId": 0, "permissions": {},
                "parentChatId": 0, "parentMessageId": 0, "isNew": False, "textFieldEnabled": "Y",
                "backgroundId": None}

    def _v2_user(self, uid: int) -> dict:
        if uid not in self.users:
            return {}
        u = self._user_out(uid)
        return {"id": uid, "active": u["active"], "name": u["name"], "firstName": u["first_name"],
                "lastName": u["last_name"], "workPosition": u["work_position"], "color": u["color"],
                "avatar": "", "gender": u["gender"], "birthday": "", "extranet": u["extranet"], "bot": u["bot"],
                "connector": u["connector"], "externalAuthId": u["external_auth_id"], "status": "online",
                "idle": False, "lastActivityDate": False, "mobileLastDate": False, "desktopLastDate": False,
                "absent": False, "departments": u["departments"], "phones": u["phones"], "website": "",
                "email": "", "type": u["type"]}
