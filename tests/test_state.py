"""Durable state: atomic, private, and whole after kill -9 at any instant."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import unittest

from tests.support import PY, ROOT, PortalCase, bc, script

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import b24common as bc
sf = bc.StateFile(sys.argv[2])
n = sf.load().get("n", 0)
pad = "x" * 20000
print("ready", flush=True)
while True:
    n += 1
    sf.save({"n": n, "pad": pad, "cursors": {"chat%d" % i: n for i in range(50)}})
"""


class StateFileTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="b24state-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "sub", "state.json")

    def test_roundtrip_mode_and_folder(self) -> None:
        sf = bc.StateFile(self.path)
        self.assertEqual(sf.load(), {})
        sf.save({"cursors": {"chat1": 5}, "text": "привет"})
        self.assertEqual(sf.load(), {"cursors": {"chat1": 5}, "text": "привет"})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["state.json"])

    def test_corrupt_file_is_a_clear_error(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        for content, needle in (("{broken", "not valid JSON"), ("[1, 2]", "expected an object")):
            with self.subTest(content=content):
                with open(self.path, "w") as fh:
                    fh.write(content)
                with self.assertRaises(bc.ConfigError) as ctx:
                    bc.StateFile(self.path).load()
                self.assertIn(self.path, str(ctx.exception))
                self.assertIn(needle, str(ctx.exception))

    def test_default_locations(self) -> None:
        self.assertEqual(bc.default_state_dir({"B24_STATE_DIR": "/x", "STATE_DIRECTORY": "/y"}), "/x")
        self.assertEqual(bc.default_state_dir({"STATE_DIRECTORY": "/var/lib/b24:/other"}), "/var/lib/b24")
        self.assertEqual(bc.default_state_dir({"XDG_STATE_HOME": "/s"}), "/s/b24-openlines")
        self.assertTrue(bc.default_state_dir({}).endswith(os.path.join(".local", "state", "b24-openlines")))

    def test_kill_9_at_random_instants_never_leaves_a_broken_file(self) -> None:
        rng = random.Random(7)
        last = 0
        deadline = time.monotonic() + 20
        kills = 0
        while kills < 12 and time.monotonic() < deadline:
            proc = subprocess.Popen([PY, "-c", WRITER, ROOT, self.path], stdout=subprocess.PIPE, text=True)
            self.assertEqual(proc.stdout.readline().strip(), "ready")
            time.sleep(rng.uniform(0.01, 0.25))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)          # whole, parseable
            self.assertGreaterEqual(data["n"], last)
            self.assertEqual(set(data["cursors"].values()), {data["n"]})
            last = data["n"]
        self.assertGreaterEqual(kills, 5)
        self.assertGreater(last, kills)
        bc.StateFile(self.path).load()
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["state.json"])


if __name__ == "__main__":
    unittest.main()


class PrivateFiles(PortalCase):
    """Files with customer data or secrets: 0600 whatever the umask, never written through a planted link;
    a state folder anybody may write to is refused."""

    def test_umask_zero_still_gives_0600_files(self) -> None:
        from tests.support import Proc
        from tests.test_bridge import BRIDGE
        from tests.test_push import free_port
        folder = os.path.join(self.tmp, "state")
        env = self.env(B24_LISTEN=str(free_port()), B24_APP_TOKEN="t" * 24, BOT_HTTP_URL="http://127.0.0.1:9/bot")
        proc = Proc(["sh", "-c", 'umask 000; exec "$0" "$@"', PY, script(BRIDGE)], env, self.tmp)
        self.procs.append(proc)
        self.assertTrue(proc.wait_stderr("bridging Open Lines", 20), proc.all_output())
        self.assertEqual(proc.stop(), 0)
        os.close(bc.open_private(os.path.join(folder, "bridge.dead-letters.jsonl"), os.O_WRONLY | os.O_APPEND))
        names = os.listdir(folder)
        self.assertIn("bridge.receiver.sqlite", names)
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            self.assertEqual(mode & 0o077, 0, "%s is %o" % (name, mode))

    def test_planted_links_are_not_followed(self) -> None:
        folder = os.path.join(self.tmp, "state")
        os.makedirs(folder, mode=0o700)
        victim = os.path.join(self.tmp, "victim.txt")
        with open(victim, "w") as fh:
            fh.write("untouched\n")
        for name in ("bridge.lock", "bridge.dead-letters.jsonl"):
            link = os.path.join(folder, name)
            os.symlink(victim, link)
            with self.assertRaises(OSError):
                bc.open_private(link, os.O_WRONLY | os.O_APPEND)
            os.unlink(link)
        os.symlink(victim, os.path.join(folder, "chat-bot.json"))
        bc.write_private(os.path.join(folder, "chat-bot.json"), "{}")      # replaces the link, not the file
        with open(victim) as fh:
            self.assertEqual(fh.read(), "untouched\n")
        self.assertFalse(os.path.islink(os.path.join(folder, "chat-bot.json")))

    def test_a_world_writable_state_folder_is_refused(self) -> None:
        from tests.test_bridge import BRIDGE
        folder = os.path.join(self.tmp, "open")
        os.makedirs(folder)
        os.chmod(folder, 0o777)
        proc = self.run_script(BRIDGE, "--once", env=self.env(B24_STATE_DIR=folder, BOT_HTTP_URL="http://127.0.0.1:9/b"))
        self.assertOneLineError(proc, 2, "writable by everyone")
        proc = self.run_script("b24_openlines_reader.py", "--once", "--state", os.path.join(folder, "r.json"))
        self.assertOneLineError(proc, 2, "writable by everyone")


class DamagedStore(PortalCase):
    """An empty or damaged state database stops the bridge with one line and exit 2 -- never a silent fresh
    start -- and --reset-state starts over on purpose, keeping the old file aside."""

    def bridge(self, *args: str, **env):
        from tests.test_bridge import BRIDGE
        return self.run_script(BRIDGE, "--once", *args, env=self.env(BOT_HTTP_URL="http://127.0.0.1:9/bot", **env))

    def test_empty_and_damaged_databases_are_refused_then_reset_on_purpose(self) -> None:
        folder = os.path.join(self.tmp, "state")
        db = os.path.join(folder, "bridge.db")
        self.assertEqual(self.bridge().returncode, 0)
        with open(db, "rb") as fh:
            good = fh.read()
        cases = {"empty": b"", "not a database": b"this is not sqlite at all " * 200,
                 "damaged pages": good[:100] + bytes(random.Random(3).randrange(256) for _ in range(len(good) - 100))}
        for what, content in cases.items():
            with self.subTest(what):
                for suffix in ("-wal", "-shm"):
                    if os.path.exists(db + suffix):
                        os.unlink(db + suffix)
                with open(db, "wb") as fh:
                    fh.write(content)
                proc = self.bridge()
                self.assertOneLineError(proc, 2, "bridge.db", "--reset-state")
                self.assertNotIn("internal error", proc.stderr)
        proc = self.bridge("--reset-state")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        kept = [n for n in os.listdir(folder) if n.startswith("bridge.db.reset-")]
        self.assertTrue(kept, os.listdir(folder))
        self.assertEqual(self.bridge().returncode, 0)

    def test_a_state_that_cannot_be_written_is_a_configuration_error(self) -> None:
        proc = self.bridge("--state", "/proc/self/no-such-folder/bridge.db")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertNotIn("internal error", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
