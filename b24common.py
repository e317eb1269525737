"""The shared core of the Bitrix24 Open Lines toolkit (stdlib only, Python 3.9+): what two or more
of the scripts use, and nothing else.

In the order of this file:

* secrets -- :func:`register_secret` / :func:`redact`: the webhook code, the
  bot's auth and tokens show as ``***`` in every message, log line and repr;
  :func:`setup_logging`;
* errors -- :class:`B24Error` and its kinds (each with its exit code),
  :data:`TRANSIENT` (worth another try later), :func:`format_error`;
* ``.env`` files read the way python-dotenv does (:func:`dotenv_values`,
  :func:`load_dotenv`); :class:`Config` -- the environment, validated once;
* :class:`Client` -- the urllib REST client: :class:`RateLimiter` for both
  portal limits, bounded retries, ``batch`` (shared between threads that wait
  at the same moment, with :attr:`Client.share_batches`), typed errors;
  :class:`Backoff`, the one rule for pausing after failures in a row;
* dialogs and messages -- :class:`DialogInfo`, :class:`Message`,
  :func:`classify` (customer, operator, self, bot, system), media as
  attachments, :func:`visible` (text safe to print);
* :class:`Poller` -- new Open Lines messages strictly after per-dialog
  cursors (``FIRST_ID``), found through the recent lists or pointed at by
  hints (the sources in ``b24push.py``);
* sending -- :func:`send_text` with a ``TEMPLATE_ID`` (a resend is safe),
  :func:`posted_uuids` (is it already in the dialog?), :func:`take_dialog`;
  bot replies -- :func:`normalize_reply` turns any answer shape into texts;
* durable state -- :class:`StateFile`, :func:`write_private` (atomic, 0600);
* command-line plumbing -- common options, ``--demo``, ``--check``
  (:class:`Doctor`), :func:`run_main` (one line and an exit code per error).

Beside it: ``b24push.py`` (the sources of inbound messages), ``olbridge/``
(the bridge's parts), ``b24emu/`` (the portal emulator).

A short session::

    >>> cfg = Config.from_env(os.environ)
    >>> client = Client(cfg)
    >>> poller = Poller(client, self_id=client.whoami()["id"])
    >>> poller.start()                # from "now"
    >>> for msg in poller.poll():     # oldest first, each message once
    ...     print(msg.dialog_id, msg.author_kind, msg.text)
"""
from __future__ import annotations

__all__ = [
    # exit codes, errors
    "VERSION", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_NOT_DELIVERED", "EXIT_UNCONFIRMED",
    "EXIT_INTERRUPTED", "TRANSIENT", "Interrupted",
    "B24Error", "ConfigError", "StateWriteError", "UsageError", "TransportError", "UnknownOutcomeError",
    "APIError", "AuthError", "ScopeError", "AccessDeniedError", "NotMemberError", "NotFoundError",
    "RateLimitError", "ServerError", "BadRequestError", "DuplicateUuidError", "PortalMovedError",
    "api_error", "what_came_back", "format_error",
    # secrets, logging, .env, configuration
    "redact", "register_secret", "setup_logging", "dotenv_values", "load_dotenv", "parse_dotenv",
    "Config", "env_number", "split_url", "parse_listen", "is_loopback",
    # the REST client
    "Client", "RateLimiter", "BatchResult", "Backoff", "as_map", "as_int", "BATCH_MAX", "MESSAGES_PAGE",
    # dialogs and messages
    "parse_dialog_id", "display_dialog_id", "normalize_phone", "user_phone", "visible", "bbcode_to_text",
    "parse_date", "DialogInfo", "Message", "MessageFactory", "classify", "messages_of", "waits_in_queue",
    # the poller
    "Poller", "SYNC_MARGIN_SEC", "DEFAULT_RECONCILE_SEC",
    # sending, bot replies
    "human_size", "MESSAGE_MAX_CHARS", "new_template_id", "split_text", "check_text", "send_text", "post_with_uuid", "posted_uuids",
    "find_by_uuid", "take_dialog", "normalize_reply", "parse_bot_answer", "BotAnswer", "ReplyShapeError",
    # durable state
    "StateFile", "write_private", "open_private", "private_folder", "default_state_dir",
    # command-line plumbing
    "add_common_arguments", "apply_env_file", "environment_or_demo", "start_demo_portal",
    "load_config_from_args", "run_main", "check_scopes", "line_queues", "Doctor", "run_doctor",
]

import argparse
import collections
import datetime as _dt
import http.client
import json
import logging
import math
import mimetypes
import os
import random
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

VERSION = "0.5.9"

# Exit codes shared by every script.
EXIT_OK = 0
EXIT_FAILURE = 1        # an API or network failure that persisted
EXIT_USAGE = 2          # a usage or configuration mistake
EXIT_NOT_DELIVERED = 4  # the message did not reach the customer (or was refused: the window is closed)
EXIT_UNCONFIRMED = 5    # no delivery report came in time
EXIT_INTERRUPTED = 130  # Ctrl-C

# Tuning numbers (each can be overridden through Config / the environment).
DEFAULT_POLL_SEC = 2.0
POLL_SEC_MIN, POLL_SEC_MAX = 0.1, 3600.0
DEFAULT_HTTP_TIMEOUT_SEC = 30.0      # the cloud cuts requests at 60 s
DEFAULT_BOT_TIMEOUT_SEC = 120.0      # the deadline of a whole bot exchange, not of one read
DEFAULT_BOT_MAX_BYTES = 1048576      # a bot answer larger than this is refused
DEFAULT_RATE_PER_SEC = 2.0           # leaky bucket drain, non-Enterprise plans
DEFAULT_RATE_BURST = 50              # leaky bucket size, non-Enterprise plans
BUCKET_HEADROOM = 0.9                # we fill at most 90 % of the bucket ourselves
DEFAULT_OPERATING_LIMIT_SEC = 420.0  # per-method budget per 10 minutes (box default)
OPERATING_HEADROOM = 0.9
OPERATING_WAIT_MAX_SEC = 600.0       # the budget window is 10 minutes
MAX_RETRIES = 5
BACKOFF_BASE_SEC = 0.5
BACKOFF_CAP_SEC = 30.0
BATCH_MAX = 50                       # commands per batch request
MESSAGES_PAGE = 50                   # im.dialog.messages.get caps LIMIT at 50
RECENT_PAGE_MIN = 8                  # recent items read on an idle cycle
RECENT_PAGE_MAX = 200
SYNC_MAX_AGE_SEC = 6 * 86400         # im.recent.get LAST_SYNC_DATE looks back 7 days at most
SYNC_MARGIN_SEC = 60.0               # recent rows are written after their message, up to this late: the sweep
SYNC_SWEEP_SEC = 60.0                #   (this often) asks back to the previous sweep less this margin
SYNC_NEAR_SEC = 2.0                  # and only this far the rest of the time (a late row is rare and brief)
OWN_READ_DELAY_SEC = 15.0            # a dialog whose news is only our own post is read this much later
                                     #   (a customer answering within it brings our post along: one read)
OWN_READ_WATCHED = 2                 #   so many times that when the post went after the scan (Poller.posted)
ADOPTED_LIVE_SEC = 3600.0            # a chat our bot holds with news this recent is re-read at every scan,
ADOPTED_PER_SCAN = 40                #   of the quieter ones this many, the longest unchecked first
SESSION_ANSWERED = 10                # Open Lines session status from which an operator has it
MESSAGE_MAX_CHARS = 20000            # longer texts are cut by im.message.add
DELIVERY_WAIT_SEC = 300.0            # a send unconfirmed this long is "unconfirmed" (the portal's own rule)
SEND_PATIENCE_SEC = 30.0             # how long send_text resends (same TEMPLATE_ID) an unknown outcome
POLL_BACKOFF_MAX_SEC = 60.0
SOURCES = ("auto", "poll", "events", "bot")   # B24_SOURCE
DEFAULT_RECONCILE_SEC = 60.0         # the scan beside a push source (B24_RECONCILE_SEC)
USERS_CACHE_MAX = 5000               # authors remembered for classification (oldest dropped first)

log = logging.getLogger("b24common")


# ===========================================================================
# Secrets
# ===========================================================================

