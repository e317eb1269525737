"""Listeners that can't be knocked over: an HTTP server with a deadline for each whole request, a bound on
its connections, and log lines that say each cause once a minute (the push receiver, the health listener).

A client that opens a connection and sends nothing, or trickles a byte a second, holds no thread for
longer than ``request_deadline`` seconds -- the deadline covers the request line, the headers and the
body together, not each read.  At most ``max_connections`` are open at once; when a new one comes
and the bound is reached, the oldest connection that has not yet sent a complete request is dropped
to make room, so a genuine request still gets in while a flood is held open.  File descriptors are
thereby bounded too, and the portal and bot clients of the same process are never starved of them.
"""
from __future__ import annotations

__all__ = ["GuardedHTTPServer", "SaidOnce", "content_length"]

import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_REQUEST_DEADLINE_SEC = 10.0
SAY_EVERY_SEC = 60.0
LINGER_MAX_BYTES = 4 << 20          # what a refused client may still send before its connection is closed


class SaidOnce:
    """Log a line per cause at most once every *every* seconds; the next one says how many were not shown."""

    def __init__(self, logger: logging.Logger, every: float = SAY_EVERY_SEC):
        self.logger, self.every = logger, every
        self.lock = threading.Lock()
        self.last: dict = {}        # cause -> (monotonic time said, lines not shown since)

    def say(self, level: int, cause: str, text: str, *args: Any) -> None:
        now = time.monotonic()
        with self.lock:
            said, hidden = self.last.get(cause, (None, 0))
            if said is not None and now - said < self.every:
                self.last[cause] = (said, hidden + 1)
                return
            self.last[cause] = (now, 0)
        if hidden:
            text += " (and %d more like it in the last %.0f s)" % (hidden, now - said)
        self.logger.log(level, text, *args)


def content_length(headers: Any, limit: int) -> tuple:
    """``(length, None)`` or ``(None, (status, why))`` for a request's Content-Length: one, plain digits,
    at most *limit* (a negative, odd, repeated or conflicting length is refused, never read to EOF)."""
    if headers.get("Transfer-Encoding"):
        return None, (411, "send a Content-Length, not Transfer-Encoding")
    values = headers.get_all("Content-Length") or []
    if not values:
        return None, (411, "send a Content-Length")
    texts = {v.strip() for value in values for v in value.split(",")}
    if len(texts) != 1:
        return None, (400, "conflicting Content-Length headers")
    text = texts.pop()
    if not text.isdigit() or not text.isascii() or len(text) > 12:
        return None, (400, "Content-Length is not a length")
    length = int(text)
    if length > limit:
        return None, (413, "body larger than %d bytes" % limit)
    return length, None


class GuardedHTTPServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` with a whole-request deadline and a connection bound (see the module
    docstring).  Handlers call :meth:`request_complete` once the request has been read in full."""

    daemon_threads = True
    request_queue_size = 128
    max_connections = DEFAULT_MAX_CONNECTIONS
    request_deadline = DEFAULT_REQUEST_DEADLINE_SEC

    def __init__(self, address: tuple, handler: Any, logger: logging.Logger):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.said = SaidOnce(logger)
        self._open: dict = {}          # socket -> [monotonic start, request complete]
        self._guard = threading.Lock()
        self._unread: set = set()      # refused before their bodies were read (see _linger)
        self._closing = threading.Event()
        super().__init__(address, handler)          # binds (and closes itself again if it cannot)
        threading.Thread(target=self._reap, name="http-deadline", daemon=True).start()

    # -- the bound ------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._guard:
            if len(self._open) >= self.max_connections:
                waiting = [(start, sock) for sock, (start, done) in self._open.items() if not done]
                if not waiting:       # every open connection is a genuine request in progress
                    self.said.say(logging.WARNING, "full", "listener on port %d: %d requests in progress; "
                                  "refusing more", self.server_address[1], len(self._open))
                    self._drop(request)
                    request.close()        # never handed to a thread: closed here
                    return
                self._drop(min(waiting, key=lambda pair: pair[0])[1])
                self.said.say(logging.WARNING, "evicted", "listener on port %d: %d connections open; dropped the "
                              "oldest one that had not sent a request", self.server_address[1], self.max_connections)
            self._open[request] = [time.monotonic(), False]
        super().process_request(request, client_address)

    def request_complete(self, request: Any) -> None:
        with self._guard:
            if request in self._open:
                self._open[request][1] = True

    def shutdown_request(self, request: Any) -> None:
        with self._guard:
            self._open.pop(request, None)
            linger = request in self._unread
            self._unread.discard(request)
        if linger:
            self._linger(request)
        super().shutdown_request(request)

    def body_left_unread(self, request: Any) -> None:
        """The handler refuses *request* without reading its body: linger when closing it."""
        with self._guard:
            self._unread.add(request)

    @staticmethod
    def _linger(sock: Any) -> None:
        """A request refused before its body was read (413, 411): take in what the client is still sending,
        for a moment and a few MiB at most, so that it reads the refusal instead of a reset connection."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            deadline, taken = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline and taken < LINGER_MAX_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                taken += len(chunk)
        except OSError:
            pass

    def _drop(self, sock: Any) -> None:
        """Make *sock* count no more and end it (under the lock): its handler's next read sees the end, and
        the handler's thread closes it as usual -- never closed here, so its number is not reused under it."""
        self._open.pop(sock, None)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the deadline ---------------------------------------------------------------------
    def _reap(self) -> None:
        while not self._closing.wait(0.25):
            now = time.monotonic()
            with self._guard:
                late = [s for s, (start, done) in self._open.items() if not done and now - start > self.request_deadline]
                for sock in late:
                    self._drop(sock)
            if late:
                self.said.say(logging.INFO, "deadline", "listener on port %d: dropped %d connection(s) that sent no "
                              "complete request within %g s", self.server_address[1], len(late), self.request_deadline)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up or was dropped: one quiet line a minute, never a traceback."""
        self.said.say(logging.DEBUG, "client", "listener on port %d: a client went away mid-request",
                      self.server_address[1])

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
