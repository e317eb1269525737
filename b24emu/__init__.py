"""The Bitrix24 portal emulator behind ``mock_b24_portal.py``, laid out like the thing it imitates.

``world`` holds the world (users, lines, chats, sessions, messages) and its
control actions; each other module holds one REST namespace, where Bitrix24's
own documentation files it; ``dispatch`` lets a request in (auth, scopes,
limits).  :class:`Portal` puts them together.
"""
from __future__ import annotations

from .batch import Batch
from .delivery import Delivery
from .dispatch import Dispatch
from .event import EventMethods
from .files import Files
from .im_dialog import ImDialog
from .im_message import ImMessage
from .im_recent import ImRecent
from .im_v2_event import ImV2Event
from .imbot import Imbot
from .imbot_v2 import ImbotV2
from .imopenlines import Imopenlines
from .ns_user import UserMethods
from .operator import OperatorActions
from .welcome_bot import WelcomeBot
from .world import World

# the order of their hooks: the welcome bot acts on a message after the others have seen it
NAMESPACES = (UserMethods, ImRecent, ImDialog, ImMessage, Imopenlines, OperatorActions, Imbot, ImbotV2, Files, ImV2Event, EventMethods,
              Batch, Delivery, WelcomeBot)


class Portal(*NAMESPACES, Dispatch, World):  # type: ignore[misc]
    """The whole emulated portal: the world, every REST namespace, and the dispatcher."""

    METHODS: dict = {}
    for _ns in NAMESPACES:
        METHODS.update(_ns.METHODS)
    del _ns

    def __init__(self, **kwargs) -> None:
        World.__init__(self, **kwargs)
        for ns in NAMESPACES:          # the namespaces that watch the world hook in
            attach = getattr(ns, "attach", None)
            if attach is not None:
                attach(self)


__all__ = ["Portal", "World", "NAMESPACES"]
