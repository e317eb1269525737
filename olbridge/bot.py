"""Asking the user's bot over HTTP: one POST per turn, a deadline over the whole exchange, signatures."""
from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Mapping

import b24common as bc


class BotError(bc.B24Error):
    """The bot could not be asked (``retryable``: an outage), or its answer was unusable."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable



_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")     # what a reply may not hold (\t \n \r may)


class _Reader:
    """The response's byte stream, noting whether it ended inside the header block."""

    def __init__(self, fp):
        self._fp = fp
        self.ended_early = False

    def readline(self, *args):
        line = self._fp.readline(*args)
        if not line:
            self.ended_early = True
        return line

    def __getattr__(self, name: str):
        return getattr(self._fp, name)


class _Response(http.client.HTTPResponse):
    """http.client's response, but an interim answer (``102 Processing``, ``103 Early Hints``) is passed
    over to the real one (http.client passes over ``100`` only), and a header block cut off by the end
    of the connection is noticed (:attr:`fp`.ended_early)."""

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = _Reader(self.fp)

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if not 100 < status < 200:      # 100 Continue: begin() passes it over itself
                return version, status, reason
            while True:                      # this interim answer's headers
                line = self.fp.readline(65537)
                if not line:
                    raise http.client.IncompleteRead(b"")
                if line in (b"\r\n", b"\n"):
                    break


