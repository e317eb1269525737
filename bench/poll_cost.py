#!/usr/bin/env python3
"""Requests and response bytes per poll cycle, as counted by the emulator.

Our poller (b24common.Poller) against a naive one -- the whole recent list
every cycle, one im.dialog.messages.get per changed dialog, no batch -- run
side by side in this one process, each on a fresh emulator with the same
world.  Scenarios: idle with 10 and with 1,000 dialogs; 1, 10 and 50
dialogs changing per cycle (1,000 dialogs).  In every scenario some
dialogs wait in the webhook user's queue (``--waiting``, default 4): a
real portal appends them to every recent-list answer, whatever is asked.

Then a busy minute: of 300 dialogs, 10, 100 or 300 each get one message a
minute at an even pace, each at its own instant between two scans; a cycle
every 2 s on the portal's clock (run faster than real time).  Rows and bytes
the scans cost per cycle, with the scan as it is (2 s back; once a minute, a
sweep back to the previous one less 60 s) and as it was (60 s back every
cycle), against a quiet minute.

    python3 bench/poll_cost.py [--cycles N] [--waiting N]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import b24common as bc  # noqa: E402
import mock_b24_portal as mp  # noqa: E402


class NaivePoller:
    """What a first attempt looks like: read everything, fetch each changed dialog alone."""

    def __init__(self, client: bc.Client):
        self.client = client
        self.last: dict = {}

    def _all_items(self) -> list:
        items, offset = [], 0
        while True:
            env = self.client.call_full("im.recent.list", {"OFFSET": offset, "LIMIT": 200})
            res = env["result"]
            items.extend(res["items"])
            if not res.get("hasMore"):
                return items
            offset += 200     # the docs' way: `next` also counts the in-queue items

    def start(self) -> None:
        for item in self._all_items():
            self.last[item["id"]] = item["message"]["id"]

    def poll(self) -> list:
        out = []
        for item in self._all_items():
            did, mid = item["id"], item["message"]["id"]
            if item["chat"].get("entity_type") != "LINES" or mid <= self.last.get(did, 0):
                continue
            first = self.last.get(did, 0)
            while True:
                res = self.client.call("im.dialog.messages.get", {"DIALOG_ID": did, "FIRST_ID": first, "LIMIT": 50})
                msgs = sorted(res["messages"], key=lambda m: m["id"])
                out.extend(msgs)
                if msgs:
                    first = msgs[-1]["id"]
                if len(msgs) < 50:
                    break
            self.last[did] = max(first, mid)
        return out


def measure(dialogs: int, changing: int, cycles: int, kind: str, waiting: int) -> tuple:
    server = mp.serve()
    try:
        portal = server.portal
        portal.set_limits(rate=1000, burst=100000)   # measure cost, not pacing
        chats = portal.add_dialogs(max(0, dialogs - 3))  # the world has 3 LINES dialogs of ours
        for i in range(max(0, waiting - 1)):              # ... and one waiting in the queue
            portal.new_conversation(1, "Waiting Customer%d" % i, None, "anyone there?")
        client = bc.Client(bc.Config.from_env({"B24_WEBHOOK_BASE": server.webhook_base,
                                               "B24_RATE_PER_SEC": "100", "B24_RATE_BURST": "10000"}))
        poller = bc.Poller(client, self_id=7) if kind == "ours" else NaivePoller(client)
        poller.start()
        poller.poll()
        requests = nbytes = delivered = 0
        for cycle in range(cycles):
            for c in chats[cycle * 7 % max(1, len(chats) - changing):][:changing]:
                portal.customer_message(c, "hello %d" % cycle)
            portal.reset_stats()
            delivered += len(poller.poll())
            st = portal.stats()
            requests += st["requests"]
            nbytes += st["bytes_total"]
        expected = changing * cycles
        if delivered != expected:
            raise SystemExit("%s poller delivered %d messages, expected %d" % (kind, delivered, expected))
        return requests / cycles, nbytes / cycles
    finally:
        server.stop()


class _RowCounter(bc.Client):
    """A client that counts the rows the scan's ``im.recent.get`` returned (the poller names it "sync")."""

    rows = 0

    def batch(self, commands, **kwargs):
        result = super().batch(commands, **kwargs)
        if isinstance(result.results.get("sync"), list):
            self.rows += len(result.results["sync"])
        return result


