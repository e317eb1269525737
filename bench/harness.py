"""What the bridge benchmarks share: an emulator, a mock bot and a bridge subprocess on loopback."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mock_b24_portal as mp  # noqa: E402
import mock_bot_server  # noqa: E402


@contextlib.contextmanager
def bridge_world(dialogs: int, *, env: dict | None = None, args: list | None = None, bot_delay: float = 0.0,
                 default_limits: bool = False, poll_sec: float = 0.5,
                 prepare: Callable[[mp.PortalServer, str], dict] | None = None) -> Iterator[tuple]:
    """``(portal, bot, chats, bridge process)``: *dialogs* Open Lines dialogs of the webhook user, a bot
    answering after *bot_delay*, a quiet bridge polling every *poll_sec* -- all stopped afterwards.
    Unless *default_limits*, the portal's limits are lifted (cost is measured, not pacing).
    *prepare(portal server, state folder)* runs before the bridge starts and returns more environment."""
    server = mp.serve()
    bot = mock_bot_server.BotServer(delay=bot_delay).start()
    folder = tempfile.mkdtemp(prefix="bench-bridge-")
    proc = None
    try:
        portal = server.portal
        full_env = dict(os.environ, B24_WEBHOOK_BASE=server.webhook_base, BOT_HTTP_URL=bot.url,
                        B24_POLL_SEC=str(poll_sec), B24_STATE_DIR=folder, PYTHON_DOTENV_DISABLED="1")
        if not default_limits:
            portal.set_limits(rate=10000, burst=10 ** 6)
            full_env.update(B24_RATE_PER_SEC="100", B24_RATE_BURST="10000")
        full_env.update(env or {})
        if prepare is not None:
            full_env.update(prepare(server, folder))
        chats = portal.add_dialogs(dialogs)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "b24_ol_bridge.py"), "-q"] + list(args or []),
                                env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(2.5)          # signed in, started from now
        yield portal, bot, chats, proc
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        bot.stop()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