_secrets: set = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember *value* so that :func:`redact` hides it everywhere.

    For an auth header value such as ``Bearer <token>`` the token alone is
    hidden too.
    """
    if not value:
        return
    parts = [value] + ([value.split(None, 1)[1].strip()] if " " in value.strip() else [])
    with _secrets_lock:
        for part in parts:
            if len(part) >= 4:
                _secrets.add(part)
                _secrets.add(urllib.parse.quote(part, safe=""))


def redact(text: Any) -> str:
    """Return ``str(text)`` with every registered secret replaced by ``***``."""
    s = str(text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in s:
            s = s.replace(secret, "***")
    return s


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


_WHERE = re.compile(r"^((?:chat|user)\d+|\d+)(?: #(\d+))?: ")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, dialog, message_id, event (redacted)."""

    def format(self, record: logging.LogRecord) -> str:
        text = redact(record.getMessage())
        m = _WHERE.match(text)
        out = {"time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name,
               "dialog": m.group(1) if m else None, "message_id": int(m.group(2)) if m and m.group(2) else None,
               "event": text[m.end():] if m else text}
        if record.exc_info:
            out["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup_logging(verbose: int = 0, stream=None, timestamps: bool | None = None, json_lines: bool = False) -> None:
    """Configure the root logger once, for a script's ``main()``: stderr, redacted.

    Text lines carry no timestamp under systemd (journald stamps them); ``json_lines``
    writes one JSON object per line for log shippers."""
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    if timestamps is None:
        timestamps = not os.environ.get("JOURNAL_STREAM") and not _under_systemd()
    fmt = "%(asctime)s %(levelname)s %(message)s" if timestamps else "%(levelname)s %(message)s"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else _RedactingFormatter(fmt, "%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# ===========================================================================
# Exceptions
# ===========================================================================

class B24Error(Exception):
    """Base of every error this toolkit raises on purpose."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(redact(message))

    def __repr__(self) -> str:
        return "%s(%r)" % (type(self).__name__, str(self))


class ConfigError(B24Error):
    """A bad setting: environment variable, .env line, option value."""

    exit_code = EXIT_USAGE


class StateWriteError(B24Error):
    """State could not be written (disk full, I/O error): transient, retried -- not a setting."""


class UsageError(B24Error):
    """A bad command line."""

    exit_code = EXIT_USAGE


class TransportError(B24Error):
    """The portal could not be reached or answered with something unusable."""

    def __init__(self, message: str, *, retryable: bool = True, maybe_executed: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.maybe_executed = maybe_executed


class UnknownOutcomeError(TransportError):
    """A write went out but no usable answer came back: it may or may not have happened.
    ``cause`` says what came back instead ("the portal answered HTTP 500", ...)."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message, retryable=False, maybe_executed=True)
        self.cause = redact(cause)


def what_came_back(exc: BaseException) -> str:
    """A failed exchange in a few words: "the portal answered HTTP 502 with an HTML page"..."""
    if isinstance(exc, APIError):
        if exc.status:
            detail = exc.description if exc.code.startswith("HTTP_") else exc.code
            return "the portal answered HTTP %d (%s)" % (exc.status, detail) if detail else \
                "the portal answered HTTP %d" % exc.status
        return "the portal answered %s" % (exc.code or "an error")
    return str(exc)


class APIError(B24Error):
    """The portal answered with an error: keeps Bitrix's ``error`` code and description."""

    retryable = False
    maybe_executed = False

    def __init__(self, code: str, description: str = "", status: int = 0, method: str = ""):
        self.code = code or ""
        self.description = redact(description or "")
        self.status = status
        self.method = method
        where = "%s: " % method if method else ""
        http = " (HTTP %d)" % status if status else ""
        text = "%s%s%s" % (where, self.code or "error", http)
        if self.description:
            text += ": " + self.description
        super().__init__(text)


class AuthError(APIError):
    """The webhook is wrong, revoked, or its owner is deactivated: a credential mistake (exit 2)."""

    exit_code = EXIT_USAGE


class ScopeError(AuthError):
    """The webhook lacks the scope the method needs."""


class AccessDeniedError(APIError):
    """The webhook user may not do this (dialog access, method forbidden for webhooks)."""


class NotMemberError(AccessDeniedError):
    """``CANCELED``: the user is not a real member of the chat, so it cannot post."""


class NotFoundError(APIError):
    """Unknown method, chat or user."""


class RateLimitError(APIError):
    """``QUERY_LIMIT_EXCEEDED``, ``OPERATION_TIME_LIMIT`` or ``OVERLOAD_LIMIT``."""

    retryable = True


class ServerError(APIError):
    """A 5xx answer, an HTML error page, ``INTERNAL_SERVER_ERROR``."""

    retryable = True
    maybe_executed = True


class BadRequestError(APIError):
    """Any other 4xx: the request itself was wrong."""


class DuplicateUuidError(APIError):
    """``MESSAGE_DUPLICATED_BY_UUID``: a message with this ``TEMPLATE_ID`` is being (or was
    meant to be) written -- its outcome is not known yet, not a failure (fact sheet §9)."""


class PortalMovedError(APIError):
    """The portal answered with a redirect (e.g. its domain was renamed)."""


TRANSIENT = (RateLimitError, ServerError, TransportError)   # worth another try later: limits, 5xx, network


class Interrupted(BaseException):
    """The program was asked to stop while a request waited (for the rate limiter, a method's time
    budget, or a retry): raised out of the wait so that stopping never waits on the portal.  Not an
    ``Exception``: no handler of failures takes it for one -- it unwinds to the loop that owns the
    work, which leaves that work where it is (nothing is lost: it is redone at the next start)."""

_AUTH_CODES = {"INVALID_CREDENTIALS", "NO_AUTH_FOUND", "AUTHORIZATION_ERROR", "EXPIRED_TOKEN",
               "INVALID_TOKEN", "PORTAL_DELETED", "INVALID_REQUEST"}
_ACCESS_CODES = {"ACCESS_DENIED", "ACCESS_ERROR", "WRONG_AUTH_TYPE", "REPLY_ACCESS_ERROR"}
_NOT_FOUND_CODES = {"ERROR_METHOD_NOT_FOUND", "CHAT_ID", "USER_NOT_FOUND", "USER_ID", "NOT_FOUND"}
_RATE_CODES = {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT"}
_SERVER_CODES = {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}


def api_error(code: Any, description: Any = "", status: int = 0, method: str = "") -> APIError:
    """Build the typed error for a Bitrix ``error`` code (and HTTP status)."""
    code = "" if code is None else str(code)
    key = code.upper()
    if key == "INSUFFICIENT_SCOPE":
        cls = ScopeError
    elif key == "CANCELED":
        cls = NotMemberError
    elif key == "MESSAGE_DUPLICATED_BY_UUID":
        cls = DuplicateUuidError
    elif key in _RATE_CODES:
        cls = RateLimitError
    elif key in _AUTH_CODES:
        cls = AuthError
    elif key in _ACCESS_CODES:
        cls = AccessDeniedError
    elif key in _NOT_FOUND_CODES:
        cls = NotFoundError
    elif key in _SERVER_CODES or status >= 500:
        cls = ServerError
    elif status == 401:
        cls = AuthError
    elif status == 403:
        cls = AccessDeniedError
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitError
    else:
        cls = BadRequestError
    return cls(code, "" if description is None else str(description), status, method)


def format_error(exc: BaseException) -> str:
    """One line for a person: what went wrong and, where we know it, what to do."""
    text = redact(exc)
    if isinstance(exc, ScopeError):
        return text + " -- give the webhook the scope this needs (im, imopenlines) in Bitrix24"
    if isinstance(exc, AuthError):
        return text + " -- the webhook was rejected: check B24_WEBHOOK_BASE, or create a new incoming webhook"
    if isinstance(exc, NotMemberError):
        return text + (" -- the webhook user is not a member of this chat: take the dialog "
                       "(imopenlines.operator.answer), join the session, or have it assigned")
    return text


# ===========================================================================
# .env files (python-dotenv compatible reading)
# ===========================================================================

_WS = r"[^\S\r\n]*"
_RE_EXPORT = re.compile(r"export[^\S\r\n]+")
_RE_KEY = re.compile(r"'([^']+)'|([^=#\s]+)")
_RE_SQ = re.compile(r"'((?:\\'|[^'])*)'")
_RE_DQ = re.compile(r'"((?:\\"|[^"])*)"')
_RE_AFTER = re.compile(_WS + r"(?:#[^\r\n]*)?(?:\r\n|\n|\r|$)")
_RE_REST = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)?")
_RE_WS = re.compile(_WS)
_RE_BLANK = re.compile(r"\s*")
_RE_LINE = re.compile(r"[^\r\n]*")
_RE_DQ_ESC = re.compile(r"\\[\\'\"abfnrtv]")
_RE_SQ_ESC = re.compile(r"\\[\\']")
_RE_VAR = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")
_DQ_MAP = {"\\\\": "\\", "\\'": "'", '\\"': '"', "\\a": "\a", "\\b": "\b", "\\f": "\f",
           "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\v": "\v"}


@dataclass
class _Binding:
    key: str | None
    value: str | None
    line: int
    error: str | None = None


_SECRETISH = re.compile(r"(/rest/\d+/)[^/\s\"']+|((?:Bearer|Basic|Token)\s+)\S+", re.IGNORECASE)


def parse_dotenv(text: str) -> list:
    """Split .env text into bindings (key, value, line, error); comments are dropped."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list = []
    pos, n = 0, len(text)

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    while pos < n:
        # blank lines and leading whitespace
        m = _RE_BLANK.match(text, pos)
        pos = m.end()
        if pos >= n:
            break
        start = pos
        if text[pos] == "#":
            pos = _RE_REST.match(text, pos).end()
            continue
        err = None
        m = _RE_EXPORT.match(text, pos)
        if m:
            pos = m.end()
        m = _RE_KEY.match(text, pos)
        if not m:       # the line is never quoted back: it may be a secret pasted on its own
            err = "expected NAME=value"
        else:
            key = m.group(1) if m.group(1) is not None else m.group(2)
            pos = _RE_WS.match(text, m.end()).end()
            value: str | None
            if pos < n and text[pos] == "=":
                pos = _RE_WS.match(text, pos + 1).end()
                c = text[pos] if pos < n else ""
                if c == "'":
                    mv = _RE_SQ.match(text, pos)
                    if not mv:
                        err = "unterminated single-quoted value for %s" % key
                    else:
                        value = _RE_SQ_ESC.sub(lambda x: x.group(0)[1], mv.group(1))
                        pos = mv.end()
                elif c == '"':
                    mv = _RE_DQ.match(text, pos)
                    if not mv:
                        err = "unterminated double-quoted value for %s" % key
                    else:
                        value = _RE_DQ_ESC.sub(lambda x: _DQ_MAP[x.group(0)], mv.group(1))
                        pos = mv.end()
                else:
                    mv = _RE_LINE.match(text, pos)
                    value = re.sub(r"\s+#.*", "", mv.group(0)).rstrip()
                    pos = mv.end()
            else:
                value = None
            if err is None:
                ma = _RE_AFTER.match(text, pos)
                if not ma:      # named by its key (when it looks like a NAME), never by its text
                    named = "%s: " % key if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", key) else ""
                    err = ("%sexpected NAME=value" % named if value is None else
                           "unexpected text after the value of %s (quote a value that has spaces)" % key)
                else:
                    pos = ma.end()
                    out.append(_Binding(key, value, line_of(start)))
                    continue
        out.append(_Binding(None, None, line_of(start), err))
        pos = _RE_REST.match(text, start).end()
    return out


def _interpolate(value: str, lookup: Callable[[str], str | None]) -> str:
    def repl(m: re.Match) -> str:
        got = lookup(m.group("name"))
        if got is None:
            return m.group("default") or ""
        return got
    return _RE_VAR.sub(repl, value)


def _read_env_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError("%s: env file not found" % path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (%s)" % (path, exc.reason)) from None
    except OSError as exc:
        raise ConfigError("%s: cannot read env file (%s)" % (path, exc.strerror or exc)) from None


def _resolve(path: str, strict: bool, env_wins: bool,
             environ: Mapping[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    values: dict = {}
    for b in parse_dotenv(_read_env_file(path)):
        if b.error:
            msg = "%s:%d: %s" % (path, b.line, b.error)
            if strict:
                raise ConfigError(msg)
            log.warning("%s", msg)
            continue
        if b.value is None:
            values[b.key] = None
            continue

        def lookup(name: str) -> str | None:
            if env_wins and name in environ:
                return environ[name]
            if values.get(name) is not None:
                return values[name]
            return environ.get(name)
        if strict:
            for m in _RE_VAR.finditer(b.value):
                if m.group("default") is None and lookup(m.group("name")) is None:
                    raise ConfigError("%s:%d: `${%s}`: %s is not defined above or in the environment"
                                      % (path, b.line, m.group("name"), m.group("name")))
        values[b.key] = _interpolate(b.value, lookup)
    return values


def dotenv_values(path: str, *, strict: bool = False) -> dict:
    """Parse *path* like python-dotenv's ``dotenv_values``; ``os.environ`` is not touched.

    Keys without ``=`` map to ``None``.  A malformed line is logged as
    ``FILE:LINE: what is wrong`` and skipped -- or raised as :class:`ConfigError`
    with ``strict=True``.
    """
    return _resolve(path, strict, env_wins=False)


def load_dotenv(path: str, *, override: bool = False, strict: bool = False,
                environ: Any = None) -> bool:
    """Apply *path* to ``os.environ`` (or *environ*); existing variables win unless *override*."""
    environ = os.environ if environ is None else environ
    values = _resolve(path, strict, env_wins=not override, environ=environ)
    for key, value in values.items():
        if value is None:
            continue
        if override or key not in environ:
            environ[key] = value
    return bool(values)


# ===========================================================================
# Configuration
# ===========================================================================

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_RE_REST_PATH = re.compile(r"^(?P<prefix>.*?/rest/)(?P<uid>[^/]+)/(?P<code>[^/]+)(?:/(?P<rest>.*))?$")


def is_loopback(host: str) -> bool:
    host = (host or "").lower()
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def split_url(value: str, name: str, what: str) -> urllib.parse.SplitResult:
    """``urlsplit`` that turns every malformation into one ConfigError naming the setting:
    a broken IPv6 bracket, a port that is not a number from 1 to 65535, a user:password part."""
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        text = str(exc)
        why = ("a broken IPv6 address (a '[' without its ']')" if "IPv6" in text else
               "a port that is not a number from 1 to 65535" if "port" in text.lower() else "a malformed URL")
        raise ConfigError("%s: the URL has %s (expected %s)" % (name, why, what)) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s: expected %s, got something that is not an http(s) URL" % (name, what))
    if port == 0:
        raise ConfigError("%s: the URL has a port that is not a number from 1 to 65535 (expected %s)" % (name, what))
    if "@" in parts.netloc:
        raise ConfigError("%s: the URL must not carry a user name or password (user:password@); %s" % (
            name, "the webhook code is the credential" if name == "B24_WEBHOOK_BASE"
            else "put credentials in BOT_HTTP_AUTH"))
    return parts


def parse_listen(text: str, name: str) -> tuple:
    """``PORT``, ``:PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; the host defaults to 127.0.0.1."""
    text = text.strip()
    host, port = "127.0.0.1", text
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else ""
    elif ":" in text:
        host, port = text.rsplit(":", 1)
        host = host or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("%s=%s: expected PORT or HOST:PORT (port 1-65535)" % (name, text))
    return host, int(port)


def _parse_routes(text: str) -> dict:
    """``BOT_ROUTES``: ``3=https://a/...,5=https://b/...`` -> ``{3: url, 5: url}`` (one bot per Open Line)."""
    routes: dict = {}
    for n, item in enumerate(t for t in text.split(",") if t.strip()):
        line, sep, url = item.strip().partition("=")
        if not sep or not line.strip().isdigit() or int(line) <= 0:
            raise ConfigError("BOT_ROUTES: item %d should be LINE_ID=URL, like 3=https://bot.example/hook" % (n + 1))
        split_url(url.strip(), "BOT_ROUTES", "an http(s) URL for line %s" % line.strip())
        routes[int(line)] = url.strip()
    return routes


def _normalize_webhook(raw: str, name: str = "B24_WEBHOOK_BASE") -> tuple:
    """Check and normalise a webhook URL; return ``(base, host, user_id, code)``.

    ``base`` always ends with ``/``; a pasted method suffix (``profile.json``)
    is dropped.  Errors never quote the code.
    """
    value = (raw or "").strip().strip('"').strip("'")
    if not value:
        raise ConfigError("%s is not set: put your incoming webhook URL "
                          "(https://<portal>/rest/<user_id>/<code>/) in .env" % name)
    parts = split_url(value, name, "https://<portal>/rest/<user_id>/<code>/")
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if parts.query or parts.fragment:
        raise ConfigError("%s: the webhook URL must not contain '?' or '#' (host %s)" % (name, host))
    m = _RE_REST_PATH.match(parts.path)
    if not m:
        raise ConfigError("%s: expected https://%s/rest/<user_id>/<code>/ -- the path has no "
                          "/rest/<user_id>/<code>/ part" % (name, host))
    uid, code = m.group("uid"), m.group("code")
    register_secret(code)
    rest = (m.group("rest") or "").strip("/")
    if "/" in rest:
        raise ConfigError("%s: extra path after /rest/<user_id>/<code>/ -- end the URL right after the "
                          "code (host %s)" % (name, host))
    if not uid.isdigit() or int(uid) <= 0:
        raise ConfigError("%s: the user id in /rest/<user_id>/<code>/ must be a positive number "
                          "(host %s)" % (name, host))
    if not re.fullmatch(r"[A-Za-z0-9_]{4,64}", code):
        raise ConfigError("%s: the webhook code in /rest/%s/<code>/ looks wrong: expected "
                          "letters and digits (host %s)" % (name, uid, host))
    if scheme == "http" and not is_loopback(host):
        raise ConfigError("%s: Bitrix24 accepts webhooks over https:// only "
                          "(plain http:// is allowed for a local emulator on 127.0.0.1)" % name)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    base = "%s://%s%s%s/%s/" % (scheme, netloc, m.group("prefix"), uid, code)
    return base, host, int(uid), code


def env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float,
               integer: bool = False) -> float:
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    text = str(raw).strip()
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError("%s=%r: expected %s between %g and %g" % (name, text, kind, lo, hi)) from None
    if not (lo <= value <= hi) or value != value:
        raise ConfigError("%s=%s: out of range, expected %g to %g" % (name, text, lo, hi))
    return value


@dataclass(frozen=True)
class Config:
    """Settings from the environment, validated once.  ``repr`` hides the secrets."""

    webhook_base: str = field(repr=False)
    portal_host: str = ""
    user_id: int = 0
    poll_sec: float = DEFAULT_POLL_SEC
    http_timeout: float = DEFAULT_HTTP_TIMEOUT_SEC
    rate_per_sec: float = DEFAULT_RATE_PER_SEC
    rate_burst: int = DEFAULT_RATE_BURST
    operating_limit: float = DEFAULT_OPERATING_LIMIT_SEC
    max_retries: int = MAX_RETRIES
    send_patience: float = SEND_PATIENCE_SEC
    backoff_max: float = POLL_BACKOFF_MAX_SEC   # the longest pause between tries in an outage
    max_file_mb: float = 100.0                   # B24_MAX_FILE_MB: the largest file sent (the portal's own limit)
    delivery_wait: float = DELIVERY_WAIT_SEC     # B24_DELIVERY_WAIT_SEC
    bot_url: str = ""
    bot_auth: str = field(default="", repr=False)
    bot_secret: str = field(default="", repr=False)
    bot_routes: dict = field(default_factory=dict)   # Open Line id -> bot URL (BOT_ROUTES)
    bot_timeout: float = DEFAULT_BOT_TIMEOUT_SEC
    bot_max_bytes: int = DEFAULT_BOT_MAX_BYTES
    bot_max_file_bytes: int = 20 << 20          # BOT_MAX_FILE_BYTES: a file the bridge fetches for the bot
    business_phone: str = ""
    state_dir: str = ""
    source: str = "auto"                  # B24_SOURCE: auto | poll | events | bot
    reconcile_sec: float = DEFAULT_RECONCILE_SEC
    listen: tuple = ()                    # B24_LISTEN: (host, port) of the HTTP receiver
    app_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require_bot: bool = False) -> Config:
        env = os.environ if env is None else env
        base, host, uid, _code = _normalize_webhook(env.get("B24_WEBHOOK_BASE", ""))
        bot_auth = (env.get("BOT_HTTP_AUTH") or "").strip()
        register_secret(bot_auth)
        bot_secret = (env.get("BOT_HTTP_SECRET") or "").strip()
        register_secret(bot_secret)
        if bot_secret and len(bot_secret) < 16:
            raise ConfigError("BOT_HTTP_SECRET: use at least 16 characters (a random string the bot also knows)")
        routes = _parse_routes(env.get("BOT_ROUTES") or "")
        bot_url = (env.get("BOT_HTTP_URL") or "").strip()
        if bot_url:
            split_url(bot_url, "BOT_HTTP_URL", "an http:// or https:// URL of your bot")
        elif require_bot and not routes:
            raise ConfigError("BOT_HTTP_URL is not set: the URL your bot listens on "
                              "(try mock_bot_server.py for a local one)")
        source = (env.get("B24_SOURCE") or "auto").strip().lower()
        if source not in SOURCES:
            raise ConfigError("B24_SOURCE=%s: expected one of %s" % (source, ", ".join(SOURCES)))
        app_token = (env.get("B24_APP_TOKEN") or "").strip()
        register_secret(app_token)
        listen_text = (env.get("B24_LISTEN") or "").strip()
        phone = (env.get("B24_BUSINESS_PHONE") or "").strip()
        if phone and not re.fullmatch(r"\+?[0-9 ()-]{5,20}", phone):
            raise ConfigError("B24_BUSINESS_PHONE=%r: expected a phone number such as +10000000001" % phone)
        return cls(
            webhook_base=base, portal_host=host, user_id=uid,
            poll_sec=env_number(env, "B24_POLL_SEC", DEFAULT_POLL_SEC, POLL_SEC_MIN, POLL_SEC_MAX),
            http_timeout=env_number(env, "B24_HTTP_TIMEOUT_SEC", DEFAULT_HTTP_TIMEOUT_SEC, 1, 600),
            rate_per_sec=env_number(env, "B24_RATE_PER_SEC", DEFAULT_RATE_PER_SEC, 0.1, 100),
            rate_burst=int(env_number(env, "B24_RATE_BURST", DEFAULT_RATE_BURST, 1, 10000, integer=True)),
            operating_limit=env_number(env, "B24_OPERATING_LIMIT_SEC", DEFAULT_OPERATING_LIMIT_SEC, 1, 100000),
            max_retries=int(env_number(env, "B24_MAX_RETRIES", MAX_RETRIES, 0, 50, integer=True)),
            send_patience=env_number(env, "B24_SEND_PATIENCE_SEC", SEND_PATIENCE_SEC, 0, 3600),
            backoff_max=env_number(env, "B24_BACKOFF_MAX_SEC", POLL_BACKOFF_MAX_SEC, 1, 3600),
            delivery_wait=env_number(env, "B24_DELIVERY_WAIT_SEC", DELIVERY_WAIT_SEC, 1, 86400),
            max_file_mb=env_number(env, "B24_MAX_FILE_MB", 100.0, 0.001, 100.0),
            bot_url=bot_url, bot_auth=bot_auth, bot_secret=bot_secret, bot_routes=routes,
            bot_timeout=env_number(env, "BOT_HTTP_TIMEOUT_SEC", DEFAULT_BOT_TIMEOUT_SEC, 1, 3600),
            bot_max_bytes=int(env_number(env, "BOT_MAX_REPLY_BYTES", DEFAULT_BOT_MAX_BYTES, 1024, 64 * 1048576,
                                      integer=True)),
            bot_max_file_bytes=int(env_number(env, "BOT_MAX_FILE_BYTES", 20 << 20, 1, 100 << 20, integer=True)),
            business_phone=phone,
            state_dir=(env.get("B24_STATE_DIR") or "").strip(),
            source=source,
            reconcile_sec=env_number(env, "B24_RECONCILE_SEC", DEFAULT_RECONCILE_SEC, POLL_SEC_MIN, 86400),
            listen=parse_listen(listen_text, "B24_LISTEN") if listen_text else (),
            app_token=app_token,
        )

    @property
    def redacted_base(self) -> str:
        return redact(self.webhook_base)


# ===========================================================================
# REST client
# ===========================================================================

