"""Files into and out of a chat: a file read within limits, sent by the route the webhook allows (the three Disk
steps with a TEMPLATE_ID, else the one-call upload), found again after a lost answer; a chat's file saved.

Fact sheet §18: ``im.disk.folder.get`` -> ``disk.folder.uploadfile`` (scope
``disk``) -> ``im.disk.file.commit`` with ``TEMPLATE_ID`` is idempotent like
``im.message.add``; ``im.v2.File.upload`` (scope ``im``) is one call without a
uuid, so a lost answer is settled by looking for the file's message.  Never
``SILENT_MODE=Y``: the file would not reach the customer.  Used by the
sender, the terminal chat and the bridge.
"""
from __future__ import annotations

__all__ = ["OutFile", "read_local", "from_bytes", "file_route", "route_for", "send_file", "find_file_message", "file_names",
           "save_chat_file"]

import base64
import logging
import mimetypes
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, NamedTuple

import b24common as bc

log = logging.getLogger("b24files")

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OutFile(NamedTuple):
    """A file to send: its name in the chat, its bytes, its MIME type."""

    name: str
    data: bytes
    mime: str


def _clean_name(name: str) -> str:
    name = os.path.basename(str(name or "").replace("\\", "/")).strip()
    name = re.sub(r"[\x00-\x1f\x7f]", "", name)
    return name[:200] or "file"


def from_bytes(name: str, data: bytes, mime: str = "") -> OutFile:
    name = _clean_name(name)
    return OutFile(name, data, mime or mimetypes.guess_type(name)[0] or "application/octet-stream")


def read_local(path: str, max_mb: float, what: str = "--file") -> OutFile:
    """A local file to send; a :class:`b24common.UsageError` (exit 2) naming it when it is missing,
    unreadable, not a file, or larger than *max_mb* (``B24_MAX_FILE_MB``)."""
    try:
        size = os.stat(path).st_size
        if not os.path.isfile(path):
            raise bc.UsageError("%s %s: not a file" % (what, path))
        if size > max_mb * (1 << 20):
            raise bc.UsageError("%s %s: %s is more than B24_MAX_FILE_MB=%g (the portal takes files up to 100 MB)"
                                % (what, path, bc.human_size(size), max_mb))
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise bc.UsageError("%s %s: %s" % (what, path, (exc.strerror or str(exc)).lower())) from None
    return from_bytes(os.path.basename(path), data)


def file_route(client: bc.Client) -> str:
    """``"disk"`` (three steps, idempotent: the webhook has the ``disk`` scope) or ``"upload"`` (one call)."""
    return route_for(client.scopes())


def route_for(scopes: list) -> str:
    """:func:`file_route` for scopes already read."""
    return "disk" if "disk" in scopes else "upload"


def send_file(client: bc.Client, dialog_id: str, f: OutFile, *, caption: str = "", template_id: str = "",
              route: str = "", bot: Mapping | None = None, patience: float | None = None) -> int:
    """Post *f* into the dialog as one file message (*caption* as its text); its message id.

    *bot* (``{"bot_id", "client_id"}``): as that Chatbots 2.0 bot (``imbot.v2.File.upload``).  Otherwise by
    *route* (default: :func:`file_route`).  A lost answer is settled by the uuid (Disk route) or by looking
    for the file's message; it is never sent blindly twice."""
    template_id = template_id or bc.new_template_id()
    if bot is None and (route or file_route(client)) == "disk":
        return _by_disk(client, dialog_id, f, caption, template_id, patience)
    return _by_upload(client, dialog_id, f, caption, bot)


def _by_disk(client: bc.Client, dialog_id: str, f: OutFile, caption: str, template_id: str,
             patience: float | None) -> int:
    folder = bc.as_int(bc.as_map(client.call("im.disk.folder.get", {"DIALOG_ID": dialog_id})).get("ID"))
    upload = {"id": folder, "data": {"NAME": f.name}, "generateUniqueName": True,
              "fileContent": [f.name, base64.b64encode(f.data).decode("ascii")]}
    try:
        disk = bc.as_map(client.call("disk.folder.uploadfile", upload, write=True))
    except bc.UnknownOutcomeError:      # a stray copy in the chat's folder at worst: upload again
        disk = bc.as_map(client.call("disk.folder.uploadfile", upload, write=True))
    params = {"DIALOG_ID": dialog_id, "UPLOAD_ID": bc.as_int(disk.get("ID")), "TEMPLATE_ID": template_id}
    if caption:
        params["MESSAGE"] = caption
    return bc.post_with_uuid(client, dialog_id, template_id, "im.disk.file.commit", params,
                             lambda res: bc.as_int(bc.as_map(res).get("MESSAGE_ID")), patience=patience)


