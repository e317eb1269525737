"""Did the customer get it: the verdict the portal gives each sent message, and the WhatsApp 24-hour window.

A send returns a message id even when WhatsApp never gets the message; the fate shows later, in the
message's params and in a system message that follows it (fact sheet §13):

* **delivered** -- ``SENDING`` cleared and the connector's ``CONNECTOR_MID`` present;
* **failed** -- ``IS_DELIVERED:"N"`` (the connector said so; its reason is in the system message that
  follows), or ``SENDING`` stuck with an "Error sending message" notice (refused before the hand-off:
  the window was closed, the customer opted out);
* **unconfirmed** -- still ``SENDING`` after ``B24_DELIVERY_WAIT_SEC`` (300 s, the portal's own rule),
  or the portal's own "not delivered ... still waiting" notice;
* **sent** -- the chat's connector reports no delivery (live chat, a private or group chat).

:class:`DeliveryWatch` follows many sent messages at once for one program, with at most one ``batch``
read per call for every dialog with sends in flight, and none when there are none.  :func:`window_of`
reads the reply window from a chat's ``entity_data_1`` (fields 9 and 10, §6.1 and §13.4).
"""
from __future__ import annotations

__all__ = ["DELIVERED", "SENT", "FAILED", "REFUSED", "UNCONFIRMED", "NO_REPORTS", "WINDOW_SEC", "Verdict",
           "Window", "window_of", "judge", "DeliveryWatch", "reports_delivery"]

import re
import time
from typing import Any, Collection, Mapping, NamedTuple

import b24common as bc

DELIVERED, SENT, FAILED, REFUSED, UNCONFIRMED = "delivered", "sent", "failed", "refused", "unconfirmed"
NO_REPORTS = ("livechat",)          # connectors that report no delivery (§13)
WINDOW_SEC = {"whatsappbyedna": 86400, "whatsappbytwilio": 86400}   # connectors with a reply window (§13.4)
_DASHES = re.compile(r"-{5,}")


class Verdict(NamedTuple):
    dialog_id: str
    message_id: int
    status: str                     # delivered | sent | failed | refused | unconfirmed
    reason: str = ""

    def describe(self) -> str:
        """One line for a person: ``delivered``, ``not delivered: <reason>``, ``unconfirmed after N s``."""
        if self.status == FAILED or self.status == REFUSED:
            return "not delivered: %s" % (self.reason or "the connector reported an error")
        if self.status == UNCONFIRMED:
            return ("unconfirmed " if self.reason.startswith("after") else "unconfirmed: ") + self.reason
        return self.status


class Window(NamedTuple):
    """The reply window of a chat: ``closes_at`` (Unix seconds, 0: no window) and why it is set."""

    closes_at: float = 0.0
    reason: str = ""                # DEFAULT (24 h after the customer's last message) | USER (opted out)

    def closed(self, now: float | None = None) -> bool:
        return bool(self.closes_at) and self.closes_at < (time.time() if now is None else now)

    def why(self) -> str:
        return "the customer opted out" if self.reason.upper() == "USER" else "expired"

    def describe(self, now: float | None = None) -> str:
        """"window closes in 3 h 10 min" / "window closed -- the customer must write first" / ""."""
        if not self.closes_at:
            return ""
        now = time.time() if now is None else now
        if self.closed(now):
            return "window closed (%s) -- the customer must write first" % self.why()
        left = int(self.closes_at - now) // 60
        return "window closes in %s" % ("%d h %d min" % divmod(left, 60) if left >= 60 else "%d min" % left)


def window_of(chat: Mapping) -> Window:
    """The reply window from ``im.dialog.get``'s chat object (``entity_data_1`` fields 9 and 10)."""
    fields = (str(chat.get("entity_data_1") or "").split("|") + [""] * 10)[:10]
    return Window(float(bc.as_int(fields[8])), fields[9] if fields[9] not in ("0",) else "")


def reports_delivery(connector: str) -> bool:
    """Does a chat on this connector get delivery marks (an Open Lines connector other than live chat)?"""
    return bool(connector) and connector not in NO_REPORTS


def _yes(value: Any) -> bool:
    return value is True or str(value).upper() in ("Y", "TRUE", "1")


def _provider_text(text: str) -> str:
    """The provider's reason inside a "could not be delivered" notice (between dashed lines), else ""."""
    plain = bc.bbcode_to_text(text)
    parts = [p.strip() for p in _DASHES.split(plain)]
    return parts[1] if len(parts) >= 3 and parts[1] else ""


