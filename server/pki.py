"""A site's transport PKI: one CA, the broker's certificate, client certificates for devices and
collectors, the revocation list and the broker's ACL, all in one folder.

Transport certificates say who may talk to the broker and on which topics; they are not the
evidence keys (those are the Ed25519 keys in the registry), so a stolen TLS key alone cannot forge
an event, and a revoked registry key is refused whatever the transport says. Certificates use
ECDSA P-256, which every TLS stack a broker or a gateway runs understands.

The folder (mode 0700):

    ca.pem, ca.key        the site CA (the key never leaves this folder)
    crl.pem               revoked client certificates; the broker reads it at start and on SIGHUP
    dynamic-security.json who may use which topic (mosquitto's dynamic security plugin); read at start
    index.json            every certificate issued: name, kind, serial, expiry, revocation
    issued/NAME.pem|.key  the certificates and keys handed to the broker, devices and collectors
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from battery_trace.protocol import topics
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Kind = Literal["broker", "device", "collector"]
KINDS: tuple[Kind, ...] = ("broker", "device", "collector")
CA_DAYS = 3650
LEAF_DAYS = 730
# The broker refuses every client once the CRL's next update has passed, so it is re-signed on
# every revocation and carries a long horizon, and `battery-server pki renew-crl` (run daily by
# configs/battery-pki-renew-crl.timer) re-signs it once fewer than RENEW_DAYS are left.
CRL_DAYS = 365
RENEW_DAYS = 30


class PkiError(Exception):
    pass


@dataclass(frozen=True)
class Issued:
    name: str
    kind: Kind
    serial: int
    not_after: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS#8 PEM, created 0600 and never over an existing file."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca_cert_path = folder / "ca.pem"
        self.ca_key_path = folder / "ca.key"
        self.crl_path = folder / "crl.pem"
        self.access_path = folder / "dynamic-security.json"
        self.index_path = folder / "index.json"
        self.issued_dir = folder / "issued"

    # -- the CA -------------------------------------------------------------------------------------

    def init(self, site: str) -> None:
        if self.ca_key_path.exists():
            raise PkiError(f"{self.ca_key_path} exists: this folder already holds a CA (refusing to replace it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self.issued_dir.mkdir(exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, site),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{site} battery-trace CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_path, key)
        self.ca_cert_path.write_bytes(_pem(cert))
        self._save([])

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.ca_key_path.exists():
            raise PkiError(f"no CA in {self.folder}; create one with: battery-server pki init --dir {self.folder}")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path} is not an EC private key")
        return cert, key

    # -- issuing and revoking -----------------------------------------------------------------------

    def issue(self, name: str, kind: Kind, hosts: tuple[str, ...] = (), days: int = LEAF_DAYS) -> tuple[Path, Path]:
        """A key and a certificate for NAME; returns (certificate, key) paths."""
        if kind not in KINDS:
            raise PkiError(f"kind {kind!r} is not valid; valid: {', '.join(KINDS)}")
        if kind != "broker":
            problem = topics.device_id_problem(name)
            if problem:  # the certificate's name becomes the broker username the ACL matches topics with
                raise PkiError(f"{kind} name {problem}")
        elif not hosts:
            raise PkiError("a broker certificate needs at least one --host (the name or address clients dial)")
        ca_cert, ca_key = self._ca()
        index = self.index()
        if any(i.name == name and i.active for i in index):
            raise PkiError(f"{name} already has an active certificate; revoke it first to issue a new one")
        cert_path, key_path = self.issued_dir / f"{name}.pem", self.issued_dir / f"{name}.key"
        for stale in (cert_path, key_path):  # only a revoked certificate's files can be here
            stale.unlink(missing_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(key_path, key)
        cert_path.write_bytes(_pem(cert))
        index.append(Issued(name, kind, cert.serial_number, cert.not_valid_after_utc.isoformat()))
        self._save(index)
        return cert_path, key_path

    def revoke(self, name: str) -> list[Issued]:
        index = self.index()
        hits = [i for i in index if i.name == name and i.active]
        if not hits:
            known = sorted({i.name for i in index if i.active})
            raise PkiError(f"{name} has no active certificate; active: {', '.join(known) or 'none'}")
        when = _now().isoformat()
        index = [Issued(i.name, i.kind, i.serial, i.not_after, when) if i in hits else i for i in index]
        self._save(index)
        return [i for i in index if i.name == name and i.revoked_at == when]

    # -- what the broker reads ----------------------------------------------------------------------

    def index(self) -> list[Issued]:
        if not self.index_path.exists():
            return []
        return [Issued(**row) for row in json.loads(self.index_path.read_text())["certificates"]]

    def _save(self, index: list[Issued]) -> None:
        self.index_path.write_text(json.dumps({"certificates": [asdict(i) for i in index]}, indent=2) + "\n")
        self.write_crl(index)
        active = [i for i in index if i.active]
        access = broker_access(
            sorted(i.name for i in active if i.kind == "device"),
            sorted(i.name for i in active if i.kind == "collector"),
        )
        self.access_path.write_text(json.dumps(access, indent=2) + "\n")

    def crl_next_update(self) -> dt.datetime | None:
        """When the broker starts refusing every client unless the CRL is re-signed; None if there is
        no readable CRL (which the broker refuses just the same)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        return crl.next_update_utc

    def renew_crl(self, within_days: int = RENEW_DAYS) -> tuple[bool, dt.datetime]:
        """Re-sign the CRL if it expires within ``within_days`` (or cannot be read); returns whether it
        was re-signed, and its next update."""
        next_update = self.crl_next_update()
        if next_update is not None and next_update - _now() > dt.timedelta(days=within_days):
            return False, next_update
        self.write_crl()
        renewed = self.crl_next_update()
        assert renewed is not None  # just written
        return True, renewed

    def write_crl(self, index: list[Issued] | None = None, now: dt.datetime | None = None) -> None:
        ca_cert, ca_key = self._ca()
        now = now or _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
        )
        for i in index if index is not None else self.index():
            if i.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(i.serial)
                    .revocation_date(dt.datetime.fromisoformat(i.revoked_at))
                    .build()
                )
        self.crl_path.write_bytes(_pem(builder.sign(ca_key, hashes.SHA256())))