def _last_id(client: bc.Client, dialog_id: str) -> int:
    """The dialog's newest message id (``LAST_ID=0``: without it the portal answers the first unread)."""
    res = client.call("im.dialog.messages.get", {"DIALOG_ID": dialog_id, "LAST_ID": 0, "LIMIT": 1})
    msgs = bc.messages_of(res)[0]
    return max((bc.as_int(m.get("id")) for m in msgs), default=0)


def _by_upload(client: bc.Client, dialog_id: str, f: OutFile, caption: str, bot: Mapping | None) -> int:
    before = _last_id(client, dialog_id)
    content = base64.b64encode(f.data).decode("ascii")
    fields: dict = {"name": f.name, "content": content}
    if caption:
        fields["message"] = caption
    if bot is not None:
        method, params = "imbot.v2.File.upload", {"botId": bot["bot_id"], "botToken": bot["client_id"],
                                                  "dialogId": dialog_id, "fields": fields}
        author = bc.as_int(bot["bot_id"])
    else:
        method, params = "im.v2.File.upload", {"dialogId": dialog_id, "fields": fields}
        author = client.whoami()["id"]
    try:
        return bc.as_int(bc.as_map(client.call(method, params, write=True)).get("messageId"))
    except bc.UnknownOutcomeError as exc:
        found = find_file_message(client, dialog_id, f.name, after=before, author=author)
        if found:
            log.info("%s: the file did arrive (message %d)", bc.display_dialog_id(dialog_id), found)
            return found
        raise bc.UnknownOutcomeError("%s to %s: %s, and the file is not in the chat; it was not sent again"
                                     % (method, bc.display_dialog_id(dialog_id), exc.cause or "no answer"),
                                     exc.cause) from None


def find_file_message(client: bc.Client, dialog_id: str, name: str, *, after: int, author: int) -> int:
    """The id of a message by *author* after message *after* carrying a file named *name*, else 0."""
    res = client.call("im.dialog.messages.get", {"DIALOG_ID": dialog_id, "FIRST_ID": after,
                                                 "LIMIT": bc.MESSAGES_PAGE})
    msgs, _users, files = bc.messages_of(res)
    for m in msgs:
        if bc.as_int(m.get("author_id")) == author and name in file_names(m, files):
            return bc.as_int(m.get("id"))
    return 0


def file_names(msg: Mapping, files: Mapping) -> set:
    """The names of the files a raw message carries (its ``params.FILE_ID``, looked up in *files*: the
    ``{id: file}`` of :func:`b24common.messages_of`)."""
    ids = bc.as_map(msg.get("params")).get("FILE_ID") or []
    ids = list(ids.values()) if isinstance(ids, Mapping) else ids if isinstance(ids, list) else [ids]
    return {str(files.get(bc.as_int(i), {}).get("name") or "") for i in ids}


def save_chat_file(client: bc.Client, dialog_id: str, file: Mapping, folder: str, *,
                   timeout: float = 60.0) -> str:
    """Download a chat's file (``im.v2.File.download``'s link; else the file's own link, which on some
    portals needs a browser login) into *folder*, never over an existing file; the path written."""
    name = _clean_name(str(file.get("name") or "file-%s" % file.get("id")))
    try:
        url = str(bc.as_map(client.call("im.v2.File.download", {"dialogId": dialog_id,
                                                                 "fileId": bc.as_int(file.get("id"))})
                            ).get("downloadUrl") or "")
    except bc.APIError as exc:
        url = str(file.get("urlDownload") or "")
        if not url:
            raise bc.B24Error("%s: the portal gives no download link (%s)" % (name, exc.code)) from None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        url = urllib.parse.urljoin("%s://%s/" % (urllib.parse.urlsplit(client.config.webhook_base).scheme,
                                                 client.host), url)
    try:
        with _DIRECT.open(urllib.request.Request(url, headers={"User-Agent": "b24-toolkit"}), timeout=timeout) as resp:
            ctype = (resp.headers.get("Content-Type") or "").lower()
            data = resp.read(int(client.config.max_file_mb * (1 << 20)) + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise bc.TransportError("%s: download failed (%s)" % (name, getattr(exc, "reason", exc))) from None
    if ctype.startswith("text/html"):
        raise bc.B24Error("%s: the portal's link needs a browser login; open the chat in Bitrix24 to save it" % name)
    if len(data) > client.config.max_file_mb * (1 << 20):
        raise bc.B24Error("%s: more than B24_MAX_FILE_MB=%g; not saved" % (name, client.config.max_file_mb))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    path, n = os.path.join(folder, name), 1
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            n += 1
            path = os.path.join(folder, "%s (%d)%s" % (stem, n, ext))
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path