def php_query(params: Mapping[str, Any] | None) -> str:
    """URL-encode *params* with PHP bracket notation (``A[]=1``, ``F[NAME]=x``)."""
    pairs: list = []

    def walk(prefix: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk("%s[%s]" % (prefix, k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk("%s[%d]" % (prefix, i), v)
        elif isinstance(value, bool):
            pairs.append((prefix, "Y" if value else "N"))
        else:
            pairs.append((prefix, str(value)))

    for key, value in (params or {}).items():
        walk(str(key), value)
    return urllib.parse.urlencode(pairs)


_READ_METHODS = {"scope", "profile", "user.current", "methods", "server.time", "app.info"}


def _is_read_method(method: str) -> bool:
    """True for methods that change nothing (safe to repeat)."""
    m = method.lower()
    return m in _READ_METHODS or m.rsplit(".", 1)[-1] in ("get", "list")


def _writes(methods: Iterable[str]) -> bool:
    """True if any of *methods* may change something (a batch carrying one is a write)."""
    return not all(_is_read_method(m) for m in methods)


class RateLimiter:
    """Keeps one process under both portal limits before the portal has to say no.

    * the request bucket: each request adds 1, the bucket drains ``rate`` per
      second, the portal refuses above ``burst``; we fill at most 90 % of it;
    * the per-method operating time: the portal reports ``time.operating`` and
      ``operating_reset_at``; a method close to the budget waits for the reset.
    """

    def __init__(self, rate: float = DEFAULT_RATE_PER_SEC, burst: int = DEFAULT_RATE_BURST,
                 operating_limit: float = DEFAULT_OPERATING_LIMIT_SEC,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.capacity = max(1.0, float(int(burst * BUCKET_HEADROOM)))
        self.operating_limit = float(operating_limit)
        self._clock, self._wall, self._sleep = clock, wallclock, sleep
        self._level = 0.0
        self._last = clock()
        self.last_wait = float("-inf")   # when a request last had to wait for the bucket (see strained())
        self._blocked_until: dict = {}   # method -> unix time
        self._reset_at: dict = {}        # method -> last operating_reset_at seen
        self._lock = threading.Lock()
        self.progress: Callable[[], None] | None = None   # called between waits: waiting is progress
        self.stop: threading.Event | None = None          # set: waits end at once with Interrupted

    def _drain(self) -> None:
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._last) * self.rate)
        self._last = now

    def acquire(self, methods: Iterable[str] = ()) -> None:
        """Wait until one more request of *methods* is within both limits, then count it.

        The waiting happens outside the lock: a method waiting ten minutes for its
        time budget never holds up another method, or another thread.
        """
        methods = [m.lower() for m in methods]
        told = False
        while True:
            with self._lock:
                wall = self._wall()
                until = max([self._blocked_until.get(m, 0.0) for m in methods] + [0.0])
                if until > wall:
                    wait = until - wall
                    if not told:
                        log.info("waiting %.1f s for the portal's operating-time budget of %s to reset",
                                 wait, ", ".join(methods))
                        told = True
                else:
                    self._drain()
                    if self._level + 1 <= self.capacity:
                        self._level += 1
                        return
                    wait = (self._level + 1 - self.capacity) / self.rate
                    self.last_wait = self._clock()
            if self.progress is not None:
                self.progress()
            self.pause(min(wait, 5.0))

    def wait_for_room(self) -> None:
        """Wait until one more request fits in the bucket (nothing is counted); a wait counts as one
        (see :meth:`strained`)."""
        while True:
            wait = self.ready_in()
            if wait <= 0:
                return
            with self._lock:
                self.last_wait = self._clock()
            if self.progress is not None:
                self.progress()
            self.pause(min(wait, 0.5))

    def ready_in(self) -> float:
        """Seconds until one more request fits in the bucket (0: now); nothing is counted."""
        with self._lock:
            self._drain()
            return max(0.0, (self._level + 1 - self.capacity) / self.rate)

    def strained(self, within: float, share: float = 0.5) -> bool:
        """Did a request wait for the bucket in the last *within* seconds, or is more than *share* of the
        burst allowance spent (the budget is what limits us, or soon will)?"""
        with self._lock:
            self._drain()
            spent = self._level > self.capacity * share
        return spent or self._clock() - self.last_wait < within

    def pause(self, seconds: float) -> None:
        """Sleep, unless (or until) :attr:`stop` is set: then :class:`Interrupted`."""
        if self.stop is None:
            self._sleep(seconds)
        elif self.stop.is_set() or self.stop.wait(seconds):
            raise Interrupted()

    def note_time(self, method: str, block: Any) -> None:
        """Read a ``time`` block: block a method that used up most of its budget."""
        if not isinstance(block, Mapping):
            return
        try:
            operating = float(block.get("operating") or 0)
            reset_at = float(block.get("operating_reset_at") or 0)
        except (TypeError, ValueError):
            return
        with self._lock:
            if reset_at:
                self._reset_at[method.lower()] = reset_at
            if operating >= self.operating_limit * OPERATING_HEADROOM and reset_at:
                self._blocked_until[method.lower()] = reset_at

    def reset_wait(self, methods: Sequence[str]) -> float:
        """Seconds until the last reported ``operating_reset_at`` of *methods* (capped)."""
        with self._lock:
            until = max([self._reset_at.get(m.lower(), 0.0) for m in methods] + [0.0])
        return min(max(0.0, until - self._wall()), OPERATING_WAIT_MAX_SEC)

    def note_refused(self, error: APIError, methods: Sequence[str], delay: float) -> None:
        """The portal refused: make the next call wait at least *delay*."""
        with self._lock:
            if error.code.upper() == "QUERY_LIMIT_EXCEEDED":
                self._drain()
                self._level = max(self._level, self.capacity)
            else:
                wall = self._wall()
                for m in methods:
                    key = m.lower()
                    self._blocked_until[key] = max(self._blocked_until.get(key, 0.0), wall + delay)


@dataclass
class BatchResult:
    """Per-command outcome of :meth:`Client.batch`: results and errors kept apart."""

    results: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    next: dict = field(default_factory=dict)
    time: dict = field(default_factory=dict)     # the first request's ``time`` block
    # the methods that ran, and answered, before these commands in the same request (a shared one)
    after: frozenset = frozenset()


class _Rider:
    """One caller's commands in line for a shared batch request, and then their outcome."""

    def __init__(self, commands: Mapping[str, tuple], due: float):
        self.commands = dict(commands)
        self.due = due                 # it goes at the latest then (monotonic), with company or not
        self.writes = _writes(method for method, _params in self.commands.values())
        self.tries = 0
        self.done = False
        self.error: BaseException | None = None
        self.out = BatchResult()

    def take(self, shared: BatchResult, prefix: str) -> None:
        """This rider's part of a shared request's outcome: the names that start with *prefix*."""
        self.out.time = shared.time
        for mine, theirs in ((self.out.results, shared.results), (self.out.errors, shared.errors),
                             (self.out.total, shared.total), (self.out.next, shared.next)):
            mine.update((name, theirs[prefix + name]) for name in self.commands if prefix + name in theirs)

    def outcome(self) -> BatchResult:
        if self.error is not None:
            raise self.error
        return self.out


def as_map(value: Any) -> dict:
    """PHP encodes an empty map as ``[]`` and a 0..n-1 map as a list: accept all three."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        return None


def _opener_for(host: str) -> urllib.request.OpenerDirector:
    """Redirects are reported, not followed (urllib would turn a POST into a bare GET);
    a loopback host never goes through a proxy from the environment."""
    handlers: list = [_NoRedirect()]
    if is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


class Client:
    """Bitrix24 REST over an incoming webhook (urllib, JSON bodies).

    ``call(method, params)`` returns ``result`` or raises a typed
    :class:`APIError` / :class:`TransportError`.  Reads are retried with
    exponential backoff and jitter on rate limits, 5xx and network errors;
    writes are retried only when the portal certainly did not run them,
    otherwise :class:`UnknownOutcomeError` is raised for the caller to
    reconcile.
    """

    def __init__(self, config: Config, *, limiter: RateLimiter | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        self.config = config
        self.base = config.webhook_base
        self.host = config.portal_host
        self.limiter = limiter or RateLimiter(config.rate_per_sec, config.rate_burst,
                                              config.operating_limit, sleep=sleep)
        self._rng = rng or random.Random()
        self._opener = _opener_for(self.host)
        self.requests = 0
        self.limit_hits = 0         # answers refused by a portal limit (429 / 503)
        self._on_progress: Callable[[], None] | None = None
        self._me: dict | None = None
        # batches of several threads waiting to go at the same time go out as one request (see batch())
        self.share_batches = False
        self._pool = threading.Condition()
        self._riders: list = []           # batches waiting to go, oldest first
        self._gathering = False           # a thread is gathering the next shared request

    def __repr__(self) -> str:
        return "Client(%s)" % self.config.redacted_base

    # -- one HTTP exchange ------------------------------------------------
    def _exchange(self, method: str, body: dict) -> dict:
        url = self.base + method
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        req = urllib.request.Request(url, data=data, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json",
            "User-Agent": "b24-openlines-toolkit/" + VERSION})
        self.requests += 1
        where = "%s on %s" % (method, self.host)
        try:
            resp = self._opener.open(req, timeout=self.config.http_timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    raw = exc.read()
                except (OSError, http.client.HTTPException):
                    raw = b""
                status, headers = exc.code, exc.headers
        except urllib.error.URLError as exc:
            # connect/send failed inside urllib: the portal has not run the method
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise TransportError("%s: the portal's TLS certificate could not be verified (%s)"
                                     % (where, getattr(reason, "verify_message", reason)),
                                     retryable=False) from None
            raise TransportError("%s: cannot connect: %s" % (where, reason)) from None
        except (TimeoutError, socket.timeout) as exc:
            raise TransportError("%s: no answer within %g s (%s)" % (
                where, self.config.http_timeout, type(exc).__name__), maybe_executed=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError("%s: connection dropped before an answer (%s)" % (
                where, type(exc).__name__), maybe_executed=True) from None
        else:
            status, headers = resp.status, resp.headers
            try:
                with resp:
                    raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise TransportError("%s: answer cut off (%s)" % (where, type(exc).__name__),
                                     maybe_executed=True) from None
        return self._decode(method, status, headers, raw)

    def _decode(self, method: str, status: int, headers: Any, raw: bytes) -> dict:
        where = "%s on %s" % (method, self.host)
        if 300 <= status < 400:
            loc = urllib.parse.urlsplit(headers.get("Location", "") or "").hostname or "?"
            raise PortalMovedError("REDIRECT", "the portal redirects to host %s: update "
                                   "B24_WEBHOOK_BASE" % loc, status, method)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            ctype = (headers.get("Content-Type", "") if headers else "") or ""
            what = "an HTML page" if "html" in ctype.lower() or raw.lstrip()[:1] == b"<" else \
                "a malformed body"
            if status >= 400:
                raise ServerError("HTTP_%d" % status, "the portal answered with %s" % what,
                                  status, method) from None
            raise TransportError("%s: the portal answered HTTP %d with %s" % (where, status, what),
                                 maybe_executed=True) from None
        if isinstance(data, dict) and "error" in data and "result" not in data:
            raise api_error(data.get("error"), data.get("error_description"), status, method)
        if status >= 400:
            raise api_error("", "unexpected answer", status, method)
        if not isinstance(data, dict) or "result" not in data:
            raise TransportError("%s: the answer has no 'result'" % where, maybe_executed=True)
        return data

    # -- retries ------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(BACKOFF_CAP_SEC, BACKOFF_BASE_SEC * (2 ** attempt)))

    def _request(self, method: str, body: dict, *, write: bool,
                 sub_methods: Sequence[str] = ()) -> dict:
        limited = [method] + list(sub_methods)
        attempt = 0
        while True:
            self._progress()
            self.limiter.acquire(limited)
            self._progress()
            try:
                envelope = self._exchange(method, body)
                self._progress()
                self.limiter.note_time(method, envelope.get("time"))
                return envelope
            except (APIError, TransportError) as exc:
                retryable = getattr(exc, "retryable", False)
                if not retryable:
                    raise
                if write and exc.maybe_executed:
                    cause = what_came_back(exc)
                    raise UnknownOutcomeError(
                        "%s: the request went out but no usable answer came back (%s); it may "
                        "or may not have been carried out -- not retried" % (method, cause), cause) from None
                if attempt >= self.config.max_retries:
                    raise
                attempt += 1
                delay = self._backoff(attempt)
                if isinstance(exc, RateLimitError):
                    self.limit_hits += 1
                    delay = max(delay, 1.0 / max(self.limiter.rate, 0.1))
                    if exc.code.upper() == "OPERATION_TIME_LIMIT":
                        delay = max(delay, 5.0, self.limiter.reset_wait(limited))
                    self.limiter.note_refused(exc, limited, delay)
                # callers report a failure that outlives the retries; each retry is detail
                log.debug("%s; retry %d/%d in %.1f s", exc, attempt, self.config.max_retries, delay)
                self._progress()
                self.limiter.pause(delay)

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    @property
    def on_progress(self) -> Callable[[], None] | None:
        return self._on_progress

    @on_progress.setter
    def on_progress(self, hook: Callable[[], None] | None) -> None:
        """Called before and after each request and between waits (also the limiter's)."""
        self._on_progress = hook
        self.limiter.progress = hook

    # -- public API -----------------------------------------------------------
    def call_full(self, method: str, params: Mapping[str, Any] | None = None, *,
                  write: bool | None = None) -> dict:
        """Call *method*; return the whole envelope (``result``, ``next``, ``total``, ``time``)."""
        if write is None:
            write = not _is_read_method(method)
        return self._request(method, dict(params or {}), write=write)

    def call(self, method: str, params: Mapping[str, Any] | None = None, *,
             write: bool | None = None) -> Any:
        """Call *method* and return its ``result``."""
        return self.call_full(method, params, write=write)["result"]

    def batch(self, commands: Mapping[str, tuple], *, halt: bool = False, patience: float = 0.0) -> BatchResult:
        """Run ``{name: (method, params)}`` through ``batch``, 50 commands per request.

        With :attr:`share_batches`, the batches of other threads that are waiting to go at the same
        moment -- for the portal's budget, or for company: up to *patience* seconds -- go out in the
        same request (a batch may mix methods; each caller's commands stay together and in order, and
        each gets back only its own results).  The bridge's replies wait a little that way for the
        next scan or read: one request instead of two, and the budget goes to the customers."""
        if self.share_batches and not halt and 0 < len(commands) <= BATCH_MAX:
            return self._ride(commands, patience)
        out = BatchResult()
        names = list(commands)
        for i in range(0, len(names), BATCH_MAX):
            self._send_batch({name: commands[name] for name in names[i:i + BATCH_MAX]}, halt, out)
            if halt and out.errors:
                break
        return out

    def _send_batch(self, commands: Mapping[str, tuple], halt: bool, out: BatchResult) -> None:
        """One ``batch`` request (at most :data:`BATCH_MAX` commands); its outcome is added to *out*."""
        cmd = {}
        methods = []
        for name, (method, params) in commands.items():
            methods.append(method)
            query = php_query(params)
            cmd[name] = method + ("?" + query if query else "")
        write = _writes(methods)
        env = self._request("batch", {"halt": 1 if halt else 0, "cmd": cmd}, write=write, sub_methods=methods)
        if not out.time:
            out.time = as_map(env.get("time"))
        res = as_map(env.get("result"))
        results = as_map(res.get("result"))
        errors = as_map(res.get("result_error"))
        times = as_map(res.get("result_time"))
        for name, method in zip(commands, methods):
            if name in results:
                out.results[name] = results[name]
            if name in errors:
                e = errors[name]
                if isinstance(e, Mapping):
                    out.errors[name] = api_error(e.get("error"), e.get("error_description"), 0, method)
                else:
                    out.errors[name] = api_error("ERROR", str(e), 0, method)
            self.limiter.note_time(method, times.get(name))
        out.total.update(as_map(res.get("result_total")))
        out.next.update(as_map(res.get("result_next")))

    # -- shared batches -------------------------------------------------------------
    def _ride(self, commands: Mapping[str, tuple], patience: float) -> BatchResult:
        """Wait in line with *commands*.  One waiting thread at a time gathers the next request -- waits
        for the budget, and for company while the line has patience left -- and sends it for everyone it
        took (as many as fit); the others wait for their part of its answer, or gather the next."""
        rider = _Rider(commands, time.monotonic() + max(0.0, patience))
        with self._pool:
            self._riders.append(rider)
            self._pool.notify_all()       # a thread waiting for company has it
        try:
            while True:
                with self._pool:
                    # someone else gathers, or our request is under way: wait
                    while not rider.done and (self._gathering or rider not in self._riders):
                        stop = self.limiter.stop
                        if stop is not None and stop.is_set() and rider in self._riders:
                            raise Interrupted()
                        self._pool.wait(1.0)
                        self._progress()     # waiting for another thread's request is progress too
                    if rider.done:
                        return rider.outcome()
                    self._gathering = True
                try:
                    going = self._gather()
                finally:
                    with self._pool:
                        self._gathering = False
                        self._pool.notify_all()
                self._send_shared(going)
        except BaseException:
            with self._pool:
                if rider in self._riders:        # never sent: nobody else sends it either
                    self._riders.remove(rider)
            raise

    def _gather(self) -> list:
        """The riders of the next shared request, once the budget has room for it and the line has no
        patience left (or company has come)."""
        while True:
            self.limiter.wait_for_room()
            with self._pool:
                wait = min([r.due for r in self._riders] or [0.0]) - time.monotonic()
                if wait <= 0 or len(self._riders) > 1 or sum(len(r.commands) for r in self._riders) >= BATCH_MAX:
                    break                  # no patience left, company has come, or there is no room for any
                self._pool.wait(wait)      # a plain wait: whoever joins the line ends it
        going: list = []
        with self._pool:
            size = 0
            while self._riders and (not going or size + len(self._riders[0].commands) <= BATCH_MAX):
                going.append(self._riders.pop(0))
                size += len(going[-1].commands)
        # the reads first: a read never sees a write of the same request before its caller has heard of it
        going.sort(key=lambda r: r.writes)
        return going

    def _send_shared(self, going: list) -> None:
        """One request for the commands of *going*; each rider gets its own part of the outcome."""
        merged = {}
        for i, rider in enumerate(going):
            merged.update(("q%d_%s" % (i, name), command) for name, command in rider.commands.items())
        out = BatchResult()
        again: list = []
        try:
            self._send_batch(merged, False, out)
        except UnknownOutcomeError as exc:
            # a write among them lost its answer: the reads that went with it are simply asked again
            again = [r for r in going if not r.writes and r.tries < self.config.max_retries]
            for rider in going:
                rider.error = None if rider in again else exc
        except BaseException as exc:  # noqa: BLE001 - it is each rider's own outcome, raised in its thread
            for rider in going:
                rider.error = exc
        else:
            ran: set = set()
            for i, rider in enumerate(going):
                rider.take(out, "q%d_" % i)
                rider.out.after = frozenset(ran)
                ran.update(method for name, (method, _params) in rider.commands.items() if name in rider.out.results)
        with self._pool:
            for rider in going:
                if rider in again:
                    rider.tries += 1
                else:
                    rider.done = True
            self._riders[:0] = again
            self._pool.notify_all()

    def whoami(self) -> dict:
        """The webhook user via ``profile`` (no scope needed): ``{"id", "name", "admin"}``."""
        if self._me is None:
            prof = as_map(self.call("profile"))
            if not prof:
                raise AuthError("authorization_error", "the webhook user is inactive", 0, "profile")
            name = " ".join(x for x in (prof.get("NAME"), prof.get("LAST_NAME")) if x).strip()
            self._me = {"id": as_int(prof.get("ID")), "name": name or "user %s" % prof.get("ID"),
                        "admin": bool(prof.get("ADMIN"))}
        return self._me

    def scopes(self) -> list:
        res = self.call("scope")
        return [str(s) for s in res] if isinstance(res, list) else list(as_map(res).values())


def as_int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ===========================================================================
# Dialogs, messages and who wrote them
# ===========================================================================

_RE_DIALOG = re.compile(r"^\s*(?:(chat)(\d+)|(user)(\d+)|(\d+))\s*$", re.IGNORECASE)


def parse_dialog_id(text: str) -> str:
    """``chatN`` or bare ``N`` -> ``chatN``; ``userN`` -> ``N`` (the API's private dialog id)."""
    m = _RE_DIALOG.match(text or "")
    if not m or int(next(g for g in (m.group(2), m.group(4), m.group(5)) if g)) <= 0:
        raise UsageError("dialog %r: expected chatN (or just N) for a chat, userN for a "
                         "private dialog" % (text,))
    if m.group(1):
        return "chat%d" % int(m.group(2))
    if m.group(3):
        return str(int(m.group(4)))
    return "chat%d" % int(m.group(5))


def display_dialog_id(dialog_id: str) -> str:
    """The API's dialog id as people write it (``chatN`` or ``userN``)."""
    return "user%s" % dialog_id if str(dialog_id).isdigit() else str(dialog_id)


def normalize_phone(value: Any) -> str:
    """``10000000101`` / ``+1 000 000 0101`` / ``10000000101@c.us`` -> ``+10000000101``; else ``""``."""
    if not value or not isinstance(value, (str, int)):
        return ""
    text = str(value).split("@", 1)[0].strip()
    digits = re.sub(r"[\s()\-.]", "", text)
    if re.fullmatch(r"\+?\d{6,15}", digits):
        return "+" + digits.lstrip("+")
    return ""


def user_phone(user: Mapping | None) -> str:
    phones = user.get("phones") if isinstance(user, Mapping) else None
    if isinstance(phones, Mapping):
        for key in ("personal_mobile", "work_phone", "personal_phone", "inner_phone"):
            p = normalize_phone(phones.get(key))
            if p:
                return p
    return ""


def _user_name(user: Mapping | None, uid: int) -> str:
    if isinstance(user, Mapping):
        name = user.get("name") or " ".join(
            x for x in (user.get("first_name"), user.get("last_name")) if x)
        if name:
            return str(name)
    return "user %d" % uid if uid else "system"


_BB_SIMPLE = re.compile(r"\[/?(?:b|i|u|s|quote|code|color(?:=[^\]]*)?|size(?:=[^\]]*)?|"
                        r"font(?:=[^\]]*)?|left|right|center|justify|list|\*)\]", re.IGNORECASE)
_BB_URL = re.compile(r"\[url=([^\]]+)\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_BB_URL_BARE = re.compile(r"\[url\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_BB_TAGGED = re.compile(r"\[(user|chat|dialog|call|pch|context|send|put)(?:=[^\]]*)?\](.*?)\[/\1\]",
                        re.IGNORECASE | re.DOTALL)


_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: Any) -> str:
    """Text from the portal made safe to print on a terminal: control characters are shown, not
    obeyed (``ESC`` -> ``^[``, ``\\r`` -> ``␍``, C1 and bidi overrides -> ``<U+009B>``).  Newlines
    and tabs stay.  A customer cannot clear the screen, retitle the window or overwrite a line."""
    def show(m: re.Match) -> str:
        c = m.group(0)
        o = ord(c)
        if c == "\r":
            return "\u240d"
        if o < 0x20:
            return "^" + chr(o + 64)
        if o == 0x7f:
            return "^?"
        return "<U+%04X>" % o
    return _UNSAFE.sub(show, "" if text is None else str(text))


def bbcode_to_text(text: Any) -> str:
    """Bitrix BB-codes as plain text: ``[b]x[/b]`` -> ``x``, ``[URL=u]t[/URL]`` -> ``t (u)``."""
    s = "" if text is None else str(text)
    s = re.sub(r"\[br\]|#BR#", "\n", s, flags=re.IGNORECASE)

    def url(m: re.Match) -> str:
        target, label = m.group(1).strip(), m.group(2).strip()
        return label if label == target or not label else "%s (%s)" % (label, target)
    s = _BB_URL.sub(url, s)
    s = _BB_URL_BARE.sub(lambda m: m.group(1), s)
    s = _BB_TAGGED.sub(lambda m: m.group(2), s)
    s = re.sub(r"\[icon=[^\]]*\]|\[img[^\]]*\].*?\[/img\]", "", s, flags=re.IGNORECASE)
    s = _BB_SIMPLE.sub("", s)
    return s


def _parse_iso(value: Any) -> _dt.datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_date(value: Any) -> float | None:
    """An ISO-8601 date of the portal as Unix time (None if absent or unreadable)."""
    parsed = _parse_iso(value)
    return parsed.timestamp() if parsed else None


def _parse_tz(value: Any) -> _dt.tzinfo | None:
    """The UTC offset an ISO-8601 date of the portal was written in."""
    parsed = _parse_iso(value)
    return parsed.tzinfo if parsed else None


@dataclass
class DialogInfo:
    """What the recent list tells about one Open Lines dialog."""

    dialog_id: str
    chat_id: int = 0
    title: str = ""
    entity_id: str = ""
    line_id: int | None = None
    customer_id: int = 0
    customer_name: str = ""
    customer_phone: str = ""
    is_lines: bool = True
    session_id: int = 0
    waiting: bool = False          # in the webhook user's queue, not taken: readable, not writable
    adopted: bool = False          # known through our chat bot, not the recent list: re-read at each scan
    crm: dict = field(default_factory=dict)   # {"lead": id, "contact": id, "deal": id, "company": id} bound
    entity_data_1: str = ""        # as read (its fields 9 and 10: the reply window, b24delivery.window_of)

    @classmethod
    def from_chat(cls, dialog_id: str, chat: Mapping | None, title: str = "") -> DialogInfo:
        chat = chat if isinstance(chat, Mapping) else {}
        entity_type = str(chat.get("entity_type") or "").upper()
        is_lines = entity_type == "LINES" or str(chat.get("type") or "").lower() == "lines" \
            or str(chat.get("message_type") or "") == "L"
        entity_id = str(chat.get("entity_id") or "")
        info = cls(dialog_id, as_int(chat.get("id")), str(title or chat.get("name") or ""),
                   entity_id, None, 0, is_lines=is_lines)
        parts = entity_id.split("|")
        info.entity_data_1 = str(chat.get("entity_data_1") or "")
        data1 = info.entity_data_1.split("|")
        if is_lines and len(data1) >= 6:
            info.session_id = as_int(data1[5])      # 0 once the session is closed
        data2 = str(chat.get("entity_data_2") or "").split("|")
        info.crm = {data2[i].lower(): as_int(data2[i + 1]) for i in range(0, len(data2) - 1, 2)
                    if data2[i] and as_int(data2[i + 1])}
        if is_lines and len(parts) >= 4:
            info.line_id = as_int(parts[1], 0) or None
            info.customer_id = as_int(parts[3])
            # WhatsApp connectors often use the phone (or phone@c.us) as the external chat id;
            # other messengers (Telegram...) use numbers that are not phones
            if parts[2].endswith("@c.us") or re.search(r"whatsapp|wazzup|(^|_)wa(_|$)", parts[0], re.I):
                info.customer_phone = normalize_phone(parts[2])
        return info

    @property
    def connector(self) -> str:
        """The Open Lines connector (``entity_id`` = ``connector|line|external chat|customer``), else ""."""
        return self.entity_id.split("|")[0] if self.is_lines else ""

    def learn_customer(self, user: Mapping | None) -> None:
        if not isinstance(user, Mapping):
            return
        self.customer_name = _user_name(user, self.customer_id)
        self.customer_phone = user_phone(user) or self.customer_phone

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("chat_id", "title", "entity_id", "line_id",
                                              "customer_id", "customer_name", "customer_phone",
                                              "is_lines", "session_id", "waiting", "crm", "adopted")}


@dataclass
class Message:
    """One message, classified.  ``author_kind``: customer, operator, self, bot or system."""

    dialog_id: str
    chat_id: int
    id: int
    date: str
    author_id: int
    author_kind: str
    author_name: str
    text: str
    customer_name: str = ""
    customer_phone: str = ""
    line_id: int | None = None
    new_dialog: bool = False
    params: dict = field(default_factory=dict)
    uuid: str | None = None
    attachments: list = field(default_factory=list)   # see _attachment_of()
    caption: str = ""              # what the author typed (for media: the caption, may be "")
    session_id: int = 0
    waiting: bool = False          # the dialog waited in our queue when this was read
    crm: dict = field(default_factory=dict)

    @property
    def timestamp(self) -> float | None:
        return parse_date(self.date)

    @property
    def deleted(self) -> bool:
        """Deleted by its author (the portal keeps the id, puts a placeholder text in, §19)."""
        return str(self.params.get("IS_DELETED") or "").upper() == "Y"

    @property
    def edited(self) -> bool:
        """Edited after it was sent: same id, the new text (§19)."""
        return str(self.params.get("IS_EDITED") or "").upper() == "Y"

    @property
    def display_text(self) -> str:
        """The text as a person reads it: ``[photo: a.jpg, 230 KB] caption`` for media, ``[deleted]``."""
        if self.deleted:
            return "[deleted]"
        if not self.attachments:
            return self.text
        tags = " ".join(_describe_attachment(a) for a in self.attachments)
        return "%s %s" % (tags, self.caption) if self.caption else tags

    def to_json(self) -> dict:
        return {"dialog_id": display_dialog_id(self.dialog_id), "chat_id": self.chat_id,
                "message_id": self.id, "date": self.date, "author_id": self.author_id,
                "author_kind": self.author_kind, "author_name": self.author_name,
                "customer_name": self.customer_name or None,
                "customer_phone": self.customer_phone or None, "line_id": self.line_id,
                "text": None if self.deleted else self.text, "attachments": list(self.attachments),
                "new_dialog": self.new_dialog, **({"deleted": True} if self.deleted else {}),
                **({"edited": True} if self.edited else {})}


_MEDIA_WORDS = {"image": "photo", "audio": "audio", "video": "video", "file": "document"}


def _attachment_of(raw: Mapping) -> dict:
    """A portal file object (``files[]`` of ``im.dialog.messages.get``) as we pass it on."""
    name = str(raw.get("name") or "")
    ext = str(raw.get("extension") or (name.rsplit(".", 1)[-1] if "." in name else "")).lower()
    kind = str(raw.get("type") or "file").lower()
    return {"id": as_int(raw.get("id")), "type": _MEDIA_WORDS.get(kind, "file"), "portal_type": kind,
            "name": name, "size": as_int(raw.get("size")), "extension": ext,
            "mime": mimetypes.guess_type(name)[0] or "", "url_download": str(raw.get("urlDownload") or "")}


def human_size(size: int) -> str:
    if size >= 1024 * 1024:
        return "%.1f MB" % (size / 1048576.0)
    if size >= 1024:
        return "%d KB" % round(size / 1024.0)
    return "%d B" % size


def _describe_attachment(att: Mapping) -> str:
    """``[photo: a.jpg, 230 KB]`` -- what a text-only reader (or bot) sees of a file; with its number and
    type where one was given (the terminal chat's ``[photo #2: a.jpg, image/jpeg, 230 KB]``)."""
    numbered = "n" in att
    bits = [x for x in (str(att.get("name") or ""), str(att.get("mime") or "") if numbered else "",
                        human_size(as_int(att.get("size"))) if att.get("size") else "") if x]
    kind = "%s #%d" % (att.get("type") or "file", att["n"]) if numbered else str(att.get("type") or "file")
    return "[%s%s]" % (kind, ": " + ", ".join(bits) if bits else "")


def classify(raw: Mapping, users: Mapping[int, Mapping], *, self_id: int,
             customer_id: int = 0) -> str:
    """Who wrote *raw*: ``system``, ``self``, ``customer``, ``bot`` or ``operator``."""
    author = as_int(raw.get("author_id"))
    if author == 0:
        return "system"
    if author == self_id:
        return "self"
    user = users.get(author) or {}
    if user.get("connector") is True or (customer_id and author == customer_id) \
            or user.get("external_auth_id") == "imconnector":
        return "customer"
    if user.get("bot") is True or user.get("type") == "bot":
        return "bot"
    return "operator"


def _users_map(users: Any) -> dict:
    out = {}
    items = users.values() if isinstance(users, Mapping) else users if isinstance(users, list) else []
    for u in items:
        if isinstance(u, Mapping) and as_int(u.get("id")):
            out[as_int(u.get("id"))] = u
    return out


def messages_of(result: Any) -> tuple:
    """``im.dialog.messages.get``'s result -> (raw messages, {user id: user}, {file id: file})."""
    res = as_map(result)
    msgs = res.get("messages")
    msgs = list(msgs.values()) if isinstance(msgs, Mapping) else msgs if isinstance(msgs, list) else []
    msgs = [m for m in msgs if isinstance(m, Mapping) and as_int(m.get("id"))]
    files = res.get("files")
    files = files.values() if isinstance(files, Mapping) else files if isinstance(files, list) else []
    return msgs, _users_map(res.get("users")), {as_int(f.get("id")): f for f in files
                                                if isinstance(f, Mapping) and as_int(f.get("id"))}


_USER_KEYS = ("id", "name", "first_name", "last_name", "connector", "bot", "type", "external_auth_id",
              "phones")


class MessageFactory:
    """Turns raw ``im.dialog.messages.get`` rows into :class:`Message` objects."""

    def __init__(self, self_id: int):
        self.self_id = self_id
        self.users: dict = {}
        self.files: dict = {}

    def learn(self, users: Mapping[int, Mapping], info: DialogInfo | None, files: Mapping | None = None) -> None:
        # keep only what classification and display need: a daemon sees many customers
        self.users.update((uid, {k: u[k] for k in _USER_KEYS if k in u}) for uid, u in users.items())
        self.files.update((fid, _attachment_of(f)) for fid, f in (files or {}).items())
        for cache in (self.users, self.files):
            if len(cache) > USERS_CACHE_MAX:
                for k in list(cache)[:USERS_CACHE_MAX // 5]:
                    del cache[k]
        if info and info.customer_id and info.customer_id in users:
            info.learn_customer(users[info.customer_id])

    def make(self, raw: Mapping, dialog_id: str, info: DialogInfo | None) -> Message:
        author = as_int(raw.get("author_id"))
        cid = info.customer_id if info else 0
        kind = classify(raw, self.users, self_id=self.self_id, customer_id=cid)
        if info and kind == "customer" and not info.customer_id:
            info.customer_id = author
            info.learn_customer(self.users.get(author))
        params = raw.get("params")
        params = params if isinstance(params, dict) else {}
        file_ids = params.get("FILE_ID")
        file_ids = list(file_ids.values()) if isinstance(file_ids, Mapping) else \
            file_ids if isinstance(file_ids, list) else [file_ids] if file_ids else []
        attachments = [self.files.get(as_int(f)) or _attachment_of({"id": f}) for f in file_ids if as_int(f)]
        caption = bbcode_to_text(raw.get("text"))
        text = caption
        if attachments and not caption.strip():
            # text-only consumers (and bots) still see that something came
            text = " ".join(_describe_attachment(a) for a in attachments)
        return Message(
            dialog_id=dialog_id, chat_id=as_int(raw.get("chat_id")) or (info.chat_id if info else 0),
            id=as_int(raw.get("id")), date=str(raw.get("date") or ""), author_id=author,
            author_kind=kind, author_name=_user_name(self.users.get(author), author),
            text=text, caption=caption, attachments=attachments,
            customer_name=info.customer_name if info else "",
            customer_phone=info.customer_phone if info else "",
            line_id=info.line_id if info else None, session_id=info.session_id if info else 0,
            waiting=info.waiting if info else False, crm=dict(info.crm) if info else {},
            params=params,
            uuid=raw.get("uuid") if isinstance(raw.get("uuid"), str) else None)


def waits_in_queue(item: Mapping) -> bool:
    """A recent-list item for a chat waiting in a queue (undistributed; appended to every recent
    answer): no ``last_id``, and its chat has no ``role`` (fact sheet §7.1) -- a member row has both."""
    return "last_id" not in item and not as_map(item.get("chat")).get("role")


def _dialog_of(item: Mapping) -> str:
    did = str(item.get("id") or "")
    if not did:
        chat_id = as_int(item.get("chat_id"))
        did = "chat%d" % chat_id if chat_id else ""
    return did


# ===========================================================================
# The poller
# ===========================================================================

def _locked(method: Callable) -> Callable:
    """Run a :class:`Poller` method under the poller's lock."""
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class _TrackedDict(dict):
    """A dict that remembers which keys changed since :meth:`Poller.take_dirty`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dirty: set = set()

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self or self[key] != value:
            self.dirty.add(key)
        super().__setitem__(key, value)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: Any, *default: Any) -> Any:
        self.dirty.add(key)
        return super().pop(key, *default)


class _Want:
    """What one dialog's fetch is after, and what it found (see :meth:`Poller._fetch`).

    *forward*: ``FIRST_ID`` pages after the cursor, ascending.  *tail*:
    ``LAST_ID`` pages back from the newest message, descending, until the
    cursor or the cut -- for a dialog that comes into sight with history we
    must not replay.  Messages dated before *cut* (as far back as the scan
    reached: the previous scan less :data:`SYNC_MARGIN_SEC`, or the sweep's
    start) are passed over: they were written while the dialog was out of
    our sight, not since we last looked -- except those up to *seen*, an id
    the recent list showed us (or ours) before this read: the dialog was in
    sight then, however long their read took.
    """

    def __init__(self, first: int, target: int, *, cut: float | None = None, tail: bool = False, seen: int = 0):
        self.first = first            # only ids above this are ours
        self.target = target          # the newest id the recent list showed
        self.cut = cut
        self.seen = seen
        self.tail = tail
        self.after = first            # forward: the next FIRST_ID
        self.before = 0               # tail: the next LAST_ID (0 = the newest)
        self.keep: dict = {}          # id -> raw message to deliver
        self.passed = 0               # highest id passed over (older than the cut)
        self.highest = 0

    def params(self) -> dict:
        if self.tail:
            return {"LAST_ID": self.before, "LIMIT": MESSAGES_PAGE}
        return {"FIRST_ID": self.after, "LIMIT": MESSAGES_PAGE}

    def _recent(self, raw: Mapping) -> bool:
        if self.cut is None or as_int(raw.get("id")) <= self.seen:
            return True
        date = parse_date(raw.get("date"))
        return date is None or date >= self.cut

    def take(self, msgs: list) -> bool:
        """Take one page; True if another page is needed."""
        full = len(msgs) >= MESSAGES_PAGE
        rows = sorted((m for m in msgs if as_int(m.get("id")) > (self.first if self.tail else self.after)),
                      key=lambda m: as_int(m.get("id")))
        for m in rows:
            mid = as_int(m.get("id"))
            self.highest = max(self.highest, mid)
            if self._recent(m):
                self.keep[mid] = m
            else:
                self.passed = max(self.passed, mid)
        if not rows:
            return False
        if self.tail:
            oldest = as_int(rows[0].get("id"))
            if full and len(rows) == len(msgs) and self._recent(rows[0]):
                self.before = oldest
                return True
            return False
        self.after = as_int(rows[-1].get("id"))
        if full and self.cut is not None and not any(self._recent(m) for m in rows):
            # a long stretch written while the dialog was out of sight: read back from its end
            self.tail, self.first, self.before = True, self.after, 0
            return True
        return full or self.after < self.target

    def messages(self) -> list:
        return [self.keep[i] for i in sorted(self.keep)]

    def hold_above(self, top: int) -> int:
        """Leave the messages above *top* to the next cycle; return the highest id this read saw."""
        seen = self.highest
        for mid in [i for i in self.keep if i > top]:
            del self.keep[mid]
        self.highest = min(self.highest, top)
        return seen


class Poller:
    """New messages of every Open Lines dialog the webhook user can read.

    Each cycle first learns which dialogs changed since the previous cycle
    -- one small request whatever the number of dialogs, see :meth:`_scan` --
    then fetches every changed dialog strictly after its cursor with
    ``FIRST_ID`` (one ``batch`` for up to 50 dialogs), looping until caught
    up.  Reads due whatever the scan finds (our own post's, put off until
    now; a dialog not caught up) ride in the scan's batch.  Messages come
    back oldest first, across dialogs.  With *in_order* they also come in
    the order they were written from one cycle to the next: what was
    written after the scan, which a dialog's read may meet, waits for the
    next cycle, with what other dialogs got meanwhile.

    A dialog that comes into sight mid-life (a chat transferred to us, a
    supervisor adding the webhook user) starts where it became visible:
    messages older than the previous scan (less a margin for the portal's
    late-written rows) are history, not news -- except a waiting session
    nobody answered yet, whose messages since the session began are news.

    Cursors advance when the caller :meth:`ack`-s a message (``poll()`` acks
    by itself unless ``auto_ack=False``), so a state file saved after each
    ack never skips a message it did not deliver.
    """

    SCAN_CALLS = frozenset({"im.recent.list", "im.recent.get"})   # the scan's one request (_scan_sync)

    def __init__(self, client: Client, *, self_id: int, lines_only: bool = True,
                 page_min: int = RECENT_PAGE_MIN, in_order: bool = False):
        self.client = client
        self.self_id = self_id
        self.lines_only = lines_only
        self.in_order = in_order
        self.page_min = page_min
        self.factory = MessageFactory(self_id)
        self.cursors: dict = _TrackedDict()   # dialog_id -> last delivered (acked) message id
        self.fetched: dict = {}       # dialog_id -> last fetched message id (in memory)
        self.last_seen: dict = {}     # dialog_id -> last message id the recent list showed
        self._said_behind = False     # warned that the portal is behind the saved cursors
        self._suspects: dict = {}     # dialog -> its recent item, whose message is before our cursor (this scan)
        self.dialogs: dict = {}       # dialog_id -> DialogInfo
        self.watermark: float | None = None   # the portal's clock when the last completed scan began
        self.floor_id = 0             # new dialogs start after this id
        self._committed_watermark: float | None = None   # the watermark a restart may trust
        self._unacked: set = set()    # (dialog, id) delivered by poll() but not acked yet
        self._acked: dict = {}        # dialog -> highest acked id
        self._page = page_min
        self._unreadable: dict = {}  # dialog -> target we could not read
        self._rewound: set = set()   # dialogs replaying history on purpose (no cut)
        self.uses_sync = True        # until the portal shows it ignores LAST_SYNC_DATE
        self.sweep_every = SYNC_SWEEP_SEC   # how often the scan sweeps wide (else it asks back SYNC_NEAR_SEC)
        self.sweep_margin = SYNC_MARGIN_SEC # how late a recent row may be written, at most
        self.monotonic = time.monotonic     # the sweep's clock (a benchmark may run a minute faster)
        self._swept: float | None = None    # when the last wide scan ran (none yet)
        self._swept_from: float | None = None   # the watermark that sweep started from
        self._cut: float | None = None      # this scan's reach: rows older are not news (see _consider)
        self._newest: float | None = None
        self._read_time: float | None = None
        self._tz: _dt.tzinfo = _dt.timezone.utc   # the portal's UTC offset, once seen
        self.own_read_delay = OWN_READ_DELAY_SEC
        self._told: collections.deque = collections.deque()   # (dialog, id, watched, when) posted: see posted()
        self._own: dict = {}          # dialog -> ids we posted in it, above what was read of it
        self._unwatched: set = set()  # dialogs with a post of ours among them that went without the scan
        self._owed: dict = {}         # dialog -> when its read, put off, is due (monotonic)
        self._queued: set = set()     # the dialogs this scan showed waiting in our queue
        self._news_at: dict = {}      # dialog our chat bot holds -> when a read last brought news (monotonic)
        self._rechecked: dict = {}    # dialog our chat bot holds -> when a scan last re-read it (monotonic)
        self.started = False
        self.lock = threading.RLock()   # poll() in one thread, ack() and to_state() in others

    # -- state ----------------------------------------------------------------
    @_locked
    def to_state(self) -> dict:
        return {"version": 1, "cursors": dict(self.cursors), "floor_id": self.floor_id,
                "watermark": self._committed_watermark,
                "dialogs": {d: i.to_json() for d, i in self.dialogs.items() if d in self.cursors}}

    @_locked
    def load_state(self, state: Mapping | None) -> None:
        if not state:
            return
        self.cursors = _TrackedDict((str(k), as_int(v)) for k, v in as_map(state.get("cursors")).items())
        self.fetched = dict(self.cursors)
        self.last_seen = dict(self.cursors)
        self.floor_id = as_int(state.get("floor_id"))
        wm = state.get("watermark")
        self.watermark = self._committed_watermark = float(wm) if isinstance(wm, (int, float)) else None
        for d, raw in as_map(state.get("dialogs")).items():
            if isinstance(raw, Mapping):
                info = DialogInfo(str(d))
                for k in raw:
                    if hasattr(info, k):
                        setattr(info, k, raw[k])
                self.dialogs[str(d)] = info
        self.started = self.watermark is not None

    @_locked
    def take_dirty(self) -> dict:
        """``{dialog: {"cursor": id, "info": {...}} or None (forgotten)}`` for every dialog whose
        cursor or details changed since the last call -- what an incremental store writes."""
        out = {}
        for did in self.cursors.dirty:
            if did in self.cursors:
                info = self.dialogs.get(did)
                out[did] = {"cursor": self.cursors[did], "info": info.to_json() if info else {}}
            else:
                out[did] = None
        self.cursors.dirty = set()
        return out

    @_locked
    def mark_dirty(self, dialogs: Iterable[str]) -> None:
        """Have :meth:`take_dirty` report these again (their save failed)."""
        self.cursors.dirty.update(dialogs)

    @_locked
    def meta(self) -> dict:
        """The scalar state a store keeps beside the per-dialog cursors."""
        return {"watermark": self._committed_watermark, "floor_id": self.floor_id}

    def has_waiting(self) -> bool:
        """Is a dialog waiting in a queue in sight?  (Such chats produce no events.)  Safe from any
        thread: the values are copied in one step."""
        return any(d.waiting for d in list(self.dialogs.values()))

    @_locked
    def forget(self, dialog_id: str) -> None:
        """Drop what is known of a dialog (it comes back as a dialog first seen, from then on)."""
        for table in (self.cursors, self.fetched, self.last_seen, self.dialogs, self._unreadable, self._acked,
                      self._own, self._owed, self._news_at, self._rechecked):
            table.pop(dialog_id, None)
        self._rewound.discard(dialog_id)
        self._unwatched.discard(dialog_id)

    # -- our own messages ---------------------------------------------------------
    def posted(self, dialog_id: str, message_id: int, after: frozenset = frozenset()) -> None:
        """The caller posted *message_id* into *dialog_id*.  Safe from any thread; never waits for a poll.

        Our post moves the dialog in the recent list, but reading the dialog at once would mostly fetch
        just our own message.  It cannot be skipped: a customer message written in the instant before
        ours is behind it, and ids are one sequence for the whole portal, with gaps, so nothing tells it
        is there but a read.  So that read is put off by :attr:`own_read_delay` seconds: a new message
        in the dialog meanwhile (the usual case in a conversation) is read together with ours at once,
        and otherwise the late read brings our message's delivery params too (what a delivery verdict
        would read anyway).

        *after*: the methods that ran, and answered, before the post in its request
        (:attr:`BatchResult.after`).  When they are the scan's (:data:`SCAN_CALLS`; one that failed is
        dropped), only a message written in the milliseconds between the two can hide behind the post, so
        its read waits twice as long for company -- unless another post of ours in the dialog went
        without a scan."""
        if message_id:
            watched = self.SCAN_CALLS <= after
            self._told.append((str(dialog_id), int(message_id), watched, self.monotonic()))

    def _take_told(self) -> None:
        while self._told:
            did, mid, watched, at = self._told.popleft()
            if mid > max(self.cursors.get(did, 0), self.fetched.get(did, 0)) and len(self._own) < 100000:
                self._own.setdefault(did, set()).add(mid)
                info = self.dialogs.get(did)
                if not watched or (info is not None and info.adopted):    # a chat bot's chat is in no scan
                    self._unwatched.add(did)
                    if did in self._owed:               # a read already put off waits no longer than this one
                        self._owed[did] = min(self._owed[did], at + self.own_read_delay)

    def _own_delay(self, did: str) -> float:
        """How long the read of *did*, whose only news is our own post, is put off."""
        return self.own_read_delay * (1 if did in self._unwatched else OWN_READ_WATCHED)

    def _put_off_own(self, wants: dict, hinted: dict) -> None:
        """Take out of *wants* the dialogs whose only news is our own post, until their read is due.  A
        dialog a push source named is read now unless the named message is ours."""
        now = self.monotonic()
        for did, want in list(wants.items()):
            own = self._own.get(did)
            seen = self.last_seen.get(did, 0)
            target = max(want.target, seen)
            if want.tail or not own or target not in own or hinted.get(did, target) not in own:
                continue
            if seen > want.first and seen not in own:
                continue                            # somebody else's message is known to wait below ours
            if now < self._owed.setdefault(did, now + self._own_delay(did)):
                del wants[did]
                self.last_seen[did] = target        # read when due, even if the list stays quiet

    def _read_own(self, did: str) -> None:
        """*did* was read: our posts up to there need nothing more."""
        self._owed.pop(did, None)
        own = self._own.get(did)
        if own is not None:
            own.difference_update([i for i in own if i <= self.fetched.get(did, 0)])
            if not own:
                del self._own[did]
                self._unwatched.discard(did)

    def _recheck_adopted(self, wants: dict) -> None:
        """Dialogs our chat bot holds are in no recent list, so the scan re-reads them after their cursors:
        that is what finds a message whose bot event was lost.  One with news in the last
        :data:`ADOPTED_LIVE_SEC` is re-read at every scan; of the quieter ones (a week of them can be a
        thousand), :data:`ADOPTED_PER_SCAN` at a scan, the longest unchecked first -- and of those never
        checked (after a start), the most recently active first."""
        now = self.monotonic()
        chosen, quiet = [], []
        for did, info in self.dialogs.items():
            if not info.adopted or did not in self.cursors or did in wants:
                continue
            if now - self._news_at.get(did, -math.inf) < ADOPTED_LIVE_SEC:
                chosen.append(did)
            else:
                quiet.append((self._rechecked.get(did, -math.inf), -self.last_seen.get(did, 0), did))
        quiet.sort()
        chosen.extend(did for _checked, _newest, did in quiet[:ADOPTED_PER_SCAN])
        for did in chosen:
            done = max(self.cursors[did], self.fetched.get(did, 0))
            wants[did] = _Want(done, done)
            self._rechecked[did] = now

    def _lagging(self) -> Iterator[tuple]:
        """``(dialog, read up to, newest id seen)`` of each known dialog not read up to what the recent list
        showed (rewound, a page left over, a read put off or failed) -- unless that newest id is one we may
        not read."""
        for did, cur in self.cursors.items():
            done = max(cur, self.fetched.get(did, cur))
            target = self.last_seen.get(did, done)
            if done < target and self._unreadable.get(did) != target:
                yield did, done, target

    def _reads_due(self) -> dict:
        """``{dialog: FIRST_ID}`` of the reads this cycle makes whatever its scan finds -- a dialog whose
        read was put off (our own post) and is due now, or one not caught up last time.  They ride in the
        scan's batch, after the scan: a cycle whose only news is our own post costs one request."""
        now = self.monotonic()
        due: dict = {}
        for did, done, target in self._lagging():
            own = self._own.get(did)
            if own and target in own and now < self._owed.get(did, now + self._own_delay(did)):
                continue                                # still put off
            due[did] = done
            if len(due) >= BATCH_MAX - 2:
                break
        return due

    def _take_early(self, wants: dict, got: dict) -> set:
        """Feed the reads that rode in the scan's batch (*got*: ``{dialog: (FIRST_ID, result)}``) to the
        dialogs' wants; return the dialogs they satisfied (a full page, or a want that starts elsewhere, is
        read on by :meth:`_fetch`)."""
        done: set = set()
        for did, (first, result) in got.items():
            want = wants.get(did)
            if want is None or want.tail or want.after != first:
                continue
            msgs, users, files = messages_of(result)
            self.factory.learn(users, self.dialogs.get(did), files)
            if not want.take(msgs):
                done.add(did)
        return done

    # -- recent list ------------------------------------------------------------
    def _note_read_time(self, block: Any) -> None:
        """Remember the portal's clock when a scan began: later changes are dated after it."""
        block = as_map(block)
        tz = _parse_tz(block.get("date_start"))
        if tz is not None:
            self._tz = tz
        try:
            start = float(block.get("start"))
        except (TypeError, ValueError):
            return
        if self._read_time is None:
            self._read_time = float(int(start))

    def _skips(self) -> dict:
        """The recent-list filters that leave out what we never read: with :attr:`lines_only`, the team's
        group chats and private dialogs (``SKIP_CHAT`` drops group and open chats, ``SKIP_DIALOG``
        one-to-one ones; Open Lines chats are a type of their own)."""
        return {"SKIP_CHAT": "Y", "SKIP_DIALOG": "Y"} if self.lines_only else {}

    def _recent_page(self, offset: int, limit: int) -> tuple:
        env = self.client.call_full("im.recent.list", dict(self._skips(), OFFSET=offset, LIMIT=limit))
        self._note_read_time(env.get("time"))
        res = env.get("result")
        if isinstance(res, list):          # tolerate a bare list
            return res, False
        res = as_map(res)
        items = res.get("items")
        items = list(items.values()) if isinstance(items, Mapping) else items or []
        more = bool(res.get("hasMore", res.get("hasMorePages", False)))
        return [i for i in items if isinstance(i, Mapping)], more


    def _consider(self, item: Mapping, changed: dict, seen: set, *, full: bool = False) -> tuple:
        """Look at one recent item; return ``(unchanged, activity date, in-queue)``."""
        did = _dialog_of(item)
        queued = waits_in_queue(item)
        if queued and did:
            self._queued.add(did)
        date = parse_date(item.get("date_last_activity") or item.get("date_update"))
        if not did or did in seen:
            return True, date, queued
        seen.add(did)
        if date is not None:
            self._newest = date if self._newest is None else max(self._newest, date)
        mid = as_int(as_map(item.get("message")).get("id"))
        cursor = self.cursors.get(did)
        if mid and cursor is not None and mid < cursor:
            self._suspects[did] = item      # a late row, or a portal behind our state: a read tells which
        info = self._learn_dialog(did, item)
        relevant = info.is_lines or not self.lines_only
        if full:        # start(): where each dialog stands is all it needs -- not every item of every page
            changed[did] = {"message": {"id": mid}}
            return False, date, queued
        was = self.last_seen.get(did)
        if not mid or (was is not None and mid <= was):
            return True, date, queued
        if was is None and not queued and date is not None and self._cut is not None and date < self._cut:
            # a dialog we had not met, quiet since well before our last scan: nothing new in it
            self.last_seen[did] = mid
            if relevant:
                self.cursors.setdefault(did, mid)
                self.fetched.setdefault(did, mid)
            return True, date, queued
        if relevant:
            changed[did] = item
        else:
            self.last_seen[did] = mid
        return False, date, queued

    def _settle_suspects(self, changed: dict, full: bool) -> None:
        """The dialogs of this scan whose recent row ends before our cursor.  The portal writes a row after
        its message (fact sheet §7.2), so while a dialog keeps getting messages a read can bring some whose
        rows are not there yet, and a row then ends before what was read -- messages after it say so.  A
        portal behind our state (another one, one restored from a backup) has none: that dialog is taken
        as first seen (:meth:`_behind`).  One read each, 50 to a ``batch``, and none when there are none."""
        suspects = [(did, item, as_int(as_map(item.get("message")).get("id"))) for did, item in self._suspects.items()]
        self._suspects = {}
        for start in range(0, len(suspects), BATCH_MAX):
            chunk = suspects[start:start + BATCH_MAX]
            br = self.client.batch({"s%d" % i: ("im.dialog.messages.get", {"DIALOG_ID": did, "FIRST_ID": mid, "LIMIT": 1})
                                    for i, (did, _item, mid) in enumerate(chunk)})
            for i, (did, item, mid) in enumerate(chunk):
                err = br.errors.get("s%d" % i)
                if isinstance(err, (RateLimitError, ServerError, AuthError)):
                    raise err
                cursor = self.cursors.get(did)
                if "s%d" % i not in br.results or cursor is None:
                    continue                # not read now: its row comes again, and so does the question
                if messages_of(br.results["s%d" % i])[0]:
                    log.debug("%s: its recent row is behind what was read (written late)", display_dialog_id(did))
                    continue
                self._behind(did, mid, cursor)
                self._consider(item, changed, set(), full=full)

    def _behind(self, did: str, mid: int, cursor: int) -> None:
        """The portal's dialog ends before our cursor: the saved state was written against another portal
        (a new emulator on the same address, a portal restored from a backup).  Follow the portal: the
        dialog is taken as first seen -- what was written since the last scan is delivered, the rest is
        history."""
        if not self._said_behind:
            log.warning("%s ends at message %d, but the saved state has read it up to %d: the state was "
                        "written against another portal (or this one was restored from a backup) -- following "
                        "the portal from here, in this dialog and any other like it", display_dialog_id(did),
                        mid, cursor)
            self._said_behind = True
        else:
            log.debug("%s: the portal is behind the saved state (%d < %d); following it", display_dialog_id(did),
                      mid, cursor)
        self.forget(did)

    def _scan(self, full: bool, early: Mapping | None = None, got: dict | None = None) -> tuple:
        """Find changed dialogs; return ``({dialog: recent item}, the scan's watermark)``.

        Normally one ``batch``: ``im.recent.list LIMIT=1`` (the newest dialog,
        whatever its row's date) and ``im.recent.get LAST_SYNC_DATE=<last scan
        less a margin>`` (what changed since; every in-queue chat comes with it,
        whatever the date).  A portal that
        ignores ``LAST_SYNC_DATE`` is read the other way from then on:
        ``im.recent.list`` in activity order, only down to the first item that
        has not changed and is older than the last scan -- everything below it
        is older still.  Pages move by ``OFFSET += LIMIT`` (the portal's
        ``next`` also counts the in-queue items, and following it skips
        dialogs).  ``full`` reads every page and returns every dialog.
        *early* (``{dialog: FIRST_ID}``) are reads that go in that one batch,
        after the scan; their results land in *got* (``{dialog: (FIRST_ID,
        result)}``).
        """
        self._newest = None
        self._read_time = None
        self._queued = set()
        self._suspects = {}
        changed: dict = {}
        if not full and self.uses_sync and self.watermark is not None \
                and time.time() - self.watermark < SYNC_MAX_AGE_SEC:
            if self._scan_sync(changed, early or {}, {} if got is None else got):
                self._no_longer_waiting()
                self._settle_suspects(changed, full)
                return changed, self._scan_time()
            changed.clear()
            self._suspects = {}
            self._read_time = None
        seen: set = set()
        offset = 0
        limit = RECENT_PAGE_MAX if full else self._page
        while True:
            items, more = self._recent_page(offset, limit)
            boundary = False
            for item in items:
                unchanged, date, queued = self._consider(item, changed, seen, full=full)
                if unchanged and not full and not queued and not item.get("pinned") \
                        and date is not None and self._cut is not None and date < self._cut:
                    boundary = True     # read the rest of this page: in-queue chats come last
            if boundary or not more or not items:
                break
            offset += limit
            limit = RECENT_PAGE_MAX
        self._no_longer_waiting()
        self._settle_suspects(changed, full)
        return changed, self._scan_time()

    def _no_longer_waiting(self) -> None:
        """Every answer of a scan lists all the chats waiting in our queue (fact sheet §7): one we knew as
        waiting and not among them was taken -- by us, or by another operator (then it is out of our sight
        and its row never comes again to say so).  Else a chat long gone from the queue would keep a push
        source's scan fast for good."""
        for did, info in self.dialogs.items():
            if info.waiting and did not in self._queued:
                info.waiting = False
                if did in self.cursors:
                    self.cursors.dirty.add(did)

    def _scan_time(self) -> float | None:
        """The watermark a completed scan earns: the portal's clock at its start."""
        if self._read_time is not None:
            return max(self._read_time, self.watermark or 0.0)
        return self._newest

    def _scan_sync(self, changed: dict, early: Mapping, got: dict) -> bool:
        """The one-request scan; False if the portal did not honour ``LAST_SYNC_DATE``.

        It asks for the rows changed since the last scan less a few seconds (:data:`SYNC_NEAR_SEC`), and
        once every :attr:`sweep_every` seconds since the previous sweep less :attr:`sweep_margin` (the
        sweep): a row the portal wrote up to that late was either there at the previous sweep or is dated
        after the previous sweep less that margin, so one of the two sweeps has it -- its message is late,
        never lost -- and a busy minute does not cost every cycle the rows of the whole minute."""
        now = self.monotonic()
        wide = self._swept is None or now - self._swept >= self.sweep_every
        if wide:
            since = min(self.watermark, self._swept_from or self.watermark) - self.sweep_margin
            self._cut = min(self._cut if self._cut is not None else since, since)
        else:
            since = self.watermark - SYNC_NEAR_SEC
        # in the portal's own UTC offset, so even a portal comparing strings gets it right
        text = _dt.datetime.fromtimestamp(since, self._tz).isoformat(timespec="seconds")
        # the chats waiting in our queue come with the sync, not with the head a second time
        commands = {
            "head": ("im.recent.list", dict(self._skips(), LIMIT=1, SKIP_UNDISTRIBUTED_OPENLINES="Y")),
            "sync": ("im.recent.get", dict(self._skips(), LAST_SYNC_DATE=text)),
        }
        reads = list(early.items())
        for i, (did, first) in enumerate(reads):        # after the scan: they see all it saw
            commands["e%d" % i] = ("im.dialog.messages.get", {"DIALOG_ID": did, "FIRST_ID": first,
                                                              "LIMIT": MESSAGES_PAGE})
        br = self.client.batch(commands)
        got.update((did, (first, br.results["e%d" % i])) for i, (did, first) in enumerate(reads)
                   if "e%d" % i in br.results)
        self._note_read_time(br.time)
        for name in ("head", "sync"):
            err = br.errors.get(name)
            if isinstance(err, (RateLimitError, ServerError, AuthError)):
                raise err
        head, sync = br.results.get("head"), br.results.get("sync")
        if "head" not in br.results or not isinstance(sync, list):
            self.uses_sync = False
        else:
            for item in sync:
                # judge the filter on member rows only: in-queue chats come whatever the date
                if not isinstance(item, Mapping) or waits_in_queue(item):
                    continue
                updated = parse_date(item.get("date_update") or item.get("date_last_activity")
                                      or as_map(item.get("message")).get("date"))
                if updated is not None and updated < since - 1:
                    self.uses_sync = False      # the filter was ignored: older items came back
                    break
        if not self.uses_sync:
            log.info("this portal ignores im.recent.get LAST_SYNC_DATE: scanning im.recent.list instead")
            return False
        if wide:
            self._swept, self._swept_from = now, self.watermark
        items = as_map(head).get("items")
        items = list(items.values()) if isinstance(items, Mapping) else items or []
        seen: set = set()
        for item in list(sync) + list(items):
            if isinstance(item, Mapping):
                self._consider(item, changed, seen)
        return True

    def _learn_dialog(self, did: str, item: Mapping) -> DialogInfo:
        info = self.dialogs.get(did)
        if info is None or not info.chat_id:
            fresh = DialogInfo.from_chat(did, item.get("chat"), item.get("title") or "")
            if info is not None:
                fresh.customer_name = fresh.customer_name or info.customer_name
                fresh.customer_phone = fresh.customer_phone or info.customer_phone
            info = self.dialogs[did] = fresh
        lines = as_map(item.get("lines"))
        before = (info.session_id, info.waiting)
        data1 = str(as_map(item.get("chat")).get("entity_data_1") or "")
        if lines.get("id") is not None:
            info.session_id = as_int(lines.get("id"))
        elif info.is_lines and data1.count("|") >= 5:     # im.dialog.get: no "lines", the session is in field 6
            info.session_id = as_int(data1.split("|")[5])
        info.waiting = info.is_lines and waits_in_queue(item)
        if (info.session_id, info.waiting) != before and did in self.cursors:
            self.cursors.dirty.add(did)
        user = item.get("user")
        if isinstance(user, Mapping) and info.customer_id and as_int(user.get("id")) == info.customer_id:
            info.learn_customer(user)
        return info

    def _adopt(self, did: str, message_id: int) -> dict | None:
        """A dialog our chat bot is in, met through its event: learn it (``im.dialog.get``) as a dialog
        first seen; None if the webhook user may not read it (said once)."""
        try:
            chat = as_map(self.client.call("im.dialog.get", {"DIALOG_ID": did}))
        except (AccessDeniedError, NotFoundError, BadRequestError) as exc:
            if did not in self._unreadable:
                log.warning("%s: our chat bot is in it, but the webhook user may not read it (%s) -- let the "
                            "user see the line's dialogs (an administrator, or the line's permissions)",
                            display_dialog_id(did), exc)
                self._unreadable[did] = message_id
            return None
        item = {"chat": chat, "title": chat.get("name") or "", "last_id": as_int(chat.get("last_id")),
                "message": {"id": max(message_id, as_int(chat.get("last_message_id")))}}
        info = self._learn_dialog(did, item)
        info.adopted = True
        return item

    # -- fetching -----------------------------------------------------------------
    def _fetch(self, wants: dict) -> set:
        """Read each ``{dialog: _Want}`` until it is satisfied; return the dialogs we may not read.

        Up to 50 dialogs go in one ``batch``; a dialog whose page was full
        goes round again.  Rate limits and server errors propagate.
        """
        pending = dict(wants)
        failed: set = set()
        while pending:
            names = list(pending)[:BATCH_MAX]
            if len(names) == 1:
                d = names[0]
                try:
                    results = {d: self.client.call("im.dialog.messages.get",
                                                   dict(pending[d].params(), DIALOG_ID=d))}
                    errors: dict = {}
                except (AccessDeniedError, NotFoundError, BadRequestError) as exc:
                    results, errors = {}, {d: exc}
            else:
                br = self.client.batch({d: ("im.dialog.messages.get", dict(pending[d].params(), DIALOG_ID=d))
                                        for d in names})
                results, errors = br.results, br.errors
            for d in names:
                if d in errors or d not in results:
                    err = errors.get(d) or ServerError("", "no result for this command", 0, "batch")
                    if isinstance(err, (RateLimitError, ServerError, AuthError)):
                        raise err
                    log.info("%s: cannot read it now: %s", display_dialog_id(d), err)
                    pending.pop(d)
                    failed.add(d)
                    continue
                msgs, users, files = messages_of(results[d])
                self.factory.learn(users, self.dialogs.get(d), files)
                if not pending[d].take(msgs):
                    pending.pop(d)
        return failed

    def _cut_for(self, did: str) -> float | None:
        """The cut of a read of *did* this cycle: none for a dialog replaying history on purpose (and none
        before the first scan, when :attr:`_cut` is None too)."""
        return None if did in self._rewound else self._cut

    def _want(self, did: str, item: Mapping) -> _Want:
        """How to read a changed dialog: after its cursor, or -- first seen -- from where it came into sight."""
        target = as_int(as_map(item.get("message")).get("id"))
        cut = self._cut_for(did)
        if did in self.cursors:
            return _Want(max(self.cursors[did], self.fetched.get(did, 0)), target, cut=cut,
                         seen=self.last_seen.get(did, 0))
        lines = as_map(item.get("lines"))
        began = parse_date(lines.get("date_create"))
        if cut is not None and waits_in_queue(item) and began is not None \
                and as_int(lines.get("status"), 99) < SESSION_ANSWERED:
            # a waiting session nobody has answered: what the customer wrote in it is news
            cut = min(cut, began - 1)
        return _Want(self.floor_id, target, cut=cut, tail=True)

    # -- cycle ----------------------------------------------------------------------
    @_locked
    def start(self) -> list:
        """Begin from "now": remember where every dialog stands, deliver nothing.

        With state loaded (:meth:`load_state`) this is a normal :meth:`poll`
        that catches up on what arrived while we were away.
        """
        if self.started:
            return self.poll()
        changed, newest = self._scan(full=True)
        for did, item in changed.items():
            mid = as_int(as_map(item.get("message")).get("id"))
            self.last_seen[did] = mid
            self.floor_id = max(self.floor_id, mid)
            if self.dialogs.get(did) and (self.dialogs[did].is_lines or not self.lines_only):
                self.cursors.setdefault(did, mid)
                self.fetched[did] = max(self.fetched.get(did, 0), self.cursors[did])
        self.watermark = self._committed_watermark = newest if newest is not None else time.time() - 60
        self.started = True
        return []

    @_locked
    def rewind(self, *, since: float | None = None, count: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
        """Move known cursors back so the next poll replays recent history.

        *since*: messages newer than this Unix time; *count*: the last N of each
        dialog; with both, whichever reaches further back.  Dialogs are read
        back in ``batch`` requests of 50; *progress(done, total)* follows them.
        """
        targets = [did for did in self.cursors
                   if not (self.dialogs.get(did) is not None and not self.dialogs[did].is_lines and self.lines_only)]
        for did, point in self._replay_points(targets, since, count, progress).items():
            self.cursors[did] = self.fetched[did] = min(self.cursors[did], point)
            self._unreadable.pop(did, None)
            self._rewound.add(did)

    def _replay_points(self, dialogs: list, since: float | None, count: int | None,
                       progress: Callable[[int, int], None] | None) -> dict:
        """``{dialog: id after which its replay starts}``, paging back with ``LAST_ID``, 50 dialogs
        per request.  Dialogs we may not read are left out."""
        state = {d: {"last": 0, "seen": 0, "by_count": None, "by_date": None} for d in dialogs}
        points: dict = {}
        pending = list(dialogs)
        total = len(dialogs)
        while pending:
            chunk, pending = pending[:BATCH_MAX], pending[BATCH_MAX:]
            br = self.client.batch({d: ("im.dialog.messages.get", {"DIALOG_ID": d, "LAST_ID": state[d]["last"],
                                                                   "LIMIT": MESSAGES_PAGE}) for d in chunk})
            for d in chunk:
                err = br.errors.get(d)
                if isinstance(err, (RateLimitError, ServerError, AuthError)):
                    raise err
                if err is not None or d not in br.results:
                    continue
                st = state[d]
                rows = sorted(((as_int(m.get("id")), parse_date(m.get("date")))
                               for m in messages_of(br.results[d])[0]), reverse=True)
                for mid, date in rows:
                    st["seen"] += 1
                    if count and st["by_count"] is None and st["seen"] > count:
                        st["by_count"] = mid
                    if since is not None and st["by_date"] is None and date is not None and date < since:
                        st["by_date"] = mid
                asked = [k for k, on in (("by_count", bool(count)), ("by_date", since is not None)) if on]
                if all(st[k] is not None for k in asked) or len(rows) < MESSAGES_PAGE:
                    # not reached by the end of the history: replay from its start (0)
                    points[d] = min((st[k] or 0 for k in asked), default=self.cursors.get(d, 0))
                else:
                    st["last"] = rows[-1][0]
                    pending.append(d)
            if progress is not None:
                progress(len(points), total)
        return points

    @_locked
    def poll(self, *, auto_ack: bool = True, hints: Iterable[Any] | None = None) -> list:
        """One cycle: new messages since the cursors, oldest first (each once).

        With *hints* (from a push source) only the hinted dialogs are read,
        after their cursors -- unless a hint says "look everywhere" or names
        a dialog not met yet: then the scan runs too.  A hint at or below a
        cursor costs nothing: that message was delivered already.
        """
        if not self.started:
            raise RuntimeError("call start() first")
        hints = None if hints is None else list(hints)
        scan = hints is None or any(not h.dialog_id or (h.dialog_id not in self.cursors and not h.adopt)
                                    for h in hints)
        # how far back this cycle reaches: a wide scan reaches further (see _scan_sync)
        self._cut = None if self.watermark is None else self.watermark - self.sweep_margin
        self._take_told()
        got: dict = {}        # the reads that rode in the scan's batch
        changed, newest = self._scan(full=False, early=self._reads_due(), got=got) if scan else ({}, None)
        for h in hints or ():
            # met through our chat bot: learnt when new, and again when the bot joins (a new session)
            if h.adopt and h.dialog_id not in changed and (h.dialog_id not in self.cursors or not h.message_id):
                item = self._adopt(h.dialog_id, h.message_id)
                if item is not None:
                    changed[h.dialog_id] = item
        wants: dict = {}
        for did, item in changed.items():
            wants[did] = self._want(did, item)
        if scan:
            self._recheck_adopted(wants)
        for h in hints or ():
            did = h.dialog_id
            if h.adopt and did in self.dialogs and not self.dialogs[did].adopted:
                self.dialogs[did].adopted = True
                if did in self.cursors:
                    self.cursors.dirty.add(did)
            if did in wants or did not in self.cursors or (
                    self.lines_only and did in self.dialogs and not self.dialogs[did].is_lines):
                continue
            done = max(self.cursors[did], self.fetched.get(did, 0))
            if h.message_id and h.message_id <= done:
                continue
            # read forward from the cursor for what is there: never count the hinted id as read
            wants[did] = _Want(done, done, cut=self._cut_for(did), seen=self.last_seen.get(did, 0))
        # dialogs rewound, or not caught up last time, are read even if the list is quiet
        for did, done, target in self._lagging():
            if did not in wants:
                wants[did] = _Want(done, target, cut=self._cut_for(did), seen=target)
        hinted: dict = {}
        for h in hints or ():
            if h.dialog_id:
                hinted[h.dialog_id] = max(hinted.get(h.dialog_id, 0), h.message_id) if h.message_id else -1
        self._put_off_own(wants, hinted)
        read = self._take_early(wants, got)
        failed = self._fetch({d: w for d, w in wants.items() if d not in read})
        # in order: nothing written after the scan, which saw every id up to the newest it showed (a
        # dialog a push hint named is read whole: its event may not come again; one our chat bot holds
        # is in no recent list)
        top = max((w.target for w in wants.values()), default=0) if (self.in_order and scan) else 0
        out: list = []
        for did, want in wants.items():
            if did in failed:
                self._unreadable[did] = want.target
                self.last_seen[did] = max(self.last_seen.get(did, 0), want.target)
                continue
            self._unreadable.pop(did, None)
            if top and did not in hinted and not (did in self.dialogs and self.dialogs[did].adopted):
                self.last_seen[did] = max(self.last_seen.get(did, 0), want.hold_above(top))
            msgs = want.messages()
            info = self.dialogs.get(did)
            if msgs and info is not None and info.adopted:
                self._news_at[did] = self.monotonic()
            is_new = did not in self.cursors
            for m in msgs:
                msg = self.factory.make(m, did, info)
                msg.new_dialog, is_new = is_new, False
                out.append(msg)
            self.fetched[did] = max(self.fetched.get(did, 0), want.first, want.target, want.highest)
            self.last_seen[did] = max(self.last_seen.get(did, 0), self.fetched[did])
            if self.fetched[did] >= self.last_seen[did]:
                self._rewound.discard(did)
            self._read_own(did)
            # the cursor moves past what was passed over (history), never past what is out
            start = (min(want.keep) - 1) if want.keep else max(want.passed, self.fetched[did])
            if did not in self.cursors:
                self.cursors[did] = start
            elif start > self.cursors[did] and not any(d == did for d, _i in self._unacked):
                self.cursors[did] = start
        out.sort(key=lambda m: m.id)
        if newest is not None:
            self.watermark = max(self.watermark or newest, newest)
        self._unacked.update((m.dialog_id, m.id) for m in out)
        if auto_ack:
            for m in out:
                self.ack(m)
        if not self._unacked:
            self._committed_watermark = self.watermark
        # the page read next time follows the traffic: idle cycles read a small page
        self._page = max(self.page_min, min(RECENT_PAGE_MAX, 2 * len(changed) + self.page_min))
        return out

    @_locked
    def ack(self, message: Message) -> None:
        """Mark *message* delivered: its dialog's cursor moves up to it.

        The saved scan watermark moves only when nothing delivered is still
        unacknowledged, so a restart from :meth:`to_state` rescans far enough.
        """
        did = message.dialog_id
        self._unacked.discard((did, message.id))
        self._acked[did] = max(self._acked.get(did, 0), message.id)
        waiting = [i for d, i in self._unacked if d == did]
        # never past a message of this dialog that is still out (FIRST_ID is exclusive)
        upto = min(waiting) - 1 if waiting else self._acked[did]
        if upto > self.cursors.get(did, 0):
            self.cursors[did] = upto
        if not self._unacked:
            self._committed_watermark = self.watermark


# ===========================================================================
# Sending
# ===========================================================================

def new_template_id() -> str:
    """A lower-case UUID v4 for ``TEMPLATE_ID`` (makes a resend recognisable)."""
    return str(uuid.uuid4())


def split_text(text: str, limit: int = MESSAGE_MAX_CHARS) -> list:
    """Split *text* into pieces of at most *limit* characters, in linear time.

    Cuts at a paragraph break if one is in the second half of the window,
    else at a line break, else at a space, else hard.
    """
    text = text.strip()
    out: list = []
    start, end = 0, len(text)
    while end - start > limit:
        stop = start + limit
        cut = -1
        for sep in ("\n\n", "\n", " "):
            pos = text.rfind(sep, start + limit // 2, stop + 1)
            if pos > start:
                cut = pos
                break
        if cut <= start:
            cut = stop
        piece = text[start:cut].rstrip()
        if piece:
            out.append(piece)
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        out.append(text[start:end])
    return out


def posted_uuids(result: Any) -> dict:
    """``im.dialog.messages.get``'s result -> ``{TEMPLATE_ID: message id}`` of the messages carrying one:
    the one way to tell whether a message we sent is already in the dialog."""
    return {m["uuid"]: as_int(m.get("id")) for m in messages_of(result)[0]
            if isinstance(m.get("uuid"), str) and m["uuid"]}


def find_by_uuid(client: Client, dialog_id: str, template_id: str) -> int:
    """The id of the message carrying *template_id* among the dialog's newest 50, else 0."""
    res = client.call("im.dialog.messages.get", {"DIALOG_ID": dialog_id, "LAST_ID": 0, "LIMIT": MESSAGES_PAGE})
    return posted_uuids(res).get(template_id, 0)


def send_text(client: Client, dialog_id: str, text: str, *, template_id: str | None = None,
              patience: float | None = None, sleep: Callable[[float], None] | None = None) -> int:
    """Post one message (``im.message.add``); return its id (see :func:`post_with_uuid`)."""
    template_id = template_id or new_template_id()
    return post_with_uuid(client, dialog_id, template_id, "im.message.add",
                          {"DIALOG_ID": dialog_id, "MESSAGE": text, "TEMPLATE_ID": template_id}, as_int,
                          patience=patience, sleep=sleep)


def post_with_uuid(client: Client, dialog_id: str, template_id: str, method: str, params: Mapping,
                   id_of: Callable[[Any], int], *, patience: float | None = None,
                   sleep: Callable[[float], None] | None = None) -> int:
    """Post one message carrying *template_id* (``im.message.add``, ``im.disk.file.commit``); its id.

    The ``TEMPLATE_ID`` makes a resend safe: the portal answers a repeat with
    the id of the message it already has.  So when the outcome is unknown --
    the request went out and no usable answer came back, or the portal says
    ``MESSAGE_DUPLICATED_BY_UUID`` (an attempt with this uuid is still running,
    or died after recording it) -- the dialog is searched for the uuid and,
    if it is not there yet, the same message is sent again with the same
    ``TEMPLATE_ID`` after a pause, for up to *patience* seconds.  Past that,
    :class:`UnknownOutcomeError`: never a blind resend, never a silent loss.
    """
    pause = sleep or client.limiter.pause
    patience = client.config.send_patience if patience is None else patience
    deadline = time.monotonic() + patience
    delay = 0.5
    what = ""
    while True:
        try:
            return id_of(client.call(method, params, write=True))
        except UnknownOutcomeError as exc:
            what = exc.cause or "no usable answer came back"
        except DuplicateUuidError:
            what = "the portal is still writing it (MESSAGE_DUPLICATED_BY_UUID)"
        try:
            found = find_by_uuid(client, dialog_id, template_id)
        except (TransportError, ServerError, RateLimitError):
            found = 0
        if found:
            log.info("%s: the message did arrive (id %d)", display_dialog_id(dialog_id), found)
            return found
        if time.monotonic() + delay > deadline:
            raise UnknownOutcomeError(
                "%s to %s: %s, and after %.0f s the message is still not in the chat; it may "
                "yet appear -- check the chat before sending again" % (method, display_dialog_id(dialog_id), what,
                                                                         patience))
        log.debug("%s: %s; sending again with the same TEMPLATE_ID in %.1f s",
                  display_dialog_id(dialog_id), what, delay)
        pause(delay)
        delay = min(delay * 2, 10.0)


def check_text(text: str) -> str:
    """The rule every sender shares: no NUL bytes, valid text, not empty."""
    if "\x00" in text:
        raise UsageError("the text contains a NUL byte; nothing sent")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the text is not valid UTF-8; nothing sent") from None
    if not text.strip():
        raise UsageError("the text is empty; nothing sent")
    return text


def take_dialog(client: Client, dialog_id: str, how: str = "answer") -> None:
    """Take an Open Lines dialog waiting in the queue (``imopenlines.operator.answer``), or join
    it as an extra participant (``how="join"``: ``imopenlines.session.join``): after either the
    webhook user is a member and may post."""
    if not dialog_id.startswith("chat"):
        raise UsageError("only Open Lines chats (chatN) can be taken, not %s" % display_dialog_id(dialog_id))
    method = "imopenlines.session.join" if how == "join" else "imopenlines.operator.answer"
    client.call(method, {"CHAT_ID": int(dialog_id[4:])}, write=True)


# ===========================================================================
# Bot replies
# ===========================================================================

class ReplyShapeError(B24Error):
    """The bot's answer has a shape we cannot turn into texts."""


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        keys = ", ".join(sorted(str(k) for k in value)[:6])
        return "an object with keys {%s}" % keys if keys else "an empty object"
    if isinstance(value, list):
        return "a list of %d item(s)" % len(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a %s" % type(value).__name__


_REPLY_KEYS = ("response", "reply_text", "reply", "text", "message", "answer", "output")
_REPLY_LIST_KEYS = ("replies", "messages", "responses")


def normalize_reply(body: Any) -> list:
    """Turn a bot's answer into a list of non-empty texts.

    Accepts ``{"response"|"reply_text"|"text"|"message": str}``,
    ``{"replies"|"messages": [...]}``, a bare string, a list of strings, and
    lists of ``{"text": ...}`` objects (Rasa).  Raises :class:`ReplyShapeError`
    naming the shape otherwise.  An empty list means "the bot chose not to answer".
    """
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        return [body.strip()] if body.strip() else []
    if isinstance(body, list):
        out: list = []
        for item in body:
            if isinstance(item, str):
                if item.strip():
                    out.append(item.strip())
            elif isinstance(item, Mapping):
                text = next((item[k] for k in _REPLY_KEYS if isinstance(item.get(k), str)), None)
                if text is None:
                    if any(k in item for k in ("image", "buttons", "custom", "attachment")):
                        continue    # non-text Rasa items: nothing to say in text
                    raise ReplyShapeError("bot reply: list item is %s, expected a string or "
                                          "{\"text\": ...}" % _describe(item))
                if text.strip():
                    out.append(text.strip())
            elif item is not None:
                raise ReplyShapeError("bot reply: list item is %s, expected a string" % _describe(item))
        return out
    if isinstance(body, Mapping):
        for key in _REPLY_LIST_KEYS:
            if key in body and isinstance(body[key], (list, str)):
                return normalize_reply(body[key])
        for key in _REPLY_KEYS:
            if key in body:
                value = body[key]
                if isinstance(value, (str, list)):
                    return normalize_reply(value)
                if value is None:
                    return []
                if isinstance(value, Mapping):
                    return normalize_reply(value)
                raise ReplyShapeError("bot reply: %r is %s, expected a string" % (key, _describe(value)))
        raise ReplyShapeError("bot reply: got %s; expected one of response, reply_text, text, "
                              "message, replies, messages" % _describe(body))
    if body is None:
        return []
    raise ReplyShapeError("bot reply: got %s; expected an object, a string or a list" % _describe(body))


@dataclass
class BotAnswer:
    """What the bot said: texts to post (maybe none), files to post after them (see :func:`reply_files`),
    and whether it hands the dialog to a person."""

    texts: list = field(default_factory=list)
    handoff: bool = False
    files: list = field(default_factory=list)


def parse_bot_answer(body: Any) -> BotAnswer:
    """A decoded bot answer -> :class:`BotAnswer`; ``{"handoff": true, "text": "..."}`` hands over;
    ``"files"`` (objects) or Rasa's ``{"image": url}`` / ``{"attachment": ...}`` items (lists) carry files."""
    try:
        files = reply_files(body)
        rest = body
        if isinstance(body, Mapping):
            rest = {k: v for k, v in body.items() if k not in ("handoff", "files")}
        speaks = not isinstance(rest, Mapping) or any(k in rest for k in _REPLY_KEYS + _REPLY_LIST_KEYS)
        handoff = isinstance(body, Mapping) and body.get("handoff") is True
        texts = normalize_reply(rest) if speaks or not (handoff or files) else []
        return BotAnswer(texts, handoff, files)
    except RecursionError:
        raise ReplyShapeError("bot reply: nested too deeply to be a reply") from None


def reply_files(body: Any) -> list:
    """The files of a bot answer, each ``{"url" | "base64", "name", "mime", "caption"}`` -- or ``{"error"}``
    for an entry that names no file (posted as nothing, reported as a dead letter)."""
    out: list = []
    if isinstance(body, Mapping) and isinstance(body.get("files"), list):
        for item in body["files"]:
            out.append(_file_spec(item))
    elif isinstance(body, Mapping):
        lists = [body[k] for k in _REPLY_LIST_KEYS if k in body]      # the one normalize_reply reads
        if lists and isinstance(lists[0], list):
            out = reply_files(lists[0])
    elif isinstance(body, list):
        for item in body:
            if isinstance(item, Mapping) and item.get("image"):
                out.append(_file_spec({"url": item["image"]}))
            if isinstance(item, Mapping) and item.get("attachment"):
                att = item["attachment"]
                payload = as_map(as_map(att).get("payload"))
                url = att if isinstance(att, str) else (as_map(att).get("url") or as_map(att).get("src")
                                                        or payload.get("url") or payload.get("src"))
                out.append(_file_spec(dict(as_map(att), url=url) if isinstance(att, Mapping) else {"url": url}))
    return out


def _file_spec(item: Any) -> dict:
    if not isinstance(item, Mapping):
        return {"error": "a files entry is %s, expected an object with url or base64" % _describe(item)}
    url = item.get("url")
    b64 = item.get("base64")
    name = str(item.get("name") or item.get("filename") or "").strip()
    spec = {"name": name, "mime": str(item.get("mime") or ""), "caption": str(item.get("caption") or "")}
    if isinstance(b64, str) and b64.strip():
        if not name:
            return dict(spec, error="a base64 file has no name")
        return dict(spec, base64=b64.strip())
    if isinstance(url, str) and url.strip():
        url = url.strip()
        if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
            return dict(spec, error="%s: only http:// and https:// files are fetched" % url.split(":", 1)[0])
        if not name:
            name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]) or "file"
        return dict(spec, url=url, name=name)
    return dict(spec, error="a files entry has neither url nor base64")


# ===========================================================================
# Durable state
# ===========================================================================

def default_state_dir(env: Mapping[str, str] | None = None) -> str:
    """``$B24_STATE_DIR``, else systemd's ``$STATE_DIRECTORY``, else XDG state home."""
    env = os.environ if env is None else env
    if env.get("B24_STATE_DIR"):
        return env["B24_STATE_DIR"]
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    xdg = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "b24-openlines")


class StateFile:
    """A small JSON document that survives ``kill -9`` at any instant.

    Each :meth:`save` writes a temp file in the same folder, fsyncs it,
    renames it over the old one and fsyncs the folder; the file is 0600.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def load(self) -> dict:
        """The saved document (``{}`` if none); removes temp files a killed writer left."""
        folder, prefix = os.path.dirname(self.path), ".%s." % os.path.basename(self.path)
        try:
            for name in os.listdir(folder):
                if name.startswith(prefix):
                    os.unlink(os.path.join(folder, name))
        except OSError:
            pass
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("%s: state file is not valid JSON (%s); move it away to start "
                              "fresh" % (self.path, exc)) from None
        except OSError as exc:
            raise ConfigError("%s: cannot read state file (%s)" % (self.path, exc.strerror)) from None
        if not isinstance(data, dict):
            raise ConfigError("%s: state file holds %s, expected an object" % (self.path, _describe(data)))
        return data

    def save(self, data: Mapping) -> None:
        try:
            write_private(self.path, json.dumps(data, ensure_ascii=False, sort_keys=True))
        except PermissionError as exc:
            raise ConfigError("%s: cannot write state (%s)" % (self.path, exc.strerror)) from None
        except OSError as exc:
            raise StateWriteError("%s: cannot write state (%s)" % (self.path, exc.strerror or exc)) from None


def open_private(path: str, flags: int) -> int:
    """``os.open`` for a file that holds customer data or secrets: created 0600 whatever the umask (and
    set to 0600 if it was not), never through a symbolic link.  Raises OSError."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def private_folder(folder: str, what: str = "state folder") -> str:
    """Create *folder* (0700) if needed; refuse one that anybody may write to (files could be planted or
    swapped for links there).  Returns its absolute path; raises ConfigError."""
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError as exc:
        raise ConfigError("%s %s: cannot create it (%s)" % (what, folder, exc.strerror or exc)) from None
    if st.st_mode & 0o002:
        raise ConfigError("%s %s is writable by everyone: use a folder of your own (chmod 700 %s, or another "
                          "B24_STATE_DIR)" % (what, folder, folder))
    return folder


def write_private(path: str, text: str | bytes) -> None:
    """Replace *path* with *text* (or bytes), atomically, readable by its owner only (0600 whatever the umask).

    The new content is written to a fresh temp file beside it (created exclusively, so a planted
    link is never followed), fsynced and renamed over the old one -- which replaces a link rather
    than writing through it -- and the folder is fsynced.  ``kill -9`` at any instant leaves the old
    file or the new one.  Raises OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=folder)
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class Backoff:
    """The pause after failures in a row: *interval* doubled with each failure, at most *cap*
    (``B24_BACKOFF_MAX_SEC``, a minute by default).  :meth:`succeeded` starts over."""

    def __init__(self, interval: float, cap: float | None = None):
        self.interval = interval
        self.cap = POLL_BACKOFF_MAX_SEC if cap is None else cap
        self.failures = 0

    def failed(self) -> float:
        """One more failure: how long to wait before the next try."""
        self.failures += 1
        return min(self.cap, self.interval * (2 ** min(self.failures, 6)))

    def succeeded(self) -> None:
        self.failures = 0


# ===========================================================================
# Command-line plumbing shared by the scripts
# ===========================================================================

def _interval_arg(text: str) -> float:
    """argparse type for ``--interval``: the range ``B24_POLL_SEC`` accepts."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (POLL_SEC_MIN <= value <= POLL_SEC_MAX):
        raise argparse.ArgumentTypeError("expected seconds from %g to %g" % (POLL_SEC_MIN, POLL_SEC_MAX))
    return value


def add_common_arguments(parser: argparse.ArgumentParser,
                         quiet_help: str = "only warnings and errors on stderr", *, poll: bool = False) -> None:
    """``--env-file``, ``-v``, ``-q``, ``--version`` (and ``--interval`` for polling scripts)."""
    if poll:
        parser.add_argument("--interval", type=_interval_arg, metavar="SEC",
                            help="poll interval in seconds (default: B24_POLL_SEC or 2)")
    parser.add_argument("--env-file", metavar="PATH",
                        help="read settings from PATH (default: ./.env, then .env beside the scripts)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--log-json", action="store_true",
                        help="log lines as JSON objects (time, level, dialog, message_id, event)")
    parser.add_argument("--check", action="store_true",
                        help="check the setup (settings, webhook, scopes, queues...), one line per check; "
                             "exit 0 if all is well")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)


def _find_env_file(explicit: str | None) -> str | None:
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError("--env-file %s: no such file" % explicit)
        return explicit
    if os.environ.get("PYTHON_DOTENV_DISABLED", "").strip().lower() in ("1", "true", "yes", "y", "on"):
        return None
    for folder in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        candidate = os.path.join(folder, ".env")
        if os.path.isfile(candidate):
            return candidate
    return None


def apply_env_file(args: argparse.Namespace, environ: Any) -> str | None:
    """Apply ``--env-file`` (or the .env found) to *environ*; variables already set win.
    Returns the file's path, or None when there is none."""
    path = _find_env_file(getattr(args, "env_file", None))
    if path:
        load_dotenv(path, strict=True, environ=environ)
    return path


def _under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("NOTIFY_SOCKET") or environ.get("INVOCATION_ID"))


