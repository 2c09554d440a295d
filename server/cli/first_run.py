"""``init``: the server's own secrets, created once on purpose, and checked every time they are used.

The signing key is the server's identity: agents trust receipts only from it. A key conjured when the
configured file is missing (a typo in the path, a volume not mounted, a lost backup) would make every
agent refuse every receipt without a word, so only ``battery-server init`` creates it; everything else
refuses to run without it. The dashboard's token is created there too, and checked at every start: an
empty or short token (a ``touch``, a crash between create and write) would leave the dashboard and its
API open to anyone. Files are written whole or not at all (a temporary file, fsynced, then linked into
place, which also never overwrites), mode 0600, and no secret is ever printed or logged.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from battery_trace.protocol import keys
from battery_trace.server.cli.common import OK, UsageError, add_config, config
from battery_trace.server.config import TOKEN_ENV, ServerConfig

from battery_trace.bounded_read import UnreadableInput, read_bounded

MIN_TOKEN = 32
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")  # unreserved in a URL: the token may travel as ?token=
TOKEN_RULE = (
    f"at least {MIN_TOKEN} characters of A-Z a-z 0-9 . _ ~ - "
    "(battery-server init makes one; or: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
)


def _init_hint(args: argparse.Namespace) -> str:
    return "battery-server init" + (f" -c {args.config}" if getattr(args, "config", None) else "")


def server_key(path: Path, args: argparse.Namespace) -> keys.PrivateKey:
    """The server's signing key; never created here."""
    if not path.exists():
        raise UsageError(f"no server key at {path}; create it once with: {_init_hint(args)}")
    return keys.load_private(path)


def next_server_key(cfg: ServerConfig, args: argparse.Namespace) -> keys.PublicKey | None:
    """The public half of [server] next_key, announced in receipts while the key is rotated."""
    if cfg.next_key_path is None:
        return None
    return server_key(cfg.next_key_path, args).public


def web_token(cfg: ServerConfig, args: argparse.Namespace) -> tuple[str, str]:
    """The dashboard's token and where it came from ($BT_WEB_TOKEN, else [web] token_file)."""
    if TOKEN_ENV in os.environ:
        return _checked_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}"), f"${TOKEN_ENV}"
    path = cfg.web.token_path
    if not path.exists():
        raise UsageError(f"no dashboard token at {path} (nor ${TOKEN_ENV}); create it once with: {_init_hint(args)}")
    try:
        text = read_bounded(path, 4096).decode("utf-8", errors="replace")
    except UnreadableInput as exc:
        raise UsageError(f"dashboard token: {exc}") from None
    return _checked_token(text.strip(), str(path)), str(path)


def _checked_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        # Say how long it is and which rule it breaks, never what it is.
        problem = "is empty" if not token else f"holds {len(token)} characters"
        if token and len(token) >= MIN_TOKEN:
            problem = "holds characters other than A-Z a-z 0-9 . _ ~ -"
        raise UsageError(f"the dashboard token in {where} {problem}; refusing to start with it; valid: {TOKEN_RULE}")
    return token


def _create(path: Path, write: Callable[[Path], None]) -> None:
    """A new file, whole or not at all: written beside, fsynced, then linked (never over an existing one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.new")
    scratch.unlink(missing_ok=True)
    try:
        write(scratch)
        os.link(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_token(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(secrets.token_urlsafe(32) + "\n")
        f.flush()
        os.fsync(fd)


def init(args: argparse.Namespace) -> int:
    cfg = config(args)
    if cfg.key_path.exists():
        key = keys.load_private(cfg.key_path)
        print(f"server key: kept {cfg.key_path} (public key {key.public.hex})")
    else:
        _create(cfg.key_path, lambda p: keys.save_private(keys.generate(), p))
        key = keys.load_private(cfg.key_path)
        print(f"server key: created {cfg.key_path} (0600); agents verify receipts with {key.public.hex}")
    if cfg.next_key_path is not None and cfg.next_key_path.exists():
        print(
            f"next server key: kept {cfg.next_key_path} (public key {keys.load_private(cfg.next_key_path).public.hex})"
        )
    elif cfg.next_key_path is not None:
        _create(cfg.next_key_path, lambda p: keys.save_private(keys.generate(), p))
        nxt = keys.load_private(cfg.next_key_path).public
        print(f"next server key: created {cfg.next_key_path} (0600), public key {nxt.hex}; receipts announce it")
    if cfg.web.listen is None:
        print("dashboard: off ([web] listen), no token needed")
    elif TOKEN_ENV in os.environ or cfg.web.token_path.exists():
        _, where = web_token(cfg, args)
        print(f"dashboard token: kept {where}")
    else:
        _create(cfg.web.token_path, _write_token)
        print(f"dashboard token: created {cfg.web.token_path} (0600)")
    return OK


EXAMPLES = """examples:
  battery-server init                                    # the embedded defaults in $BT_HOME
  battery-server init -c /etc/battery-server/server.toml
  battery-server pubkey -c /etc/battery-server/server.toml > server.pub.hex   # then, for the agents
"""


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "init",
        help="create the server's signing key and dashboard token (once, before the first run)",
        description="Create what the configuration names and is missing: the receipt-signing key ([server] "
        "key), the next one while the key is rotated ([server] next_key) and the dashboard's token "
        f"([web] token_file, unless ${TOKEN_ENV} is set), from the OS RNG, "
        "mode 0600. Existing files are checked and kept, never overwritten; no secret is printed. Every "
        "other command refuses to run without the key rather than make a new one.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(i)
    i.set_defaults(func=init)
