"""What an operator does with a conversation: ``imopenlines.operator.*``, ``session.intercept`` / ``session.join`` (fact sheet §16).

Who may act is one rule (``Operator::checkAccess``): a member of the chat, a
user the waiting chat is offered to, or one with the line's JOIN permission.
Parameter case differs per method, as in the source: ``answer``, ``skip``,
``spam`` and ``finish`` fold their keys, the others want ``CHAT_ID`` exactly.
Many failures have their own odd shape: ``answer`` refuses with an *empty*
error, ``transfer`` and ``intercept`` say ``OPERATOR_WRONG`` for anything.
"""
from __future__ import annotations

import re
from typing import Any

from .world import SESSION_ANSWERED, SESSION_CLOSED, SESSION_NEW, RestError, _int_param

SESSION_SPAM = 65
NOT_YOURS = "Attempt to close the dialog by a user who is not an operator"


class OperatorActions:
    """``imopenlines.operator.answer/skip/spam/finish/another.finish/transfer``, ``imopenlines.session.intercept/join``."""

    METHODS = {
        "imopenlines.operator.answer": ("m_op_answer", "imopenlines", True),
        "imopenlines.operator.skip": ("m_op_skip", "imopenlines", True),
        "imopenlines.operator.spam": ("m_op_spam", "imopenlines", True),
        "imopenlines.operator.finish": ("m_op_finish", "imopenlines", True),
        "imopenlines.operator.another.finish": ("m_op_another_finish", "imopenlines", False),
        "imopenlines.operator.transfer": ("m_op_transfer", "imopenlines", False),
        "imopenlines.session.intercept": ("m_op_intercept", "imopenlines", False),
        "imopenlines.session.join": ("m_op_join", "imopenlines", False),
    }

    def _access(self, ctx: dict, p: dict) -> dict:
        """``Operator::checkAccess``: the chat, once the caller may act on it."""
        chat = self.chats.get(_int_param(p.get("CHAT_ID"), 0) or 0)
        if chat is None:
            raise RestError(400, "CHAT_ID", "Chat ID is invalid.")
        uid = ctx["user"]
        if uid in chat["members"] and chat["type"] != "lines":
            raise RestError(400, "CHAT_TYPE", "This chat is not Open Channel")
        if chat["type"] != "lines" or not self._can_read(chat, uid):
            raise RestError(400, "ACCESS_DENIED", "You do not have permission to access this chat.")
        return chat

    def _note(self, chat: dict, text: str, **users: int) -> None:
        for key, uid in users.items():
            text = text.replace("#%s#" % key, "[USER=%d]%s[/USER]" % (uid, self._full_name(uid)))
        self._post(chat, 0, text, system=True)

    def _answer(self, chat: dict, uid: int) -> None:
        """*uid* answers: the other operators leave (the welcome bot too, as the line says), *uid* owns it."""
        for other in [u for u in chat["members"] if u not in (chat["customer_id"], uid)
                      and self.users.get(u, {}).get("kind") == "employee"]:
            del chat["members"][other]
        self.take_chat(chat["id"], uid)

    def _session(self, chat: dict) -> dict | None:
        session = self.sessions.get(chat["session_id"])
        return session if session and session["status"] < SESSION_CLOSED else None

    # -- taking and leaving ---------------------------------------------------------------
    def m_op_answer(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        if not self._session(chat) or chat["owner"] == ctx["user"]:
            raise RestError(400, "", "")     # no session to load, or already yours: an empty error (§16)
        self._answer(chat, ctx["user"])
        self._note(chat, "#USER# picked conversation", USER=ctx["user"])
        return True

    def m_op_skip(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        uid = ctx["user"]
        chat["members"].pop(uid, None)
        session = self._session(chat)
        if not session:
            raise RestError(400, "", "")     # the caller is out anyway
        self._note(chat, "#USER# rejected conversation", USER=uid)
        chat.setdefault("skipped_by", set()).add(uid)
        if chat["owner"] == uid:
            chat["owner"] = 0
        session.update(status=SESSION_NEW, operator=0)
        line = self.lines.get(chat["line_id"]) or {}
        rest = [u for u in line.get("queue", []) if u not in chat["skipped_by"]]
        chat["offered_to"] = (rest or [None])[0] if line.get("offer") == "one" else None
        chat["offered_at"] = self.clock()
        return True

    def m_op_join(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        self.join(chat["id"], ctx["user"])
        return True

    def m_op_intercept(self, ctx: dict, p: dict) -> Any:
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        try:
            chat = self._access(ctx, p)
        except RestError:
            raise RestError(400, "OPERATOR_WRONG", "You can not redirect to this operator") from None
        owner, uid = chat["owner"], ctx["user"]
        if owner > 0 and owner != uid and self._session(chat):
            chat["members"].pop(owner, None)
            self._answer(chat, uid)
            self._note(chat, "#USER_1# took conversation from #USER_2#", USER_1=uid, USER_2=owner)
        return True              # in the queue, unanswered, already yours: nothing happens

    # -- closing -------------------------------------------------------------------------
    def _close(self, ctx: dict, chat: dict, *, status: int = SESSION_CLOSED) -> None:
        if not self._session(chat):
            raise RestError(400, "NOT_LOAD_SESSION_OR_CHAT", "Failed to load session or chat")
        if chat["owner"] <= 0:
            self._answer(chat, ctx["user"])   # nobody answered yet: the caller answers first
        session_id = chat["session_id"]
        self.close_session(chat["id"])
        if status != SESSION_CLOSED:
            self.sessions[session_id]["status"] = status

    def m_op_finish(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        session = self._session(chat)
        if session and session["operator"] and session["operator"] != ctx["user"]:
            raise RestError(400, "ERROR_USER_NOT_OPERATOR", NOT_YOURS)
        self._close(ctx, chat)
        return True

    def m_op_another_finish(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        session = self._session(chat)
        if session and session["operator"] and session["operator"] != ctx["user"]:
            self._note(chat, "#USER# ended current conversation", USER=ctx["user"])
        self._close(ctx, chat)
        return True

    def m_op_spam(self, ctx: dict, p: dict) -> Any:
        chat = self._access(ctx, p)
        if self._session(chat):
            self._note(chat, "#USER# marked the current conversation as spam", USER=ctx["user"])
            self._close(ctx, chat, status=SESSION_SPAM)
        return True

    # -- passing it on ------------------------------------------------------------------
    def m_op_transfer(self, ctx: dict, p: dict) -> Any:
        """To ``queue<lineId>`` (the session waits again, operators leave) or to a user (who answers at
        once).  Every failure past the empty checks is ``OPERATOR_WRONG``."""
        if p.get("CHAT_ID") in (None, ""):
            raise RestError(400, "CHAT_ID_EMPTY", "Chat ID can't be empty")
        target = p.get("TRANSFER_ID")
        if target in (None, ""):
            if "USER_ID" in p and p["USER_ID"] in (None, ""):
                raise RestError(400, "USER_ID_EMPTY", "User ID can't be empty")
            if "QUEUE_ID" in p and p["QUEUE_ID"] in (None, ""):
                raise RestError(400, "QUEUE_ID_EMPTY", "Queue ID can't be empty")
            target = p.get("USER_ID") or ("queue%s" % p["QUEUE_ID"] if p.get("QUEUE_ID") else None)
        if target in (None, ""):
            raise RestError(400, "TRANSFER_ID_EMPTY", "Transfer ID can't be empty")
        wrong = RestError(400, "OPERATOR_WRONG", "You can not redirect to this operator")
        try:
            chat = self._access(ctx, p)
        except RestError:
            raise wrong from None
        session = self._session(chat)
        if not session:
            raise wrong
        uid = ctx["user"]
        m = re.fullmatch(r"queue(\d+)", str(target))
        if m:
            line = self.lines.get(int(m.group(1)))
            if not line:
                raise wrong
            same = line["id"] == chat["line_id"]
            for other in [u for u in chat["members"] if u != chat["customer_id"]]:
                del chat["members"][other]
            chat["owner"] = 0
            chat["line_id"] = session["line_id"] = line["id"]
            session.update(status=SESSION_NEW, operator=0)
            session.pop("bot", None)
            chat["offered_to"] = (line["queue"] or [None])[0] if line.get("offer") == "one" else None
            chat["offered_at"] = self.clock()
            if same:
                self._note(chat, "#USER# rejected conversation", USER=uid)
            self._post(chat, 0, "Enquiry has been resubmitted to the queue.", system=True)
            return True
        to = _int_param(target, 0) or 0
        user = self.users.get(to)
        if not user or not user["active"] or user["kind"] != "employee" or to == uid:
            raise wrong
        chat["members"].pop(uid, None)
        self._answer(chat, to)
        session["status"] = max(session["status"], SESSION_ANSWERED)
        self._note(chat, "#USER_FROM# transfered conversation to #USER_TO#", USER_FROM=uid, USER_TO=to)
        return True