# Why the broker's access rules are a dynamic-security file and not an acl_file: mosquitto 2.0's
# acl_file never checks a SUBSCRIBE (its check returns "allowed" for every subscription and tests
# only delivery). A device could then join the collectors' shared-subscription group: the broker
# hands it a share of every device's events and drops them at the delivery check, so those events
# are delayed until their agents resend them, for as long as it stays subscribed. The dynamic
# security plugin (shipped with mosquitto 2.0) checks subscriptions, but its 2.0 rules cannot name
# "the client's own username" (%u), so each device gets rules of its own, and the plugin reads the
# file only at start: restart the broker after issuing or revoking a certificate.


def _acl(kind: str, topic: str) -> dict[str, object]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def broker_access(devices: list[str], collectors: list[str]) -> dict[str, object]:
    """The dynamic security plugin's file. The broker takes each client's username from its
    certificate's common name (``use_identity_as_username``); a name not in this file may do nothing
    (every default is "deny"), so a certificate issued after the broker started is shut out, not let in."""
    p = topics.PREFIX
    roles: list[dict[str, object]] = [
        {
            "rolename": "collector",
            "textdescription": "every device's events (as one shared group) and statuses; writes receipts",
            "acls": [
                _acl("subscribeLiteral", topics.SHARED_EVENTS),
                _acl("subscribeLiteral", f"{p}/+/status"),
                _acl("publishClientReceive", f"{p}/+/events"),
                _acl("publishClientReceive", f"{p}/+/status"),
                _acl("publishClientSend", f"{p}/+/receipts"),
            ],
        }
    ]
    clients: list[dict[str, object]] = [{"username": c, "roles": [{"rolename": "collector"}]} for c in collectors]
    for device in devices:
        roles.append(
            {
                "rolename": f"device-{device}",
                "textdescription": "publishes its own events and status, reads its own receipts",
                "acls": [
                    _acl("publishClientSend", f"{p}/{device}/events"),
                    _acl("publishClientSend", f"{p}/{device}/status"),
                    _acl("subscribeLiteral", f"{p}/{device}/receipts"),
                    _acl("publishClientReceive", f"{p}/{device}/receipts"),
                ],
            }
        )
        clients.append({"username": device, "roles": [{"rolename": f"device-{device}"}]})
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