def _cut_off(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """The exchange's deadline passed: end the connection, whatever it is waiting for."""
    cut.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class BotClient:
    """POSTs one inbound message to the bot (``BOT_HTTP_URL``) and returns its :class:`BotAnswer`.

    ``Authorization: <BOT_HTTP_AUTH>`` is sent when set (and never logged).
    ``BOT_HTTP_TIMEOUT_SEC`` is the deadline of the whole exchange -- connect,
    send, every byte of the answer -- so a bot that trickles its answer cannot
    hold a dialog forever; an answer over ``BOT_MAX_REPLY_BYTES`` is refused.
    Connection failures, timeouts, 429 and 5xx are outages (``retryable``);
    any other 4xx, a body that is not a reply, or one too large is unusable.
    An empty answer (204, empty body) means "no reply"; ``text/plain`` is one
    reply; JSON goes through :func:`parse_bot_answer`.  The caller decides
    about retries.
    """

    def __init__(self, config: bc.Config, url: str | None = None):
        url = url or config.bot_url
        if not url:
            raise bc.ConfigError("BOT_HTTP_URL is not set")
        self.url = url
        self.auth = config.bot_auth
        self.secret = config.bot_secret
        self.timeout = config.bot_timeout
        self.max_bytes = config.bot_max_bytes
        parts = urllib.parse.urlsplit(self.url)
        self.scheme = parts.scheme
        self.host = parts.hostname or "?"
        self.target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.port = parts.port or (443 if self.scheme == "https" else 80)   # checked by split_url()
        self.insecure_remote = self.scheme == "http" and not bc.is_loopback(self.host)

    def __repr__(self) -> str:
        return "BotClient(host=%s)" % self.host

    def _connect(self, timeout: float) -> tuple:
        """``(connection, request target)``, through an https/http proxy from the environment if one
        applies (never for loopback)."""
        proxy = None
        if not bc.is_loopback(self.host) and not urllib.request.proxy_bypass(self.host):
            proxy = urllib.request.getproxies().get(self.scheme)
        if self.scheme == "https":
            ctx = ssl.create_default_context()
            if proxy:
                pp = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
                conn = http.client.HTTPSConnection(pp.hostname, pp.port or 8080, timeout=timeout, context=ctx)
                conn.set_tunnel(self.host, self.port)
            else:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
            return conn, self.target
        if proxy:
            pp = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            return http.client.HTTPConnection(pp.hostname, pp.port or 8080, timeout=timeout), self.url
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout), self.target

    def _exchange(self, body: bytes, headers: dict) -> tuple:
        """One POST under one deadline -> ``(status, content type, raw body)``, the body decoded from gzip
        if the bot sent it so.  The deadline covers everything -- connect, the status line, the headers,
        the body: when it passes, the connection is cut whatever is being read."""
        where = "bot on %s" % self.host
        deadline = time.monotonic() + self.timeout
        cut = threading.Event()

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline")
            return remaining

        conn, target = self._connect(self.timeout)
        conn.response_class = _Response
        timer = threading.Timer(self.timeout, _cut_off, (conn, cut))
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", target, body=body, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(left())
            resp = conn.getresponse()
            if resp.fp is not None and resp.fp.ended_early:
                raise http.client.IncompleteRead(b"")          # the headers never ended: not an answer
            status, ctype = resp.status, resp.getheader("Content-Type", "") or ""
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise BotError("%s: the answer is %s bytes, more than BOT_MAX_REPLY_BYTES=%d"
                               % (where, declared, self.max_bytes))
            chunks: list = []
            size = 0
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(left())
                chunk = resp.read1(65536)
                if not chunk:
                    if resp.length:                  # the connection ended before Content-Length said
                        raise http.client.IncompleteRead(b"", resp.length)
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise BotError("%s: the answer is larger than BOT_MAX_REPLY_BYTES=%d"
                                   % (where, self.max_bytes))
                chunks.append(chunk)
                left()
            return status, ctype, self._decoded(b"".join(chunks), resp.getheader("Content-Encoding", ""))
        except ssl.SSLCertVerificationError as exc:
            raise BotError("%s: its TLS certificate could not be verified (%s)"
                           % (where, getattr(exc, "verify_message", exc)), retryable=True) from None
        except (TimeoutError, socket.timeout):
            raise BotError("%s: no complete answer within BOT_HTTP_TIMEOUT_SEC=%g s"
                           % (where, self.timeout), retryable=True) from None
        except (ConnectionRefusedError, socket.gaierror) as exc:
            if cut.is_set():
                raise BotError("%s: no complete answer within BOT_HTTP_TIMEOUT_SEC=%g s"
                               % (where, self.timeout), retryable=True) from None
            raise BotError("%s: cannot connect: %s" % (where, exc.strerror or exc), retryable=True) from None
        except (OSError, http.client.HTTPException) as exc:
            if cut.is_set():
                raise BotError("%s: no complete answer within BOT_HTTP_TIMEOUT_SEC=%g s"
                               % (where, self.timeout), retryable=True) from None
            what = "the answer was cut off" if isinstance(exc, http.client.IncompleteRead) else \
                "connection failed or dropped (%s)" % type(exc).__name__
            raise BotError("%s: %s" % (where, what), retryable=True) from None
        finally:
            timer.cancel()
            conn.close()

    def _decoded(self, raw: bytes, encoding: str) -> bytes:
        """The body as sent before any ``Content-Encoding`` (we ask for none; gzip is undone anyway)."""
        encoding = (encoding or "identity").strip().lower()
        if encoding == "identity":
            return raw
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise BotError("bot on %s: the answer is %s-encoded, which the bridge cannot read (it asks for "
                           "identity)" % (self.host, encoding))
        unpack = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)
        try:
            out = unpack.decompress(raw, self.max_bytes + 1)
        except zlib.error:
            raise BotError("bot on %s: the answer says %s but is not" % (self.host, encoding)) from None
        if len(out) > self.max_bytes or unpack.unconsumed_tail:
            raise BotError("bot on %s: the answer is larger than BOT_MAX_REPLY_BYTES=%d once unpacked"
                           % (self.host, self.max_bytes))
        return out

    def _headers(self, extra: Mapping[str, str] | None = None, *, json_body: bool = True) -> dict:
        """What every request to the bot carries (``Authorization`` when set), plus *extra*."""
        headers = {"User-Agent": "b24-openlines-toolkit/" + bc.VERSION, "Accept-Encoding": "identity"}
        if json_body:
            headers.update({"Content-Type": "application/json", "Accept": "application/json"})
        headers.update(extra or {})
        if self.auth:
            headers["Authorization"] = self.auth
        return headers

    def probe(self) -> tuple:
        """A GET to the bot's URL (for ``--check``): ``(HTTP status, "")`` or ``(None, what failed)``."""
        conn, target = self._connect(min(self.timeout, 10.0))
        try:
            conn.request("GET", target, headers=self._headers(json_body=False))
            resp = conn.getresponse()
            resp.read(65536)
            return resp.status, ""
        except (OSError, http.client.HTTPException) as exc:
            return None, "bot on %s does not answer (%s)" % (self.host, getattr(exc, "strerror", None) or exc)
        finally:
            conn.close()

    def probe_signature(self) -> tuple:
        """With ``BOT_HTTP_SECRET``: POST a probe whose signature is wrong; a bot that checks
        signatures refuses it.  ``(HTTP status, "")`` or ``(None, what failed)``."""
        body = json.dumps({"platform": "bitrix24", "direction": "probe", "text": ""}).encode()
        forged = {TIMESTAMP_HEADER: str(int(time.time())), SIGNATURE_HEADER: "sha256=" + "0" * 64}
        try:
            status, _ctype, _raw = self._exchange(body, self._headers(forged))
        except BotError as exc:
            return None, str(exc)
        return status, ""

    def tell(self, notice: Mapping) -> None:
        """POST a notice the bot need not answer (a delivery report), signed like every request."""
        body = json.dumps(notice, ensure_ascii=False).encode("utf-8")
        headers = self._headers()
        if self.secret:
            headers.update(sign_request(self.secret, body))
        status, _ctype, _raw = self._exchange(body, headers)
        if status >= 300:
            raise BotError("bot on %s answered HTTP %d" % (self.host, status), retryable=status >= 500)

    def ask(self, payload: Mapping, *, headers: Mapping[str, str] | None = None) -> bc.BotAnswer:
        """One exchange with the bot; raises :class:`BotError`."""
        all_headers = self._headers(headers)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        if self.secret:
            all_headers.update(sign_request(self.secret, body))
        status, ctype, raw = self._exchange(body, all_headers)
        where = "bot on %s" % self.host
        if status == 429 or status >= 500:
            raise BotError("%s answered HTTP %d" % (where, status), retryable=True)
        if status >= 300:
            raise BotError("%s answered HTTP %d" % (where, status))
        if status == 204 or not raw.strip():
            return bc.BotAnswer()
        kind = ctype.split(";")[0].strip().lower()
        if "html" in kind:
            raise BotError("%s answered with an HTML page, not a reply" % where)
        if kind and not (kind.startswith("text/") or kind == "application/json" or kind.endswith("+json")):
            raise BotError("%s answered with %s, not text or JSON" % (where, kind[:60]))
        text = raw.decode("utf-8", "replace")
        if "json" in kind or text.lstrip()[:1] in ("{", "["):
            try:
                decoded = json.loads(text)
            except RecursionError:
                raise BotError("%s: the answer is nested too deeply to be a reply" % where) from None
            except ValueError:
                raise BotError("%s: the answer is not valid JSON" % where) from None
            try:
                answer = bc.parse_bot_answer(decoded)
            except bc.ReplyShapeError as exc:
                raise BotError("%s: %s" % (where, exc)) from None
        else:
            answer = bc.BotAnswer(bc.normalize_reply(text))
        for part in answer.texts:
            bad = _CONTROL.search(part)
            if bad:
                raise BotError("%s: the answer holds a control character (U+%04X) that is not text -- "
                               "binary data, or an encoding mix-up" % (where, ord(bad.group())))
        return answer


SIGNATURE_HEADER = "X-B24-Signature"
TIMESTAMP_HEADER = "X-B24-Timestamp"


def sign_request(secret: str, body: bytes, now: float | None = None) -> dict:
    """``BOT_HTTP_SECRET``: HMAC-SHA256 over ``<timestamp>.<body>`` -- the bot checks it to reject
    forgeries, and the timestamp to reject replays."""
    ts = str(int(time.time() if now is None else now))
    mac = hmac.new(secret.encode("utf-8"), ts.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: "sha256=" + mac}


def verify_signature(secret: str, body: bytes, timestamp: str, signature: str, *, max_age: float = 300,
                     now: float | None = None) -> str:
    """What a bot does with a signed request: "" if genuine and fresh, else why not -- never an exception,
    whatever the headers hold."""
    timestamp, signature = str(timestamp or ""), str(signature or "")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return "no timestamp"
    if abs((time.time() if now is None else now) - int(timestamp)) > max_age:
        return "stale timestamp (a replay?)"
    want = sign_request(secret, body, now=int(timestamp))[SIGNATURE_HEADER]
    return "" if hmac.compare_digest(want.encode(), signature.encode("utf-8", "replace")) else "bad signature"
