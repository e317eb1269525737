"""Configuration from the environment: validation, normalisation, redaction."""
from __future__ import annotations

import unittest

from tests.support import bc

CODE = "abc123def456ghi7"
GOOD = "https://portal.example.invalid/rest/7/%s/" % CODE


class WebhookBase(unittest.TestCase):
    def cfg(self, base: str, **extra) -> bc.Config:
        env = {"B24_WEBHOOK_BASE": base}
        env.update(extra)
        return bc.Config.from_env(env)

    def test_normalised_forms(self) -> None:
        for raw in (GOOD, GOOD[:-1], GOOD + "profile.json", GOOD + "profile", GOOD + "im.message.add.json",
                    "  %s  " % GOOD, '"%s"' % GOOD, GOOD + "scope.json/"):
            with self.subTest(raw=raw):
                cfg = self.cfg(raw)
                self.assertEqual(cfg.webhook_base, GOOD)
                self.assertEqual(cfg.portal_host, "portal.example.invalid")
                self.assertEqual(cfg.user_id, 7)

    def test_loopback_http_allowed(self) -> None:
        for host in ("127.0.0.1:8080", "localhost:9", "[::1]:80"):
            with self.subTest(host=host):
                self.assertTrue(self.cfg("http://%s/rest/1/%s/" % (host, CODE)).webhook_base.startswith("http://"))

    def test_rejections_name_the_problem_without_the_code(self) -> None:
        cases = [
            ("", "B24_WEBHOOK_BASE is not set"),
            ("http://portal.example.invalid/rest/7/%s/" % CODE, "https:// only"),
            ("ftp://portal.example.invalid/rest/7/%s/" % CODE, "not an http(s) URL"),
            ("https://portal.example.invalid/7/%s/" % CODE, "/rest/<user_id>/<code>/"),
            ("https://portal.example.invalid/rest/x/%s/" % CODE, "positive number"),
            ("https://portal.example.invalid/rest/7/%s!!/" % CODE, "looks wrong"),
            ("https://portal.example.invalid/rest/7/%s/?a=1" % CODE, "'?' or '#'"),
            ("portal.example.invalid/rest/7/%s/" % CODE, "not an http(s) URL"),
        ]
        for raw, needle in cases:
            with self.subTest(raw=raw):
                with self.assertRaises(bc.ConfigError) as ctx:
                    self.cfg(raw)
                self.assertIn(needle, str(ctx.exception))
                self.assertNotIn(CODE, str(ctx.exception))
                self.assertEqual(ctx.exception.exit_code, bc.EXIT_USAGE)

    def test_numbers_parse_and_stay_in_range(self) -> None:
        self.assertEqual(self.cfg(GOOD).poll_sec, 2.0)
        self.assertEqual(self.cfg(GOOD).bot_timeout, 120.0)
        self.assertEqual(self.cfg(GOOD, B24_POLL_SEC="0.5").poll_sec, 0.5)
        for name, value in (("B24_POLL_SEC", "fast"), ("B24_POLL_SEC", "0"), ("B24_POLL_SEC", "-1"),
                            ("BOT_HTTP_TIMEOUT_SEC", "1e9"), ("B24_RATE_BURST", "2.5"),
                            ("B24_POLL_SEC", "nan")):
            with self.subTest(name=name, value=value):
                with self.assertRaises(bc.ConfigError) as ctx:
                    self.cfg(GOOD, **{name: value})
                self.assertIn(name, str(ctx.exception))

    def test_bot_settings(self) -> None:
        with self.assertRaises(bc.ConfigError):
            self.cfg(GOOD, BOT_HTTP_URL="not a url")
        with self.assertRaises(bc.ConfigError) as ctx:
            bc.Config.from_env({"B24_WEBHOOK_BASE": GOOD}, require_bot=True)
        self.assertIn("BOT_HTTP_URL", str(ctx.exception))
        with self.assertRaises(bc.ConfigError):
            self.cfg(GOOD, B24_BUSINESS_PHONE="call me")

    def test_secrets_hidden_in_repr_and_redact(self) -> None:
        cfg = self.cfg(GOOD, BOT_HTTP_AUTH="Bearer s3cr3t-token-value")
        self.assertNotIn(CODE, repr(cfg))
        self.assertNotIn("s3cr3t", repr(cfg))
        self.assertNotIn(CODE, repr(bc.Client(cfg)))
        self.assertEqual(bc.redact("see %s and Bearer s3cr3t-token-value" % GOOD),
                         "see https://portal.example.invalid/rest/7/***/ and ***")
        self.assertEqual(bc.redact("token s3cr3t-token-value alone"), "token *** alone")
        err = bc.APIError("X", "echo " + GOOD, 400, "m")
        self.assertNotIn(CODE, str(err))
        self.assertNotIn(CODE, repr(err))


class Dialogs(unittest.TestCase):
    def test_dialog_ids(self) -> None:
        self.assertEqual(bc.parse_dialog_id("chat15"), "chat15")
        self.assertEqual(bc.parse_dialog_id("15"), "chat15")
        self.assertEqual(bc.parse_dialog_id("CHAT15"), "chat15")
        self.assertEqual(bc.parse_dialog_id("user9"), "9")
        self.assertEqual(bc.display_dialog_id("9"), "user9")
        for bad in ("", "chat", "chat0", "0", "-3", "chat1.5", "sg5", "user", "abc", "chat 5x"):
            with self.subTest(bad=bad):
                with self.assertRaises(bc.UsageError):
                    bc.parse_dialog_id(bad)

    def test_phones(self) -> None:
        self.assertEqual(bc.normalize_phone("10000000101"), "+10000000101")
        self.assertEqual(bc.normalize_phone("+1 000 000-01-02"), "+10000000102")
        self.assertEqual(bc.normalize_phone("10000000103@c.us"), "+10000000103")
        self.assertEqual(bc.normalize_phone(False), "")
        self.assertEqual(bc.normalize_phone("10000x0001"), "")

    def test_bbcode(self) -> None:
        self.assertEqual(bc.bbcode_to_text("[b]A[/b][br]B"), "A\nB")
        self.assertEqual(bc.bbcode_to_text("[URL=https://x.invalid/]site[/URL]"), "site (https://x.invalid/)")
        self.assertEqual(bc.bbcode_to_text("[USER=5 REPLACE]Olga[/USER], hi"), "Olga, hi")

    def test_split_text(self) -> None:
        para = ("word " * 30).strip()
        text = "\n\n".join([para] * 10)
        parts = bc.split_text(text, limit=400)
        self.assertTrue(all(len(p) <= 400 for p in parts))
        self.assertEqual("\n\n".join(parts), text)
        self.assertEqual(bc.split_text("x" * 25, limit=10), ["x" * 10, "x" * 10, "x" * 5])
        self.assertEqual(bc.split_text("  short  "), ["short"])


if __name__ == "__main__":
    unittest.main()
