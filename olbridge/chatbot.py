"""The bridge's own Open Lines chat bot: registering it (Chatbots 2.0 in fetch mode, or the legacy imbot.register
with a URL), setting it on a line, showing the lines' bot settings -- and chat-bot.json, which keeps its key."""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from typing import Mapping

import b24common as bc

log = logging.getLogger("b24_ol_bridge")

BOT_CODE = "b24_ol_bridge"
TOKEN_MAX = 40              # imbot.v2.Bot.register refuses longer botTokens (fact sheet §14.1)
LINE_FIELDS = ("WELCOME_BOT_ENABLE", "WELCOME_BOT_ID", "WELCOME_BOT_JOIN", "WELCOME_BOT_TIME", "WELCOME_BOT_LEFT")


def chat_bot_path(folder: str) -> str:
    return os.path.join(folder, "chat-bot.json")


def is_fetch(reg: Mapping | None) -> bool:
    """Does this registration's bot keep its events for us to fetch (``imbot.v2.Event.get``)?"""
    return bool(reg) and reg.get("mode") == "fetch"


def load_chat_bot(folder: str, host: str) -> dict | None:
    """The bot registered with --register-bot for this portal (None if there is none)."""
    path = chat_bot_path(folder)
    try:
        with open(path, encoding="utf-8") as fh:
            reg = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise bc.ConfigError("%s: cannot read the chat bot registration (%s); run --register-bot again "
                             "or delete the file" % (path, exc)) from None
    if not isinstance(reg, dict) or not reg.get("bot_id") or not reg.get("client_id"):
        raise bc.ConfigError("%s: not a chat bot registration; run --register-bot again or delete the file" % path)
    if reg.get("portal") != host:
        raise bc.ConfigError("%s: the chat bot was registered on %s, not on %s" % (path, reg.get("portal"), host))
    bc.register_secret(str(reg["client_id"]))
    reg.setdefault("mode", "webhook")           # written before fetch mode existed: a POST bot
    return reg


def _save(folder: str, reg: dict) -> None:
    bc.write_private(chat_bot_path(folder), json.dumps(reg))


def _need_imbot(client: bc.Client, what: str) -> None:
    if "imbot" not in client.scopes():
        raise bc.ConfigError("%s: the webhook has no imbot scope; add it to the incoming webhook "
                             "(Developer resources > Other > Inbound webhook) and try again" % what)


def _lost_key(client: bc.Client, code: str, bot_id: object = "") -> bc.ConfigError:
    return bc.ConfigError(
        "--register-bot: a chat bot with the code %s%s is already registered on %s, but its key is not in "
        "chat-bot.json here (lost, or another bridge's): Bitrix24 would hand back that bot bound to the old "
        "key and it would stay silent. Restore chat-bot.json, or delete that bot in Bitrix24, or give this "
        "bridge its own code with BRIDGE_BOT_CODE" % (code, " (id %s)" % bot_id if bot_id else "", client.host))


def register_fetch_bot(client: bc.Client, folder: str, name: str, code: str) -> tuple:
    """Chatbots 2.0: an Open Lines bot whose events wait in its queue (no public URL).  A bot registered
    before with a URL is moved to fetch mode (fact sheet §14.6).  ``(bot id, what happened)``."""
    _need_imbot(client, "--register-bot")
    old = load_chat_bot(folder, client.host)
    token = str(old["client_id"]) if old else "b24olb" + secrets.token_hex(16)
    bc.register_secret(token)
    if len(token) > TOKEN_MAX:
        raise bc.ConfigError("--register-bot: the bot's key in %s is longer than %d characters, which Chatbots 2.0 "
                             "refuses; --unregister-bot, then --register-bot" % (chat_bot_path(folder), TOKEN_MAX))
    try:
        if old:
            bot = _bot_of(client.call("imbot.v2.Bot.get", {"botToken": token, "botId": old["bot_id"]}))
            if bot.get("eventMode") == "fetch":
                old["mode"] = "fetch"
                _save(folder, old)
                return bc.as_int(old["bot_id"]), "already registered"
            client.call("imbot.v2.Bot.update", {"botId": old["bot_id"], "botToken": token,
                                                "fields": {"eventMode": "fetch"}}, write=True)
            _save(folder, dict(old, mode="fetch", url=""))
            return bc.as_int(old["bot_id"]), "moved to fetch mode: no more POSTs to %s" % (
                bc.split_url(str(old.get("url") or "http://unknown/"), "url", "").hostname)
        bot = _bot_of(client.call("imbot.v2.Bot.register", {"botToken": token, "fields": {
            "code": code, "type": "openline", "eventMode": "fetch", "isSupportOpenline": "Y",
            "properties": {"name": name, "workPosition": "answers through b24_ol_bridge"}}}, write=True))
    except bc.APIError as exc:
        if exc.code == "BOT_CODE_ALREADY_TAKEN":
            raise _lost_key(client, code) from None
        if exc.code.upper() in ("ERROR_METHOD_NOT_FOUND", "METHOD_NOT_FOUND"):
            raise bc.ConfigError("--register-bot: this portal has no Chatbots 2.0 (imbot.v2); register the legacy "
                                 "bot with --register-bot URL (its events come as POSTs to B24_LISTEN)") from None
        raise
    bot_id = bc.as_int(bot.get("id"))
    if str(bot.get("eventMode") or "fetch") != "fetch":        # our code, registered by us before, with POSTs
        client.call("imbot.v2.Bot.update", {"botId": bot_id, "botToken": token,
                                            "fields": {"eventMode": "fetch"}}, write=True)
    _save(folder, {"portal": client.host, "bot_id": bot_id, "client_id": token, "mode": "fetch", "name": name,
                   "code": code, "url": ""})
    return bot_id, "registered"


