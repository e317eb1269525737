"""``im.recent.*``: the recent lists (fact sheet §7)."""
from __future__ import annotations

import datetime as _dt
from typing import Any

from .world import RestError, _int_param, _yes


class ImRecent:
    """``im.recent.*``: the recent lists (fact sheet §7)."""

    METHODS = {
        "im.recent.list": ("m_im_recent_list", "im", True),
        "im.recent.get": ("m_im_recent_get", "im", True),
    }

    def m_im_recent_list(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        offset = _int_param(p.get("OFFSET"), None)
        if offset is None:
            offset = _int_param(p.get("START"), 0) or 0
        limit = _int_param(p.get("LIMIT"), 50) or 50
        limit = 50 if limit <= 0 else min(limit, 200)
        member, queued = self._recent_for(uid)
        if _yes(p.get("SKIP_OPENLINES")):
            member = [c for c in member if c["type"] != "lines"]
            queued = []
        if _yes(p.get("SKIP_UNDISTRIBUTED_OPENLINES")):
            queued = []
        if _yes(p.get("SKIP_CHAT")):
            member = [c for c in member if c["type"] in ("private", "lines")]
        if _yes(p.get("SKIP_DIALOG")):
            member = [c for c in member if c["type"] != "private"]
        if _yes(p.get("UNREAD_ONLY")):
            member = [c for c in member if self._recent_item(c, uid)["counter"] > 0]
        date_filter = p.get("LAST_MESSAGE_DATE") or p.get("DATE_LAST_ACTIVITY")
        if date_filter:
            try:
                cut = _dt.datetime.fromisoformat(str(date_filter)).timestamp()
            except ValueError:
                raise RestError(400, "ERROR_ARGUMENT", "LAST_MESSAGE_DATE has a wrong format") from None
            page = [c for c in member if int(c["activity"]) <= cut][:limit]
            has_more = len([c for c in member if int(c["activity"]) <= cut]) > limit
        else:
            page = member[offset:offset + limit]
            has_more = len(page) == limit
        original = _yes(p.get("GET_ORIGINAL_TEXT"))
        items = [self._recent_item(c, uid, original) for c in page + queued]
        result = {"items": items, "hasMore": has_more, "hasMorePages": has_more, "copilot": None,
                  "messagesAutoDeleteConfigs": []}
        if not date_filter and not _yes(p.get("UNREAD_ONLY")):
            result["birthdayList"] = []
        extra = {"total": -1}
        if has_more:
            # the portal counts the appended in-queue items too (fact sheet §7.1): a client that
            # follows `next` skips one member dialog per waiting dialog at every page break
            extra["next"] = offset + len(items)
        return result, extra

    def m_im_recent_get(self, ctx: dict, p: dict) -> Any:
        uid = ctx["user"]
        member, queued = self._recent_for(uid)
        now = self.clock()
        if _yes(p.get("ONLY_OPENLINES")):
            chats = queued + [c for c in member if c["type"] == "lines"]
        else:
            sync = p.get("LAST_SYNC_DATE") or p.get("LAST_UPDATE")
            cut = now - 30 * 86400
            if sync:
                try:
                    cut = max(_dt.datetime.fromisoformat(str(sync).replace("Z", "+00:00")).timestamp(),
                              now - 7 * 86400)
                except ValueError:
                    pass      # the portal parses it in a try/catch: an unreadable date is ignored
            # only member rows are filtered; in-queue chats are appended whatever the date
            chats = [c for c in member if self._row_date(c, uid) >= cut] + queued
            chats.sort(key=lambda c: (not (c["members"].get(uid) or {}).get("pinned", False),
                                      -self._row_date(c, uid)))
            if _yes(p.get("SKIP_OPENLINES")):
                chats = [c for c in chats if c["type"] != "lines"]
            if _yes(p.get("SKIP_CHAT")):
                chats = [c for c in chats if c["type"] in ("private", "lines")]
            if _yes(p.get("SKIP_DIALOG")):
                chats = [c for c in chats if c["type"] != "private"]
        return [self._recent_item(c, uid) for c in chats]
