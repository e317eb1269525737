"""The bot exchange against bots that misbehave on the wire: a bot on a real socket that sends exactly the
bytes a test gives it (trickled, cut off, interim answers, gzip, binary) -- and the signature check a bot
does, fed nonsense."""
from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import unittest
import urllib.request

import b24common as bc
import mock_bot_server
import olbridge.bot as botlib


class WireBot:
    """Accepts connections on 127.0.0.1; each gets the steps of *script*: bytes to send, or a number of
    seconds to wait; then the connection is closed.  The request it read is kept."""

    def __init__(self, script: list):
        self.script = script
        self.requests: list = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length:")), b"0"))
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head.decode("latin-1"))
                for step in self.script:
                    if self.stop.is_set():
                        return
                    if isinstance(step, (int, float)):
                        time.sleep(step)
                    else:
                        conn.sendall(step)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def answer(body: bytes, *, ctype: str = "application/json", extra: str = "") -> bytes:
    return ("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (ctype, len(body), extra)
            ).encode() + body


REPLY = json.dumps({"reply_text": "hi there"}).encode()


class Exchange(unittest.TestCase):
    def client(self, bot: WireBot, timeout: float = 2) -> botlib.BotClient:
        cfg = bc.Config.from_env({"B24_WEBHOOK_BASE": "http://127.0.0.1:9/rest/1/abcdefgh/",
                                  "BOT_HTTP_URL": "http://127.0.0.1:%d/bot" % bot.port,
                                  "BOT_HTTP_TIMEOUT_SEC": str(timeout)})
        return botlib.BotClient(cfg)

    def wire(self, *script) -> WireBot:
        bot = WireBot(list(script))
        self.addCleanup(bot.close)
        return bot

    def ask(self, bot: WireBot, timeout: float = 2):
        return self.client(bot, timeout).ask({"text": "hello"})

    def test_the_deadline_covers_a_trickled_status_line_and_headers(self) -> None:
        for what, head in (("status line", b"HTTP/1.1 200 OK\r\n"),
                           ("headers", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 40)):
            with self.subTest(what):
                steps = [head[:1]] + [x for b in head[1:] for x in (0.3, bytes([b]))]
                bot = self.wire(*steps)
                started = time.monotonic()
                with self.assertRaises(botlib.BotError) as caught:
                    self.ask(bot, timeout=2)
                took = time.monotonic() - started
                self.assertTrue(caught.exception.retryable)
                self.assertIn("BOT_HTTP_TIMEOUT_SEC=2", str(caught.exception))
                self.assertLess(took, 4.0, "the deadline is the whole exchange, not each read")

    def test_an_answer_cut_off_is_a_failed_attempt_not_an_empty_answer(self) -> None:
        cases = {
            "mid-headers": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Thing: 1\r\n",
            "chunked without its end": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"rep\r\n",
            "shorter than its length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 40\r\n\r\n{\"reply_text\"",
        }
        for what, raw in cases.items():
            with self.subTest(what):
                with self.assertRaises(botlib.BotError) as caught:
                    self.ask(self.wire(raw))
                self.assertTrue(caught.exception.retryable, str(caught.exception))

    def test_interim_answers_are_passed_over(self) -> None:
        for interim in (b"HTTP/1.1 102 Processing\r\n\r\n",
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"):
            with self.subTest(interim):
                got = self.ask(self.wire(interim, 0.05, answer(REPLY)))
                self.assertEqual(got.texts, ["hi there"])

    def test_gzip_is_not_asked_for_and_is_undone_when_it_comes(self) -> None:
        bot = self.wire(answer(gzip.compress(REPLY), extra="Content-Encoding: gzip\r\n"))
        self.assertEqual(self.ask(bot).texts, ["hi there"])
        self.assertIn("accept-encoding: identity", bot.requests[0].lower())
        with self.assertRaises(botlib.BotError):
            self.ask(self.wire(answer(b"\x1f\x8b\x08 not really", extra="Content-Encoding: gzip\r\n")))
        with self.assertRaises(botlib.BotError) as caught:
            self.ask(self.wire(answer(b"xx", extra="Content-Encoding: br\r\n")))
        self.assertIn("br-encoded", str(caught.exception))

    def test_binary_and_control_characters_never_reach_a_customer(self) -> None:
        cases = {
            "octet-stream": answer(b"PK\x03\x04 zip bytes", ctype="application/octet-stream"),
            "an image": answer(b"\x89PNG", ctype="image/png"),
            "NUL in text": answer(b"hello\x00world", ctype="text/plain"),
            "ESC in JSON": answer(json.dumps({"reply_text": "red \x1b[31m text"}).encode()),
        }
        for what, raw in cases.items():
            with self.subTest(what):
                with self.assertRaises(botlib.BotError) as caught:
                    self.ask(self.wire(raw))
                self.assertFalse(caught.exception.retryable)
        ok = self.ask(self.wire(answer(json.dumps({"reply_text": "line one\n\tline two\r\n"}).encode())))
        self.assertEqual(len(ok.texts), 1)


class Signatures(unittest.TestCase):
    SECRET = "a-secret-of-some-length"

    def test_odd_headers_are_invalid_never_an_exception(self) -> None:
        body = b'{"text": "hi"}'
        good = botlib.sign_request(self.SECRET, body)
        ts, sig = good[botlib.TIMESTAMP_HEADER], good[botlib.SIGNATURE_HEADER]
        self.assertEqual(botlib.verify_signature(self.SECRET, body, ts, sig), "")
        for timestamp, signature in (("\u00b2", sig), ("9" * 4300, sig), ("", sig), (ts, "sha256=\u00e9\u00e9"),
                                     (ts, ""), ("-5", sig), (ts, "\udcff")):
            with self.subTest(timestamp=timestamp[:10], signature=signature[:10]):
                self.assertNotEqual(botlib.verify_signature(self.SECRET, body, timestamp, signature), "")

    def test_the_mock_bot_answers_401_to_them(self) -> None:
        bot = mock_bot_server.BotServer().start()
        bot.secret = self.SECRET
        self.addCleanup(bot.stop)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for timestamp in ("\u00b2".encode(), b"9" * 4300):
            req = urllib.request.Request(bot.url, data=b'{"text": "hi"}', method="POST")
            req.add_header("Content-Type", "application/json")
            req.add_unredirected_header(botlib.TIMESTAMP_HEADER, timestamp.decode("latin-1"))
            req.add_unredirected_header(botlib.SIGNATURE_HEADER, "sha256=00")
            with self.assertRaises(urllib.error.HTTPError) as caught:
                opener.open(req, timeout=10)
            self.assertEqual(caught.exception.code, 401)