def environment_or_demo(args: argparse.Namespace) -> tuple:
    """The environment with the .env file applied (real variables win), and whether to run the demo.

    The demo runs when asked (``--demo``), or with nothing configured at all
    (no ``B24_WEBHOOK_BASE``, no ``BOT_*`` setting, no .env file) when a
    person runs the script on a terminal.  Under systemd, with a ``BOT_*``
    setting, a misspelled ``B24_WEBHOOK*`` name, or off a terminal, a missing
    webhook is a configuration error: a service must never quietly run a demo.
    """
    environ = dict(os.environ)
    if getattr(args, "demo", False):
        return environ, True
    env_file = apply_env_file(args, environ)
    args.env_file_used = env_file          # said at start: which file the settings came from
    if environ.get("B24_WEBHOOK_BASE", "").strip():
        return environ, False
    near = sorted(k for k in environ if k.startswith("B24_WEBHOOK") or k.startswith("B24_WEB_HOOK"))
    bots = sorted(k for k in environ if k.startswith("BOT_"))
    why = ("running under systemd" if _under_systemd(environ) else
           "%s is set" % near[0] if near else "%s is set" % bots[0] if bots else
           "settings come from %s" % env_file if env_file else
           "" if sys.stdin.isatty() and sys.stderr.isatty() else "not on a terminal")
    if why:
        hint = " (did you mean B24_WEBHOOK_BASE instead of %s?)" % near[0] if near else ""
        raise ConfigError("B24_WEBHOOK_BASE is not set%s: set it to the incoming webhook URL "
                          "(see README: Setup); the built-in demo runs only with --demo or, with nothing "
                          "configured, on a terminal (%s)" % (hint, why))
    log.warning("B24_WEBHOOK_BASE is not set: running the built-in demo instead (see README: Setup)")
    return environ, True


