"""The REST client against the emulator over real HTTP: errors, limits, faults, batch."""
from __future__ import annotations

import threading
import time
import unittest

from tests.support import PortalCase, bc, mp


class FakeTime:
    """Wall clock and sleep for the operating-time budget (10-minute windows)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.slept: list = []

    def now(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += max(0.0, seconds)


class Basics(PortalCase):
    def test_call_returns_result_and_envelope(self) -> None:
        c = self.client()
        self.assertEqual(c.whoami(), {"id": 7, "name": "Olga Sidorova", "admin": False})
        self.assertIn("im", c.scopes())
        env = c.call_full("im.recent.list", {"LIMIT": 2})
        self.assertEqual(env["total"], -1)
        self.assertIn("operating_reset_at", env["time"])
        self.assertIsInstance(env["result"]["items"], list)

    def test_typed_errors(self) -> None:
        c = self.client()
        cases = [
            (lambda: c.call("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.ids["foreign"]}),
             bc.AccessDeniedError, "ACCESS_ERROR", 403),
            (lambda: c.call("no.such.method"), bc.NotFoundError, "ERROR_METHOD_NOT_FOUND", 404),
            (lambda: c.call("event.bind", {"event": "ONIMMESSAGEADD"}), bc.AccessDeniedError,
             "WRONG_AUTH_TYPE", 403),
            (lambda: c.call("im.message.add", {"DIALOG_ID": "chat%d" % self.ids["queued"], "MESSAGE": "x"}),
             bc.NotMemberError, "CANCELED", 400),
            (lambda: c.call("im.message.add", {"DIALOG_ID": "chat%d" % self.ids["lines_member"], "MESSAGE": " "}),
             bc.BadRequestError, "MESSAGE_EMPTY", 400),
            (lambda: c.call("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.ids["lines_member"],
                                                       "FIRST_ID": "abc"}),
             bc.BadRequestError, "FIRST_ID_STRING", 400),
        ]
        for fn, cls, code, status in cases:
            with self.subTest(code=code):
                with self.assertRaises(cls) as ctx:
                    fn()
                self.assertEqual((ctx.exception.code, ctx.exception.status), (code, status))
                self.assertFalse(ctx.exception.retryable)

    def test_wrong_code_revoked_and_scope(self) -> None:
        bad = self.server.webhook_base.replace(self.portal.code, "wrongcode12345678")
        with self.assertRaises(bc.AuthError) as ctx:
            bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": bad})).call("profile")
        self.assertEqual((ctx.exception.code, ctx.exception.status), ("INVALID_CREDENTIALS", 401))
        self.assertNotIn("wrongcode12345678", str(ctx.exception) + repr(ctx.exception))
        # an unknown method is reported before authentication, as on a real portal
        with self.assertRaises(bc.NotFoundError):
            bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": bad})).call("im.nope")
        self.portal.set_webhook(scopes=["imopenlines"])
        with self.assertRaises(bc.ScopeError) as ctx:
            self.client().call("im.recent.list")
        self.assertEqual((ctx.exception.code, ctx.exception.status), ("insufficient_scope", 401))
        self.portal.set_webhook(scopes=["im"], active=False)
        with self.assertRaises(bc.AuthError) as ctx:
            self.client().call("profile")
        self.assertEqual(ctx.exception.code, "authorization_error")
        self.assertEqual(self.portal.stats()["counts"].get("profile"), 2, "auth errors must not be retried")

    def test_batch_keeps_results_and_errors_apart(self) -> None:
        c = self.client()
        cmds = {"me": ("profile", {}),
                "bad": ("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.ids["foreign"]}),
                "msgs": ("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % self.ids["lines_member"],
                                                    "FIRST_ID": 0, "LIMIT": 2})}
        for i in range(57):
            cmds["p%d" % i] = ("profile", {})
        res = c.batch(cmds)
        self.assertEqual(self.portal.stats()["counts"]["batch"], 2)
        self.assertEqual(res.results["me"]["ID"], "7")
        self.assertEqual(len(res.results["msgs"]["messages"]), 2)
        self.assertIsInstance(res.errors["bad"], bc.AccessDeniedError)
        self.assertNotIn("bad", res.results)
        self.assertEqual(len(res.results), 59)
        halted = c.batch({"a": ("im.dialog.get", {"DIALOG_ID": "chat%d" % self.ids["foreign"]}),
                          "b": ("profile", {})}, halt=True)
        self.assertIn("a", halted.errors)
        self.assertNotIn("b", halted.results)


class Limits(PortalCase):
    def test_burst_of_60_calls_never_shows_query_limit(self) -> None:
        c = self.client()          # the real default numbers: 2 req/s drain, bucket of 50
        started = time.monotonic()
        for _ in range(60):
            self.assertEqual(c.call("profile")["ID"], "7")
        statuses = [e["status"] for e in self.portal.stats()["log"]]
        self.assertEqual(statuses.count(200), 60)
        self.assertNotIn(503, statuses)
        self.assertGreater(time.monotonic() - started, 3.0, "the limiter should have paced the tail")

    def test_shared_bucket_already_full_is_survived(self) -> None:
        self.portal.set_limits(bucket_level=50)   # another client on this host used it up
        c = self.client()
        for _ in range(5):
            c.call("profile")
        statuses = [e["status"] for e in self.portal.stats()["log"]]
        self.assertIn(503, statuses)
        self.assertEqual(statuses.count(200), 5)

    def _operating_setup(self, client_limit: float) -> tuple:
        fake = FakeTime()
        self.server.stop()
        self.server = mp.PortalServer(mp.Portal(clock=fake.now), 0).start()
        self.addCleanup(self.server.stop)
        self.portal = self.server.portal
        self.portal.set_limits(operating_limit=3, method_cost={"im.dialog.get": 1.0})
        cfg = self.config(B24_OPERATING_LIMIT_SEC=client_limit)
        limiter = bc.RateLimiter(cfg.rate_per_sec, cfg.rate_burst, cfg.operating_limit,
                                 wallclock=fake.now, sleep=fake.sleep)
        return fake, bc.Client(cfg, limiter=limiter, sleep=fake.sleep)

    def test_operating_budget_is_respected_proactively(self) -> None:
        fake, c = self._operating_setup(3)
        for _ in range(8):
            c.call("im.dialog.get", {"DIALOG_ID": "chat%d" % self.portal.world_ids["lines_member"]})
        self.assertNotIn(429, [e["status"] for e in self.portal.stats()["log"]])
        self.assertGreater(sum(fake.slept), 60, "should have waited for operating_reset_at")

    def test_operation_time_limit_waits_for_the_reset(self) -> None:
        fake, c = self._operating_setup(100000)   # the client does not know the portal's budget
        for _ in range(8):
            c.call("im.dialog.get", {"DIALOG_ID": "chat%d" % self.portal.world_ids["lines_member"]})
        statuses = [e["status"] for e in self.portal.stats()["log"]]
        self.assertIn(429, statuses)
        self.assertEqual(statuses.count(200), 8)


class Strain(unittest.TestCase):
    """RateLimiter.strained(): what makes the bridge read less often so the replies get the requests."""

    def test_half_the_burst_spent_counts_as_strained_before_anything_waits(self) -> None:
        clock = [1000.0]
        limiter = bc.RateLimiter(rate=2, burst=50, clock=lambda: clock[0])
        for _ in range(int(limiter.capacity / 2)):
            limiter.acquire()
        self.assertFalse(limiter.strained(10))
        limiter.acquire()
        self.assertTrue(limiter.strained(10), "more than half the allowance spent")
        self.assertEqual(limiter.ready_in(), 0.0)
        clock[0] += 1.0                                  # two requests drained
        self.assertFalse(limiter.strained(10))

    def test_a_request_that_waited_counts_for_a_while(self) -> None:
        clock = [1000.0]

        def sleep(seconds: float) -> None:
            clock[0] += seconds
        limiter = bc.RateLimiter(rate=2, burst=10, clock=lambda: clock[0], sleep=sleep)
        for _ in range(int(limiter.capacity)):
            limiter.acquire()
        self.assertAlmostEqual(limiter.ready_in(), 0.5)
        limiter.acquire()                                # waits 0.5 s
        clock[0] += 5                                    # the bucket is empty again...
        self.assertEqual(limiter.ready_in(), 0.0)
        self.assertTrue(limiter.strained(10))            # ...but a request waited 5 s ago
        clock[0] += 6
        self.assertFalse(limiter.strained(10))


class SharedBatches(PortalCase):
    """With share_batches (the bridge), batches of several threads waiting at the same time go as one request."""

    def shared_client(self, **extra) -> bc.Client:
        c = self.client(**extra)
        c.share_batches = True
        return c

    def in_threads(self, *calls) -> list:
        """Run each ``(delay, function)`` in a thread of its own; their outcomes (a result or the exception)."""
        out: list = [None] * len(calls)

        def run(i: int, delay: float, fn) -> None:
            time.sleep(delay)
            try:
                out[i] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                out[i] = exc
        threads = [threading.Thread(target=run, args=(i, d, fn)) for i, (d, fn) in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out

    def test_a_batch_waiting_for_company_goes_with_the_next_one_each_gets_its_own_results(self) -> None:
        c = self.shared_client()
        dialog = "chat%d" % self.ids["lines_member"]
        post = {"me": ("profile", {}),
                "m": ("im.message.add", {"DIALOG_ID": dialog, "MESSAGE": "shared ride", "TEMPLATE_ID": bc.new_template_id()})}
        read = {"me": ("profile", {}), "m": ("im.dialog.messages.get", {"DIALOG_ID": dialog, "LAST_ID": 0, "LIMIT": 5})}
        started = time.monotonic()
        posted, got = self.in_threads((0.0, lambda: c.batch(post, patience=5.0)), (0.5, lambda: c.batch(read)))
        self.assertLess(time.monotonic() - started, 3.0, "the read coming ended the post's wait")
        self.assertEqual(self.portal.stats()["counts"], {"batch": 1})
        self.assertEqual((set(posted.results), set(got.results)), ({"me", "m"}, {"me", "m"}))
        self.assertIsInstance(posted.results["m"], int)
        self.assertIn("chat_id", got.results["m"])
        # the read went first, though it came second: it does not see a post its caller has not heard of
        self.assertNotIn("shared ride", [m["text"] for m in got.results["m"]["messages"]])
        self.assertTrue(posted.time and posted.time == got.time)
        # each learns what ran before its commands in that request
        self.assertEqual((posted.after, got.after), ({"profile", "im.dialog.messages.get"}, frozenset()))
        # alone, it waits out its patience and goes by itself
        started = time.monotonic()
        alone = c.batch(read, patience=0.6)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(self.portal.stats()["counts"], {"batch": 2})
        self.assertIn("shared ride", [m["text"] for m in alone.results["m"]["messages"]])
        self.assertEqual(alone.after, frozenset())

    def test_batches_waiting_for_the_budget_go_as_one_request(self) -> None:
        c = self.shared_client(B24_RATE_PER_SEC=1, B24_RATE_BURST=2)     # one request a second
        c.call("profile")                                                 # the budget is spent for a second
        names = ["a", "b", "c"]
        outs = self.in_threads(*[(0.05 * i, lambda n=n: c.batch({n: ("profile", {}), "x": ("scope", {})}))
                                 for i, n in enumerate(names)])
        self.assertEqual(self.portal.stats()["counts"], {"profile": 1, "batch": 1})
        for n, out in zip(names, outs):
            self.assertEqual(set(out.results), {n, "x"}, out)
            self.assertEqual(out.results[n]["ID"], "7")

    def test_a_write_that_loses_its_answer_takes_no_read_down_with_it(self) -> None:
        c = self.shared_client()
        dialog = "chat%d" % self.ids["lines_member"]
        self.portal.fault("drop_after", count=1, method="batch")     # the request runs, its answer is lost
        post = {"m": ("im.message.add", {"DIALOG_ID": dialog, "MESSAGE": "lost answer", "TEMPLATE_ID": bc.new_template_id()})}
        read = {"m": ("im.dialog.messages.get", {"DIALOG_ID": dialog, "LAST_ID": 0, "LIMIT": 5})}
        posted, got = self.in_threads((0.0, lambda: c.batch(post, patience=5.0)), (0.3, lambda: c.batch(read)))
        self.assertIsInstance(posted, bc.UnknownOutcomeError, "the write's outcome is not known: its caller finds out")
        self.assertIsInstance(got, bc.BatchResult, got)
        self.assertIn("lost answer", [m["text"] for m in got.results["m"]["messages"]], "the read was asked again")
        self.assertEqual(self.portal.stats()["counts"], {"batch": 2})

    def test_batches_of_a_client_that_does_not_share_go_alone(self) -> None:
        c = self.client()
        self.in_threads((0.0, lambda: c.batch({"a": ("profile", {})}, patience=5.0)),
                        (0.1, lambda: c.batch({"b": ("profile", {})})))
        self.assertEqual(self.portal.stats()["counts"], {"batch": 2})


class Faults(PortalCase):
    KINDS = ("http500", "http502", "http503", "html", "malformed", "truncated", "drop", "drop_after")

    def quick(self, **extra) -> bc.Client:
        self.slept: list = []
        return bc.Client(self.config(**extra), sleep=self.slept.append)

    def test_each_fault_is_survived_by_a_read(self) -> None:
        for kind in self.KINDS:
            with self.subTest(kind=kind):
                self.portal.fault(kind, count=2, method="im.recent.list")
                items = self.quick().call("im.recent.list", {"LIMIT": 1})["items"]
                self.assertTrue(items)
                self.assertFalse(self.portal.faults)

    def test_latency_beyond_the_timeout_is_retried(self) -> None:
        self.portal.fault("latency", count=1, seconds=1.5, method="profile")
        c = self.quick(B24_HTTP_TIMEOUT_SEC=1)
        self.assertEqual(c.call("profile")["ID"], "7")
        self.assertEqual(len(self.slept), 1)

    def test_persistent_faults_end_in_a_typed_error(self) -> None:
        expected = {"http500": bc.ServerError, "http502": bc.ServerError, "http503": bc.RateLimitError,
                    "html": bc.TransportError, "malformed": bc.TransportError,
                    "truncated": bc.TransportError, "drop": bc.TransportError}
        for kind, cls in expected.items():
            with self.subTest(kind=kind):
                self.portal.clear_faults()
                self.portal.fault(kind, count=100, method="profile")
                c = self.quick(B24_MAX_RETRIES=2)
                self.portal.reset_stats()
                with self.assertRaises(cls) as ctx:
                    c.call("profile")
                self.assertEqual(self.portal.stats()["requests"], 3, "one try and two retries")
                self.assertNotIn(self.portal.code, str(ctx.exception))
                if isinstance(ctx.exception, bc.TransportError):
                    self.assertIn("127.0.0.1", str(ctx.exception))

    def _texts(self, chat_id: int, text: str) -> list:
        return [m for m in self.portal.chat_messages(chat_id) if m["text"] == text]

    def test_write_with_unknown_outcome_is_not_retried(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("drop_after", count=1, method="im.message.add")
        with self.assertRaises(bc.UnknownOutcomeError):
            self.quick().call("im.message.add", {"DIALOG_ID": "chat%d" % chat, "MESSAGE": "once"})
        self.assertEqual(len(self._texts(chat, "once")), 1)
        self.assertEqual(self.portal.stats()["counts"]["im.message.add"], 1)

    def test_send_text_reconciles_by_template_id(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("drop_after", count=1, method="im.message.add")
        mid = bc.send_text(self.quick(), "chat%d" % chat, "arrived anyway")
        self.assertEqual([m["id"] for m in self._texts(chat, "arrived anyway")], [mid])
        # dropped before it ran: not in the chat, so sent again with the same TEMPLATE_ID -- once
        self.portal.fault("drop", count=1, method="im.message.add")
        mid = bc.send_text(self.quick(), "chat%d" % chat, "dropped, resent")
        self.assertEqual([m["id"] for m in self._texts(chat, "dropped, resent")], [mid])
        # the attempt died after the portal recorded its uuid: "not known yet" until the record
        # expires; past the patience it is reported, never posted twice
        self.portal.behave(fail_after_uuid=1, uuid_ttl=3600)
        with self.assertRaises(bc.UnknownOutcomeError) as ctx:
            bc.send_text(self.quick(), "chat%d" % chat, "stuck", patience=1.0)
        self.assertIn("check the chat", str(ctx.exception))
        self.assertIn("MESSAGE_DUPLICATED_BY_UUID", str(ctx.exception))
        self.assertEqual(self._texts(chat, "stuck"), [])

    def test_write_refused_by_the_rate_limit_is_retried_once_posted(self) -> None:
        chat = self.ids["lines_member"]
        self.portal.fault("http503", count=2, method="im.message.add")
        bc.send_text(self.quick(), "chat%d" % chat, "after 503")
        self.assertEqual(len(self._texts(chat, "after 503")), 1)


if __name__ == "__main__":
    unittest.main()


class Tls(PortalCase):
    """https:// with a certificate the client cannot verify: one clear error, no retries."""

    def test_unverifiable_certificate_is_not_retried(self) -> None:
        import shutil
        import ssl
        import subprocess
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer
        if not shutil.which("openssl"):
            self.skipTest("openssl is not installed")
        key, cert = self.tmp + "/key.pem", self.tmp + "/cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
        hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        httpd = HTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.addCleanup(httpd.server_close)
        self.addCleanup(httpd.shutdown)
        base = "https://127.0.0.1:%d/rest/7/%s/" % (httpd.server_address[1], self.portal.code)
        slept: list = []
        client = bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": base}), sleep=slept.append)
        with self.assertRaises(bc.TransportError) as ctx_err:
            client.call("profile")
        self.assertIn("TLS certificate could not be verified", str(ctx_err.exception))
        self.assertNotIn(self.portal.code, str(ctx_err.exception))
        self.assertEqual(slept, [])
        self.assertEqual(hits, [])
