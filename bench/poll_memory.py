#!/usr/bin/env python3
"""Memory of a long-running poller: does it grow with the number of cycles?

The emulator runs as a separate process (so its own growing message store is
not counted); this process runs b24common.Poller against it for many cycles,
with a few customers writing before each one, and reports the Python heap
(tracemalloc, after a full GC) early and late in the run, side by side.

    python3 bench/poll_memory.py [--cycles 1500] [--dialogs 1000]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import subprocess
import sys
import tracemalloc
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import b24common as bc  # noqa: E402

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def control(base_url: str, endpoint: str, **body) -> object:
    req = urllib.request.Request("%s/_control/%s" % (base_url, endpoint), data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with OPENER.open(req, timeout=30) as resp:
        return json.loads(resp.read())["result"]


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1500)
    parser.add_argument("--dialogs", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.getLogger("b24common").addHandler(logging.NullHandler())
    logging.getLogger("b24common").propagate = False
    portal = subprocess.Popen([sys.executable, os.path.join(ROOT, "mock_b24_portal.py"),
                               "--dialogs", str(args.dialogs)], stdout=subprocess.PIPE, text=True)
    try:
        base = portal.stdout.readline().strip().split("=", 1)[1]
        url = base.split("/rest/")[0]
        control(url, "limits", rate=10000, burst=1000000)
        chats = sorted(int(c) for c, v in control(url, "world")["chats"].items()
                       if v["type"] == "lines" and 7 in v["members"])
        client = bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": base, "B24_RATE_PER_SEC": "100",
                                               "B24_RATE_BURST": "10000"}))
        rng = random.Random(5)
        tracemalloc.start()
        poller = bc.Poller(client, self_id=7)
        poller.start()
        marks = {}
        ids: list = []
        points = (max(1, args.cycles // 10), max(2, args.cycles // 2), args.cycles)
        for cycle in range(1, args.cycles + 1):
            for chat in rng.sample(chats, 3):
                control(url, "customer_message", chat_id=chat, text="message %d" % cycle)
            ids.extend(m.id for m in poller.poll())
            if cycle in points:
                gc.collect()
                marks[cycle] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        delivered = len(ids)
        if delivered != 3 * args.cycles or ids != sorted(set(ids)):
            raise SystemExit("delivered %d messages (%d distinct), expected %d in order"
                             % (delivered, len(set(ids)), 3 * args.cycles))
        first, half, last = points
        print("poller heap (KiB) after %d / %d / %d cycles: %.0f / %.0f / %.0f" % (
            first, half, last, marks[first] / 1024, marks[half] / 1024, marks[last] / 1024))
        print("growth over the second half: %.2fx (it grows while new dialogs and customers are met, "
              "then levels off)" % (marks[last] / marks[half]))
        print("%d dialogs, %d messages delivered in order once, %d requests (%.1f per cycle)" % (
            len(chats), delivered, client.requests, client.requests / args.cycles))
        return 0
    finally:
        portal.terminate()
        portal.wait()
        portal.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
