"""Is the bridge alive: heartbeats of every thread, /healthz and /metrics, systemd's notify and watchdog."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from b24http import GuardedHTTPServer

log = logging.getLogger("b24_ol_bridge")

STATUS_EVERY_SEC = 10.0     # systemd's status line is refreshed this often (watchdog or not)


def sd_notify(**fields: Any) -> bool:
    """Tell systemd how we are (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``); no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "@/":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    payload = "\n".join("%s=%s" % (k, str(v).replace("\n", " ")) for k, v in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)) as sock:
            sock.connect(addr)
            sock.sendall(payload.encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


def watchdog_seconds() -> float | None:
    """Half of systemd's ``WatchdogSec`` if it watches this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Liveness:
    """Heartbeats of the main loop and every worker.

    A thread beats when it waits for work, before and after every request
    (the REST client's progress hook) and around every bot exchange.  One
    that has not beaten for *stuck_after* seconds is stuck: systemd's
    watchdog is no longer fed, so a bridge that only looks alive gets
    restarted.  Outages do not count -- waiting them out is progress.
    """

    def __init__(self, stuck_after: float):
        self.stuck_after = stuck_after
        self.beats: dict = {}
        self.doing: dict = {}
        self.lock = threading.Lock()

    def beat(self, doing: str | None = None) -> None:
        name = threading.current_thread().name
        with self.lock:
            self.beats[name] = time.monotonic()
            if doing is not None:
                self.doing[name] = doing

    def stuck(self) -> list:
        """``[(thread, seconds since its last beat, what it was doing)]`` for the stuck ones."""
        now = time.monotonic()
        with self.lock:
            return [(name, now - t, self.doing.get(name, "")) for name, t in self.beats.items()
                    if now - t > self.stuck_after]


class Watchdog:
    """Feeds systemd's watchdog while every thread makes progress (``WATCHDOG=1`` every half
    ``WatchdogSec``), and keeps systemd's status line fresh; a stuck thread is logged once."""

    def __init__(self, live: Liveness, status: Callable[[], str]):
        self.live, self.status = live, status
        self.every = watchdog_seconds()
        self.last_ping = 0.0
        self.said_stuck = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="bridge-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            stuck = self.live.stuck()
            now = time.monotonic()
            if stuck and not self.said_stuck:
                name, age, doing = stuck[0]
                log.error("%s made no progress for %.0f s (%s): no more watchdog pings%s", name, age, doing or "?",
                          "; systemd will restart the bridge" if self.every else "")
                self.said_stuck = True
            elif not stuck and self.said_stuck:
                log.info("every thread makes progress again")
                self.said_stuck = False
            if now - self.last_ping >= (self.every or STATUS_EVERY_SEC):
                fields = {"WATCHDOG": 1} if self.every and not stuck else {}
                sd_notify(**fields, STATUS=self.status())
                self.last_ping = now
            time.sleep(min(0.5, (self.every or 1.0) / 2))


class HealthServer(GuardedHTTPServer):
    """``GET /healthz`` and ``GET /metrics`` (Prometheus text format); nothing else, no secret.  Idle and
    slow connections are dropped (:class:`b24http.GuardedHTTPServer`)."""

    request_deadline = 5.0

    def __init__(self, address: tuple, bridge: Any):
        super().__init__(address, _HealthHandler, log)
        self.bridge = bridge

    def start(self) -> HealthServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="bridge-http",
                         daemon=True).start()
        return self


class _HealthHandler(BaseHTTPRequestHandler):
    server: HealthServer
    timeout = 5.0          # each read and write; the whole request has the server's deadline

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
        raw = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.server.request_complete(self.request)      # a GET is read in full with its headers
        path = self.path.split("?", 1)[0]
        bridge = self.server.bridge
        if path == "/healthz":
            problem = bridge.problem()
            self._send(503 if problem else 200, (problem or "ok") + "\n")
        elif path == "/metrics":
            self._send(200, bridge.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, "not found: only /healthz and /metrics\n")

    def _refuse(self) -> None:
        self._send(405, "only GET\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    """How long the bot took, in Prometheus buckets."""

    def __init__(self, bounds: tuple = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self.lock:
            self.counts[next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))] += 1
            self.total += seconds

    def render(self, out: list, name: str, help_: str) -> None:
        with self.lock:
            counts, total = list(self.counts), self.total
        out.append("# HELP %s %s" % (name, help_))
        out.append("# TYPE %s histogram" % name)
        cumulative = 0
        for bound, n in zip(list(self.bounds) + ["+Inf"], counts):
            cumulative += n
            out.append('%s_bucket{le="%s"} %d' % (name, bound, cumulative))
        out.append("%s_sum %r" % (name, float(total)))
        out.append("%s_count %d" % (name, cumulative))


def metric(out: list, name: str, kind: str, help_: str, samples: list) -> None:
    out.append("# HELP %s %s" % (name, help_))
    out.append("# TYPE %s %s" % (name, kind))
    for labels, value in samples:
        out.append("%s%s %s" % (name, labels, repr(float(value)) if isinstance(value, float) else value))


