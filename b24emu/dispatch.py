"""How a REST request is let in and answered: auth, scopes, limits (fact sheet §1-§3)."""
from __future__ import annotations

import time

from .world import OPERATING_MIN_COUNTED, RestError, _int_param, _iso


class Dispatch:
    """Authentication, scopes, both rate limits and the time block (fact sheet §1-§3)."""

    def _time_block(self, start: float, ctx: dict | None = None, method: str | None = None,
                    processing: float | None = None) -> dict:
        finish = max(start, self.clock())     # the portal's own clock (a test may move it)
        block = {"start": start, "finish": finish, "duration": finish - start,
                 "processing": processing if processing is not None else finish - start,
                 "date_start": _iso(start), "date_finish": _iso(finish)}
        if ctx is not None and method:
            used, reset_at = self._operating(ctx, method)
            block["operating_reset_at"] = reset_at
            block["operating"] = used
        return block

    def _operating(self, ctx: dict, method: str) -> tuple:
        now = self.clock()
        minutes = self.operating.setdefault((ctx["user"], method), {})
        current = int(now // 60)
        for m in [m for m in minutes if m <= current - 10]:
            del minutes[m]
        used = sum(minutes.values())
        oldest = min(minutes) if minutes else current
        return used, int((oldest + 10) * 60)

    def _check_operating(self, ctx: dict, method: str) -> None:
        used, _reset = self._operating(ctx, method)
        if used > self.operating_limit:
            raise RestError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")

    def _add_operating(self, ctx: dict, method: str, seconds: float) -> None:
        if seconds < OPERATING_MIN_COUNTED:
            return
        minutes = self.operating.setdefault((ctx["user"], method), {})
        key = int(self.clock() // 60)
        minutes[key] = minutes.get(key, 0.0) + seconds

    def _take_token(self, ip: str) -> None:
        now = time.monotonic()
        level, last = self.bucket.get(ip, [0.0, now])
        level = max(0.0, level - (now - last) * self.rate)
        if level + 1 > self.burst:
            self.bucket[ip] = [level, now]
            raise RestError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        self.bucket[ip] = [level + 1, now]

    def _auth(self, user_id: str | None, code: str | None) -> dict:
        if user_id is None:
            raise RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        hook = self.webhooks.get((_int_param(user_id, -1), code))
        if not hook or _int_param(user_id, -1) not in self.users:
            raise RestError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        if not hook["active"] or not self.users[_int_param(user_id, -1)]["active"]:
            raise RestError(401, "authorization_error", "Unable to authorize user")
        return {"user": int(user_id), "scopes": hook["scopes"]}

    def _run_method(self, ctx: dict, method: str, params: dict) -> tuple:
        """Scope check, operating budget, handler; returns ``(result, extra, time_block)``."""
        handler_name, scope, upper = self.METHODS[method]
        if scope and scope not in ctx["scopes"] and not (scope == "user" and
                                                          {"user_brief", "user_basic"} & set(ctx["scopes"])):
            raise RestError(401, "insufficient_scope",
                            "The request requires higher privileges than provided by the webhook token")
        if upper:
            params = {str(k).upper(): v for k, v in params.items()}
        params = {k: (None if v is None else v) for k, v in params.items() if v is not None}
        self._check_operating(ctx, method)
        start, wall = self.clock(), time.time()
        out = getattr(self, handler_name)(ctx, params)
        elapsed = time.time() - wall
        cost = self.method_cost.get(method, elapsed)
        self._add_operating(ctx, method, cost)
        result, extra = out if isinstance(out, tuple) else (out, {})
        return result, extra, self._time_block(start, ctx, method, cost)

    def handle_rest(self, path_user: str | None, path_code: str | None, method: str, params: dict,
                    ip: str = "127.0.0.1") -> tuple:
        """One REST request -> ``(status, body dict)``; also used by batch sub-calls."""
        method = method.lower()
        for suffix in (".json", ".xml"):
            if method.endswith(suffix):
                method = method[:-len(suffix)]
        with self.lock:
            self.tick()
            try:
                self._take_token(ip)
                if method not in self.METHODS:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                ctx = self._auth(path_user, path_code)
                if method == "batch":
                    return 200, self._batch(ctx, params)
                result, extra, tblock = self._run_method(ctx, method, params)
                body = {"result": result}
                body.update(extra)
                body["time"] = tblock
                return 200, body
            except RestError as exc:
                return exc.status, exc.body()
