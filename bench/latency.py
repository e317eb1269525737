#!/usr/bin/env python3
"""Inbound-to-bot latency and idle cost of the bridge for each source of inbound messages.

One bridge per source runs as a subprocess against the emulator and an instant bot, side by side
in one run, with the same poll interval: FIRST_ID polling, the event queue (im.v2.Event), the HTTP
receiver fed by an outgoing webhook (ONOPENLINEMESSAGEADD), the receiver fed by the bridge's legacy
Open Lines chat bot (ONIMBOTMESSAGEADD), and the bridge's own Chatbots 2.0 bot in fetch mode
(imbot.v2.Event.get, no public URL).  Customers write at random moments; for each message, the
time from its creation on the portal to the bot receiving it, as a multiple of the poll interval
and of a bare loopback HTTP round trip, and the portal requests spent per answered message.  Then
each bridge sits idle and the requests it costs the portal per minute are counted.  No chat waits in a queue (those produce no events, and a scan at
the poll interval would hide what push does); the emulator's queue server posts without delay.
For scale: a bare loopback round trip, and the floor of any pushed message -- the portal's POST
to a receiver, one REST read, one bot exchange, each measured alone and summed.

    python3 bench/latency.py [--messages 40] [--poll 1.0]
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import bridge_world  # noqa: E402

import b24common as bc  # noqa: E402
import b24push as push  # noqa: E402
import mock_b24_portal as mp  # noqa: E402
import mock_bot_server  # noqa: E402
import olbridge.bot as botlib  # noqa: E402
from olbridge import chatbot  # noqa: E402

SOURCES = ("poll", "events", "receiver", "chat bot", "fetch bot")
BOT_CHATS = ("chat bot", "fetch bot")       # their chats are new sessions the bot joins


def percentile(values: list, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def loopback_round_trip(url: str, n: int = 200) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    times = []
    for _ in range(n):
        started = time.perf_counter()
        with opener.open(url, timeout=5) as resp:
            resp.read()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pipeline_floor(server, bot, n: int = 100) -> float:
    """What a pushed message needs at the least, each step measured alone on loopback: the portal's
    form POST to a receiver, one ``im.dialog.messages.get``, one bot exchange (medians, summed)."""
    receiver = push.ReceiverSource(("127.0.0.1", 0), app_token="t" * 16)
    receiver.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    client = bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": server.webhook_base,
                                           "B24_RATE_PER_SEC": "100", "B24_RATE_BURST": "10000"}))
    server.portal.set_limits(rate=10000, burst=10 ** 6)
    asker = botlib.BotClient(bc.Config.from_env({"B24_WEBHOOK_BASE": server.webhook_base, "BOT_HTTP_URL": bot.url}))
    chat = server.portal.world_ids["lines_member"]
    body = b"event=ONIMBOTJOINCHAT&data[PARAMS][DIALOG_ID]=chat1&auth[application_token]=" + b"t" * 16
    steps: dict = {"post": [], "rest": [], "bot": []}
    try:
        for _ in range(n):
            t = time.perf_counter()
            with opener.open(urllib.request.Request("http://127.0.0.1:%d/" % receiver.address[1], data=body),
                             timeout=5) as resp:
                resp.read()
            steps["post"].append(time.perf_counter() - t)
            t = time.perf_counter()
            client.call("im.dialog.messages.get", {"DIALOG_ID": "chat%d" % chat, "FIRST_ID": 0, "LIMIT": 50})
            steps["rest"].append(time.perf_counter() - t)
            t = time.perf_counter()
            asker.ask({"text": "hi", "dialog_id": "chat1"})
            steps["bot"].append(time.perf_counter() - t)
    finally:
        receiver.close()
    bot.received.clear()
    return sum(statistics.median(v) for v in steps.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet(portal) -> None:
    """Close the sessions waiting in the webhook user's queue: nothing makes the scan run fast."""
    for chat in list(portal.chats.values()):
        if chat["type"] == "lines" and portal.in_queue_for(chat, 7):
            portal.close_session(chat["id"])
    portal.behave(push_delay=0.0)