def judge(msg: Mapping, notices: list, *, age: float, wait: float, dialog_id: str = "") -> Verdict | None:
    """The verdict on one sent message, from its params and the system messages after it (*notices*,
    oldest first); None while it is still in flight.  *age*: seconds since it was sent."""
    params = bc.as_map(msg.get("params"))
    mid = bc.as_int(msg.get("id"))
    texts = [str(n.get("text") or "") for n in notices]
    if "IS_DELIVERED" in params and not _yes(params.get("IS_DELIVERED")):
        reason = next((_provider_text(t) for t in texts if _provider_text(t)), "")
        return Verdict(dialog_id, mid, FAILED, reason or "the connector reported an error")
    if params.get("CONNECTOR_MID") and not _yes(params.get("SENDING")):
        return Verdict(dialog_id, mid, DELIVERED)
    if _yes(params.get("SENDING")):
        if any(t.strip().lower().startswith("error sending message") for t in texts):
            return Verdict(dialog_id, mid, REFUSED, "refused before it reached WhatsApp (the 24-hour window "
                                                     "was closed, or the customer opted out)")
        if any("not delivered" in t.lower() and "waiting" in t.lower() for t in texts):
            return Verdict(dialog_id, mid, UNCONFIRMED, "the portal says the customer is still waiting for it")
        if age >= wait:
            return Verdict(dialog_id, mid, UNCONFIRMED, "after %.0f s" % age)
    elif age >= wait:                     # never handed off (a silent chat, a connector without marks)
        return Verdict(dialog_id, mid, UNCONFIRMED, "after %.0f s" % age)
    return None


class DeliveryWatch:
    """Sent messages followed until the portal settles them.  :meth:`add` after a send, :meth:`check`
    once a poll cycle (one ``batch`` for up to 50 dialogs with sends in flight, none when there are none)."""

    def __init__(self, client: bc.Client, wait: float | None = None, clock: Any = time.monotonic):
        self.client = client
        self.wait = client.config.delivery_wait if wait is None else wait
        self.clock = clock
        self.pending: dict = {}          # message id -> (dialog id, monotonic time sent)

    def add(self, dialog_id: str, message_id: int, at: float | None = None) -> None:
        """Follow *message_id* (sent at *at* on this watch's clock; now if not given)."""
        self.pending[int(message_id)] = (dialog_id, self.clock() if at is None else at)

    def busy(self) -> bool:
        return bool(self.pending)

    def check(self, younger: float = 0.0, also: Collection = ()) -> list:
        """The verdicts that came in since the last call (each message's once).  Dialogs whose messages
        were all sent less than *younger* seconds ago are left for now (a read due anyway judges them),
        except those in *also*.
        Each batch's answer is judged and let go before the next is asked for: with hundreds of dialogs
        in flight, only one answer is held at a time."""
        if not self.pending:
            return []
        by_dialog: dict = {}                 # dialog -> [(message id, sent at)]
        for mid, (dialog, at) in self.pending.items():
            by_dialog.setdefault(dialog, []).append((mid, at))
        if younger > 0:
            now = self.clock()
            by_dialog = {d: sent for d, sent in by_dialog.items()
                         if d in also or now - min(at for _m, at in sent) >= younger}
        dialogs = sorted(by_dialog, key=lambda d: min(by_dialog[d]))      # the longest waiting first
        out = []
        for start in range(0, len(dialogs), bc.BATCH_MAX):      # one batch per 50 dialogs in flight
            out.extend(self._judge_batch(dialogs[start:start + bc.BATCH_MAX], by_dialog))
        return out

    def _judge_batch(self, chunk: list, by_dialog: Mapping) -> list:
        """One ``batch`` read of the dialogs in *chunk* from their first message in flight; the verdicts."""
        res = self.client.batch({"d%d" % i: ("im.dialog.messages.get", {
            "DIALOG_ID": d, "FIRST_ID": min(by_dialog[d])[0] - 1, "LIMIT": bc.MESSAGES_PAGE})
            for i, d in enumerate(chunk)})
        now = self.clock()
        out = []
        for i, dialog in enumerate(chunk):
            msgs = sorted(bc.messages_of(res.results.get("d%d" % i))[0], key=lambda m: bc.as_int(m.get("id")))
            by_id = {bc.as_int(m.get("id")): m for m in msgs}
            for mid, sent_at in by_dialog[dialog]:
                if mid not in by_id:
                    continue
                notices = [m for m in msgs if bc.as_int(m.get("id")) > mid and not bc.as_int(m.get("author_id"))]
                verdict = judge(by_id[mid], notices, age=now - sent_at, wait=self.wait, dialog_id=dialog)
                if verdict is not None:
                    del self.pending[mid]
                    out.append(verdict)
        return out
