"""The bridge's own settings (BRIDGE_*), read from the environment and checked once."""
from __future__ import annotations

import re
from typing import Mapping

import b24common as bc


class Settings:
    """The bridge's own settings (the shared ones live in :class:`b24common.Config`)."""

    def __init__(self, env: Mapping[str, str]):
        self.retry_hours = bc.env_number(env, "BRIDGE_RETRY_HOURS", 24.0, 0.0001, 24 * 30)
        # a message's first wait after a failure; it doubles with each one, up to 5 minutes
        self.retry_first = bc.env_number(env, "BRIDGE_RETRY_FIRST_SEC", 1.0, 0.01, 300)
        self.fallback_text = (env.get("BRIDGE_FALLBACK_TEXT") or "").strip()
        self.max_chars = int(bc.env_number(env, "BRIDGE_MAX_REPLY_CHARS", 4096, 100, bc.MESSAGE_MAX_CHARS,
                                           integer=True))
        self.forget_days = bc.env_number(env, "BRIDGE_FORGET_DAYS", 7.0, 0.00001, 3650)
        listen = (env.get("BRIDGE_HTTP_LISTEN") or "").strip()
        self.http_listen = bc.parse_listen(listen, "BRIDGE_HTTP_LISTEN") if listen else None
        self.stuck_sec = bc.env_number(env, "BRIDGE_STUCK_SEC", 0, 0, 86400)   # 0: from the timeouts
        self.human_pause_min = bc.env_number(env, "BRIDGE_HUMAN_PAUSE_MIN", 30, 0, 7 * 24 * 60)
        # where {"handoff": true} sends the customer: nowhere (""), the line's queue, queueN, or a user id
        self.handoff_to = (env.get("BRIDGE_HANDOFF_TO") or "").strip().lower()
        if self.handoff_to not in ("", "queue") and not re.fullmatch(r"queue[1-9]\d*|[1-9]\d*", self.handoff_to):
            raise bc.ConfigError("BRIDGE_HANDOFF_TO=%s: expected queue, queueN (the queue of line N) or a user id"
                                 % self.handoff_to)
        self.debounce = bc.env_number(env, "BRIDGE_DEBOUNCE_SEC", 0, 0, 600)
        self.concurrency = int(bc.env_number(env, "BRIDGE_MAX_CONCURRENCY", 8, 1, 64, integer=True))
        self.take = (env.get("BRIDGE_TAKE") or "").strip().lower()
        if self.take not in ("", "answer", "join", "off", "no"):
            raise bc.ConfigError("BRIDGE_TAKE=%s: expected answer (take queued dialogs) or join" % self.take)
        self.take = "" if self.take in ("off", "no") else self.take
        self.once_patience = bc.env_number(env, "BRIDGE_ONCE_PATIENCE_SEC", 30, 0, 3600)   # --once: outage
        # a dialog the bridge took from the queue goes back to it (with the fallback text) when the bot
        # stays down this long: the customer must not wait outside every queue
        self.handback_min = bc.env_number(env, "BRIDGE_OUTAGE_HANDBACK_MIN", 5, 0, 7 * 24 * 60)
        # follow each posted part until the portal says it was delivered (one batch a poll interval while
        # parts are in flight); 0 turns it off
        self.track_delivery = (env.get("BRIDGE_TRACK_DELIVERY") or "1").strip().lower() not in ("0", "n", "no",
                                                                                              "false", "off")
        # parts the scan did not settle on its way are read again this often (one batch for all of them)
        self.delivery_check = bc.env_number(env, "BRIDGE_DELIVERY_CHECK_SEC", 10, 0.1, 3600)
        # a dialog whose only news is our own reply is read this much later: a customer message meanwhile
        # brings it along (one read, not two), and a message hidden behind the reply is this late at most
        self.own_read_delay = bc.env_number(env, "BRIDGE_OWN_READ_DELAY_SEC", bc.OWN_READ_DELAY_SEC, 0, 300)
        self.delivery_events = (env.get("BOT_DELIVERY_EVENTS") or "").strip().lower() in ("1", "y", "yes", "true", "on")
        self.undelivered_to = (env.get("BRIDGE_UNDELIVERED_TO") or "").strip().lower()
        if self.undelivered_to not in ("", "queue"):
            raise bc.ConfigError("BRIDGE_UNDELIVERED_TO=%s: expected queue (or nothing)" % self.undelivered_to)
        self.reply_batch = int(bc.env_number(env, "BRIDGE_REPLY_BATCH", 50, 1, bc.BATCH_MAX, integer=True))