def preparer(source: str, poll: float):
    def prepare(server, folder: str) -> dict:
        portal = server.portal
        quiet(portal)
        env = {"B24_POLL_SEC": str(poll), "B24_RECONCILE_SEC": "60"}
        if source in ("poll", "events"):
            return dict(env, B24_SOURCE=source)
        portal.set_webhook(scopes=["im", "imopenlines", "imbot"])
        client = bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": server.webhook_base}))
        if source == "fetch bot":
            bot_id, _what = chatbot.register_fetch_bot(client, folder, "Bench bot", chatbot.BOT_CODE)
            for line in list(portal.lines):
                portal.line_bot(line, bot_id, time=0)
            return dict(env, B24_SOURCE="auto")
        port = free_port()
        env.update(B24_SOURCE="poll", B24_LISTEN="127.0.0.1:%d" % port)
        if source == "receiver":
            return dict(env, B24_APP_TOKEN=portal.outgoing_webhook("http://127.0.0.1:%d/" % port)["application_token"])
        bot_id = chatbot.register_webhook_bot(client, folder, "http://127.0.0.1:%d/" % port, "Bench bot",
                                              chatbot.BOT_CODE)
        for line in list(portal.lines):
            portal.line_bot(line, bot_id, time=0)
        return env
    return prepare


def run(source: str, poll: float, messages: int, seed: int, idle_sec: float) -> tuple:
    with bridge_world(0, poll_sec=poll, prepare=preparer(source, poll)) as (portal, bot, _chats, _proc):
        rng = random.Random(seed)
        if source in BOT_CHATS:        # the bot joins the new sessions of its lines
            chats = [portal.new_conversation(3, "Bench Customer%d" % i, None, "hi")["chat_id"] for i in range(5)]
        else:
            chats = [c["id"] for c in portal.chats.values() if c["type"] == "lines" and 7 in c["members"]]
        time.sleep(1.5)
        bot.received.clear()
        start_requests = sum(portal.counts.values())
        created = {}
        for i in range(messages):
            time.sleep(rng.uniform(0.05, 2.2 * poll))
            text = "latency %d" % i
            created[text] = time.time()
            portal.customer_message(rng.choice(chats), text)
        deadline = time.monotonic() + 90
        while sum(1 for r in bot.received if r["payload"]["text"] in created) < messages \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        lat = [r["t"] - created[r["payload"]["text"]] for r in bot.received if r["payload"]["text"] in created]
        time.sleep(1.0)
        before = sum(portal.counts.values())
        per_message = (before - start_requests) / max(1, len(lat))
        time.sleep(idle_sec)
        return lat, per_message, (sum(portal.counts.values()) - before) * 60.0 / idle_sec


def main(argv: list | None = None) -> int:
    logging.getLogger("b24_ol_bridge").setLevel(logging.ERROR)   # --register-bot's http:// warning
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40, help="messages per source (default 40)")
    parser.add_argument("--poll", type=float, default=1.0, help="B24_POLL_SEC for every source (default 1)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idling measured (default 60)")
    args = parser.parse_args(argv)
    bot = mock_bot_server.BotServer().start()
    server = mp.serve()
    try:
        rtt = loopback_round_trip(bot.url.replace("/webhook/whatsapp", "/"))
        floor = pipeline_floor(server, bot)
    finally:
        bot.stop()
        server.stop()
    print("inbound-to-bot latency per source, instant bot, B24_POLL_SEC=%g, B24_RECONCILE_SEC=60, %d messages each"
          % (args.poll, args.messages))
    print("bare loopback HTTP round trip (median): %.2f ms; the floor of a pushed message -- the portal's POST, "
          "one REST read, one bot POST, each alone -- %.2f ms" % (rtt * 1000, floor * 1000))
    print("%-10s %9s %9s %11s %11s %15s %12s %12s %13s" % (
        "source", "p50 (ms)", "p99 (ms)", "p50 / poll", "p99 / poll", "p50 / loopback", "p50 / floor",
        "req / answer", "idle req/min"))
    for n, source in enumerate(SOURCES):
        lat, per_message, idle = run(source, args.poll, args.messages, seed=n + 1, idle_sec=args.idle)
        if len(lat) < args.messages:
            print("%-10s only %d of %d messages reached the bot" % (source, len(lat), args.messages))
            if not lat:
                continue
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print("%-10s %9.1f %9.1f %10.2fx %10.2fx %14.0fx %11.1fx %12.2f %13.1f" % (
            source, p50 * 1000, p99 * 1000, p50 / args.poll, p99 / args.poll, p50 / rtt, p50 / floor, per_message,
            idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
