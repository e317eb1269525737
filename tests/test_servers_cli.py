"""The two stand-ins as scripts: first line on stdout, then they serve until stopped."""
from __future__ import annotations

import json
import subprocess
import unittest
import urllib.request

from tests.support import PY, script

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServersAsScripts(unittest.TestCase):
    def start(self, name: str, *args: str) -> tuple:
        proc = subprocess.Popen([PY, script(name)] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.terminate)
        key, _, value = proc.stdout.readline().strip().partition("=")
        return proc, key, value

    def post(self, url: str, body: dict) -> object:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with OPENER.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def test_portal_script_prints_its_webhook_then_serves(self) -> None:
        _proc, key, base = self.start("mock_b24_portal.py", "--dialogs", "5")
        self.assertEqual(key, "B24_WEBHOOK_BASE")
        self.assertRegex(base, r"^http://127\.0\.0\.1:\d+/rest/7/[0-9a-f]{16}/$")
        body = self.post(base + "profile.json", {})
        self.assertEqual(body["result"]["ID"], "7")
        items = self.post(base + "im.recent.list", {"LIMIT": 200})["result"]["items"]
        self.assertGreaterEqual(len(items), 5 + 4)

    def test_bot_script_prints_its_url_and_answers_in_the_chosen_shape(self) -> None:
        _proc, key, url = self.start("mock_bot_server.py", "--shape", "replies")
        self.assertEqual(key, "BOT_HTTP_URL")
        self.assertEqual(self.post(url, {"text": "hi"}), {"replies": ["Echo: hi"]})

    def test_bad_options(self) -> None:
        for name, args, needle in (("mock_b24_portal.py", ["--port", "70000"], "--port"),
                                   ("mock_b24_portal.py", ["--code", "x"], "--code"),
                                   ("mock_bot_server.py", ["--shape", "xml"], "invalid choice"),
                                   ("mock_bot_server.py", ["--delay", "-1"], "--delay")):
            with self.subTest(name=name, args=args):
                proc = subprocess.run([PY, script(name)] + args, capture_output=True, text=True, timeout=30)
                self.assertEqual(proc.returncode, 2)
                self.assertIn(needle, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)
