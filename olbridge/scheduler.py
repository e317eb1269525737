"""Which dialog is handled when: one worker per dialog at a time (its messages in order), dialogs side by
side, retries woken when they are due, and a dialog handed to the poster kept away from the workers."""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from typing import Callable

import b24common as bc
from olbridge.health import Liveness

log = logging.getLogger("b24_ol_bridge")


class Scheduler:
    """``wake(dialog)`` puts a dialog in line (now or at a time); worker threads take dialogs one at a
    time and run *serve* on them, which returns when to come back (None: nothing left).  Nothing is
    done under the lock but bookkeeping."""

    def __init__(self, live: Liveness, workers: int):
        self.serve: Callable[[str], "float | None"] = lambda dialog: None
        self.live = live
        self.workers = workers
        self.lock = threading.Lock()
        self.ready: queue.Queue = queue.Queue()
        self.queued: set = set()          # dialogs in `ready`
        self.working: set = set()         # dialogs a worker is on
        self.posting: set = set()         # dialogs whose answer the poster has
        self.rewake: set = set()          # woken while working or posting: woken again when let go
        self.delayed: list = []           # heap of (monotonic due, dialog)
        self.busy = 0                     # messages being handled (workers and poster)

    def start(self, serve: Callable[[str], "float | None"]) -> None:
        self.serve = serve
        for n in range(self.workers):
            threading.Thread(target=self._worker, name="bridge-worker-%d" % n, daemon=True).start()

    def wake(self, dialog: str, at: float | None = None) -> None:
        with self.lock:
            if at is not None and at > time.monotonic():
                heapq.heappush(self.delayed, (at, dialog))
            elif dialog in self.working or dialog in self.posting:
                self.rewake.add(dialog)      # whoever has it now wakes it again when it lets go
            elif dialog not in self.queued:
                self.queued.add(dialog)
                self.ready.put(dialog)

    def release_due(self) -> float:
        """Move dialogs whose wait is over to the ready queue; seconds until the next one."""
        now = time.monotonic()
        due = []
        with self.lock:
            while self.delayed and self.delayed[0][0] <= now:
                due.append(heapq.heappop(self.delayed)[1])
            wait = self.delayed[0][0] - now if self.delayed else 3600.0
        for dialog in due:
            self.wake(dialog)
        return wait

    def waiting_to_retry(self) -> int:
        with self.lock:
            return len(self.delayed)

    def idle(self) -> bool:
        """Nothing ready and nothing being handled (delayed retries may remain)."""
        with self.lock:
            return not self.queued and not self.working and not self.posting and self.ready.empty() \
                and self.busy == 0

    def answering(self) -> bool:
        """Are answers on their way: a dialog with a worker, or waiting for one?"""
        with self.lock:
            return bool(self.working or self.queued)

    def add_busy(self, n: int) -> None:
        with self.lock:
            self.busy += n

    # -- the poster's side ---------------------------------------------------------------
    def to_poster(self, dialog: str) -> None:
        with self.lock:
            self.posting.add(dialog)
            self.busy += 1

    def from_poster(self, dialog: str, again_at: float | None = None) -> None:
        """The poster is done with *dialog* (for now): it goes back to the workers."""
        with self.lock:
            self.posting.discard(dialog)
            self.rewake.discard(dialog)
            self.busy -= 1
        self.wake(dialog, again_at)

    # -- a worker ---------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            self.live.beat("waiting for work")
            try:
                dialog = self.ready.get(timeout=1.0)
            except queue.Empty:
                continue
            with self.lock:
                self.queued.discard(dialog)
                if dialog in self.working:
                    continue
                self.working.add(dialog)
            retry_at = None
            try:
                retry_at = self.serve(dialog)
            except bc.Interrupted:
                return                       # stopping: the message stays where it is, redone at the next start
            except Exception as exc:  # noqa: BLE001 - a worker survives everything; the work waits
                log.exception("%s: unexpected failure (%s); trying this dialog again in 30 s",
                              bc.display_dialog_id(dialog), exc)
                retry_at = time.monotonic() + 30
            finally:
                with self.lock:
                    self.working.discard(dialog)
                    again = dialog in self.rewake and dialog not in self.posting
                    if again:
                        self.rewake.discard(dialog)
            if retry_at is not None:
                self.wake(dialog, retry_at)
            if again:
                self.wake(dialog)
