#!/usr/bin/env python3
"""What following each answer's delivery costs: requests per answered message with tracking on and off,
side by side in one run, and the idle cost once nothing is in flight.

Two bridges (BRIDGE_TRACK_DELIVERY=1 and =0) run against two emulators with the same dialogs and the same
customer traffic (an instant bot; the portal's connector confirms each reply 0.3 s after it is posted).
Every request a bridge makes is counted by its emulator: while the traffic runs and the verdicts come
in, then over an idle stretch with nothing in flight.

    python3 bench/delivery.py [--dialogs 20] [--messages 60] [--rate 2] [--poll 1.0] [--idle 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import bridge_world  # noqa: E402


def run(track: bool, args: argparse.Namespace, results: dict) -> None:
    env = {"BRIDGE_TRACK_DELIVERY": "1" if track else "0"}
    with bridge_world(args.dialogs, env=env, poll_sec=args.poll) as (portal, bot, chats, _proc):
        texts = ["m%d" % i for i in range(args.messages)]
        before = portal.stats()["requests"]
        for i, text in enumerate(texts):
            portal.customer_message(chats[i % len(chats)], text)
            time.sleep(1.0 / args.rate)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(bot.received) < len(texts):
            time.sleep(0.1)
        time.sleep(2 * args.poll + 1.0)          # the last verdicts come in
        answered = len(bot.received)
        busy = portal.stats()["requests"] - before
        idle_from = portal.stats()["requests"]
        time.sleep(args.idle)
        idle = (portal.stats()["requests"] - idle_from) * 60.0 / args.idle
        results[track] = (answered, busy, idle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogs", type=int, default=20)
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--rate", type=float, default=2.0, help="customer messages per second")
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    results: dict = {}
    threads = [threading.Thread(target=run, args=(track, args, results)) for track in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("%d messages over %d dialogs at %g/s, poll every %g s, instant bot; requests counted by the emulator"
          % (args.messages, args.dialogs, args.rate, args.poll))
    print("%-14s %9s %9s %14s %12s" % ("tracking", "answered", "requests", "req/answered", "idle req/min"))
    for track in (True, False):
        answered, busy, idle = results[track]
        print("%-14s %9d %9d %14.2f %12.1f" % ("on" if track else "off", answered, busy,
                                              busy / max(answered, 1), idle))
    on, off = results[True], results[False]
    print("tracking adds %+.2f requests per answered message; idle: %.1f vs %.1f requests/min"
          % (on[1] / max(on[0], 1) - off[1] / max(off[0], 1), on[2], off[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
