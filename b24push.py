"""Where inbound messages come from: FIRST_ID scans, the im.v2.Event queue, the portal's own POSTs.

Every source says the same small thing -- "look at this dialog (after its
cursor)" or "look everywhere" -- and the :class:`b24common.Poller` does the
looking: one code path classifies, orders and delivers each message once,
whichever source (or how many) saw it.  A hint about a message at or below the
cursor costs nothing; a hint that was lost is made good by the reconciliation
scan.  Used by the reader and the bridge:

* :class:`Hint`, :class:`Delivery`, :class:`Source` -- the small interface;
* :class:`ScanSource` (the recent lists), :class:`EventQueueSource`
  (``im.v2.Event``), :class:`ReceiverSource` (``B24_LISTEN``: outgoing
  webhook and chat bot POSTs, spooled in SQLite before the 200);
* :class:`Inbound` -- the sources behind one queue; :func:`choose_sources`
  picks them from ``B24_SOURCE`` / ``B24_LISTEN``; :func:`run_sources`
  feeds their batches to a handler.
"""
from __future__ import annotations

__all__ = ["Hint", "SCAN", "Delivery", "Source", "ScanSource", "EventQueueSource", "BotEventSource",
           "event_source_available",
           "Inbound", "choose_sources", "run_sources", "hints_of", "parse_php_form", "push_hints", "HintSpool",
           "ReceiverSource", "PushReceiver", "EVENTS_PAGE", "RECEIVER_MAX_BODY"]

import hmac
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from b24common import (
    TRANSIENT,
    APIError,
    AuthError,
    B24Error,
    Backoff,
    Client,
    ConfigError,
    Interrupted,
    as_int,
    as_map,
    line_queues,
    open_private,
)
from b24http import GuardedHTTPServer, content_length

EVENTS_PAGE = 100                    # im.v2.Event.get limit (1-1000)
SCAN_STRETCH_SEC = 5.0               # under load the scan waits for the replies, up to this long a cycle
RECEIVER_MAX_BODY = 1 << 20          # a POSTed event larger than this is refused (413)
RECEIVER_READ_TIMEOUT_SEC = 10.0    # the whole request: request line, headers and body
FORM_MAX_FIELDS = 1000               # fields of a form body (PHP's max_input_vars)
FORM_MAX_DEPTH = 8                   # brackets in one form key

log = logging.getLogger("b24push")


class Hint(NamedTuple):
    """Something new in *dialog_id*, up to *message_id* (0: unknown).  An empty dialog id means "look
    everywhere" (a scan).  *adopt*: our chat bot is in this dialog -- read it even if the recent list
    never shows it (a chat the bot holds is in nobody's queue)."""

    dialog_id: str = ""
    message_id: int = 0
    adopt: bool = False


SCAN = Hint()


class Delivery:
    """One batch of hints from one source; ``position`` is what acknowledging it commits."""

    __slots__ = ("source", "hints", "position", "more", "error", "handled")

    def __init__(self, source: Source, hints: list, position: Any = None, *, more: bool = False,
                 error: BaseException | None = None):
        self.source, self.hints, self.position, self.more, self.error = source, hints, position, more, error
        self.handled = threading.Event()


class Source:
    """One way in: :meth:`start`, then :meth:`next_batch` (blocks until there is something, or *stop*),
    and :meth:`ack` once what a batch pointed at is durably handed on.  :meth:`position` /
    :meth:`restore` carry what must survive a restart (the event queue's offset)."""

    name = "source"
    due: float | None = None          # when it next scans (monotonic), if it scans at all: see ScanSource

    def start(self) -> None:
        pass

    def next_batch(self, stop: threading.Event) -> Delivery | None:
        raise NotImplementedError

    def ack(self, delivery: Delivery) -> None:
        pass

    def position(self) -> Any:
        return None

    def position_after(self, delivery: Delivery) -> Any:
        """What :meth:`position` will be once *delivery* is acknowledged (saved with its work)."""
        return self.position()

    def restore(self, position: Any) -> None:
        pass

    def retune(self, poll_sec: float, reconcile_sec: float) -> None:
        """New intervals (a reloaded settings file)."""

    def close(self) -> None:
        pass