def _bot_of(result: object) -> Mapping:
    return bc.as_map(bc.as_map(result).get("bot"))


def register_webhook_bot(client: bc.Client, folder: str, url: str, name: str, code: str) -> int:
    """The legacy route: ``imbot.register`` an Open Lines bot (TYPE=O) whose events are POSTed to *url*."""
    parts = bc.split_url(url, "--register-bot", "the public https:// URL of the receiver (B24_LISTEN)")
    if parts.scheme != "https":
        log.warning("--register-bot %s: Bitrix24 posts events only to https:// addresses with a valid "
                    "certificate (plain http:// is fine for the local emulator only)", parts.hostname)
    old = load_chat_bot(folder, client.host)
    if is_fetch(old):
        raise bc.ConfigError("--register-bot URL: the bridge's chat bot %s fetches its events (no URL needed); "
                             "to have them POSTed instead, --unregister-bot first" % old["bot_id"])
    _need_imbot(client, "--register-bot")
    if not old:        # a taken code comes back as the old bot, bound to a key we do not have
        taken = [b for b in bc.as_map(client.call("imbot.bot.list")).values()
                 if isinstance(b, Mapping) and str(b.get("CODE") or "") == code]
        if taken:
            raise _lost_key(client, code, taken[0].get("ID"))
    client_id = old["client_id"] if old else "b24olb" + secrets.token_hex(16)
    bc.register_secret(client_id)
    bot_id = bc.as_int(client.call("imbot.register", {
        "CODE": code, "TYPE": "O", "OPENLINE": "Y", "CLIENT_ID": client_id,
        "EVENT_MESSAGE_ADD": url, "EVENT_WELCOME_MESSAGE": url, "EVENT_BOT_DELETE": url,
        "PROPERTIES": {"NAME": name, "WORK_POSITION": "answers through b24_ol_bridge"}}, write=True))
    _save(folder, {"portal": client.host, "bot_id": bot_id, "client_id": client_id, "mode": "webhook",
                   "url": url, "name": name, "code": code})
    return bot_id


def unregister_chat_bot(client: bc.Client, folder: str) -> int | None:
    reg = load_chat_bot(folder, client.host)
    if reg is None:
        return None
    try:
        if is_fetch(reg):
            client.call("imbot.v2.Bot.unregister", {"botId": reg["bot_id"], "botToken": reg["client_id"]}, write=True)
        else:
            client.call("imbot.unregister", {"BOT_ID": reg["bot_id"], "CLIENT_ID": reg["client_id"]}, write=True)
    except bc.APIError as exc:
        if exc.code not in ("BOT_ID_ERROR", "BOT_NOT_FOUND"):
            raise
        log.info("the portal no longer knows chat bot %s; forgetting it here too", reg["bot_id"])
    os.unlink(chat_bot_path(folder))
    return bc.as_int(reg["bot_id"])


# -- the lines' bot settings ------------------------------------------------------------------
def attach_to_line(client: bc.Client, reg: Mapping, line: int, bot_time: int) -> dict:
    """Make the bot the line's chat bot for every new session, keeping each chat until it hands over
    (*bot_time* seconds, 0 = no limit).  All five fields in one call: the update does not merge."""
    try:
        done = client.call("imopenlines.config.update", {"CONFIG_ID": line, "PARAMS": {
            "WELCOME_BOT_ENABLE": "Y", "WELCOME_BOT_ID": reg["bot_id"], "WELCOME_BOT_JOIN": "always",
            "WELCOME_BOT_TIME": bot_time, "WELCOME_BOT_LEFT": "queue"}}, write=True)
    except bc.APIError as exc:
        if not isinstance(exc, bc.AccessDeniedError) and "PERMISSION" not in exc.code.upper():
            raise
        raise bc.ConfigError("--attach-bot %d: the webhook user may not change Open Line %d -- it needs the Open "
                             "Lines permission to modify lines (Contact Center > Access permissions), or an "
                             "administrator sets the chat bot in the line's settings (%s)" % (line, line, exc)) from None
    if done is False or str(done).lower() in ("false", "0", ""):
        raise bc.ConfigError("--attach-bot %d: the portal did not change line %d (is there such a line? "
                             "b24_ol_bridge.py --check lists them)" % (line, line))
    return bc.as_map(client.call("imopenlines.config.get", {"CONFIG_ID": line}))