def busy_minute(active: int, *, always_wide: bool, dialogs: int = 300, cycle: float = 2.0) -> tuple:
    """``(dialogs changed, scan rows, scan bytes)`` per cycle over a simulated minute in which *active*
    dialogs each get one message; the portal's clock and the sweep's run at the simulation's pace."""
    import time
    now = [time.time()]
    server = mp.serve()
    try:
        portal = server.portal
        portal.clock = lambda: now[0]
        portal.set_limits(rate=1000, burst=100000)
        chats = portal.add_dialogs(dialogs - 3)
        portal.take_chat(portal.world_ids["queued"], 9)           # nothing waits: only the scan is measured
        client = _RowCounter(bc.Config.from_env({"B24_WEBHOOK_BASE": server.webhook_base,
                                                 "B24_RATE_PER_SEC": "100", "B24_RATE_BURST": "10000"}))
        poller = bc.Poller(client, self_id=7)
        poller.monotonic = lambda: now[0]
        if always_wide:
            poller.sweep_every = 0.0                             # the 60 s margin every cycle: as it was
        poller.start()
        poller.poll()
        cycles = int(60 / cycle)
        # one message each, evenly over the minute, each at its own instant between two scans (written at
        # the very instant of a scan every time, they would meet the portal's whole-second dates at their worst)
        schedule: dict = {}
        for i, c in enumerate(chats[:active]):
            offset = (i + 0.5) * 60.0 / active                   # seconds into the minute
            schedule.setdefault(int(offset // cycle), []).append((offset % cycle, c))
        changed = rows = nbytes = 0
        for n in range(cycles * 2):                              # a minute to warm up, a minute measured
            begin = now[0]
            for offset, c in schedule.get(n % cycles, []):
                now[0] = begin + offset
                portal.customer_message(c, "busy %d" % n)
            now[0] = begin + cycle
            portal.reset_stats()
            portal.log.clear()
            client.rows = 0
            got = poller.poll()
            if n >= cycles:
                scan = next(e for e in portal.stats()["log"] if e["method"] == "batch")   # the first: the scan
                nbytes += scan["bytes"]
                rows += client.rows
                changed += len({m.dialog_id for m in got})
        return changed / cycles, rows / cycles, nbytes / cycles
    finally:
        server.stop()


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5, help="cycles measured per scenario (default 5)")
    parser.add_argument("--waiting", type=int, default=4, help="dialogs waiting in the queue (default 4)")
    args = parser.parse_args(argv)
    logging.getLogger("b24common").addHandler(logging.NullHandler())
    logging.getLogger("b24common").propagate = False
    scenarios = [("idle, 10 dialogs", 10, 0), ("idle, 1000 dialogs", 1000, 0),
                 ("1 of 1000 changing", 1000, 1), ("10 of 1000 changing", 1000, 10),
                 ("50 of 1000 changing", 1000, 50)]
    print("per poll cycle, mean of %d cycles, %d dialogs waiting in the queue; requests and response bytes "
          "counted by the emulator" % (args.cycles, max(1, args.waiting)))
    print("%-22s %10s %12s %10s %12s %9s %9s" % ("scenario", "ours req", "ours bytes", "naive req",
                                                "naive bytes", "req x", "bytes x"))
    ours_idle = {}
    for name, dialogs, changing in scenarios:
        o_req, o_bytes = measure(dialogs, changing, args.cycles, "ours", args.waiting)
        n_req, n_bytes = measure(dialogs, changing, args.cycles, "naive", args.waiting)
        if changing == 0:
            ours_idle[dialogs] = (o_req, o_bytes)
        print("%-22s %10.1f %12.0f %10.1f %12.0f %8.1fx %8.1fx" % (
            name, o_req, o_bytes, n_req, n_bytes, n_req / o_req, n_bytes / max(o_bytes, 1)))
    if 10 in ours_idle and 1000 in ours_idle:
        print("ours, idle 1000 vs 10 dialogs: requests %.2fx, bytes %.2fx" % (
            ours_idle[1000][0] / ours_idle[10][0], ours_idle[1000][1] / ours_idle[10][1]))
    print()
    print("a busy minute: 300 dialogs, N of them get one message each a minute; per 2 s cycle, the dialogs that "
          "changed, the rows im.recent.get returned and the scan request's bytes (the reads of the changed dialogs "
          "are not in it)")
    print("(target: 2x quiet + the rows that changed; a row's bytes from the 60 s scan, which returns every "
          "active dialog's row each cycle)")
    print("%-24s %10s %10s %12s %16s %10s %12s %10s %10s" % (
        "dialogs active a minute", "changed", "scan rows", "scan bytes", "as it was (60 s)", "x quiet",
        "was x quiet", "target", "x target"))
    quiet = busy_minute(0, always_wide=False)[2]
    for active in (0, 10, 100, 300):
        changed, rows, now_bytes = busy_minute(active, always_wide=False)
        _c, _r, was_bytes = busy_minute(active, always_wide=True)
        row = (was_bytes - quiet) / active if active else 0.0
        target = 2 * quiet + changed * row
        print("%-24s %10.1f %10.1f %12.0f %16.0f %9.2fx %11.2fx %10.0f %9.2fx" % (
            active, changed, rows, now_bytes, was_bytes, now_bytes / quiet, was_bytes / quiet, target,
            now_bytes / target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
