"""A site's transport PKI: one CA, the broker's certificate, client certificates for devices,
collectors and their status listeners, the revocation list and the broker's access rules.

Transport certificates say who may talk to the broker and on which topics; they are not the
evidence keys (those are the Ed25519 keys in the registry), so a stolen TLS key alone cannot forge
an event, and a revoked registry key is refused whatever the transport says. Certificates use
ECDSA P-256, which every TLS stack a broker or a gateway runs understands.

The folder keeps the CA key apart from what the broker reads. The broker runs as its own
unprivileged user (mosquitto drops root before it opens a single file), so ``broker/`` is handed
to that user (``chown -R mosquitto: DIR/broker``) and holds nothing else; the folder itself is
0711, so the broker can reach ``broker/`` without being able to list or read the rest:

    ca.pem, ca.key        the site CA (the key, 0600, never leaves this folder)
    index.json            every certificate issued: name, kind, serial, expiry, revocation
    issued/NAME.pem|.key  (0700) the certificates and keys handed to devices, collectors, the admin
    broker/               what the broker reads, written with the folder's owner:
      ca.pem                the CA certificate it checks clients against
      broker.pem|.key       its server certificate
      crl.pem               revoked client certificates; read at start and on SIGHUP
      dynamic-security.json who may use which topic (mosquitto's dynamic security plugin); read at
                            start, changed on a running broker through its control topic
                            (battery_trace.server.broker_control), and saved by the broker
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

Kind = Literal["broker", "device", "collector", "status", "admin"]
KINDS: tuple[Kind, ...] = ("broker", "device", "collector", "status", "admin")
# The broker takes each connection's client id from its certificate's name
# (use_username_as_clientid), so a certificate can hold one session only: its own. A collector
# process has two connections (its intake and its dashboard's status listener), hence two
# certificates, issued together; ``pki`` itself changes a running broker's rules as ADMIN.
ADMIN = "bt-pki-admin"
STATUS_SUFFIX = "-status"
CA_DAYS = 3650
LEAF_DAYS = 730
# The broker refuses every client once the CRL's next update has passed, so it is re-signed on
# every revocation and carries a long horizon, and `battery-server pki renew-crl` (run daily by
# configs/battery-pki-renew-crl.timer) re-signs it once fewer than RENEW_DAYS are left.
CRL_DAYS = 365
RENEW_DAYS = 30
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE = CONTROL_TOPIC + "/response"


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


def _write_public(path: Path, data: bytes) -> None:
    """Written aside and renamed (the broker may read it at any moment), with the folder's owner, so
    that what the broker's user was handed stays its own when root rewrites it."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _own_like_folder(partial)
    partial.replace(path)


def _own_like_folder(path: Path) -> None:
    folder = path.parent.stat()
    if os.geteuid() == 0 and (folder.st_uid, folder.st_gid) != (0, 0):
        os.chown(path, folder.st_uid, folder.st_gid)


def status_name(collector: str) -> str:
    """The name (certificate, client id) of a collector's status listener."""
    return collector + STATUS_SUFFIX


