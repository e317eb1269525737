"""The push receiver and the health listener under hostile clients: bodies built to cost CPU, lying lengths,
floods of idle and trickling connections, and clients that make the log shout."""
from __future__ import annotations

import gc
import os
import socket
import threading
import time
import unittest
import urllib.request

import b24push as push
from tests.test_push import QuietWorld, form, free_port, post

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send *data* as it is; what came back (up to the first 4 KB)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            return s.recv(4096)
        except socket.timeout:
            return b""


def status_of(answer: bytes) -> int:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class FormParsing(unittest.TestCase):
    def test_appending_keys_cost_linear_time(self) -> None:
        # 8x the keys: linear costs about 8x the time, quadratic 64x; the best of three of each, and a ratio,
        # so a machine busy with other tests slows both alike instead of failing a fixed bound
        def best(n: int) -> float:
            times = []
            for _ in range(3):
                gc.disable()                  # the collector's passes grow with the heap, not with the parser
                try:
                    started = time.perf_counter()
                    got = push.parse_php_form([("a[]", "")] * n)
                    times.append(time.perf_counter() - started)
                finally:
                    gc.enable()
            self.assertEqual(len(got["a"]), n)
            self.assertEqual(got["a"][str(n - 1)], "")
            return min(times)
        small, large = best(10000), best(80000)
        self.assertLess(large / small, 40, "quadratic: 8x the appended keys took %.1fx the time" % (large / small))

    def test_php_semantics_are_kept(self) -> None:
        got = push.parse_php_form([("a[0]", "x"), ("a[]", "y"), ("a[k]", "z"), ("a[]", "w"), ("b", "1"),
                                   ("b[c]", "2"), ("d[e]", "3"), ("d", "4")])
        self.assertEqual(got["a"], {"0": "x", "1": "y", "k": "z", "2": "w"})
        self.assertEqual(got["b"], {"c": "2"})           # an array wins over an earlier scalar
        self.assertEqual(got["d"], {"e": "3"})           # and a later scalar loses to an array

    def test_deep_keys_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            push.parse_php_form([("a" + "[x]" * 50, "1")])


