"""``batch`` (fact sheet §4)."""
from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any

from .world import RestError, php_parse


def batch_commands(params: dict) -> dict:
    """A ``batch`` request's ``cmd`` as ``{name: query}`` (a list is named by position; anything else: none)."""
    cmd = {str(k).lower(): v for k, v in params.items()}.get("cmd")
    if isinstance(cmd, list):
        cmd = {str(i): v for i, v in enumerate(cmd)}
    return cmd if isinstance(cmd, dict) else {}


def split_query(query: str) -> tuple:
    """``"im.dialog.get.json?DIALOG_ID=chat1"`` -> ``("im.dialog.get", "DIALOG_ID=chat1")``."""
    method, _, qs = query.partition("?")
    method = method.strip().lower()
    return (method[:-5] if method.endswith(".json") else method), qs


class Batch:
    """``batch`` (fact sheet §4)."""

    METHODS = {
        "batch": (None, None, True),
    }

    def _batch(self, ctx: dict, params: dict) -> dict:
        start = self.clock()
        p = {str(k).lower(): v for k, v in params.items()}
        cmd = batch_commands(params)
        halt = str(p.get("halt", "0")).lower() in ("1", "true", "y")
        results, errors, totals, nexts, times = {}, {}, {}, {}, {}
        for n, (name, query) in enumerate(cmd.items()):
            if not isinstance(query, str):
                continue
            if n >= 50:
                errors[name] = {"error": "ERROR_BATCH_LENGTH_EXCEEDED",
                                "error_description": "Max batch length exceeded"}
                continue
            sub_method, qs = split_query(query)
            sub_params = php_parse(urllib.parse.parse_qsl(qs, keep_blank_values=True))
            sub_params = self._resolve_refs(sub_params, results, errors, totals, nexts, times)
            slow = self.take_fault(sub_method, kinds=("latency",))
            if slow:             # this sub-call takes its time; other requests go on meanwhile
                self.lock.release()
                try:
                    time.sleep(slow["seconds"])
                finally:
                    self.lock.acquire()
            try:
                refused = self.take_fault(sub_method, kinds=("http400", "http500"))
                if refused:      # a fault aimed at this method refuses the sub-call alone
                    raise RestError(400, "ERROR_ARGUMENT", "Argument error") if refused["kind"] == "http400" \
                        else RestError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
                if sub_method == "batch":
                    raise RestError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
                if sub_method not in self.METHODS:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                result, extra, tblock = self._run_method(ctx, sub_method, sub_params)
                self.sub_counts[sub_method] += 1
                results[name] = result
                if "total" in extra:
                    totals[name] = extra["total"]
                if "next" in extra:
                    nexts[name] = extra["next"]
                times[name] = tblock
            except RestError as exc:
                errors[name] = exc.body()
                if halt:
                    break
        return {"result": {"result": results, "result_error": errors, "result_total": totals,
                           "result_next": nexts, "result_time": times},
                "time": self._time_block(start)}

    _REF = re.compile(r"\$(result|next|total|error|time)\[([^\]]+)\]((?:\[[^\]]*\])*)")

    def _resolve_refs(self, value: Any, results, errors, totals, nexts, times) -> Any:
        tables = {"result": results, "error": errors, "total": totals, "next": nexts, "time": times}
        if isinstance(value, dict):
            return {k: self._resolve_refs(v, results, errors, totals, nexts, times) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_refs(v, results, errors, totals, nexts, times) for v in value]
        if not isinstance(value, str) or "$" not in value:
            return value

        def lookup(m: re.Match) -> tuple:
            node: Any = tables[m.group(1)]
            for key in [m.group(2)] + re.findall(r"\[([^\]]*)\]", m.group(3)):
                if isinstance(node, dict) and key in node:
                    node = node[key]
                elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                    node = node[int(key)]
                else:
                    return False, None
            return True, node

        whole = self._REF.fullmatch(value)
        if whole:
            ok, got = lookup(whole)
            return got if ok else value

        def splice(m: re.Match) -> str:
            ok, got = lookup(m)
            if ok and not isinstance(got, (dict, list)):
                return "" if got is None else str(got)
            return m.group(0)
        return self._REF.sub(splice, value)