def start_demo_portal(environ: dict, interval: float = 4.0) -> Any:
    """Start the emulator in-process with simulated customers and point *environ* at it."""
    import mock_b24_portal  # only the demo needs it
    server = mock_b24_portal.serve(simulate=True, interval=interval)
    environ["B24_WEBHOOK_BASE"] = server.webhook_base
    environ.setdefault("B24_POLL_SEC", "1")
    return server


def check_scopes(client: Client) -> list:
    """``im`` is required (ConfigError naming the fix); a missing ``imopenlines`` is a warning."""
    scopes = client.scopes()
    if "im" not in scopes:
        raise ConfigError("the webhook lacks the 'im' scope: create an incoming webhook with scopes im "
                          "and imopenlines, and put it in B24_WEBHOOK_BASE")
    if "imopenlines" not in scopes:
        log.warning("the webhook lacks the 'imopenlines' scope: Open Lines queue details and taking "
                    "dialogs need it (add imopenlines to the webhook)")
    return scopes


def line_queues(client: Client, me: int) -> list:
    """``[(line id, line name, whether the webhook user is in its queue)]`` for every Open Line."""
    lines = client.call("imopenlines.config.list.get",
                        {"PARAMS": {"select": ["ID", "LINE_NAME", "ACTIVE"]}, "OPTIONS": {"QUEUE": "Y"}})
    rows = lines if isinstance(lines, list) else list(as_map(lines).values())
    out = []
    for row in rows:
        if isinstance(row, Mapping):
            queue = [as_int(x) for x in (row.get("QUEUE") or [])]
            out.append((str(row.get("ID")), str(row.get("LINE_NAME") or ""), me in queue))
    return out