class ScanSource(Source):
    """FIRST_ID polling: "look everywhere" every *every* seconds -- the whole job when it is the only
    source, the reconciliation pass (``B24_RECONCILE_SEC``) beside a push source.  *fast* says when
    to scan at *fast_every* anyway (dialogs waiting in a queue produce no events)."""

    name = "poll"

    def __init__(self, every: float, *, fast_every: float | None = None,
                 fast: Callable[[], bool] | None = None, busy: Callable[[], bool] | None = None):
        self.every, self.fast_every, self.fast = every, fast_every, fast
        self.busy = busy          # replies wait for the portal's budget: the scan gives way (up to SCAN_STRETCH_SEC)
        self.first = True
        self.due = None                   # when the next scan starts (monotonic; a reply may wait for it)

    def retune(self, poll_sec: float, reconcile_sec: float) -> None:
        if self.fast_every is None:        # the whole job
            self.every = poll_sec
        else:                              # the reconciliation pass
            self.every, self.fast_every = reconcile_sec, poll_sec

    def interval(self) -> float:
        if self.fast_every is not None and self.fast is not None and self.fast():
            return min(self.every, self.fast_every)
        return self.every

    def next_batch(self, stop: threading.Event) -> Delivery | None:
        if not self.first:
            every = self.interval()
            self.due = time.monotonic() + every
            if stop.wait(every):
                return None
        if not self.first and self.busy is not None and self.busy():
            # a busy portal is served at its ceiling: the budget goes to the replies waiting for it, and the
            # scan reads less often, in bigger bites (the messages of SCAN_STRETCH_SEC for the price of one read)
            stretch = max(0.0, SCAN_STRETCH_SEC - self.interval())
            self.due = time.monotonic() + stretch
            if stop.wait(stretch):
                return None
        self.first = False
        self.due = time.monotonic()       # under way
        return Delivery(self, [SCAN])


BOT_MESSAGE_EVENTS = ("ONIMBOTV2MESSAGEADD", "ONIMBOTV2COMMANDADD")


def _event_hint(event: Mapping, *, lines_only: bool, skip: Callable[[Mapping], bool] | None) -> Hint | None:
    """An ``im.v2.Event.get`` / ``imbot.v2.Event.get`` event -> a hint (None: not ours to look at).  The bot's
    own events *adopt* their dialog: a chat the bot holds is in nobody's recent list."""
    etype = str(event.get("type") or "").upper()
    data = as_map(event.get("data"))
    chat = as_map(data.get("chat"))
    kind = str(chat.get("type") or "").lower()
    entity = str(chat.get("entityType") or chat.get("entity_type") or "").upper()
    if lines_only and chat and kind != "lines" and entity != "LINES":
        return None
    dialog = str(chat.get("dialogId") or data.get("dialogId") or "") or (
        "chat%d" % as_int(chat.get("id")) if as_int(chat.get("id")) else "")
    if etype == "ONIMV2MESSAGEADD" or etype in BOT_MESSAGE_EVENTS:
        msg = as_map(data.get("message"))
        if skip is not None and skip(msg):
            return None
        dialog = dialog or ("chat%d" % as_int(msg.get("chatId")) if as_int(msg.get("chatId")) else "")
        return Hint(dialog, as_int(msg.get("id")), etype != "ONIMV2MESSAGEADD")
    if etype in ("ONIMV2JOINCHAT", "ONIMBOTV2JOINCHAT"):
        return Hint(dialog, 0, etype == "ONIMBOTV2JOINCHAT")
    if etype == "ONIMBOTV2DELETE":
        log.warning("the portal says our chat bot was deleted: its chats are no longer ours "
                    "(b24_ol_bridge.py --register-bot makes a new one)")
    return None       # updates, deletions, reactions: nothing new to deliver


