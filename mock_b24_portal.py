#!/usr/bin/env python3
"""A local Bitrix24 portal emulator for the Open Lines toolkit (stdlib only).

It speaks the REST API of ``docs/bitrix24-api.md`` (our fact sheet of the
real portal) on 127.0.0.1 -- shapes, ordering, errors, both rate limits --
over a small world: an operator who owns the webhook, other operators, a bot,
WhatsApp customers (connector users), several Open Lines with queues, LINES
chats with sessions, an ordinary group chat and a private dialog.

As a script::

    python3 mock_b24_portal.py [--port 0] [--simulate] [--dialogs N]

prints ``B24_WEBHOOK_BASE=<url>`` on its first line of stdout, then serves
until killed.  ``--simulate`` makes customers write every few seconds.

A control API (never under ``/rest/``) drives the world over HTTP, under
``/_control/``; every endpoint maps to a :class:`Portal` method of the same
name, usable directly from Python::

    POST /_control/customer_message   {"chat_id": 1771, "text": "hi"}
    POST /_control/new_conversation   {"line_id": 3, "name": "A", "phone": "+10000000199", "text": "hi"}
    POST /_control/join | /_control/leave   {"chat_id": 1771, "user_id": 7}
    POST /_control/operator_message   {"chat_id": 1771, "user_id": 9, "text": "..."}
    POST /_control/close_session      {"chat_id": 1771}
    GET  /_control/messages?chat_id=1771
    GET  /_control/stats              per-method counts, bytes, request log
    POST /_control/reset_stats
    POST /_control/fault              {"kind": "http500", "count": 2, "method": "im.recent.list"}
    POST /_control/limits             {"rate": 2, "burst": 50, "operating_limit": 420, ...}
    POST /_control/webhook            {"scopes": ["im"], "active": true}
    POST /_control/add_dialogs        {"count": 1000}
    GET  /_control/world
    POST /_control/customer_media     {"chat_id": 1771, "kind": "image", "name": "a.jpg", "size": 1000, "caption": ""}
    POST /_control/pin                {"chat_id": 1771, "user_id": 7, "pinned": true}
    POST /_control/add_line           {"line_id": 8, "name": "Strict", "queue": [9, 7], "offer": "one"}
    POST /_control/offer              {"chat_id": 1771, "user_id": 7}
    POST /_control/behave             {"row_lag": 1.5, "uuid_ttl": 3600, "message_add_delay": 2, "fail_after_uuid": 1}
    POST /_control/forget_uuids
    POST /_control/behave             {"drop_events": 2, "drop_push": 1, "push_delay": 0.05}
    POST /_control/outgoing_webhook   {"url": "http://127.0.0.1:8089/", "events": ["ONOPENLINEMESSAGEADD"]}
                                      -> {"id": 971, "application_token": "..."}  (as made in the UI)
    POST /_control/line_bot           {"line_id": 3, "bot_id": 2051, "time": 600}   (the line's chat bot, as in
                                      its settings; imopenlines.config.update does the same over REST)
    POST /_control/permissions        {"user_id": 7, "lines_modify": false, "admin": false}
    GET  /_control/typing             the "typing..." indications bots sent
    GET  /_control/push_stats         POST deliveries sent / failed / dropped
    POST /_control/delivery           {"chat_id": 1771, "mode": "fail", "reason": "..."}  (deliver | fail | stuck;
                                      "delay": connector answer time, "timeout": the 300 s rule)
    POST /_control/window             {"chat_id": 1771, "close": true, "reason": "expired"}  (or "opted_out")
    POST /_control/delete_message     {"message_id": 88213}      (the customer deleted it)
    POST /_control/edit_message       {"message_id": 88213, "text": "..."}

The code is laid out like the portal it imitates: ``b24emu/world.py`` is
the world, and each REST namespace has its own module there (``im_recent``,
``im_dialog``, ``im_message``, ``imopenlines``, ``imbot``, ``im_v2_event``,
``event``, ``batch``).
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from b24emu import Portal
from b24emu.batch import batch_commands, split_query
from b24emu.world import HTML_ERROR_PAGE, WEBHOOK_USER_ID, RestError, php_parse, phpify  # noqa: F401 (re-exported)

__all__ = ["Portal", "PortalServer", "RestError", "serve", "php_parse"]


# ===========================================================================
# HTTP server
# ===========================================================================

_CONTROL = {  # endpoint -> (Portal method, HTTP verbs)
    "customer_message": "customer_message", "new_conversation": "new_conversation",
    "join": "join", "leave": "leave", "operator_message": "operator_message",
    "close_session": "close_session", "messages": "chat_messages", "stats": "stats",
    "reset_stats": "reset_stats", "fault": "fault", "clear_faults": "clear_faults",
    "limits": "set_limits", "webhook": "set_webhook", "add_dialogs": "add_dialogs", "world": "world",
    "offer": "offer", "pin": "pin", "customer_media": "customer_media", "behave": "behave",
    "add_line": "add_line", "forget_uuids": "forget_uuids",
    "outgoing_webhook": "outgoing_webhook", "drop_outgoing_webhook": "drop_outgoing_webhook",
    "line_bot": "line_bot", "push_stats": "push_stats", "permissions": "permissions", "typing": "typing_shown",
    "delivery": "delivery", "window": "window", "delete_message": "delete_message", "edit_message": "edit_message",
}


def batch_calls(params: dict) -> list:
    """The sub-methods of a ``batch`` request, in order (for the request log)."""
    return [split_query(q)[0] for q in batch_commands(params).values() if isinstance(q, str)]


class _Handler(BaseHTTPRequestHandler):
    server_version = "BitrixEmulator/1.0"
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; the portal keeps its own log
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json; charset=utf-8",
              declared: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _params(self, query: str, body: bytes) -> dict:
        params = php_parse(urllib.parse.parse_qsl(query, keep_blank_values=True))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body:
            if ctype == "application/json":
                try:
                    data = json.loads(body.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    data = {}     # the real portal silently treats a broken JSON body as "no parameters"
                if isinstance(data, dict):
                    params.update(data)
            elif ctype in ("application/x-www-form-urlencoded", ""):
                params.update(php_parse(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                                               keep_blank_values=True)))
        return params

    def _dispatch(self) -> None:
        portal: Portal = self.server.portal  # type: ignore[attr-defined]
        parts = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        if parts.path.startswith("/_control/"):
            self._control(portal, parts, body)
            return
        if parts.path == "/rest/download.json":          # im.v2.File.download's link
            data = portal.download(dict(urllib.parse.parse_qsl(parts.query)).get("token", ""))
            if data is None:
                self._send(404, b'{"error": "FILE_NOT_FOUND"}')
            else:
                self._send(200, data, "application/octet-stream")
            return
        m = re.fullmatch(r"/rest/(?:(\d+)/([^/]+)/)?([^/]+?)/?", parts.path)
        if not m:
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
            return
        user, code, method = m.group(1), m.group(2), m.group(3).lower()
        if user is None and method.isdigit():
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
            return
        name = method[:-5] if method.endswith(".json") else method
        fault = portal.take_fault(name)
        if fault:
            if fault["kind"] == "latency":
                time.sleep(fault["seconds"])
            elif self._apply_fault(portal, fault, name):
                return
        params = self._params(parts.query, body)
        status, payload = portal.handle_rest(user, code, method, params, self.client_address[0])
        calls = batch_calls(params) if name == "batch" else None
        if fault and fault["kind"] == "drop_after":
            portal.record(name, 0, 0, "drop_after", calls)
            self.close_connection = True
            return
        raw = json.dumps(phpify(payload), ensure_ascii=False).encode("utf-8")
        # counted before the answer leaves, so a client that got it sees it counted
        portal.record(name, status, len(raw), str(payload.get("error", "")) if status != 200 else "", calls)
        self._send(status, raw)

    def _apply_fault(self, portal: Portal, fault: dict, name: str) -> bool:
        kind = fault["kind"]
        if kind == "drop_after":
            return False
        portal.record(name, 0, 0, kind)
        if kind == "http500":
            self._send(500, json.dumps({"error": "INTERNAL_SERVER_ERROR",
                                        "error_description": "Internal server error"}).encode())
        elif kind == "http502":
            self._send(502, HTML_ERROR_PAGE, "text/html")
        elif kind == "http400":
            self._send(400, json.dumps({"error": "ERROR_ARGUMENT",
                                        "error_description": "Argument error"}).encode())
        elif kind == "http503":
            self._send(503, json.dumps({"error": "QUERY_LIMIT_EXCEEDED",
                                        "error_description": "Too many requests"}).encode())
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Portal maintenance</body></html>", "text/html")
        elif kind == "malformed":
            self._send(200, b'{"result": {"items": [', "application/json")
        elif kind == "truncated":
            full = b'{"result": {"items": [], "hasMore": false}, "time": {"start": 1}}'
            self._send(200, full[:20], declared=len(full))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def _control(self, portal: Portal, parts: urllib.parse.SplitResult, body: bytes) -> None:
        name = parts.path[len("/_control/"):].strip("/")
        target = _CONTROL.get(name)
        if not target:
            self._send(404, json.dumps({"error": "unknown control endpoint %r" % name}).encode())
            return
        args: dict = {k: v for k, v in urllib.parse.parse_qsl(parts.query)}
        if body:
            try:
                data = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                self._send(400, b'{"error": "control body must be JSON"}')
                return
            if isinstance(data, dict):
                args.update(data)
        for key in ("chat_id", "user_id", "line_id", "count"):
            if key in args and isinstance(args[key], str) and args[key].isdigit():
                args[key] = int(args[key])
        try:
            result = getattr(portal, target)(**args)
        except RestError as exc:
            self._send(exc.status, json.dumps(exc.body()).encode())
            return
        except TypeError as exc:
            self._send(400, json.dumps({"error": "bad arguments: %s" % exc}).encode())
            return
        self._send(200, json.dumps({"result": result}, ensure_ascii=False).encode("utf-8"))


class PortalServer(ThreadingHTTPServer):
    """The emulator's HTTP server on 127.0.0.1; ``.portal`` is the :class:`Portal`."""

    daemon_threads = True
    request_queue_size = 128   # not 5: a bridge's threads, scripts and a test connect at once (see BotServer)
    allow_reuse_address = True

    def __init__(self, portal: Portal | None = None, port: int = 0):
        self.portal = portal or Portal()
        super().__init__(("127.0.0.1", port), _Handler)
        self.portal.public_url = self.url
        self._thread: threading.Thread | None = None
        self._sim_stop = threading.Event()

    def handle_error(self, request, client_address) -> None:  # a client gave up mid-reply: fine
        pass

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    @property
    def webhook_base(self) -> str:
        return "%s/rest/%d/%s/" % (self.url, WEBHOOK_USER_ID, self.portal.code)

    def start(self) -> PortalServer:
        """Serve in a background thread (for tests and demos)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="mock-b24-portal", daemon=True)
        self._thread.start()
        return self

    def start_simulation(self, interval: float = 4.0) -> None:
        threading.Thread(target=self.portal.simulate, args=(self._sim_stop, interval),
                         name="mock-b24-simulate", daemon=True).start()

    def stop(self) -> None:
        self._sim_stop.set()
        self.shutdown()
        self.server_close()


def serve(port: int = 0, simulate: bool = False, interval: float = 4.0, dialogs: int = 0,
          code: str | None = None) -> PortalServer:
    server = PortalServer(Portal(code=code), port)
    if dialogs:
        server.portal.add_dialogs(dialogs)
    server.start()
    if simulate:
        server.start_simulation(interval)
    return server


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mock_b24_portal.py",
        description="A local Bitrix24 portal emulator on 127.0.0.1 for the Open Lines toolkit.",
        epilog="Example: python3 mock_b24_portal.py --simulate  (then paste the printed "
               "B24_WEBHOOK_BASE line into .env or export it)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--simulate", action="store_true", help="customers write every few seconds")
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between simulated messages")
    parser.add_argument("--dialogs", type=int, default=0, help="add N more Open Lines dialogs")
    parser.add_argument("--code", help="webhook code to accept (default: a random one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port: expected 0..65535")
    if args.interval <= 0:
        parser.error("--interval: expected a positive number of seconds")
    if args.code is not None and not re.fullmatch(r"[A-Za-z0-9_]{4,64}", args.code):
        parser.error("--code: expected 4 to 64 letters or digits")
    try:
        server = serve(args.port, args.simulate, args.interval, max(0, args.dialogs), args.code)
    except OSError as exc:
        sys.stderr.write("mock_b24_portal.py: error: cannot listen on 127.0.0.1:%d (%s)\n"
                         % (args.port, exc.strerror or exc))
        return 1
    print("B24_WEBHOOK_BASE=%s" % server.webhook_base, flush=True)
    sys.stderr.write("mock portal on %s (control API under %s/_control/)%s; Ctrl-C to stop\n"
                     % (server.url, server.url, ", simulating customers" if args.simulate else ""))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
