#!/usr/bin/env python3
"""A local stand-in for your bot, for end-to-end checks of b24_ol_bridge.py (stdlib only).

It answers every POSTed message with ``Echo: <text>`` in the reply shape you
choose -- optionally slowly, failing now and then, in several messages,
handing over to a person, only with the right Authorization header, or only
with a valid ``BOT_HTTP_SECRET`` signature::

    python3 mock_bot_server.py [--port 0] [--shape reply_text] [--delay 0] [--token T]
                               [--fail-rate 0.2] [--multi 3] [--handoff human] [--secret S] [--log-json]
                               [--file-word catalog]

The first line on stdout is ``BOT_HTTP_URL=<url>``.  Importable too:
:class:`BotServer` keeps every request it got in ``.received``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from olbridge.bot import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

SHAPES = ("reply_text", "response", "text", "message", "replies", "messages", "rasa", "string", "none")
PATH = "/webhook/whatsapp"


def shaped(texts: list, shape: str) -> Any:
    """The reply *texts* in one of the shapes bots use."""
    if shape in ("reply_text", "response", "text", "message"):
        return {shape: "\n".join(texts)}
    if shape in ("replies", "messages"):
        return {shape: texts}
    if shape == "rasa":
        return [{"recipient_id": "customer", "text": t} for t in texts]
    if shape == "string":
        return "\n".join(texts)
    return {}


class BotServer(ThreadingHTTPServer):
    """The mock bot on 127.0.0.1.  Behaviour can be changed while it runs:

    ``shape``, ``delay`` (seconds, or a dict text -> seconds), ``token``,
    ``fail_next`` (answer the next N requests with HTTP 500), ``replies``
    (a function text -> list of reply texts).
    """

    daemon_threads = True
    # many clients connect at once (a bridge asks for eight dialogs side by side): the default backlog
    # of 5 drops the rest of a burst's connections, and the kernel tries them again only after a second
    request_queue_size = 128

    def __init__(self, port: int = 0, shape: str = "reply_text", delay: float = 0.0, token: str = ""):
        super().__init__(("127.0.0.1", port), _Handler)
        self.shape, self.delay, self.token = shape, delay, token
        self.fail_next = 0
        self.replies = lambda text: ["Echo: %s" % text]
        self.raw = None          # text -> (status, content type, body bytes): any answer at all
        self.trickle = 0.0       # seconds between the bytes of the answer (a bot that trickles)
        self.fail_rate = 0.0     # share of requests answered with HTTP 500 at random
        self.multi = 1           # replies per message
        self.handoff_word = ""   # a message containing it is handed over to a person
        self.file_word = ""      # a message containing it is answered with a file (served at /files/...)
        self.files = {"catalog.pdf": b"%PDF-1.4\n% a sample catalog\n"}   # GET /files/NAME serves these
        self.file_gets: list = []    # (path, Authorization header) of each file fetched
        self.secret = ""         # verify X-B24-Signature / X-B24-Timestamp (401 otherwise)
        self.log_json = False    # print one JSON line per payload on stdout
        self.rng = random.Random(1)
        self.received: list = []     # a benchmark may put a bounded deque here; .count counts them all
        self.count = 0
        self.rejected: list = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client that gave up: fine
        pass

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d%s" % (self.server_address[1], PATH)

    def start(self) -> BotServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                         name="mock-bot").start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: BotServer

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any) -> None:
        raw = b"" if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        if raw:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        bot = self.server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            self._answer(400, {"error": "expected a JSON body"})
            return
        if bot.secret:
            why = verify_signature(bot.secret, raw, self.headers.get(TIMESTAMP_HEADER) or "",
                                   self.headers.get(SIGNATURE_HEADER) or "")
            if why:
                with bot.lock:
                    bot.rejected.append(why)
                self._answer(401, {"error": why})
                return
        with bot.lock:
            bot.count += 1
            bot.received.append({"payload": payload, "authorization": self.headers.get("Authorization"),
                                 "path": self.path, "t": time.time(), "headers": dict(self.headers.items())})
            failing = bot.fail_next > 0 or (bot.fail_rate and bot.rng.random() < bot.fail_rate)
            if bot.fail_next > 0:
                bot.fail_next -= 1
        if bot.log_json:
            print(json.dumps(payload, ensure_ascii=False), flush=True)
        if bot.token and self.headers.get("Authorization") != bot.token:
            self._answer(401, {"error": "unauthorized"})
            return
        if failing:
            self._answer(500, {"error": "the bot is having a bad day"})
            return
        text = str(payload.get("text") or payload.get("message") or "") if isinstance(payload, dict) else ""
        delay = bot.delay.get(text, 0.0) if isinstance(bot.delay, dict) else bot.delay
        if delay:
            time.sleep(delay)
        if bot.raw is not None:
            status, ctype, body = bot.raw(text)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if bot.trickle:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(bot.trickle)
            else:
                self.wfile.write(body)
            return
        if bot.shape == "none":
            self._answer(204, None)
            return
        if bot.file_word and bot.file_word.lower() in text.lower():
            base = "http://127.0.0.1:%d" % bot.server_address[1]
            self._answer(200, {"reply_text": "Here is our catalog.", "files": [
                {"url": base + "/files/catalog.pdf", "name": "catalog.pdf", "caption": "The catalog"}]})
            return
        if bot.handoff_word and bot.handoff_word.lower() in text.lower():
            self._answer(200, {"handoff": True, "text": "A person will take over from here."})
            return
        texts = bot.replies(text)
        if bot.multi > 1:
            texts = ["%s (%d/%d)" % (t, n, bot.multi) for t in texts for n in range(1, bot.multi + 1)]
        self._answer(200, shaped(texts, bot.shape if bot.multi == 1 else "replies"))

    def do_GET(self) -> None:
        if self.path.startswith("/files/"):
            name = self.path[len("/files/"):]
            with self.server.lock:
                self.server.file_gets.append((self.path, self.headers.get("Authorization")))
            data = self.server.files.get(name)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")
            return
        if self.server.token and self.headers.get("Authorization") != self.server.token:
            self._answer(401, {"error": "unauthorized"})
            return
        self._answer(200, {"ok": True, "post_to": PATH})


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mock_bot_server.py",
                                     description="A local echo bot for end-to-end checks of the bridge.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--shape", choices=SHAPES, default="reply_text", help="reply shape (default reply_text)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to think before answering")
    parser.add_argument("--token", default="", help="require this exact Authorization header")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="R",
                        help="answer this share of requests (0 to 1) with HTTP 500")
    parser.add_argument("--multi", type=int, default=1, metavar="N", help="answer each message with N replies")
    parser.add_argument("--handoff", default="", metavar="WORD",
                        help="hand the dialog over to a person when a message contains WORD")
    parser.add_argument("--secret", default="", help="check each request's signature (BOT_HTTP_SECRET)")
    parser.add_argument("--file-word", default="", metavar="WORD",
                        help="answer a message containing WORD with a file (a sample PDF this bot serves)")
    parser.add_argument("--log-json", action="store_true", help="print each payload as one JSON line")
    args = parser.parse_args(argv)
    if not 0 <= args.fail_rate <= 1:
        parser.error("--fail-rate: expected a share from 0 to 1")
    if not 1 <= args.multi <= 10:
        parser.error("--multi: expected 1 to 10")
    if not 0 <= args.port <= 65535:
        parser.error("--port: expected 0..65535")
    if args.delay < 0:
        parser.error("--delay: expected a number of seconds, 0 or more")
    try:
        bot = BotServer(args.port, args.shape, args.delay, args.token).start()
        bot.fail_rate, bot.multi, bot.handoff_word = args.fail_rate, args.multi, args.handoff
        bot.secret, bot.log_json, bot.file_word = args.secret, args.log_json, args.file_word
    except OSError as exc:
        sys.stderr.write("mock_bot_server.py: error: cannot listen on 127.0.0.1:%d (%s)\n"
                         % (args.port, exc.strerror or exc))
        return 1
    print("BOT_HTTP_URL=%s" % bot.url, flush=True)
    sys.stderr.write("mock bot answering in the %r shape; Ctrl-C to stop\n" % args.shape)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        bot.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
