"""Files posted into a chat in one call: ``im.v2.File.upload`` and the bot's ``imbot.v2.File.upload`` (fact sheet §18.1, §14.5).

The content comes base64 encoded (strictly, no ``data:`` prefix), at most
100 MiB decoded; the file lands in the chat's folder and a message with
``params.FILE_ID`` and the caption as text is posted by the caller -- or the
bot -- and forwarded to the customer like any operator message.  There is no
uuid: a repeat posts the file again.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from .world import RestError

MAX_FILE_BYTES = 100 * 1024 * 1024
KINDS = {"jpg": "image", "jpeg": "image", "png": "image", "gif": "image", "webp": "image", "mp4": "video",
         "mov": "video", "ogg": "audio", "mp3": "audio", "m4a": "audio"}


class Files:
    """``im.v2.File.upload`` / ``imbot.v2.File.upload``."""

    METHODS = {
        "im.v2.file.upload": ("m_v2_file_upload", "im", False),
        "imbot.v2.file.upload": ("m_v2_bot_file_upload", "imbot", False),
    }

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
        if len(content) > MAX_FILE_BYTES * 4 // 3 + 4:
            raise RestError(400, "FILE_TOO_LARGE", "File is too large")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise RestError(400, "FILE_INVALID_CONTENT", "File content is not valid base64") from None
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        self.next_file_id += 1
        fid = self.next_file_id
        kind = KINDS.get(ext, "file")
        self.files[fid] = {"id": fid, "chatId": chat["id"], "date": self.clock(), "type": kind, "name": name,
                           "extension": ext, "size": len(data), "authorId": author, "content": data,
                           "mime": "application/octet-stream"}
        msg = self._post(chat, author, str(fields.get("message") or ""), params={"FILE_ID": [fid]})
        out = dict(self._file_out(fid), isTranscribable=False, isVideoNote=False, isVoiceNote=False, mediaUrl="")
        if not full:          # the bot's file object has no links and no progress (fact sheet §14.5)
            for key in ("urlPreview", "urlShow", "urlDownload", "viewerAttrs", "mediaUrl", "progress", "status"):
                out.pop(key, None)
        return {"file": out, "messageId": msg["id"], "chatId": chat["id"], "dialogId": "chat%d" % chat["id"]}
