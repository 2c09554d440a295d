"""The agent's local HTTP endpoint, on a loopback port only: ``/metrics`` (Prometheus text format),
``/healthz``, ``/status`` (JSON) and ``POST /confirm`` (a technician's confirmation at a rig).

Deliberately tiny (no web framework on an edge device): one request per connection, bounded request
size, nothing but these four paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


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
    ) -> None:
        self.host, self.port = host, port
        self.metrics, self.status, self.healthy, self.confirm = metrics, status, healthy, confirm
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
            status, content_type, payload = self._route(method, path.split("?", 1)[0], body)
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

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if method == "GET" and path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        if method == "GET" and path == "/healthz":
            ok, why = self.healthy()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if method == "GET" and path == "/status":
            return 200, "application/json", json.dumps(self.status(), default=str).encode()
        if method == "POST" and path == "/confirm" and self.confirm is not None:
            try:
                request = json.loads(body or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object")
                return 200, "application/json", json.dumps(self.confirm(request)).encode()
            except ValueError as exc:
                return 422, "application/json", json.dumps({"error": str(exc)}).encode()
        return 404, "text/plain", b"not found; try /metrics, /healthz or /status\n"