class EventQueueSource(Source):
    """``im.v2.Event.get`` (after ``im.v2.Event.subscribe``): no public URL needed.

    The offset of a batch is passed to the portal -- which acknowledges,
    i.e. deletes, everything before it for every reader of this user's queue
    -- only by the ``get`` after the batch was acknowledged here, and it is
    saved with the state, so a restart neither skips nor needs the portal to
    remember.  Again at once while ``hasMore``; otherwise every *interval*;
    growing pauses on errors.  Only chats the user is part of produce
    events: dialogs waiting in a queue come through the reconciliation scan.
    """

    name = "events"
    method = "im.v2.Event.get"

    def __init__(self, client: Client, *, interval: float, lines_only: bool = True,
                 skip: Callable[[Mapping], bool] | None = None,
                 observe: Callable[[Mapping], None] | None = None):
        self.client, self.interval, self.lines_only, self.skip = client, interval, lines_only, skip
        self.observe = observe            # sees every event as it comes (the bridge follows its bot's sessions)
        self.offset: int | None = None
        self.more = False
        self.backoff = Backoff(interval, client.config.backoff_max)

    def start(self) -> None:
        # subscribed already: see event_source_available()
        log.warning("reading the portal's event queue (im.v2.Event) of user %d: only ONE program may read it "
                    "-- a second reader or bridge on this webhook user takes events away from this one "
                    "(they then arrive only with the reconciliation scan)", self.client.config.user_id)

    def params(self) -> dict:
        return {}

    def position(self) -> Any:
        return self.offset

    def retune(self, poll_sec: float, reconcile_sec: float) -> None:
        self.interval = self.backoff.interval = poll_sec

    def restore(self, position: Any) -> None:
        if isinstance(position, int) and position > 0:
            self.offset = position

    def next_batch(self, stop: threading.Event) -> Delivery | None:
        if not self.more and self.offset is not None and stop.wait(self.interval):
            return None
        params: dict = dict(self.params(), limit=EVENTS_PAGE)
        if self.offset is not None:
            params["offset"] = self.offset
        try:
            res = as_map(self.client.call(self.method, params))
        except TRANSIENT as exc:
            delay = self.backoff.failed()
            log.warning("event queue: %s -- trying again in %.0f s", exc, delay)
            self.more = False
            stop.wait(delay)
            return None
        except B24Error as exc:            # a revoked webhook, a lost scope: the host decides
            return Delivery(self, [], error=exc)
        self.backoff.succeeded()
        events = [e for e in (res.get("events") or []) if isinstance(e, Mapping)]
        self.more = bool(res.get("hasMore")) and bool(events)
        if not events:
            if self.offset is None:
                self.offset = as_int(res.get("nextOffset")) or 0
            return None
        upto = as_int(res.get("nextOffset")) or max(as_int(e.get("eventId")) for e in events) + 1
        hints = []
        for e in events:
            if self.observe is not None:
                self.observe(e)
            h = _event_hint(e, lines_only=self.lines_only, skip=self.skip)
            if h is not None and h not in hints:
                hints.append(h)
        return Delivery(self, hints, upto, more=self.more)

    def position_after(self, delivery: Delivery) -> Any:
        if isinstance(delivery.position, int):
            return max(self.offset or 0, delivery.position)
        return self.offset

    def ack(self, delivery: Delivery) -> None:
        self.offset = self.position_after(delivery)


class BotEventSource(EventQueueSource):
    """``imbot.v2.Event.get``: the events of the bridge's own chat bot (Chatbots 2.0, fetch mode) -- every
    message a person writes in a chat the bot holds, and its joins -- kept on the portal for 24 hours, so
    nothing is lost while the bridge is down.  With *user_events*, the webhook user's own ``ONIMV2*`` events
    come in the same stream (one offset acknowledges both: no separate event-queue source then)."""

    name = "bot"
    method = "imbot.v2.Event.get"

    def __init__(self, client: Client, *, bot_id: int, token: str, user_events: bool, interval: float,
                 skip: Callable[[Mapping], bool] | None = None,
                 observe: Callable[[Mapping], None] | None = None):
        super().__init__(client, interval=interval, skip=skip, observe=observe)
        self.bot_id, self.token, self.user_events = bot_id, token, user_events

    def start(self) -> None:
        log.info("reading chat bot %d's events from the portal (imbot.v2.Event.get)%s", self.bot_id,
                 ", with the webhook user's own" if self.user_events else "")

    def params(self) -> dict:
        out: dict = {"botId": self.bot_id, "botToken": self.token}
        if self.user_events:
            out["withUserEvents"] = True
        return out


