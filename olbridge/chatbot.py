"""The legacy Open Lines chat bot (imbot.register): --register-bot URL / --unregister-bot, chat-bot.json."""
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


def chat_bot_path(folder: str) -> str:
    return os.path.join(folder, "chat-bot.json")


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
    return reg


def register_chat_bot(client: bc.Client, folder: str, url: str, name: str) -> int:
    """``imbot.register`` an Open Lines bot (TYPE=O) whose events go to *url*; keep its CLIENT_ID."""
    parts = bc.split_url(url, "--register-bot", "the public https:// URL of the receiver (B24_LISTEN)")
    if parts.scheme != "https":
        log.warning("--register-bot %s: Bitrix24 posts events only to https:// addresses with a valid "
                    "certificate (plain http:// is fine for the local emulator only)", parts.hostname)
    old = load_chat_bot(folder, client.host) or {}
    client_id = old.get("client_id") or "b24olb" + secrets.token_hex(16)
    bc.register_secret(client_id)
    if "imbot" not in client.scopes():
        raise bc.ConfigError("--register-bot: the webhook has no imbot scope; add it to the incoming webhook "
                             "(Developer resources > Other > Inbound webhook) and try again")
    bot_id = bc.as_int(client.call("imbot.register", {
        "CODE": BOT_CODE, "TYPE": "O", "OPENLINE": "Y", "CLIENT_ID": client_id,
        "EVENT_MESSAGE_ADD": url, "EVENT_WELCOME_MESSAGE": url, "EVENT_BOT_DELETE": url,
        "PROPERTIES": {"NAME": name, "WORK_POSITION": "answers through b24_ol_bridge"}}, write=True))
    bc.write_private(chat_bot_path(folder), json.dumps(
        {"portal": client.host, "bot_id": bot_id, "client_id": client_id, "url": url, "name": name}))
    return bot_id


def unregister_chat_bot(client: bc.Client, folder: str) -> int | None:
    reg = load_chat_bot(folder, client.host)
    if reg is None:
        return None
    try:
        client.call("imbot.unregister", {"BOT_ID": reg["bot_id"], "CLIENT_ID": reg["client_id"]}, write=True)
    except bc.APIError as exc:
        if "BOT_ID_ERROR" not in str(exc):
            raise
        log.info("the portal no longer knows chat bot %s; forgetting it here too", reg["bot_id"])
    os.unlink(chat_bot_path(folder))
    return bc.as_int(reg["bot_id"])


def bot_command(args: argparse.Namespace, client: bc.Client, folder: str, environ: Mapping[str, str]) -> int:
    if args.unregister_bot:
        gone = unregister_chat_bot(client, folder)
        print("no chat bot is registered for %s (nothing in %s)" % (client.host, chat_bot_path(folder))
              if gone is None else "chat bot %d removed from %s" % (gone, client.host))
        return bc.EXIT_OK
    name = (environ.get("BRIDGE_BOT_NAME") or "Assistant").strip() or "Assistant"
    bot_id = register_chat_bot(client, folder, args.register_bot, name)
    print("chat bot %r registered on %s (id %d); its events go to %s" % (
        name, client.host, bot_id, bc.split_url(args.register_bot, "--register-bot", "").hostname))
    print("next: choose it as the chat bot of your Open Line (Contact Center > the line > Chat bots), and run "
          "the bridge with B24_LISTEN set so the receiver hears it")
    return bc.EXIT_OK


