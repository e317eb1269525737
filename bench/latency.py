#!/usr/bin/env python3
"""Inbound-to-bot latency of the bridge in poll mode, as a multiple of the poll interval.

A bridge runs as a subprocess against the emulator and an instant bot; customers write at random
moments; for each message, the time from its creation on the portal to the bot receiving it.
Printed for two poll intervals side by side, with a bare loopback HTTP round trip for scale.

    python3 bench/latency.py [--messages 60]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import bridge_world  # noqa: E402

import mock_bot_server  # noqa: E402


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


def run(poll_sec: float, messages: int, seed: int) -> list:
    with bridge_world(20, poll_sec=poll_sec, env={"B24_RATE_PER_SEC": "50", "B24_RATE_BURST": "1000"}) as (
            portal, bot, chats, _proc):
        rng = random.Random(seed)
        created = {}
        for i in range(messages):
            time.sleep(rng.uniform(0.05, 2.2 * poll_sec))
            text = "latency %d" % i
            created[text] = time.time()
            portal.customer_message(rng.choice(chats), text)
        deadline = time.monotonic() + 60
        while len(bot.received) < messages and time.monotonic() < deadline:
            time.sleep(0.05)
        return [r["t"] - created[r["payload"]["text"]] for r in bot.received if r["payload"]["text"] in created]


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60, help="messages per run (default 60)")
    args = parser.parse_args(argv)
    bot = mock_bot_server.BotServer().start()
    try:
        rtt = loopback_round_trip(bot.url.replace("/webhook/whatsapp", "/"))
    finally:
        bot.stop()
    print("inbound-to-bot latency, poll mode, instant bot, %d messages per run" % args.messages)
    print("bare loopback HTTP round trip (median): %.2f ms" % (rtt * 1000))
    print("%-10s %9s %9s %12s %12s %14s" % ("poll (s)", "p50 (s)", "p99 (s)", "p50 / poll", "p99 / poll",
                                            "p50 / loopback"))
    for poll in (0.5, 1.0):
        lat = run(poll, args.messages, seed=int(poll * 10))
        if len(lat) < args.messages:
            print("only %d of %d messages reached the bot" % (len(lat), args.messages))
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print("%-10g %9.2f %9.2f %11.2fx %11.2fx %13.0fx" % (poll, p50, p99, p50 / poll, p99 / poll, p50 / rtt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