def describe_line(row: Mapping, bot_id: int) -> tuple:
    """``(text, warning or "")`` for one line's bot settings."""
    name = "line %s %r" % (row.get("ID"), row.get("LINE_NAME") or "")
    enabled = str(row.get("WELCOME_BOT_ENABLE") or "N").upper() == "Y"
    their = bc.as_int(row.get("WELCOME_BOT_ID"))
    if not enabled or not their:
        return "%s: no chat bot" % name, ""
    seconds = bc.as_int(row.get("WELCOME_BOT_TIME"), 600)
    left = str(row.get("WELCOME_BOT_LEFT") or "queue")
    text = "%s: chat bot %d%s, joins %s, keeps a chat %s, then %s" % (
        name, their, " (ours)" if their == bot_id else "", row.get("WELCOME_BOT_JOIN") or "always",
        "until it hands over" if not seconds else "for %d s" % seconds,
        "leaves it to the queue" if left == "queue" else "stays until the session closes")
    warn = ""
    if their == bot_id and seconds:
        warn = ("%s: our bot loses each chat after %d s (WELCOME_BOT_TIME) -- the conversation goes to the "
                "operators' queue and the bridge stops answering it; b24_ol_bridge.py --attach-bot %s sets "
                "BRIDGE_BOT_TIME (default 0: no limit)" % (name, seconds, row.get("ID")))
    return text, warn


def lines_with_settings(client: bc.Client) -> list:
    rows = client.call("imopenlines.config.list.get", {"PARAMS": {"select": ["ID", "LINE_NAME"] + list(LINE_FIELDS)}})
    return [r for r in (rows or []) if isinstance(r, Mapping)]


def bot_time_of(environ: Mapping[str, str]) -> int:
    return int(bc.env_number(environ, "BRIDGE_BOT_TIME", 0, 0, 7 * 86400, integer=True))


def bot_command(args: argparse.Namespace, client: bc.Client, folder: str, environ: Mapping[str, str]) -> int:
    """--register-bot [URL] / --unregister-bot / --attach-bot LINE."""
    if args.unregister_bot:
        gone = unregister_chat_bot(client, folder)
        print("no chat bot is registered for %s (nothing in %s)" % (client.host, chat_bot_path(folder))
              if gone is None else "chat bot %d removed from %s" % (gone, client.host))
        return bc.EXIT_OK
    if args.attach_bot is not None:
        reg = load_chat_bot(folder, client.host)
        if reg is None:
            raise bc.ConfigError("--attach-bot %d: no chat bot is registered here yet: run b24_ol_bridge.py "
                                 "--register-bot first" % args.attach_bot)
        row = attach_to_line(client, reg, args.attach_bot, bot_time_of(environ))
        text, warn = describe_line(row, bc.as_int(reg["bot_id"]))
        print(text)
        if warn:
            print("warning: " + warn)
        print("new conversations on line %d now go to the bot; run the bridge to answer them" % args.attach_bot)
        return bc.EXIT_OK
    name = (environ.get("BRIDGE_BOT_NAME") or "Assistant").strip() or "Assistant"
    code = (environ.get("BRIDGE_BOT_CODE") or BOT_CODE).strip() or BOT_CODE
    if not args.register_bot:
        bot_id, what = register_fetch_bot(client, folder, name, code)
        print("chat bot %r on %s (id %d): %s; its events wait in its queue on the portal (no public URL "
              "needed)" % (name, client.host, bot_id, what))
        print("next: b24_ol_bridge.py --attach-bot LINE makes it the chat bot of an Open Line; then run the bridge")
        return bc.EXIT_OK
    bot_id = register_webhook_bot(client, folder, args.register_bot, name, code)
    print("chat bot %r registered on %s (id %d); its events go to %s" % (
        name, client.host, bot_id, bc.split_url(args.register_bot, "--register-bot", "").hostname))
    print("next: b24_ol_bridge.py --attach-bot LINE (or the line's settings: Contact Center > the line > Chat bots), "
          "and run the bridge with B24_LISTEN set so the receiver hears it")
    return bc.EXIT_OK
