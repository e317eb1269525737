"""Posting answers exactly once: parts of many dialogs in one batch, one part per dialog at a time, each
with its own TEMPLATE_ID; a lost answer is looked for in the dialog before anything is sent again."""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from typing import Callable

import b24common as bc
import b24files
from b24delivery import reports_delivery
from olbridge.pauses import Pauses
from olbridge.scheduler import Scheduler
from olbridge.shared import MAX_PARTS, Shared
from olbridge.store import Row

log = logging.getLogger("b24_ol_bridge")

BOT_NOT_IN_CHAT = ("ACCESS_DENIED", "CHAT_NOT_FOUND", "CANCELED", "BOT_NOT_FOUND")
STRAINED_SEC = 10.0         # a request that waited for the portal's budget this recently: the bridge is rate-bound
SHARE_WAIT_SEC = 1.0        # replies wait up to this long for the scan due next, to go in its request,
SHARE_MAX_REPLIES = 10      #   when there are no more than this many at once (light load)
PACK_WAIT_SEC = 1.0         # rate-bound, a batch not yet full waits up to this long for the answers on their way
# inside a batch, "$result[name]" and its like are references to other commands' results (fact sheet §4)
BATCH_REFERENCE = re.compile(r"\$(?:result|next|total|error|time)\[", re.IGNORECASE)