def event_source_available(client: Client, *, subscribe: bool = True) -> tuple:
    """``(True, "")`` if the portal has the event queue (it answers ``im.v2.Event.subscribe``); else
    ``(False, why)``.

    Without *subscribe* it only asks ``im.v2.Event.get`` (``limit=1``, no ``offset``: nothing is
    acknowledged; unsubscribed, the answer is an empty list, fact sheet §12.1): once subscribed, the
    portal keeps every event of the user for 24 hours whether anybody reads them or not."""
    try:
        if subscribe:
            client.call("im.v2.Event.subscribe")
        else:
            client.call("im.v2.Event.get", {"limit": 1})
        return True, ""
    except (AuthError,) + TRANSIENT:
        raise
    except APIError as exc:
        return False, "%s" % exc


class Inbound:
    """The sources behind one queue, for one consumer (the main loop).

    Each source runs in its own thread and offers one batch at a time: the
    next is asked for only once the previous one was :meth:`done` (so an
    acknowledgement never overtakes the work).  :meth:`get` waits for
    batches; :meth:`done` acknowledges them and lets their sources go on.
    """

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.ready: list = []
        self.started = False

    def start(self) -> None:
        for src in self.sources:
            threading.Thread(target=self._run, args=(src,), name="source-%s" % src.name, daemon=True).start()
        self.started = True

    def scan_due_in(self) -> float | None:
        """Seconds until the next scan starts (0: it is under way), None if no scan is planned."""
        dues = [src.due for src in self.sources if src.due is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _run(self, src: Source) -> None:
        while not self.stop.is_set():
            try:
                batch = src.next_batch(self.stop)
            except Interrupted:
                return                          # the program is stopping
            except Exception as exc:  # noqa: BLE001 - a source must not die silently
                log.exception("source %s failed (%s); it starts over in 5 s", src.name, exc)
                self.stop.wait(5)
                continue
            if batch is None:
                continue
            with self.cond:
                self.ready.append(batch)
                self.cond.notify_all()
            while not batch.handled.wait(0.5):
                if self.stop.is_set():
                    return

    def get(self, timeout: float) -> list:
        """Every batch ready now, waiting up to *timeout* seconds for the first."""
        with self.cond:
            if not self.ready and timeout > 0:
                self.cond.wait(timeout)
            out, self.ready = self.ready, []
        return out

    def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for a batch (without taking it); True if one is ready."""
        with self.cond:
            if not self.ready and timeout > 0:
                self.cond.wait(timeout)
            return bool(self.ready)

    def put_back(self, batches: list) -> None:
        """Batches that could not be handled now: offered again by the next :meth:`get`."""
        with self.cond:
            self.ready[:0] = batches

    def done(self, batches: Iterable[Delivery]) -> None:
        for b in batches:
            b.source.ack(b)
            b.handled.set()

    def positions(self, after: Iterable[Delivery] = ()) -> dict:
        """``{source: position}`` to save -- as they will be once the batches *after* are acknowledged."""
        out = {s.name: s.position() for s in self.sources}
        for b in after:
            out[b.source.name] = b.source.position_after(b)
        return {name: pos for name, pos in out.items() if pos is not None}

    def retune(self, poll_sec: float, reconcile_sec: float) -> None:
        for s in self.sources:
            s.retune(poll_sec, reconcile_sec)

    def restore(self, positions: Mapping | None) -> None:
        for s in self.sources:
            if positions and s.name in positions:
                s.restore(positions[s.name])

    def close(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        for s in self.sources:
            s.close()


def choose_sources(client: Client, *, self_id: int, interval: float, spool_path: str = ":memory:",
                   client_id: str = "", waiting: Callable[[], bool] | None = None,
                   busy: Callable[[], bool] | None = None,
                   skip: Callable[[Mapping], bool] | None = None, own: Callable[[str, int], bool] | None = None,
                   bot: Mapping | None = None, observe: Callable[[Mapping], None] | None = None) -> list:
    """The sources ``B24_SOURCE`` and ``B24_LISTEN`` ask for, started, and always a scan: the whole
    job when nothing pushes, the reconciliation pass (``B24_RECONCILE_SEC``) when something does.

    ``auto`` takes the cheapest source that misses nothing: the bridge's own
    chat bot's events when it has one in fetch mode (*bot*: ``{"bot_id",
    "client_id"}``; the webhook user's events come in the same stream); the
    receiver when ``B24_LISTEN`` is set; else the event queue if the portal
    offers it and the webhook user is in no Open Lines queue -- a chat waiting
    in a queue produces no events, so a queue operator's scan must run at the
    poll interval anyway, and then polling alone costs less.  *own* tells the
    receiver which messages the caller posted itself (their echoes need no read).
    """
    cfg = client.config
    push: list = []
    if cfg.source == "bot" and not bot:
        raise ConfigError("B24_SOURCE=bot: no chat bot in fetch mode is registered here; run b24_ol_bridge.py "
                          "--register-bot first")
    if bot and cfg.source in ("auto", "bot", "events"):
        user_events, _why = event_source_available(client)
        push.append(BotEventSource(client, bot_id=as_int(bot["bot_id"]), token=str(bot["client_id"]),
                                   user_events=user_events, interval=interval, skip=skip, observe=observe))
    events = cfg.source == "events" and not push
    if cfg.source == "auto" and not cfg.listen and not push:
        ok, why = event_source_available(client, subscribe=False)     # subscribed only if it is used
        queues: list = []
        if ok:
            try:
                queues = [str(lid) for lid, _name, inside in line_queues(client, self_id) if inside]
            except APIError:
                queues = []
        if not ok:
            log.info("source: polling every %g s (this portal has no event queue: %s)", interval, why)
        elif queues:
            log.info("source: polling every %g s -- the event queue is not used: you are in the queue of %s %s, "
                     "and chats waiting in a queue produce no events (B24_SOURCE=events uses it anyway)",
                     interval, "lines" if len(queues) > 1 else "line", ", ".join(queues))
        events = ok and not queues
        if events:
            ok, why = event_source_available(client)
            if not ok:
                log.info("source: polling every %g s (the event queue did not take the subscription: %s)",
                         interval, why)
                events = False
    elif events:
        ok, why = event_source_available(client)
        if not ok:
            raise ConfigError("B24_SOURCE=events: this portal does not offer the event queue im.v2.Event (%s); "
                              "use B24_SOURCE=poll" % why)
    if events:
        push.append(EventQueueSource(client, interval=interval, skip=skip))
    if cfg.listen:
        if not cfg.app_token and not client_id:
            raise ConfigError("B24_LISTEN is set but B24_APP_TOKEN is not: put the application token shown "
                              "when you created the outgoing webhook in .env (or register the bridge's chat bot)")
        try:
            push.append(ReceiverSource(cfg.listen, app_token=cfg.app_token, client_id=client_id,
                                       spool_path=spool_path, portal_host=cfg.portal_host, own=own))
        except OSError as exc:
            raise ConfigError("B24_LISTEN=%s:%d: cannot listen (%s)" % (cfg.listen + (exc.strerror or exc,))) from None
    for src in push:
        src.start()
    if not push:
        return [ScanSource(interval, busy=busy)]
    log.info("source: %s, and a reconciliation scan every %g s (B24_RECONCILE_SEC)",
             " + ".join(s.name for s in push), cfg.reconcile_sec)
    return push + [ScanSource(cfg.reconcile_sec, fast_every=interval, fast=waiting)]


def run_sources(inbound: Inbound, handle: Callable[[list], bool], *, stop: threading.Event,
                interval: float, backoff_max: float | None = None,
                on_done: Callable[[], Any] | None = None) -> None:
    """Feed the batches of *inbound* to *handle* until *stop*; acknowledge what it handled.

    *handle* returns False when it could not keep the result (the batches are
    offered again).  Rate limits, 5xx and network trouble cost one warning and
    a growing pause; a revoked webhook -- from any source -- ends the loop.
    """
    backoff = Backoff(interval, backoff_max)
    while not stop.is_set():
        batches = inbound.get(min(1.0, interval))
        if not batches:
            continue
        for b in batches:
            if b.error is not None:
                raise b.error
        try:
            ok = handle(batches)
        except TRANSIENT as exc:
            delay = backoff.failed()
            log.warning("%s -- trying again in %.0f s", exc, delay)
            inbound.put_back(batches)
            stop.wait(delay)
            continue
        if ok is False:
            inbound.put_back(batches)
            stop.wait(min(interval, 5.0))
            continue
        backoff.succeeded()
        inbound.done(batches)
        if on_done is not None:
            on_done()


def hints_of(batches: Iterable[Delivery]) -> list:
    """Every hint of these batches, once each, in order."""
    return list(dict.fromkeys(h for b in batches for h in b.hints))

# -- the HTTP receiver ---------------------------------------------------------------

_FORM_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_FORM_PART = re.compile(r"\[([^\[\]]*)\]")


def parse_php_form(pairs: Iterable[tuple]) -> dict:
    """``[("data[PARAMS][DIALOG_ID]", "chat5")]`` -> ``{"data": {"PARAMS": {"DIALOG_ID": "chat5"}}}``.

    How PHP reads a form body: bracket keys nest, ``[]`` appends, a later
    scalar loses to an earlier array.  Values stay strings.  Linear in the
    size of the body; a key nested deeper than ``FORM_MAX_DEPTH`` is a
    ValueError (PHP's own limit is a setting too)."""
    out: dict = {}
    digits: dict = {}                 # id(node) -> how many of its keys are numbers (the next "[]")
    for key, value in pairs:
        m = _FORM_KEY.fullmatch(key)
        parts = [m.group(1)] + _FORM_PART.findall(m.group(2)) if m else [key]
        if len(parts) > FORM_MAX_DEPTH:
            raise ValueError("a form key nested deeper than %d" % FORM_MAX_DEPTH)
        node = out
        for i, part in enumerate(parts):
            if part == "":
                part = str(digits.get(id(node), 0))
            last = i == len(parts) - 1
            if part not in node and part.isdigit():
                digits[id(node)] = digits.get(id(node), 0) + 1
            if last:
                if not isinstance(node.get(part), dict):
                    node[part] = value
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
    return out


def _first(value: Any) -> Mapping:
    """``DATA`` as the docs show it (a one-element list, here a ``{"0": {...}}`` map) or as the
    source sends it (the object itself)."""
    value = as_map(value)
    if "0" in value and len(value) == 1:
        return as_map(value["0"])
    return value


def push_hints(body: Mapping) -> list:
    """What a POSTed event tells us: hints (possibly ``[SCAN]``), or ``[]`` for events we ignore."""
    event = str(body.get("event") or "").upper()
    data = as_map(body.get("data"))
    if event in ("ONIMBOTMESSAGEADD", "ONIMBOTJOINCHAT"):
        params = as_map(data.get("PARAMS"))
        dialog = str(params.get("DIALOG_ID") or "")
        if not dialog.startswith("chat") and as_int(params.get("CHAT_ID") or params.get("TO_CHAT_ID")):
            dialog = "chat%d" % as_int(params.get("CHAT_ID") or params.get("TO_CHAT_ID"))
        if not dialog.startswith("chat"):
            return []         # a private chat with the bot: not an Open Lines dialog
        return [Hint(dialog, as_int(params.get("MESSAGE_ID")) if event == "ONIMBOTMESSAGEADD" else 0, True)]
    if event == "ONOPENLINEMESSAGEADD":
        inner = _first(data.get("DATA"))
        msg = as_map(inner.get("message"))
        chat_id = as_int(msg.get("chat_id"))
        if chat_id:            # an outbound message: it carries the IM chat and message ids
            return [Hint("chat%d" % chat_id, as_int(msg.get("id")))]
        return [SCAN]          # an inbound one carries only the connector's ids (fact sheet §12)
    if event in ("ONSESSIONSTART", "ONSESSIONFINISH"):
        inner = _first(data.get("DATA"))            # they carry the IM chat id (fact sheet §12)
        chat_id = as_int(as_map(inner.get("chat")).get("chat_id")) or as_int(as_map(inner.get("connector")).get("chat_id"))
        return [Hint("chat%d" % chat_id)] if chat_id else [SCAN]
    if event == "ONIMBOTDELETE":
        return [SCAN]
    return []


class HintSpool:
    """Hints received over HTTP, kept in SQLite (WAL) until the pipeline has handled them.
    ``path=":memory:"`` keeps them in memory (the reconciliation scan covers a restart)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        if path != ":memory:":
            try:
                os.close(open_private(path, os.O_RDWR))    # 0600 before SQLite opens it (and its -wal, -shm)
            except OSError as exc:
                raise sqlite3.OperationalError("%s: %s" % (path, exc.strerror or exc)) from None
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS hints (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "dialog TEXT NOT NULL, message INTEGER NOT NULL, adopt INTEGER NOT NULL DEFAULT 0, "
                        "event TEXT, received REAL)")
        self.taken = 0

    def add(self, hints: list, event: str) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT INTO hints (dialog, message, adopt, event, received) "
                                    "VALUES (?, ?, ?, ?, ?)",
                                    [(h.dialog_id, h.message_id, int(h.adopt), event, time.time()) for h in hints])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def take(self, limit: int = 500) -> tuple:
        """``(highest row id, [hints])`` of the oldest *limit* rows after those already taken."""
        with self.lock:
            rows = self.db.execute("SELECT id, dialog, message, adopt FROM hints WHERE id > ? ORDER BY id LIMIT ?",
                                   (self.taken, limit)).fetchall()
        if not rows:
            return self.taken, []
        self.taken = rows[-1][0]
        return self.taken, [Hint(d, m, bool(a)) for _i, d, m, a in rows]

    def remove(self, upto: int) -> None:
        with self.lock:
            self.db.execute("DELETE FROM hints WHERE id <= ?", (upto,))

    def pending(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM hints").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


class ReceiverSource(Source):
    """Bitrix24's own POSTs (outgoing webhook, chat bot) through :class:`PushReceiver`, spooled first."""

    name = "receiver"

    def __init__(self, listen: tuple, *, app_token: str = "", client_id: str = "", spool_path: str = ":memory:",
                 portal_host: str = "", own: Callable[[str, int], bool] | None = None):
        self.listen = listen
        self.own = own                  # (dialog, message id) -> posted by us: its echo needs no read
        try:
            self.spool = HintSpool(spool_path)
        except sqlite3.Error as exc:
            raise ConfigError("%s: cannot open the receiver's spool (%s)" % (spool_path, exc)) from None
        self.arrived = threading.Event()
        self.server = PushReceiver(listen, self, app_token=app_token, client_id=client_id, portal_host=portal_host)

    @property
    def address(self) -> tuple:
        return self.server.server_address[:2]

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="push-receiver", daemon=True).start()
        log.info("receiving Bitrix24 events on http://%s:%d/ (put your TLS proxy in front of it)",
                 *self.address)
        if self.spool.pending():
            self.arrived.set()          # left over from before a restart

    def received(self, hints: list, event: str) -> None:
        if self.own is not None:        # the echo of a reply we posted: nothing to read
            hints = [h for h in hints if not (h.dialog_id and h.message_id and self.own(h.dialog_id, h.message_id))]
        if hints:
            self.spool.add(hints, event)    # durable before the portal hears 200
            self.arrived.set()

    def next_batch(self, stop: threading.Event) -> Delivery | None:
        if not self.arrived.wait(0.5):
            return None
        self.arrived.clear()
        upto, hints = self.spool.take()
        if not hints:
            return None
        self.arrived.set()              # there may be more: look again after this batch
        unique = list(dict.fromkeys(hints))
        return Delivery(self, unique, upto)

    def ack(self, delivery: Delivery) -> None:
        self.spool.remove(delivery.position)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.spool.close()


