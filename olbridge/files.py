"""The files of a bot's answer: fetched (http/https only, within BOT_MAX_FILE_BYTES and the bot's deadline, the
bot's auth never sent to another host) or decoded, then kept on disk until each is posted -- once."""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping

import b24common as bc
import b24files

log = logging.getLogger("b24_ol_bridge")

MAX_FILES = 10               # files one answer may carry


class FileError(bc.B24Error):
    """A file of the answer that cannot be had: said, dead-lettered, the rest goes on."""


class _NoAuthElsewhere(urllib.request.HTTPRedirectHandler):
    """Redirects are followed, but the bot's ``Authorization`` does not go to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
            new.headers.pop("Authorization", None)
            new.unredirected_hdrs.pop("Authorization", None)
        return new


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


class AnswerFiles:
    """Gets an answer's files and keeps them in *folder* (0700) under a key per part until posted."""

    def __init__(self, folder: str, config: bc.Config):
        self.folder = folder
        self.config = config
        self.opener = urllib.request.build_opener(_NoAuthElsewhere())

    def path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:32])

    def keep(self, key: str, spec: Mapping, bot_url: str) -> dict:
        """Fetch or decode one file of the answer and keep it; the answer's part that stands for it
        (``{"file": key, "name", "mime", "caption"}``).  :class:`FileError` says why it cannot be had."""
        if spec.get("error"):
            raise FileError(str(spec["error"]))
        if "base64" in spec:
            text = str(spec["base64"])
            if text.startswith("data:"):              # a data: URL: the content after the comma
                text = text.split(",", 1)[-1]
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise FileError("%s: the base64 content is not valid" % spec.get("name")) from None
            if len(data) > self.config.bot_max_file_bytes:
                raise FileError("%s: %s, more than BOT_MAX_FILE_BYTES=%d" % (
                    spec.get("name"), bc.human_size(len(data)), self.config.bot_max_file_bytes))
        else:
            data = self._fetch(str(spec["url"]), bot_url)
        f = b24files.from_bytes(str(spec.get("name") or "file"), data, str(spec.get("mime") or ""))
        bc.write_private(self.path(key), data)           # makes the folder 0700 if need be
        return {"file": key, "name": f.name, "mime": f.mime, "caption": str(spec.get("caption") or "")}

    def _fetch(self, url: str, bot_url: str) -> bytes:
        host = urllib.parse.urlsplit(url).hostname or "?"
        headers = {"User-Agent": "b24-openlines-toolkit/" + bc.VERSION, "Accept-Encoding": "identity"}
        if self.config.bot_auth and _origin(url) == _origin(bot_url):
            headers["Authorization"] = self.config.bot_auth       # the bot's own host only
        limit, timeout = self.config.bot_max_file_bytes, self.config.bot_timeout
        deadline = time.monotonic() + timeout
        try:
            with self.opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise FileError("file from %s: %s bytes, more than BOT_MAX_FILE_BYTES=%d" % (host, declared, limit))
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise FileError("file from %s: not fetched within BOT_HTTP_TIMEOUT_SEC=%g s" % (host, timeout))
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise FileError("file from %s: more than BOT_MAX_FILE_BYTES=%d" % (host, limit))
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            raise FileError("file from %s: HTTP %d" % (host, exc.code)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FileError("file from %s: cannot fetch it (%s)" % (host, getattr(exc, "reason", None) or exc)) from None

    def load(self, part: Mapping) -> b24files.OutFile:
        """The kept file of a part (:class:`FileError` when it is gone)."""
        try:
            with open(self.path(str(part["file"])), "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise FileError("%s: the fetched file is gone (%s)" % (part.get("name"), exc.strerror or exc)) from None
        return b24files.OutFile(str(part.get("name") or "file"), data, str(part.get("mime") or ""))

    def drop(self, part: Mapping) -> None:
        try:
            os.unlink(self.path(str(part["file"])))
        except OSError:
            pass