class Poster:
    """One thread posts what :meth:`take` hands it; the dialog goes back to the workers when its answer
    is out (or must wait).  A chat bot's replies go one request each (``imbot.message.add``)."""

    def __init__(self, shared: Shared, pauses: Pauses, scheduler: Scheduler):
        self.shared = shared
        self.pauses = pauses
        self.scheduler = scheduler
        self.outbox: queue.Queue = queue.Queue()
        self.posting = False          # a batch is on its way (waiting for the portal's budget, maybe)
        self.warned_bot_cannot_post: set = set()
        self.on_posted: Callable[[tuple], None] = lambda part: None   # a part to follow (Deliveries.follow)
        # (dialog, session, why): our chat bot is no longer in the chat (BotSessions.left)
        self.bot_left: Callable[[str, int, str], None] = lambda dialog, session, why: None
        self.scan_due_in: Callable[[], "float | None"] = lambda: None     # (Inbound.scan_due_in)

    def start(self) -> None:
        threading.Thread(target=self._run, name="bridge-poster", daemon=True).start()

    def take(self, row: Row) -> str | None:
        """A worker hands over an answered row: "posting" (the poster has the dialog now), or None."""
        if self._late(row, "the bot's answer is not posted"):
            return None
        self.scheduler.to_poster(row.dialog)
        self.outbox.put(row)
        return "posting"

    def _late(self, row: Row, what: str) -> bool:
        if self.pauses.human_after(row):
            why = "a person wrote in the dialog meanwhile"
        elif self.pauses.handed_over(row):
            why = "the conversation went to people meanwhile"
        else:
            return False
        log.info("%s: %s; %s", row.where, why, what)
        self.shared.stats["dropped_late"] += 1
        self.shared.finish(row)
        return True

    def busy(self) -> bool:
        """Is the portal's budget what holds the replies back (requests had to wait for it lately, or half
        the burst allowance is spent)?  Then reading less often, in bigger bites, leaves more of it to the
        replies -- and keeps the other half for whatever else uses the webhook."""
        return self.shared.client.limiter.strained(STRAINED_SEC)

    def patience(self, replies: int) -> float:
        """How long a batch of *replies* waits for company: for the scan due next when it is due within
        :data:`SHARE_WAIT_SEC` (one request for both; a read or a delivery check coming first takes the
        replies along just the same).  Only at light load: no more than :data:`SHARE_MAX_REPLIES` at once,
        and less than a quarter of the burst allowance spent, no request kept waiting lately -- under load
        replies that wait leave the budget idle, and the scan, no longer giving way to them, spends it
        on reads."""
        due = self.scan_due_in()
        if due is None or due > SHARE_WAIT_SEC or replies > SHARE_MAX_REPLIES \
                or self.shared.client.limiter.strained(STRAINED_SEC, 0.25):
            return 0.0
        return due + 0.2

    def follow(self, row: Row) -> bool:
        """Is there a delivery verdict to wait for (an Open Lines chat whose connector reports one)?"""
        return self.shared.settings.track_delivery and reports_delivery(row.payload.get("connector") or "")

    def _release(self, row: Row, *, again_at: float | None = None) -> None:
        self.scheduler.from_poster(row.dialog, again_at)

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        live = self.shared.live
        while True:
            live.beat("waiting for replies to post")
            try:
                first = self.outbox.get(timeout=1.0)
            except queue.Empty:
                continue
            # let a burst gather -- and while the portal's budget makes the batch wait anyway, gather what comes
            # meanwhile too: a fuller batch, and no answer left for the round after.  A plain sleep: a stop
            # does not cut it short (the reply in progress is still posted)
            time.sleep(min(1.0, max(0.02, self.shared.client.limiter.ready_in())))
            jobs = self._gather(first)
            self.posting = True
            try:
                self._post_batch(list(jobs.values()))
            except bc.Interrupted:
                return                       # stopping: each part not recorded as posted is looked for next time
            except Exception as exc:  # noqa: BLE001 - the poster survives everything; the rows wait
                log.exception("posting replies failed unexpectedly (%s); they are retried in 30 s", exc)
                for row in jobs.values():
                    self._release(row, again_at=time.monotonic() + 30)
            finally:
                self.posting = False

    def _gather(self, first: Row) -> dict:
        """``{dialog: row}`` for one batch: *first* and what waits in the outbox -- and, while the portal's
        budget is what limits us and the workers still have answers on their way, what comes within
        :data:`PACK_WAIT_SEC`: a batch short of full spends a request that a full one would have made go
        further (the gap costs nothing then: the budget is not idle, the bucket only drains)."""
        jobs = {first.dialog: first}
        limit = self.shared.settings.reply_batch
        deadline = time.monotonic() + PACK_WAIT_SEC
        while len(jobs) < limit:
            try:
                row = self.outbox.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or not self._packing():
                    break
                try:
                    row = self.outbox.get(timeout=min(left, 0.1))
                except queue.Empty:
                    continue
            if row.dialog in jobs:   # never two parts of one dialog in one batch: order first
                self.outbox.put(row)
                break
            jobs[row.dialog] = row
        return jobs

    def _packing(self) -> bool:
        """Is a batch short of full better off waiting: requests waited for the budget lately, or half the
        burst allowance is spent -- and more answers are on their way (a dialog is with a worker, or waits for one)?"""
        return self.scheduler.answering() and self.busy()

    def _post_batch(self, rows: list) -> None:
        live = []
        for row in rows:
            if self._late(row, "the rest of the answer is not posted"):
                self._release(row)
            elif row.posted >= len(row.answer):
                self._done(row)
            else:
                live.append(row)
        if not live:
            return
        legacy_bot = self.shared.legacy_bot
        alone = [row for row in live if legacy_bot or not isinstance(row.answer[row.posted], str)
                 or BATCH_REFERENCE.search(row.answer[row.posted])]
        # the legacy chat bot's replies, files, texts a batch would take for references: a request (or three) each
        for row in alone:
            self.shared.live.beat("posting a reply of %s" % row.where)
            self._after_post(row, *self._post_one(row))
        live = [row for row in live if row not in alone]
        if not live:
            return
        names = {"r%d" % i: row for i, row in enumerate(live)}
        commands = {name: self._command(row) for name, row in names.items()}
        self.shared.live.beat("posting %d replies" % len(live))
        try:
            result = self.shared.client.batch(commands, patience=self.patience(len(commands)))
            after = result.after                # the scan, if it ran just before, in the same request
            outcomes = {name: result.errors.get(name) for name in names}
            missing = [n for n in names if n not in result.results and n not in result.errors]
            ids = {n: message_id_of(result.results.get(n)) for n in names}     # the posted messages' ids
        except bc.TRANSIENT as exc:
            # the answer to the whole batch was lost or refused: find out, reply by reply
            outcomes, missing, ids, after = {}, list(names), {}, frozenset()
            log.info("replies not confirmed (%s); looking for them in their dialogs", exc)
        if missing:
            found = self._find_posted({n: names[n] for n in missing})
            for n in missing:
                ids[n] = found.get(n, 0)
                outcomes[n] = None if found.get(n) else bc.UnknownOutcomeError("not confirmed", "not in the dialog yet")
        for name, row in names.items():
            self._after_post(row, outcomes.get(name), ids.get(name, 0), after)

    def _command(self, row: Row) -> tuple:
        """``(method, params)`` posting *row*'s next part with its uuid: as our fetch-mode chat bot in the chats
        it holds (``imbot.v2.Chat.Message.send`` with a ``templateId``), else as the webhook user."""
        sh = self.shared
        text, uuid = row.answer[row.posted], sh.template(row, row.posted)
        if sh.as_bot(row):
            bot = sh.fetch_bot
            return "imbot.v2.Chat.Message.send", {"botId": bot["bot_id"], "botToken": bot["client_id"],
                                                  "dialogId": row.dialog,
                                                  "fields": {"message": text, "templateId": uuid}}
        return "im.message.add", {"DIALOG_ID": row.dialog, "MESSAGE": text, "TEMPLATE_ID": uuid}

    def _post_one(self, row: Row) -> tuple:
        """Post the next part of *row*'s answer: as our fetch-mode bot in its chats; as the legacy chat bot
        when one is registered (falling back to the webhook user where the bot is not in the chat); else with
        ``im.message.add``.  ``(None, message id)`` (id 0 when not known), or ``(error, 0)``."""
        sh = self.shared
        text = row.answer[row.posted]
        if not isinstance(text, str):
            return self._post_file(row, text)
        if sh.as_bot(row):
            method, params = self._command(row)
            try:
                return None, message_id_of(sh.client.call(method, params, write=True))
            except bc.UnknownOutcomeError as exc:        # the templateId tells: is it there?
                return self._settle(row, exc)
            except bc.B24Error as exc:
                return exc, 0
        if sh.legacy_bot:
            try:
                return None, bc.as_int(sh.client.call("imbot.message.add", {
                    "BOT_ID": sh.chat_bot["bot_id"], "CLIENT_ID": sh.chat_bot["client_id"],
                    "DIALOG_ID": row.dialog, "MESSAGE": text}, write=True))
            except bc.UnknownOutcomeError as exc:
                # imbot.message.add has no TEMPLATE_ID: parts_present() looks for the bot's texts instead
                return self._settle(row, exc)
            except bc.TRANSIENT + (bc.AuthError,) as exc:
                return exc, 0
            except bc.APIError as exc:
                if row.dialog not in self.warned_bot_cannot_post:
                    self.warned_bot_cannot_post.add(row.dialog)
                    log.warning("%s: the chat bot cannot post in %s (%s): answering as the webhook user",
                                row.where, bc.display_dialog_id(row.dialog), exc)
        try:
            return None, bc.send_text(sh.client, row.dialog, text, template_id=sh.template(row, row.posted),
                                      patience=0)
        except bc.B24Error as exc:
            return exc, 0

    def _settle(self, row: Row, exc: bc.UnknownOutcomeError) -> tuple:
        """A post whose answer was lost: ``(None, its message id)`` when the part is in the dialog after all,
        else ``(exc, 0)`` (retried later)."""
        try:
            found = self.parts_present(row)
        except bc.B24Error:
            return exc, 0
        return (None, found[row.posted]) if row.posted in found else (exc, 0)

    def _post_file(self, row: Row, part: dict) -> tuple:
        """A file of the answer, kept since it was fetched: as our chat bot in its chats, else by the webhook's
        route (the Disk steps with this part's TEMPLATE_ID, or the one-call upload)."""
        sh = self.shared
        sh.uploading.add(row.dialog)
        try:
            f = sh.files.load(part)
            mid = b24files.send_file(sh.client, row.dialog, f, caption=part.get("caption") or "",
                                     template_id=sh.template(row, row.posted), route=sh.file_route,
                                     bot=sh.fetch_bot if sh.as_bot(row) else None, patience=0)
            sh.posted(row.dialog, mid)      # before `uploading` is cleared: its echo is known as ours throughout
        except bc.B24Error as exc:
            return exc, 0
        finally:
            sh.uploading.discard(row.dialog)
        sh.files.drop(part)
        return None, mid

    # -- is it there already? ------------------------------------------------------------------
    def parts_present(self, row: Row) -> dict:
        """Which parts of this message's answer are already in the dialog, ``{part index: message id}`` (by
        their TEMPLATE_IDs, or the legacy chat bot's texts: imbot.message.add takes no TEMPLATE_ID).

        Asked once for a message left over from an earlier run (or put back from the dead letters): a
        crash between posting a part and recording it must not post it twice, even on a portal that has
        forgotten the uuid -- and a part that was refused must not be taken for posted because a later
        one is there."""
        sh = self.shared
        ours = {sh.template(row, i): i for i in range(MAX_PARTS)}
        bot_id = bc.as_int((sh.legacy_bot or {}).get("bot_id"))
        authors = {sh.client.whoami()["id"], bc.as_int((sh.chat_bot or {}).get("bot_id"))}
        by_name = any(not isinstance(p, str) for p in row.answer) and (sh.file_route != "disk" or sh.as_bot(row))
        found: dict = {}
        after = row.message_id
        for _page in range(4):
            res = sh.client.call("im.dialog.messages.get", {"DIALOG_ID": row.dialog, "FIRST_ID": after,
                                                            "LIMIT": bc.MESSAGES_PAGE})
            found.update({ours[uuid]: mid for uuid, mid in bc.posted_uuids(res).items() if uuid in ours})
            msgs, _users, files = bc.messages_of(res)
            for m in msgs if by_name else ():       # the one-call uploads carry no uuid: a file is known by its name
                if bc.as_int(m.get("author_id")) in authors:
                    names = b24files.file_names(m, files)
                    mid = bc.as_int(m.get("id"))
                    # after the parts before it (its texts, found by uuid): not an earlier answer's file of that name
                    found.update({i: mid for i, part in enumerate(row.answer)
                                  if not isinstance(part, str) and part.get("name") in names and i not in found
                                  and mid > max([found[j] for j in found if j < i] or [row.message_id])})
            for m in msgs if bot_id and row.answer else ():
                if bc.as_int(m.get("author_id")) == bot_id:        # the bot's parts carry no uuid
                    found.update({i: bc.as_int(m.get("id")) for i, text in enumerate(row.answer)
                                  if text == m.get("text")})
            if len(msgs) < bc.MESSAGES_PAGE:
                break
            after = max(bc.as_int(m.get("id")) for m in msgs)
        return found

    def _find_posted(self, rows: dict) -> dict:
        """``{name: the id of row's next part in its dialog, 0 if it is not there}``, for many rows in one
        batch of reads."""
        try:
            br = self.shared.client.batch({n: ("im.dialog.messages.get", {"DIALOG_ID": r.dialog, "LAST_ID": 0,
                                                                          "LIMIT": bc.MESSAGES_PAGE})
                                           for n, r in rows.items()})
        except bc.B24Error:
            return {}
        return {n: bc.posted_uuids(br.results.get(n)).get(self.shared.template(r, r.posted), 0)
                for n, r in rows.items()}

    # -- what a post's outcome means ---------------------------------------------------------
    def _after_post(self, row: Row, error: Exception | None, message_id: int = 0,
                    after: frozenset = frozenset()) -> None:
        sh = self.shared
        index, total = row.posted, len(row.answer)
        if error is None:
            sh.stats["replies"] += 1
            sh.posted(row.dialog, message_id, after)
            if message_id and self.follow(row):
                self.on_posted(sh.store.part_posted(row, message_id, index, posted=index + 1, attempts=0,
                                                    first_try=None))
            else:
                sh.store.update(row, posted=index + 1, attempts=0, first_try=None)
            self._next_part(row)
            return
        if sh.as_bot(row) and isinstance(error, bc.APIError) and error.code.upper() in BOT_NOT_IN_CHAT:
            # the session left the bot (time ran out, "0", an operator): this answer is late
            self.bot_left(row.dialog, row.payload.get("session_id") or 0,
                          "the portal says the bot is no longer in the chat (%s)" % error.code)
            sh.stats["dropped_late"] += 1
            sh.finish(row)
            self._release(row)
            return
        if isinstance(error, bc.NotMemberError):
            sh.cannot_post_in(row, "the portal says it is not a member (CANCELED): the dialog waits in "
                                   "the queue or its session was closed")
            sh.bury(row, "not posted: the webhook user is not a member of the dialog", "post")
            self._release(row)
            return
        if isinstance(error, bc.TRANSIENT + (bc.DuplicateUuidError,)) or (
                isinstance(error, bc.APIError) and error.code.upper() == "SENDING_FAILED"):   # in flight (§14.5)
            if sh.retry_later(row, "reply %d/%d not posted yet (%s)" % (index + 1, total, error)):
                self._release(row, again_at=time.monotonic() + max(0.0, row.next_try - time.time()))
            else:
                sh.bury(row, "reply %d/%d not posted for %g hours: %s" % (
                    index + 1, total, sh.settings.retry_hours, error), "post")
                self._release(row)
            return
        # this part is refused for good: a dead letter for it, the rest goes on
        if not isinstance(row.answer[index], str):
            sh.files.drop(row.answer[index])
        sh.stats["send_failures"] += 1
        sh.dead_letter(row, "reply %d/%d refused: %s" % (index + 1, total, bc.format_error(error)), "post")
        log.error("%s: reply %d/%d refused (%s); it is in the dead letters, the rest goes on",
                  row.where, index + 1, total, error)
        sh.store.update(row, posted=index + 1)
        self._next_part(row)

    def _next_part(self, row: Row) -> None:
        skip = next_missing(row, row.posted)
        if skip != row.posted:                 # found in the dialog already (a run before this one)
            self.shared.store.update(row, posted=skip)
        if row.posted < len(row.answer):
            self.outbox.put(row)      # the next part, in a later batch
        else:
            self._done(row)

    def _done(self, row: Row) -> None:
        if row.answer:
            self.shared.stats["answered"] += 1
        if row.handoff:
            self._hand_over(row)
        self.shared.finish(row)
        self._release(row)

    def _hand_over(self, row: Row) -> None:
        sh = self.shared
        sh.store.set_handed_off(row.dialog, self.pauses.hand_over(row))
        log.info("%s: the bot handed the dialog over to a person; it stays out of this conversation", row.where)
        if sh.settings.handoff_to or sh.as_bot(row):     # a chat our bot holds must be let go of
            sh.to_queue(row, "the bot handed over", sh.settings.handoff_to)


def message_id_of(result: object) -> int:
    """The posted message's id: ``im.message.add`` answers the id, ``imbot.v2.Chat.Message.send`` ``{"id": ...}``."""
    if isinstance(result, dict):
        return bc.as_int(result.get("id"))
    return bc.as_int(result)


def next_missing(row: Row, start: int) -> int:
    """The first part from *start* on that is not in the dialog yet (``len(answer)``: none)."""
    index = start
    while index < len(row.answer) and index in row.present:
        index += 1
    return index