def _pem(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_next_update(path: Path) -> dt.datetime | None:
    """When the broker starts refusing every client unless the CRL at ``path`` is re-signed; None if
    there is no readable CRL (which the broker refuses just the same)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None
    return crl.next_update_utc


# The collector warns (/healthz, the dashboard's health) this long before the broker's CRL runs out;
# the renewal timer re-signs it RENEW_DAYS before.
CRL_WARN_DAYS = 14


def crl_problem(path: Path, now: dt.datetime) -> str | None:
    """What an operator must hear about the broker's CRL, or None while it has time left."""
    next_update = crl_next_update(path)
    if next_update is None:
        return f"the broker's CRL {path} cannot be read; the broker refuses every client without one"
    left = next_update - now
    if left > dt.timedelta(days=CRL_WARN_DAYS):
        return None
    when = "ran out" if left.total_seconds() <= 0 else f"runs out in {left.days} days"
    return (
        f"the broker's CRL {when} ({next_update:%Y-%m-%d %H:%M}Z), after which the broker refuses every "
        "client: battery-server pki renew-crl, then reload the broker"
    )


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca_cert_path = folder / "ca.pem"
        self.ca_key_path = folder / "ca.key"
        self.index_path = folder / "index.json"
        self.issued_dir = folder / "issued"
        self.broker_dir = folder / "broker"
        self.crl_path = self.broker_dir / "crl.pem"
        self.access_path = self.broker_dir / "dynamic-security.json"

    # -- the CA -------------------------------------------------------------------------------------

    def init(self, site: str) -> None:
        if self.ca_key_path.exists():
            raise PkiError(f"{self.ca_key_path} exists: this folder already holds a CA (refusing to replace it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o711)  # the broker's user may reach broker/, and nothing else here
        self.issued_dir.mkdir(mode=0o700, exist_ok=True)
        self.broker_dir.mkdir(mode=0o755, exist_ok=True)
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
        _write_public(self.broker_dir / "ca.pem", _pem(cert))
        self._save([])
        self.issue(ADMIN, "admin")

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
        """A key and a certificate for NAME; returns (certificate, key) paths. A collector's status
        listener gets its own certificate at the same time (``status_name``)."""
        if kind == "collector":
            self._check_free(status_name(name))
        paths = self._issue(name, kind, hosts, days)
        if kind == "collector":
            self._issue(status_name(name), "status", (), days)
        return paths

    def _check_free(self, name: str) -> None:
        if any(i.name == name and i.active for i in self.index()):
            raise PkiError(f"{name} already has an active certificate; revoke it first to issue a new one")

    def _issue(self, name: str, kind: Kind, hosts: tuple[str, ...], days: int) -> tuple[Path, Path]:
        if kind not in KINDS:
            raise PkiError(f"kind {kind!r} is not valid; valid: {', '.join(KINDS)}")
        if kind != "broker":
            problem = topics.device_id_problem(name)
            if problem:  # the certificate's name becomes the broker username the ACL matches topics with
                raise PkiError(f"{kind} name {problem}")
        elif not hosts:
            raise PkiError("a broker certificate needs at least one --host (the name or address clients dial)")
        ca_cert, ca_key = self._ca()
        self._check_free(name)
        index = self.index()
        where = self.broker_dir if kind == "broker" else self.issued_dir
        cert_path, key_path = where / f"{name}.pem", where / f"{name}.key"
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
        _own_like_folder(key_path)  # the broker's key, once broker/ is the broker's
        _write_public(cert_path, _pem(cert))
        index.append(Issued(name, kind, cert.serial_number, cert.not_valid_after_utc.isoformat()))
        self._save(index)
        return cert_path, key_path

    def revoke(self, name: str) -> list[Issued]:
        """Revoke NAME's certificates (a collector's with its status listener's)."""
        index = self.index()
        names = {name} | {status_name(name) for i in index if i.name == name and i.kind == "collector"}
        hits = [i for i in index if i.name in names and i.active]
        if name == ADMIN:
            raise PkiError(f"{ADMIN} is how `pki` changes a running broker; it cannot be revoked here")
        if not hits:
            known = sorted({i.name for i in index if i.active and i.kind != "admin"})
            raise PkiError(f"{name} has no active certificate; active: {', '.join(known) or 'none'}")
        when = _now().isoformat()
        index = [Issued(i.name, i.kind, i.serial, i.not_after, when) if i in hits else i for i in index]
        self._save(index)
        return [i for i in index if i.name in names and i.revoked_at == when]

    # -- what the broker reads ----------------------------------------------------------------------

    def index(self) -> list[Issued]:
        if not self.index_path.exists():
            return []
        return [Issued(**row) for row in json.loads(self.index_path.read_text())["certificates"]]

    def _save(self, index: list[Issued]) -> None:
        self.index_path.write_text(json.dumps({"certificates": [asdict(i) for i in index]}, indent=2) + "\n")
        self.write_crl(index)
        _write_public(self.access_path, (json.dumps(self.access(index), indent=2) + "\n").encode())

    def access(self, index: list[Issued] | None = None) -> dict[str, object]:
        """The broker's access rules for the active certificates."""
        active = [i for i in (self.index() if index is None else index) if i.active]
        return broker_access({kind: sorted(i.name for i in active if i.kind == kind) for kind in ROLE_ACLS})

    def crl_next_update(self) -> dt.datetime | None:
        return crl_next_update(self.crl_path)

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
        _write_public(self.crl_path, _pem(builder.sign(ca_key, hashes.SHA256())))


# Why the broker's access rules are a dynamic-security file and not an acl_file: mosquitto 2.0's
# acl_file never checks a SUBSCRIBE (its check returns "allowed" for every subscription and tests
# only delivery). A device could then join the collectors' shared-subscription group: the broker
# hands it a share of every device's events and drops them at the delivery check, so those events
# are delayed until their agents resend them, for as long as it stays subscribed. The dynamic
# security plugin (shipped with mosquitto 2.0) checks subscriptions, but its 2.0 rules cannot name
# "the client's own username" (%u), so each device gets rules of its own. The plugin reads the
# file only at start; `pki ... --broker` applies a change to a running broker through the
# plugin's control topic instead (battery_trace.server.broker_control).


def _acl(kind: str, topic: str) -> dict[str, object]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def _device_acls(device: str) -> list[dict[str, object]]:
    p = topics.PREFIX
    return [
        _acl("publishClientSend", f"{p}/{device}/events"),
        _acl("publishClientSend", f"{p}/{device}/status"),
        _acl("subscribeLiteral", f"{p}/{device}/receipts"),
        _acl("publishClientReceive", f"{p}/{device}/receipts"),
    ]


# Per kind of certificate: (role name, what it may do, its rules). A device's role is its own.
ROLE_ACLS: dict[str, tuple[str, str, list[dict[str, object]]]] = {
    "collector": (
        "collector",
        "every device's events (as one shared group); writes receipts",
        [
            _acl("subscribeLiteral", topics.SHARED_EVENTS),
            _acl("publishClientReceive", f"{topics.PREFIX}/+/events"),
            _acl("publishClientSend", f"{topics.PREFIX}/+/receipts"),
        ],
    ),
    "status": (
        "status",
        "reads every device's retained status (a collector's dashboard)",
        [
            _acl("subscribeLiteral", f"{topics.PREFIX}/+/status"),
            _acl("publishClientReceive", f"{topics.PREFIX}/+/status"),
        ],
    ),
    "admin": (
        "admin",
        "changes these rules on the running broker (battery-server pki --broker)",
        [
            _acl("publishClientSend", CONTROL_TOPIC),
            _acl("subscribeLiteral", CONTROL_RESPONSE),
            _acl("publishClientReceive", CONTROL_RESPONSE),
        ],
    ),
    "device": ("device-{name}", "publishes its own events and status, reads its own receipts", []),
}


def broker_access(names: dict[str, list[str]]) -> dict[str, object]:
    """The dynamic security plugin's file for the active names by kind. The broker takes each
    client's username from its certificate's common name (``use_identity_as_username``); a name not
    in this file may do nothing (every default is "deny"), so a certificate issued after the broker
    started is shut out, not let in, and a revoked one can do nothing even while still connected."""
    roles: list[dict[str, object]] = []
    clients: list[dict[str, object]] = []
    for kind, (rolename, what, acls) in ROLE_ACLS.items():
        for name in names.get(kind, []):
            role = rolename.format(name=name)
            clients.append({"username": name, "roles": [{"rolename": role}]})
            if kind == "device":
                roles.append({"rolename": role, "textdescription": what, "acls": _device_acls(name)})
        if kind != "device":
            roles.append({"rolename": rolename, "textdescription": what, "acls": acls})
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