class Receiver(QuietWorld):
    def start(self, **env):
        port = free_port()
        hook = self.portal.outgoing_webhook("http://127.0.0.1:%d/b24" % port)
        proc = self.start_bridge(B24_LISTEN="127.0.0.1:%d" % port, B24_APP_TOKEN=hook["application_token"],
                                 B24_POLL_SEC="5", B24_RECONCILE_SEC="60", **env)
        self.assertTrue(proc.wait_stderr("receiving Bitrix24 events", 5), proc.all_output())
        return proc, port, hook["application_token"]

    def genuine(self, port: int, token: str) -> int:
        return post(port, form({"event": "ONSESSIONSTART", "auth": {"application_token": token}}))[0]

    def test_a_body_built_to_cost_cpu_is_cheap_and_refused(self) -> None:
        proc, port, token = self.start()
        bomb = b"event=ONIMBOTMESSAGEADD&" + b"&".join([b"a[]="] * 20000)      # ~100 KB, no token
        started = time.monotonic()
        status = post(port, bomb)[0]
        self.assertIn(status, (400, 401))
        self.assertLess(time.monotonic() - started, 3.0)
        # within the field limit and with the right token: parsed in linear time, accepted
        body = form({"event": "ONSESSIONSTART", "auth": {"application_token": token}}) + b"&" + \
            b"&".join([b"a[]="] * 900)
        self.assertEqual(post(port, body)[0], 200)
        self.assertEqual(self.genuine(port, token), 200)
        self.assertEqual(proc.stop(), 0)

    def test_lying_lengths_are_refused_never_read_to_the_end(self) -> None:
        proc, port, token = self.start()
        body = form({"event": "ONSESSIONSTART", "auth": {"application_token": token}})

        def request(*length_headers: str) -> int:
            head = b"POST /b24 HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            head += b"".join(h.encode() + b"\r\n" for h in length_headers)
            return status_of(raw_request(port, head + b"\r\n" + body))
        n = len(body)
        self.assertEqual(request("Content-Length: -1"), 400)
        self.assertEqual(request("Content-Length: abc"), 400)
        self.assertEqual(request("Content-Length: %d" % n, "Content-Length: %d" % (n + 5)), 400)
        self.assertEqual(request("Content-Length: %d, %d" % (n, n + 1)), 400)
        self.assertEqual(request("Content-Length: +%d" % n), 400)
        self.assertEqual(request(), 411)
        self.assertEqual(request("Content-Length: %d" % n, "Content-Length: %d" % n), 200)   # the same twice
        self.assertEqual(request("Content-Length: %d" % n), 200)
        self.assertEqual(proc.stop(), 0)

    def test_floods_of_idle_and_trickling_connections_leave_room_for_a_genuine_request(self) -> None:
        health = free_port()
        proc, port, token = self.start(BRIDGE_HTTP_LISTEN=str(health))
        held: list = []
        stop = threading.Event()
        self.addCleanup(stop.set)
        self.addCleanup(lambda: [s.close() for s in held])
        for target in (port, health):
            for _ in range(500):                       # idle: connect, say nothing
                held.append(socket.create_connection(("127.0.0.1", target), timeout=5))
            for _ in range(500):                       # trickling: a byte now and then
                s = socket.create_connection(("127.0.0.1", target), timeout=5)
                s.sendall(b"P" if target == port else b"G")
                held.append(s)

        def trickle() -> None:
            while not stop.wait(0.5):
                for s in held[500:1000] + held[1500:2000]:
                    try:
                        s.send(b"O")
                    except OSError:
                        pass
        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)
        for _ in range(3):
            started = time.monotonic()
            self.assertEqual(self.genuine(port, token), 200)
            with _DIRECT.open("http://127.0.0.1:%d/healthz" % health, timeout=10) as resp:
                self.assertEqual(resp.status, 200)
            self.assertLess(time.monotonic() - started, 2.0)
        threads = fds = 0
        with open("/proc/%d/status" % proc.popen.pid) as fh:
            threads = int(next(ln for ln in fh if ln.startswith("Threads:")).split()[1])
        fds = len(os.listdir("/proc/%d/fd" % proc.popen.pid))
        self.assertLess(threads, 200, "one thread per held connection")
        self.assertLess(fds, 250, "one descriptor per held connection")
        # the bridge still reaches the portal and the bot
        chat = self.ids["lines_member"]
        self.portal.customer_message(chat, "during the flood")
        self.assertEqual(self.genuine(port, token), 200)
        self.wait_for(lambda: self.answered(chat, "during the flood"), 15, "the reply during the flood")
        stop.set()
        self.assertEqual(proc.stop(), 0)

    def test_refusals_and_hang_ups_make_one_line_each_not_a_flood(self) -> None:
        proc, port, token = self.start()
        for _ in range(30):
            self.assertEqual(post(port, form({"event": "ONSESSIONSTART", "auth": {"application_token": "x" * 32}}))[0],
                             401)
        for _ in range(10):                             # hang up before the body
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /b24 HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nevent=")
        deep = b'{"event": "X", "data": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        self.assertEqual(post(port, deep, ctype="application/json")[0], 400)
        self.assertEqual(self.genuine(port, token), 200)
        time.sleep(0.5)
        out = proc.all_output()
        self.assertNotIn("Traceback", out)
        refusals = [ln for ln in proc.stderr_lines if "refused an event" in ln]
        self.assertLessEqual(len(refusals), 2, refusals)
        self.assertNotIn("ERROR", out)
        self.assertEqual(proc.stop(), 0)

    def test_the_troubleshooting_curl_gets_401_and_the_start_names_its_files(self) -> None:
        proc, port, _token = self.start()
        self.assertEqual(post(port, b"event=PING")[0], 401)          # README: curl -X POST -d event=PING
        line = next(ln for ln in proc.stderr_lines if "settings from" in ln)
        self.assertIn("state in %s" % os.path.join(self.tmp, "state", "bridge.db"), line)
        self.assertEqual(proc.stop(), 0)