class Doctor:
    """``--check``: one line per check -- ``✓`` passed, ``!`` worth knowing, ``✗`` failed, with
    what to do -- and exit status 0 when nothing failed (usable as systemd's ``ExecStartPre=``)."""

    def __init__(self, out: Any = None):
        self.out = out or sys.stdout
        self.failed = 0

    def line(self, mark: str, text: str) -> None:
        self.out.write("%s %s\n" % (mark, redact(text)))
        self.out.flush()

    def ok(self, text: str) -> None:
        self.line("\u2713", text)

    def warn(self, text: str) -> None:
        self.line("!", text)

    def fail(self, text: str, fix: str) -> None:
        self.failed += 1
        self.line("\u2717", "%s -- %s" % (text, fix))

    def portal(self, environ: Mapping[str, str], *, require_bot: bool = False) -> Client | None:
        """The checks every script shares: settings, webhook, scopes, queues; the client if usable."""
        try:
            cfg = Config.from_env(environ, require_bot=require_bot)
        except ConfigError as exc:
            self.fail("configuration: %s" % exc, "fix the setting in .env or the environment file")
            return None
        self.ok("configuration: portal %s, polling every %g s" % (cfg.portal_host, cfg.poll_sec))
        client = Client(cfg)
        try:
            me = client.whoami()
        except AuthError as exc:
            self.fail("webhook: the portal rejects it (%s)" % exc.code,
                      "create a new incoming webhook and put it in B24_WEBHOOK_BASE")
            return None
        except B24Error as exc:
            self.fail("webhook: %s" % exc, "check the network, the portal address and that the portal is up")
            return None
        self.ok("webhook: %s answers, signed in as %s (id %s)" % (cfg.portal_host, me["name"], me["id"]))
        try:
            scopes = client.scopes()
        except B24Error as exc:
            self.fail("scopes: %s" % exc, "check the webhook")
            return None
        if "im" in scopes:
            self.ok("scopes: %s" % ", ".join(sorted(scopes)))
        else:
            self.fail("scopes: %s -- 'im' is missing" % ", ".join(sorted(scopes)),
                      "edit the incoming webhook: scopes im and imopenlines")
            return None
        if "imopenlines" not in scopes:
            self.warn("scopes: no 'imopenlines': queue membership cannot be checked, dialogs cannot be taken")
            return client
        try:
            lines = line_queues(client, me["id"])
        except B24Error as exc:
            self.warn("Open Lines: cannot read the queues (%s)" % exc)
            return client
        for lid, name, inside in lines:
            if inside:
                self.ok("line %s %r: the webhook user is in its queue" % (lid, name))
            else:
                self.warn("line %s %r: not in its queue -- its waiting dialogs stay out of sight (add the "
                          "user to the queue if they should be answered)" % (lid, name))
        if lines and not any(inside for _l, _n, inside in lines):
            self.fail("Open Lines: the webhook user is in no line's queue",
                      "add it to the WhatsApp lines' queues (Contact Center -> Open Channels -> Queue)")
        self.sources(cfg)
        return client

    def sources(self, cfg: Config) -> None:
        """What push settings say (without subscribing to anything: the doctor changes nothing)."""
        self.ok("source: B24_SOURCE=%s, reconciliation every %g s" % (cfg.source, cfg.reconcile_sec))
        if not cfg.listen:
            return
        try:
            with socket.socket(socket.AF_INET6 if ":" in cfg.listen[0] else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(cfg.listen)
        except OSError as exc:
            self.fail("B24_LISTEN %s:%d: cannot listen (%s)" % (cfg.listen + (exc.strerror or exc,)),
                      "pick a free port (is a bridge already running?)")
            return
        self.ok("B24_LISTEN %s:%d: free; put your TLS proxy in front of it" % cfg.listen)

    def receiver_token(self, cfg: Config, *, chat_bot: bool = False) -> None:
        """With B24_LISTEN: something must authenticate the POSTs (the token, or the chat bot's CLIENT_ID)."""
        if not cfg.listen or cfg.app_token:
            return
        if chat_bot:
            self.warn("B24_LISTEN without B24_APP_TOKEN: only the chat bot's events are accepted")
        else:
            self.fail("B24_LISTEN is set but B24_APP_TOKEN is not: the receiver would accept nothing",
                      "put the outgoing webhook's application token in B24_APP_TOKEN")

    def state_dir(self, folder: str) -> None:
        """The state folder exists (or can be made), is writable, and is not readable by others."""
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".check-", delete=True)
            probe.close()
        except OSError as exc:
            self.fail("state folder %s: %s" % (folder, exc.strerror or exc),
                      "create it writable for the user the script runs as (systemd: StateDirectory=)")
            return
        mode = os.stat(folder).st_mode & 0o777
        if mode & 0o077:
            self.warn("state folder %s: mode %o lets others read it -- chmod 700" % (folder, mode))
        else:
            self.ok("state folder %s: writable, mode %o" % (folder, mode))

    def exit_code(self) -> int:
        return EXIT_FAILURE if self.failed else EXIT_OK


