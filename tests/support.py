"""Shared helpers: an emulator on 127.0.0.1, scripts run as real subprocesses."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import logging  # noqa: E402

import b24common as bc  # noqa: E402
import mock_b24_portal as mp  # noqa: E402

# retries log warnings; in-process tests check behaviour, not those lines
for _name in ("b24common", "b24push"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False

PY = sys.executable

# Ports a test picks and binds later (a listener a script opens, an emulator brought back after an outage)
# come from below the kernel's ephemeral range: tests side by side open thousands of client connections,
# whose local ports come from that range and could take a port between the pick and the bind.
_PORTS = range(20000, 32000)
_port_rng = __import__("random").SystemRandom()     # not a seeded one: workers are forked


def free_port() -> int:
    """A loopback port nobody listens on now, outside the ephemeral range."""
    import socket
    while True:
        port = _port_rng.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def script(name: str) -> str:
    return os.path.join(ROOT, name)


class PortalCase(unittest.TestCase):
    """A fresh emulator per test (cheap: it is a thread on a free port)."""

    poll_sec = "0.3"

    def setUp(self) -> None:
        self.server = mp.serve(free_port())
        self.portal: mp.Portal = self.server.portal
        self.ids = self.portal.world_ids
        self.tmp = tempfile.mkdtemp(prefix="b24test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(self.server.stop)
        self.procs: list = []
        self.addCleanup(self._kill_procs)

    def wait_for(self, cond, timeout: float = 15, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        self.fail("timed out waiting for %s" % what)

    def use_portal(self, portal: mp.Portal) -> None:
        """Run this test against *portal* (a variant of the emulator) instead of the default one."""
        self.server.stop()
        self.server = mp.PortalServer(portal, 0).start()
        self.addCleanup(self.server.stop)
        self.portal = self.server.portal
        self.ids = self.portal.world_ids

    # -- in-process client ------------------------------------------------
    def config(self, **extra) -> bc.Config:
        env = {"B24_WEBHOOK_BASE": self.server.webhook_base}
        env.update({k: str(v) for k, v in extra.items()})
        return bc.Config.from_env(env)

    def client(self, **extra) -> bc.Client:
        return bc.Client(self.config(**extra))

    def poller(self, client: bc.Client | None = None, **kw) -> bc.Poller:
        """A started poller for the webhook user (id 7)."""
        p = bc.Poller(client or self.client(), self_id=7, **kw)
        p.start()
        return p

    def reads(self) -> int:
        """``im.dialog.messages.get`` calls since the last stats reset, on their own or in a batch."""
        st = self.portal.stats()
        return st["counts"].get("im.dialog.messages.get", 0) + st["sub_counts"].get("im.dialog.messages.get", 0)

    # -- subprocesses ----------------------------------------------------------
    def env(self, **extra) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1",
               "PYTHON_DOTENV_DISABLED": "1", "B24_WEBHOOK_BASE": self.server.webhook_base,
               "B24_POLL_SEC": self.poll_sec, "B24_STATE_DIR": os.path.join(self.tmp, "state")}
        for key in ("PYENV_VERSION", "PYENV_ROOT"):
            if key in os.environ:
                env[key] = os.environ[key]
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def run_script(self, name: str, *args: str, env: dict | None = None, input: str | None = None,
                   timeout: float = 60, cwd: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([PY, script(name)] + list(args), input=input, capture_output=True,
                              text=True, env=env or self.env(), timeout=timeout, cwd=cwd or self.tmp)
        self.assertNoSecret(proc.stdout + proc.stderr)
        return proc

    def start_script(self, name: str, *args: str, env: dict | None = None) -> "Proc":
        p = Proc([PY, script(name)] + list(args), env or self.env(), self.tmp)
        self.procs.append(p)
        return p

    def _kill_procs(self) -> None:
        for p in self.procs:
            p.kill()
            self.assertNoSecret(p.all_output())

    # -- assertions ---------------------------------------------------------------
    def assertNoSecret(self, text: str) -> None:
        self.assertNotIn(self.portal.code, text, "the webhook code leaked into output")

    def assertOneLineError(self, proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
        self.assertEqual(proc.returncode, code, proc.stderr)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()]
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        for needle in needles:
            self.assertIn(needle, proc.stderr)


class Proc:
    """A running script whose stdout and stderr lines are collected by threads."""

    def __init__(self, argv: list, env: dict, cwd: str, stdin=subprocess.DEVNULL):
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=stdin, text=True, env=env, cwd=cwd)
        self.out: queue.Queue = queue.Queue()
        self.stdout_lines: list = []
        self.stderr_lines: list = []
        self._threads = [threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout_lines, True),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink: list, to_queue: bool) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if to_queue:
                self.out.put(line.rstrip("\n"))

    def read_lines(self, count: int, timeout: float = 20) -> list:
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got.append(self.out.get(timeout=left))
            except queue.Empty:
                break
        return got

    def wait_stderr(self, needle: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in ln for ln in list(self.stderr_lines)):
                return True
            if self.popen.poll() is not None:
                time.sleep(0.1)
                return any(needle in ln for ln in list(self.stderr_lines))
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            rc = self.popen.wait()
        self._close()
        return rc

    def _close(self) -> None:
        for t in self._threads:
            t.join(2)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._close()

    def all_output(self) -> str:
        return "\n".join(self.stdout_lines + self.stderr_lines)


def control(server, endpoint: str, **body) -> dict:
    """Call the emulator's control API over HTTP."""
    req = urllib.request.Request("%s/_control/%s" % (server.url, endpoint),
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return json.loads(resp.read())["result"]


class PtyProc:
    """A script on a real pseudo-terminal (controlling tty, fixed size); output kept raw."""

    def __init__(self, argv: list, env: dict, cwd: str, rows: int = 30, cols: int = 100):
        import fcntl
        import pty
        import struct
        import termios
        pid, fd = pty.fork()
        if pid == 0:  # child
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.buf = b""
        self.lock = threading.Lock()
        self.returncode = None
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.buf += data

    @property
    def text(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode("utf-8"))

    def expect(self, needle: str, timeout: float = 15, start: int = 0) -> int:
        """Wait until *needle* appears at or after *start*; return the index after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = self.text.find(needle, start)
            if pos >= 0:
                return pos + len(needle)
            time.sleep(0.05)
        raise AssertionError("%r not seen within %gs; screen so far:\n%s" % (needle, timeout, self.text[-3000:]))

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
                    else (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
                return self.returncode
            time.sleep(0.05)
        raise AssertionError("still running after %gs:\n%s" % (timeout, self.text[-2000:]))

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.returncode = -9
        try:
            os.close(self.fd)
        except OSError:
            pass
