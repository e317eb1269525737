"""What an operator does with an Open Lines conversation -- take, skip, transfer, close, spam, intercept, join --
as one call each, with a one-line confirmation or a refusal in the portal's own words (fact sheet §16)."""
from __future__ import annotations

__all__ = ["ACTIONS", "parse_action", "perform", "USAGE"]

import re

import b24common as bc

# action -> (method, what it did); close picks finish or another.finish, transfer takes a target
ACTIONS = {
    "answer": ("imopenlines.operator.answer", "you took the conversation"),
    "skip": ("imopenlines.operator.skip", "you skipped it: it goes to the next operator in the queue"),
    "close": ("imopenlines.operator.finish", "the conversation is closed"),
    "spam": ("imopenlines.operator.spam", "marked as spam: the conversation is closed"),
    "intercept": ("imopenlines.session.intercept", "you took the conversation over"),
    "join": ("imopenlines.session.join", "you joined the conversation (its operator stays)"),
    "transfer": ("imopenlines.operator.transfer", "transferred to %s"),
}
USAGE = "answer, skip, close, spam, intercept, join, transfer=USER_ID or transfer=queueN"


def parse_action(text: str, what: str = "--session") -> tuple:
    """``"transfer=queue3"`` -> ``("transfer", "queue3")``; ``"close"`` -> ``("close", "")``; a
    :class:`b24common.UsageError` naming *what* otherwise."""
    name, _, target = str(text or "").strip().partition("=")
    name, target = name.strip().lower(), target.strip().lower()
    if name == "take":
        name = "answer"
    if name not in ACTIONS:
        raise bc.UsageError("%s %s: expected one of %s" % (what, text, USAGE))
    if name == "transfer":
        if not re.fullmatch(r"queue[1-9]\d*|[1-9]\d*", target):
            raise bc.UsageError("%s %s: transfer to whom? transfer=USER_ID (a number) or transfer=queueN "
                                "(the queue of Open Line N)" % (what, text))
    elif target:
        raise bc.UsageError("%s %s: %s takes no value" % (what, text, name))
    return name, target


def _refused(dialog_id: str, name: str, exc: bc.APIError) -> bc.B24Error:
    shown = bc.display_dialog_id(dialog_id)
    if not exc.code and not exc.description:
        why = "the portal refused without a reason (already yours, someone else is taking it, or no open session)"
    else:
        why = "%s (%s)" % (exc.description or exc.code, exc.code) if exc.code else exc.description
    err = bc.B24Error("%s: %s refused: %s" % (shown, name, why))
    err.exit_code = exc.exit_code
    return err


def perform(client: bc.Client, dialog_id: str, name: str, target: str = "") -> str:
    """Do *name* (with *target* for a transfer) on the dialog's session; the confirmation line."""
    if not dialog_id.startswith("chat"):
        raise bc.UsageError("%s: session actions work on Open Lines chats (chatN)" % bc.display_dialog_id(dialog_id))
    chat_id = int(dialog_id[4:])
    method, done = ACTIONS[name]
    params: dict = {"CHAT_ID": chat_id}
    if name == "transfer":
        params["TRANSFER_ID"] = target
        done = done % ("the queue of line %s" % target[5:] if target.startswith("queue") else "user %s" % target)
    try:
        try:
            client.call(method, params, write=True)
        except bc.APIError as exc:
            if name != "close" or exc.code != "ERROR_USER_NOT_OPERATOR":
                raise
            # not its operator: closing someone else's conversation, where the permissions allow it
            client.call("imopenlines.operator.another.finish", params, write=True)
    except bc.APIError as exc:
        raise _refused(dialog_id, name, exc) from None
    return "%s: %s" % (bc.display_dialog_id(dialog_id), done)
