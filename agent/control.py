"""The agent's local HTTP endpoint, on a loopback port only: ``/metrics`` (Prometheus text format),
``/healthz``, ``/status`` (JSON) and ``POST /confirm`` (a technician's confirmation at a rig).

Deliberately tiny (no web framework on an edge device): one request per connection, bounded request
size, nothing but these four paths.

Loopback is not a boundary against a web browser on the same machine: any page it shows can POST to
127.0.0.1, and a page whose own name resolves to 127.0.0.1 even passes the same-origin rule. So
``/confirm``, the one path that signs something, also requires the install's secret (a file only the
agent's user, or a group it is given to, can read), a ``Host`` naming this endpoint, no foreign
``Origin`` and a JSON body (which a page cannot send without a CORS preflight this server never
answers). The reads stay open: they sign nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024
SECRET_HEADER = "authorization"  # "Bearer <secret>"


class SecretError(Exception):
    """The control secret file cannot be made or used; the message names the file and the fix."""


def create_secret(path: Path) -> str:
    """The install's control secret: read it, or create it (mode 0600, from the OS RNG) when absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path)
    except OSError as exc:
        raise SecretError(f"control secret {path}: cannot create it: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    except OSError as exc:
        path.unlink(missing_ok=True)  # never leave a half-written secret for the next start to trip on
        raise SecretError(f"control secret {path}: cannot write it: {exc.strerror}") from None
    return read_secret(path)


def read_secret(path: Path) -> str:
    """The secret in ``path``; refused when anyone but its owner and group can read or change it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except OSError as exc:
        raise SecretError(
            f"control secret {path}: cannot read it ({exc.strerror}); `battery-agent run` creates it at start, "
            "and only its user (or a group it is given to) may read it"
        ) from None
    if mode & 0o007:
        raise SecretError(f"control secret {path}: others may access it (mode {mode:04o}); chmod 600 (or 640) it")
    if len(text) < 32:
        raise SecretError(f"control secret {path}: too short to be one; delete it and restart the agent")
    return text


def metric_lines(name: str, help_text: str, kind: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
    return lines


class ControlServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Callable[[], str],
        status: Callable[[], dict[str, Any]],
        healthy: Callable[[], tuple[bool, str]],
        confirm: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        secret: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.metrics, self.status, self.healthy, self.confirm = metrics, status, healthy, confirm
        self.secret = secret
        self.refused: Counter[str] = Counter()  # POST /confirm refused, by reason
        # The names a request from this machine's own tools gives: a literal loopback address, or localhost.
        shown = f"[{host}]" if ":" in host else host
        self.hosts = {f"{shown}:{port}", f"localhost:{port}"}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("metrics and status on http://%s:%d/", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_REQUEST:
                raise ValueError("body too large")
            body = await asyncio.wait_for(reader.readexactly(length), timeout=5) if length else b""
            status, content_type, payload = self._route(method, path.split("?", 1)[0], headers, body)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, UnicodeDecodeError):
            status, content_type, payload = 400, "text/plain", b"bad request\n"
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    def _refusal(self, headers: dict[str, str]) -> tuple[int, str] | None:
        """Why a POST /confirm must not be signed (status, reason), or None. Never echoes the secret."""
        if headers.get("host") not in self.hosts:
            return 421, "host"
        origin = headers.get("origin")
        if origin is not None and origin.removeprefix("http://") not in self.hosts:
            return 403, "origin"
        if headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
            return 415, "content_type"
        scheme, _, given = headers.get(SECRET_HEADER, "").partition(" ")
        if (
            self.secret is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(given.encode(), self.secret.encode())
        ):
            return 401, "secret"
        return None

    def _confirm(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        refusal = self._refusal(headers)
        if refusal is not None:
            code, reason = refusal
            self.refused[reason] += 1
            log.warning(
                "refused POST /confirm (%s; origin %r, host %r)", reason, headers.get("origin"), headers.get("host")
            )
            message = {
                "host": "the Host header must name this endpoint (127.0.0.1:PORT)",
                "origin": "confirmations are not taken from web pages",
                "content_type": "the body must be application/json",
                "secret": "missing or wrong control secret (Authorization: Bearer <the secret file's content>)",
            }[reason]
            return code, "application/json", json.dumps({"error": message}).encode()
        assert self.confirm is not None
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
            return 200, "application/json", json.dumps(self.confirm(request)).encode()
        except ValueError as exc:
            return 422, "application/json", json.dumps({"error": str(exc)}).encode()

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        if method == "GET" and path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        if method == "GET" and path == "/healthz":
            ok, why = self.healthy()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if method == "GET" and path == "/status":
            return 200, "application/json", json.dumps(self.status(), default=str).encode()
        if method == "POST" and path == "/confirm" and self.confirm is not None:
            return self._confirm(headers, body)
        return 404, "text/plain", b"not found; try /metrics, /healthz or /status\n"