def run_doctor(args: argparse.Namespace, *, require_bot: bool = False,
               extra: Callable[[Doctor, dict, Client | None], None] | None = None) -> int:
    """``--check`` for a script: the shared portal checks, then the script's own."""
    doctor = Doctor()
    environ = dict(os.environ)
    try:
        apply_env_file(args, environ)
    except ConfigError as exc:
        doctor.fail("settings file: %s" % exc, "fix that line")
        return doctor.exit_code()
    client = doctor.portal(environ, require_bot=require_bot)
    if extra is not None:
        extra(doctor, environ, client)
    return doctor.exit_code()


def load_config_from_args(args: argparse.Namespace, *, require_bot: bool = False,
                          environ: Any = None) -> Config:
    """Apply the .env file (real environment wins) and build the :class:`Config`."""
    environ = os.environ if environ is None else environ
    apply_env_file(args, environ)
    return Config.from_env(environ, require_bot=require_bot)


def _robust_stdio() -> None:
    """Never die on a character the terminal's encoding cannot show (cron, odd locales)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def run_main(main: Callable[[], int]) -> int:
    """Run a script's main body; map errors to one stderr line and an exit code."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "b24"
    _robust_stdio()
    # an error no one catches (in any thread) is printed redacted too
    sys.excepthook = _redacting_excepthook
    threading.excepthook = _redacting_thread_hook
    try:
        return main()
    except Interrupted:                  # asked to stop (SIGTERM) while a request waited: a normal end
        return EXIT_OK
    except KeyboardInterrupt:
        try:
            sys.stderr.write("\n%s: interrupted\n" % prog)
        except OSError:
            pass
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_OK
    except B24Error as exc:
        sys.stderr.write("%s: error: %s\n" % (prog, format_error(exc)))
        return exc.exit_code
    except Exception:  # noqa: BLE001 - the last net: never leak a secret in a traceback
        sys.stderr.write(redact("%s: internal error (please report):\n%s" % (prog, traceback.format_exc())))
        return EXIT_FAILURE


def _redacting_excepthook(exc_type, exc, tb) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def _redacting_thread_hook(args) -> None:
    if args.exc_type is SystemExit:
        return
    sys.stderr.write(redact("Exception in thread %s:\n%s" % (
        getattr(args.thread, "name", "?"),
        "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))))

