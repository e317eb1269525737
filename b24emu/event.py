"""``event.*`` and the events the portal POSTs to handler URLs (fact sheet §12).

``event.bind`` & co. refuse webhooks (403 ``WRONG_AUTH_TYPE``); a webhook user
gets pushed events only through an *outgoing webhook* made in the UI (here:
:meth:`EventMethods.outgoing_webhook`, a control action) or a chat bot
(``imbot.py``).  Deliveries go through a queue server: a little late, form
encoded with PHP bracket keys, ``auth[...]`` beside ``data``, **no retries**,
and some lost on purpose when ``behave(drop_push=N)`` says so.
"""
from __future__ import annotations

import queue
import secrets
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

from .world import WEBHOOK_USER_ID, RestError

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through a proxy
OUTGOING_EVENTS = ("ONOPENLINEMESSAGEADD", "ONSESSIONSTART", "ONSESSIONFINISH")


def php_encode(data: Any, prefix: str = "") -> list:
    """``{"data": {"A": [1]}}`` -> ``[("data[A][0]", "1")]``: how PHP posts nested arrays."""
    pairs: list = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        name = "%s[%s]" % (prefix, key) if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            pairs.extend(php_encode(value if not isinstance(value, tuple) else list(value), name))
        elif isinstance(value, bool):
            pairs.append((name, "Y" if value else "N"))
        else:
            pairs.append((name, "" if value is None else str(value)))
    return pairs


class EventMethods:
    """``event.*`` (refused to webhooks), outgoing webhooks, and the queue server that delivers."""

    METHODS = {
        "event.bind": ("m_event_bind", None, False),
        "event.get": ("m_event_get", None, False),
        "event.unbind": ("m_event_unbind", None, False),
        "events": ("m_events", None, False),
        "placement.bind": ("m_placement_bind", None, False),
    }

    def attach(self) -> None:
        self.handlers: dict = {}          # handler id -> {"url", "events", "token"}
        self.next_handler_id = 970
        self.member_id = secrets.token_hex(16)
        self.deliveries: dict = {"sent": 0, "failed": 0, "dropped": 0}
        self._outbox: queue.Queue = queue.Queue()
        self._sender: threading.Thread | None = None
        self.hooks.append(self._outgoing_hook)

    def m_event_bind(self, ctx: dict, p: dict) -> Any:
        raise RestError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    m_event_get = m_event_unbind = m_events = m_placement_bind = m_event_bind

    # -- outgoing webhooks (made in the UI; here a control action) -------------------
    def outgoing_webhook(self, url: str, events: list | None = None) -> dict:
        """Create an outgoing webhook: *url* gets the chosen events; returns its application token."""
        with self.lock:
            events = [str(e).upper() for e in (events or OUTGOING_EVENTS)]
            unknown = [e for e in events if e not in OUTGOING_EVENTS]
            if unknown:
                raise RestError(400, "WRONG_EVENT", "not offered for outgoing webhooks: " + ", ".join(unknown))
            self.next_handler_id += 1
            token = secrets.token_hex(16)
            self.handlers[self.next_handler_id] = {"url": url, "events": events, "token": token}
            return {"id": self.next_handler_id, "application_token": token}

    def drop_outgoing_webhook(self, handler_id: int) -> dict:
        with self.lock:
            return {"removed": self.handlers.pop(int(handler_id), None) is not None}

    def _auth_block(self, token: str) -> dict:
        host = urllib.parse.urlsplit(self.public_url).netloc
        return {"domain": host, "client_endpoint": "%s/rest/" % self.public_url,
                "server_endpoint": "https://oauth.example.invalid/rest/", "member_id": self.member_id,
                "application_token": token}

    def _outgoing_hook(self, kind: str, chat: dict, info: dict) -> None:
        if chat["type"] != "lines" or not self.handlers:
            return
        line = self.lines.get(chat["line_id"]) or {}
        ext = chat["entity_id"].split("|")[2] if chat["entity_id"].count("|") >= 3 else ""
        if kind == "message":
            msg = info["msg"]
            if msg["author_id"] == chat["customer_id"]:
                # inbound: the connector's view -- no IM chat id (fact sheet §12)
                data = {"DATA": {"connector": {"connector_id": line.get("connector", ""), "line_id": chat["line_id"],
                                               "chat_id": ext, "user_id": chat["customer_id"]},
                                 "chat": {"id": ext},
                                 "message": {"id": (msg["params"].get("CONNECTOR_MID") or [""])[0]
                                             if isinstance(msg["params"], dict) else "",
                                             "date": int(msg["date"]), "text": msg["text"]}}}
            elif msg["author_id"]:
                # outbound (an operator or the API wrote): IM ids
                data = {"CONNECTOR": line.get("connector", ""), "LINE": chat["line_id"],
                        "DATA": {"message": {"id": msg["id"], "chat_id": chat["id"], "user_id": msg["author_id"],
                                             "text": msg["text"]}}}
            else:
                return
            self._queue_event("ONOPENLINEMESSAGEADD", data)
        elif kind in ("session_start", "session_finish"):
            # the IM chat id in both places (fact sheet §12: prepareEventsParams)
            data = {"DATA": {"connector": {"connector_id": line.get("connector", ""), "line_id": chat["line_id"],
                                           "chat_id": chat["id"], "user_id": chat["customer_id"]},
                             "chat": {"chat_id": chat["id"]},
                             "line": {"id": chat["line_id"], "name": line.get("name", "")}}}
            self._queue_event("ONSESSIONSTART" if kind == "session_start" else "ONSESSIONFINISH", data)

    def _queue_event(self, event: str, data: dict) -> None:
        for hid, h in self.handlers.items():
            if event in h["events"]:
                self._deliver(h["url"], event, hid, data, self._auth_block(h["token"]))

    # -- the queue server -------------------------------------------------------------
    def _deliver(self, url: str, event: str, handler_id: int, data: dict, auth: dict) -> None:
        """Queue one POST (called under the portal lock; the sending happens in another thread)."""
        if self.drop_push > 0:
            self.drop_push -= 1
            self.deliveries["dropped"] += 1
            return
        body = {"event": event, "event_handler_id": handler_id, "data": data, "ts": int(self.clock()),
                "auth": auth}
        self._outbox.put((time.monotonic() + self.push_delay, url, urllib.parse.urlencode(php_encode(body))))
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="portal-push", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while True:
            due, url, body = self._outbox.get()
            time.sleep(max(0.0, due - time.monotonic()))
            req = urllib.request.Request(url, data=body.encode("utf-8"), method="POST", headers={
                "Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Bitrix24 Webhook Engine"})
            try:
                with _DIRECT.open(req, timeout=5) as resp:
                    resp.read()
                ok = True
            except Exception:  # noqa: BLE001 - no retries, whatever went wrong (fact sheet §12)
                ok = False
            with self.lock:
                self.deliveries["sent" if ok else "failed"] += 1

    def push_stats(self) -> dict:
        with self.lock:
            return dict(self.deliveries, handlers=len(self.handlers), user=WEBHOOK_USER_ID)
