"""``scope``, ``profile``, ``user.current`` (fact sheet §5)."""
from __future__ import annotations

from typing import Any

from .world import _iso, _yes


class UserMethods:
    """``scope``, ``profile``, ``user.current`` (fact sheet §5)."""

    METHODS = {
        "scope": ("m_scope", None, False),
        "profile": ("m_profile", None, False),
        "user.current": ("m_user_current", "user", False),
    }

    def m_scope(self, ctx: dict, p: dict) -> Any:
        if _yes(p.get("full")) or p.get("full") in ("true", "1", True):
            return ["im", "imopenlines", "user", "crm", "task", "disk", "imbot", "placement"]
        return list(ctx["scopes"])

    def m_profile(self, ctx: dict, p: dict) -> Any:
        u = self.users[ctx["user"]]
        if not u["active"]:
            return []
        return {"ID": str(u["id"]), "ADMIN": u["admin"], "NAME": u["first_name"],
                "LAST_NAME": u["last_name"], "PERSONAL_GENDER": u["gender"], "TIME_ZONE": ""}

    def m_user_current(self, ctx: dict, p: dict) -> Any:
        u = self.users[ctx["user"]]
        return {"ID": str(u["id"]), "ACTIVE": u["active"], "NAME": u["first_name"],
                "LAST_NAME": u["last_name"], "EMAIL": "operator@example.invalid",
                "LAST_LOGIN": _iso(self.clock() - 600), "DATE_REGISTER": _iso(self.clock() - 400 * 86400),
                "IS_ONLINE": "Y", "LAST_ACTIVITY_DATE": _iso(self.clock() - 60),
                "PERSONAL_GENDER": u["gender"], "PERSONAL_BIRTHDAY": "", "WORK_POSITION": u["position"],
                "UF_DEPARTMENT": [1]}
