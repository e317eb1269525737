"""``event.*``: refused to webhooks (fact sheet §12)."""
from __future__ import annotations

from typing import Any

from .world import (
    RestError,
)


class EventMethods:
    """``event.*``: refused to webhooks (fact sheet §12)."""

    METHODS = {
        "event.bind": ("m_event_bind", None, False),
        "event.get": ("m_event_get", None, False),
        "event.unbind": ("m_event_unbind", None, False),
        "events": ("m_events", None, False),
        "placement.bind": ("m_placement_bind", None, False),
    }

    def m_event_bind(self, ctx: dict, p: dict) -> Any:
        raise RestError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    m_event_get = m_event_unbind = m_events = m_placement_bind = m_event_bind
