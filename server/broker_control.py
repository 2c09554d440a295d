"""Apply the PKI's access rules to a running mosquitto through its dynamic-security control topic.

The plugin reads its file only at start, so without this a certificate issued afterwards waits for
a restart, and a revoked device that stays connected keeps publishing until the broker restarts
(re-reading the CRL on SIGHUP refuses new connections only). Through the control topic, as the
PKI's own admin certificate, ``apply`` makes the broker's clients and roles those of the files:
a client the files no longer name is deleted, which disconnects it at once, and whatever it does
after reconnecting is refused (a name without rules may do nothing) until the CRL shuts it out.
The broker saves the result to its own file.
"""

from __future__ import annotations

import json
import queue
import ssl
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from battery_trace.server.pki import ADMIN, CONTROL_RESPONSE, CONTROL_TOPIC, Pki, PkiError

from battery_trace.tls import TlsFiles, client_context

TIMEOUT_S = 10.0


class ControlError(PkiError):
    pass


@dataclass
class Applied:
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def parse_address(text: str, default_port: int = 8883) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not a broker address; valid: HOST or HOST:PORT, e.g. broker.example.net:8883")
    return host, int(port)


def apply(pki: Pki, host: str, port: int, timeout_s: float = TIMEOUT_S) -> Applied:
    """Make the running broker's clients and roles those of ``pki.access()``."""
    wanted = pki.access()
    with _Session(pki, host, port, timeout_s) as control:
        listed = control.send([{"command": "listClients"}, {"command": "listRoles"}])
        have_clients = set(listed[0]["data"]["clients"])
        have_roles = set(listed[1]["data"]["roles"])
        clients = {c["username"]: c for c in wanted["clients"]}  # type: ignore[union-attr]
        roles = {r["rolename"]: r for r in wanted["roles"]}  # type: ignore[union-attr]
        gone = sorted(have_clients - set(clients))
        commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": n} for n in gone]
        commands += [{"command": "deleteRole", "rolename": n} for n in sorted(have_roles - set(roles))]
        commands += [{"command": "createRole", **roles[n]} for n in sorted(set(roles) - have_roles)]
        new = sorted(set(clients) - have_clients)
        commands += [{"command": "createClient", **clients[n]} for n in new]
        if commands:
            control.send(commands)
    return Applied(new, gone)


class _Session:
    """One MQTT v5 connection as the admin certificate; ``send`` waits for the plugin's answer."""

    def __init__(self, pki: Pki, host: str, port: int, timeout_s: float) -> None:
        self.where, self.timeout_s = f"{host}:{port}", timeout_s
        cert, key = pki.issued_dir / f"{ADMIN}.pem", pki.issued_dir / f"{ADMIN}.key"
        if not key.exists():
            raise ControlError(f"no admin certificate in {pki.issued_dir} ({ADMIN}.pem); this folder predates it")
        self.answers: queue.Queue[Any] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=ADMIN, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(client_context(TlsFiles(str(pki.ca_cert_path), str(cert), str(key))))
        self.client.on_connect = lambda c, u, f, reason, p: self.answers.put(("connect", reason))
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.answers.put(("subscribe", reasons[0]))
        self.client.on_message = lambda c, u, m: self.answers.put(("response", m.payload))
        self.host, self.port = host, port

    def __enter__(self) -> _Session:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise ControlError(f"cannot reach the broker at {self.where}: {exc}") from None
        self.client.loop_start()
        self._expect("connect", "the broker's CONNACK")
        self.client.subscribe(CONTROL_RESPONSE, qos=1)
        self._expect("subscribe", f"a SUBACK for {CONTROL_RESPONSE}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _expect(self, kind: str, what: str) -> Any:
        try:
            got, value = self.answers.get(timeout=self.timeout_s)
        except queue.Empty:
            late = f"no answer from the broker at {self.where} within {self.timeout_s:g} s ({what})"
            raise ControlError(late) from None
        if got != kind:
            raise ControlError(f"the broker at {self.where} answered {got} when {what} was due")
        if hasattr(value, "is_failure") and value.is_failure:
            raise ControlError(f"the broker at {self.where} refused {ADMIN}: {value} ({what})")
        return value

    def send(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
        answer = json.loads(self._expect("response", "the dynamic-security plugin's response"))
        responses = answer.get("responses", [])
        failed = [f"{r.get('command')}: {r['error']}" for r in responses if r.get("error")]
        if failed or len(responses) != len(commands):
            shown = "; ".join(failed) or f"{len(responses)} answers to {len(commands)} commands"
            raise ControlError(f"the broker at {self.where} did not apply the access rules: {shown}")
        return responses