class PushReceiver(GuardedHTTPServer):
    """``POST`` only; form (PHP bracket keys) or JSON bodies up to 1 MiB; ``auth[application_token]``
    checked in constant time against ``B24_APP_TOKEN`` (an outgoing webhook) or the registered bot's
    ``CLIENT_ID`` (the portal sends that as a legacy bot's token), before the body is taken apart; 200 once
    the event is spooled -- the work happens after.  Floods and slow clients are
    :class:`b24http.GuardedHTTPServer`'s business."""

    request_deadline = RECEIVER_READ_TIMEOUT_SEC

    def __init__(self, address: tuple, source: ReceiverSource, *, app_token: str, client_id: str,
                 portal_host: str):
        super().__init__(address, _PushHandler, log)
        self.source, self.app_token, self.client_id = source, app_token, client_id
        self.portal_host = portal_host
        self.counts: dict = {}
        self.told_domain = False

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def authentic(self, token: str) -> bool:
        given = token.encode()
        return bool(token) and any(hmac.compare_digest(given, known.encode())
                                   for known in (self.app_token, self.client_id) if known)


class _PushHandler(BaseHTTPRequestHandler):
    server: PushReceiver
    server_version = "b24-receiver"
    timeout = RECEIVER_READ_TIMEOUT_SEC

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, text: str) -> None:
        body = (json.dumps({"result": text}) if status == 200 else json.dumps({"error": text})).encode()
        self.server.count(str(status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 405:
            self.send_header("Allow", "POST")
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(405, "POST only")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def do_POST(self) -> None:
        try:
            self._post()
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True       # the sender went away or was too slow: nothing to say
        except Exception as exc:  # noqa: BLE001 - one bad request must not look like a lost connection
            self.server.said.say(logging.ERROR, "bug", "receiver: could not handle a POST (%s: %s); the "
                                 "reconciliation scan covers it", type(exc).__name__, exc)
            log.debug("receiver: the failure in full", exc_info=True)
            try:
                self._answer(500, "internal error")
            except OSError:
                pass

    def _refuse(self, status: int, why: str, cause: str = "") -> None:
        if cause:
            self.server.said.say(logging.WARNING, cause, "receiver: refused an event from %s: %s",
                                 self.client_address[0], why)
        self._answer(status, why)

    def _post(self) -> None:
        length, refused = content_length(self.headers, RECEIVER_MAX_BODY)
        if refused is not None:
            self.server.body_left_unread(self.request)   # a moment's lingering: the client reads the refusal
            self._refuse(*refused)
            return
        raw = self.rfile.read(length)
        if len(raw) < length:
            self._refuse(400, "body shorter than its Content-Length")
            return
        self.server.request_complete(self.request)
        body = self._parse(raw)
        if body is None:
            return                            # answered
        domain = str(as_map(body.get("auth")).get("domain") or "")
        if domain and self.server.portal_host and domain.split(":")[0] != self.server.portal_host \
                and not self.server.told_domain:
            self.server.told_domain = True
            log.warning("receiver: events come from %s, the webhook is on %s -- is this the same portal?",
                        domain, self.server.portal_host)
        event = str(body.get("event")).upper()
        hints = push_hints(body)
        if event == "ONIMBOTDELETE":
            log.warning("receiver: the portal says our chat bot was deleted; replies go as the webhook user")
        if hints:
            try:
                self.server.source.received(hints, event)
            except sqlite3.Error as exc:
                log.error("receiver: cannot keep the event (%s); the reconciliation scan will find it", exc)
                self._answer(503, "cannot store the event now")
                return
        log.debug("receiver: %s -> %s", event, ", ".join("%s#%d" % h[:2] if h[0] else "scan" for h in hints) or "-")
        self._answer(200, "ok")

    def _parse(self, raw: bytes) -> dict | None:
        """The event, once it is well formed and authentic (cheap checks first: the token is compared
        before a form is taken apart); None when a refusal was sent."""
        bad = "not a Bitrix24 event (form or JSON with an 'event' field)"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(400, bad, "malformed")
            return None
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                body = json.loads(text)
                if not isinstance(body, dict):
                    raise ValueError("not an object")
                token = str(as_map(body.get("auth")).get("application_token") or "")
                pairs: list = []
            else:
                pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                                               max_num_fields=FORM_MAX_FIELDS)
                body = {k: v for k, v in pairs if k in ("event", "auth[application_token]")}
                token = body.pop("auth[application_token]", "")
        except (ValueError, RecursionError):
            self._refuse(400, bad, "malformed")
            return None
        if not str(body.get("event") or "").strip():
            self._refuse(400, bad, "malformed")
            return None
        if not self.server.authentic(str(token)):
            self._refuse(401, "wrong application token", "token")
            return None
        if pairs:
            try:
                body = parse_php_form(pairs)
            except ValueError:
                self._refuse(400, bad, "malformed")
                return None
        return body


