"""Files in a chat: sent in one call (``im.v2.File.upload``, the bot's ``imbot.v2.File.upload``) or in three
(``im.disk.folder.get`` -> ``disk.folder.uploadfile`` -> ``im.disk.file.commit``), and fetched (fact sheet §18, §14.5).

The one call takes base64 content (strictly, no ``data:`` prefix), at most
100 MiB decoded, and has no uuid: a repeat posts the file again.  The three
steps need the ``disk`` scope; the commit needs membership, takes a
``TEMPLATE_ID`` (the message's uuid, as ``im.message.add``), and with
``SILENT_MODE=Y`` keeps the file from the customer.  Either way a message
with ``params.FILE_ID`` and the caption as text is posted.  A file's bytes
come from ``im.v2.File.download``'s URL (``/rest/download.json?token=...``).
"""
from __future__ import annotations

import base64
import binascii
import secrets
from typing import Any

from .world import RestError, _int_param, _iso, _yes

MAX_FILE_BYTES = 100 * 1024 * 1024
KINDS = {"jpg": "image", "jpeg": "image", "png": "image", "gif": "image", "webp": "image", "mp4": "video",
         "mov": "video", "ogg": "audio", "mp3": "audio", "m4a": "audio"}


class Files:
    """``im.v2.File.upload`` / ``imbot.v2.File.upload``."""

    METHODS = {
        "im.v2.file.upload": ("m_v2_file_upload", "im", False),
        "imbot.v2.file.upload": ("m_v2_bot_file_upload", "imbot", False),
        "im.v2.file.download": ("m_v2_file_download", "im", False),
        "imbot.v2.file.download": ("m_v2_bot_file_download", "imbot", False),
        "im.disk.folder.get": ("m_disk_folder_get", "im", True),
        "disk.folder.uploadfile": ("m_disk_folder_uploadfile", "disk", False),
        "im.disk.file.commit": ("m_disk_file_commit", "im", True),
    }

    def attach(self) -> None:
        self.disk: dict = {}              # Disk object id -> {"name", "folder", "content", "by"}
        self.next_disk_id = 7700
        self.downloads: dict = {}         # download token -> chat file id
        self.max_file_bytes = MAX_FILE_BYTES     # the portal's limit (a test may lower it)

    def file_content(self, fid: int) -> bytes:
        """The bytes of a chat file (a customer's media has made-up bytes of its size)."""
        f = self.files[fid]
        if "content" not in f:
            f["content"] = (b"%s %s " % (f["name"].encode(), f["type"].encode()) * (f["size"] // 8 + 1))[:f["size"]]
        return f["content"]

    def _chat_file(self, chat: dict, author: int, name: str, data: bytes) -> int:
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        self.next_file_id += 1
        self.files[self.next_file_id] = {"id": self.next_file_id, "chatId": chat["id"], "date": self.clock(),
                                         "type": KINDS.get(ext, "file"), "name": name, "extension": ext,
                                         "size": len(data), "authorId": author, "content": data,
                                         "mime": "application/octet-stream"}
        return self.next_file_id

    # -- one call ---------------------------------------------------------------------
    def m_v2_file_upload(self, ctx: dict, p: dict) -> Any:
        return self._upload(ctx["user"], p, full=True)

    def m_v2_bot_file_upload(self, ctx: dict, p: dict) -> Any:
        bot = self._owned(p)
        return self._upload(bot["id"], p, full=False)

    def _upload(self, author: int, p: dict, *, full: bool) -> dict:
        chat = self._v2_dialog(p)
        if author not in chat["members"]:
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this chat")
        fields = p.get("fields") if isinstance(p.get("fields"), dict) else {}
        name, content = str(fields.get("name") or ""), str(fields.get("content") or "")
        if not name or not content:
            raise RestError(400, "FILE_EMPTY", "File name or content is empty")
        if len(content) > self.max_file_bytes * 4 // 3 + 4:
            raise RestError(400, "FILE_TOO_LARGE", "File is too large")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise RestError(400, "FILE_INVALID_CONTENT", "File content is not valid base64") from None
        fid = self._chat_file(chat, author, name, data)
        msg = self._post(chat, author, str(fields.get("message") or ""), params={"FILE_ID": [fid]})
        self._touch_session(chat, author)
        out = dict(self._file_out(fid), isTranscribable=False, isVideoNote=False, isVoiceNote=False, mediaUrl="")
        if not full:          # the bot's file object has no links and no progress (fact sheet §14.5)
            for key in ("urlPreview", "urlShow", "urlDownload", "viewerAttrs", "mediaUrl", "progress", "status"):
                out.pop(key, None)
        return {"file": out, "messageId": msg["id"], "chatId": chat["id"], "dialogId": "chat%d" % chat["id"]}

    # -- fetching ---------------------------------------------------------------------
    def _download_url(self, chat: dict, fid: int) -> dict:
        if fid not in self.files or self.files[fid]["chatId"] != chat["id"]:
            raise RestError(400, "FILE_NOT_FOUND", "File not found")
        token = secrets.token_hex(12)
        self.downloads[token] = fid
        return {"downloadUrl": "%s/rest/download.json?token=%s" % (self.public_url, token)}

    def m_v2_file_download(self, ctx: dict, p: dict) -> Any:
        chat = self._v2_dialog(p)
        if not self._can_read(chat, ctx["user"]):
            raise RestError(400, "ACCESS_DENIED", "You do not have access to this chat")
        return self._download_url(chat, _int_param(p.get("fileId"), 0) or 0)

    def m_v2_bot_file_download(self, ctx: dict, p: dict) -> Any:
        self._owned(p)
        fid = _int_param(p.get("fileId"), 0) or 0
        chat = self.chats.get(self.files[fid]["chatId"]) if fid in self.files else None
        if chat is None:
            raise RestError(400, "FILE_NOT_FOUND", "File not found")
        return self._download_url(chat, fid)

    def download(self, token: str) -> bytes | None:
        """What ``/rest/download.json?token=...`` serves (None: no such link)."""
        with self.lock:
            fid = self.downloads.get(token)
            return self.file_content(fid) if fid in self.files else None

    # -- the three steps --------------------------------------------------------------------
    def _dialog_of(self, ctx: dict, p: dict) -> dict:
        if p.get("CHAT_ID") not in (None, ""):
            chat = self.chats.get(_int_param(p.get("CHAT_ID"), 0) or 0)
        elif p.get("DIALOG_ID") not in (None, ""):
            dialog = str(p["DIALOG_ID"])
            chat = self.chats.get(_int_param(dialog[4:], 0) or 0) if dialog.startswith("chat") else None
        else:
            raise RestError(400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
        if chat is None or not self._can_read(chat, ctx["user"]):
            raise RestError(403, "ACCESS_ERROR", "You don't have access to this chat")
        return chat

    def m_disk_folder_get(self, ctx: dict, p: dict) -> Any:
        chat = self._dialog_of(ctx, p)
        return {"ID": 9000 + chat["id"]}

    def m_disk_folder_uploadfile(self, ctx: dict, p: dict) -> Any:
        folder = _int_param(p.get("id"), 0) or 0
        chat = self.chats.get(folder - 9000)
        if chat is None:
            raise RestError(400, "ERROR_NOT_FOUND", "Could not find entity with id '%s'" % p.get("id"))
        if not self._can_read(chat, ctx["user"]):
            raise RestError(403, "ACCESS_DENIED", "Access denied")
        data = p.get("data") if isinstance(p.get("data"), dict) else {}
        content = p.get("fileContent")
        content = list(content.values()) if isinstance(content, dict) else content
        name = str(data.get("NAME") or (content[0] if isinstance(content, list) and content else "") or "")
        if not name:
            raise RestError(400, "DISK_BASE_SERVICE_22001", "Error: NAME is required")
        if not isinstance(content, list) or len(content) < 2:
            return {"field": "file", "uploadUrl": "%s/upload/?folder=%d" % (self.public_url, folder)}
        try:
            raw = base64.b64decode(str(content[1]), validate=True)
        except (binascii.Error, ValueError):
            raise RestError(400, "ERROR_COULD_NOT_SAVE_FILE", "Could not save file") from None
        if len(raw) > self.max_file_bytes:
            raise RestError(400, "ERROR_COULD_NOT_SAVE_FILE", "Could not save file: too large")
        taken = {d["name"] for d in self.disk.values() if d["folder"] == folder}
        if name in taken and p.get("generateUniqueName") not in (None, "", False, "0", "N", "false"):
            stem, dot, ext = name.rpartition(".")
            n = 1
            while "%s (%d)%s%s" % (stem or ext, n, dot, ext if stem else "") in taken:
                n += 1
            name = "%s (%d)%s%s" % (stem or ext, n, dot, ext if stem else "")
        self.next_disk_id += 1
        did = self.next_disk_id
        self.disk[did] = {"name": name, "folder": folder, "content": raw, "by": ctx["user"]}
        return {"ID": did, "NAME": name, "CODE": None, "STORAGE_ID": 1, "TYPE": "file", "PARENT_ID": folder,
                "DELETED_TYPE": 0, "GLOBAL_CONTENT_VERSION": 1, "FILE_ID": did + 50000, "SIZE": len(raw),
                "CREATE_TIME": _iso(self.clock()), "UPDATE_TIME": _iso(self.clock()), "DELETE_TIME": None,
                "CREATED_BY": ctx["user"], "UPDATED_BY": ctx["user"], "DELETED_BY": 0,
                "DOWNLOAD_URL": "%s/disk/downloadFile/%d/" % (self.public_url, did),
                "DETAIL_URL": "%s/docs/file/%s" % (self.public_url, name)}

    def m_disk_file_commit(self, ctx: dict, p: dict) -> Any:
        chat = self._dialog_of(ctx, p)
        uid = ctx["user"]
        if uid not in chat["members"]:
            raise RestError(400, "ACCESS_ERROR", "You don't have access to this chat")

        def ids(key: str) -> list:
            value = p.get(key)
            value = list(value.values()) if isinstance(value, dict) else value
            return [_int_param(v, 0) for v in (value if isinstance(value, list) else [value]) if v not in (None, "")]
        uploads, copies = ids("UPLOAD_ID"), ids("FILE_ID")
        if not uploads and not copies:
            raise RestError(400, "FILES_ERROR", "List of files is empty")
        folder = 9000 + chat["id"]
        for d in uploads + copies:
            if d not in self.disk or (d in uploads and self.disk[d]["folder"] != folder):
                raise RestError(400, "SAVE_ERROR", "Files could not be saved")
        template, known = self._template_of(p.get("TEMPLATE_ID"))
        if known:
            return {"FILES": {}, "DISK_ID": [], "FILE_MODELS": {}, "MESSAGE_ID": known}
        fids = [self._chat_file(chat, uid, self.disk[d]["name"], self.disk[d]["content"]) for d in uploads + copies]
        silent = _yes(p.get("SILENT_MODE"))
        params = {"FILE_ID": fids}
        if silent:
            params["SILENT_CONNECTOR"] = "Y"          # kept from the customer (fact sheet §18.2)
        msg = self._post(chat, uid, str(p.get("MESSAGE") or ""), params=params, uuid=template, skip_connector=silent)
        if template:
            self.uuids[template] = {"mid": msg["id"], "at": self.clock()}
        self._touch_session(chat, uid)
        files = {("upload%d" if d in uploads else "disk%d") % d: self._file_out(f)
                 for d, f in zip(uploads + copies, fids)}
        return {"FILES": files, "DISK_ID": [str(d) for d in uploads + copies], "FILE_MODELS": {},
                "MESSAGE_ID": msg["id"]}
