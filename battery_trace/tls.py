"""TLS for the MQTT clients of both ends (agents and collectors).

With a CA configured a client speaks only TLS: the broker must present a certificate from that CA
for the name the client dials, a client certificate is presented when one is configured (mutual
TLS), and nothing ever falls back to plaintext. Without a CA the client speaks plaintext, which is
for a loopback broker on the same machine only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from battery_trace.settings import Section


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str | None = None  # the client certificate (mutual TLS), with its key
    key: str | None = None


def client_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.ca)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert:
        context.load_cert_chain(files.cert, files.key)
    return context


def load(section: Section) -> TlsFiles | None:
    """``tls_ca``, ``tls_cert`` and ``tls_key`` of a config's [mqtt] section, each an existing file."""
    ca, cert, key = (_existing(section, k) for k in ("tls_ca", "tls_cert", "tls_key"))
    if (cert or key) and not ca:
        raise section.error("tls_ca", "is required when tls_cert or tls_key is set (TLS is all or nothing)")
    if bool(cert) != bool(key):
        raise section.error("tls_key", "tls_cert and tls_key go together (a client certificate and its key)")
    return TlsFiles(ca, cert, key) if ca else None


def _existing(s: Section, key: str) -> str | None:
    path = s.path(key, None)
    if path is not None and not path.is_file():
        raise s.error(key, f"file {path} does not exist")
    return str(path) if path else None
