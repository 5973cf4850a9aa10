"""Project certificate authority and role certificates (server | client | admin) for TLS/mTLS.

File layout inside a certificates directory::

    ca.crt  ca.key                  project CA (ca.key stays with the operator)
    server/<name>.crt  .key         one pair per server name
    client/<name>.crt  .key
    admin/<name>.crt   .key

Keys are ECDSA P-256, written atomically with mode 0600; certificates 0644. The role is
recorded in the subject's organizational unit and in the extended key usage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from crossfed.common.crypto.secure_files import (
    SecureFileError,
    check_secret_permissions,
    write_public_file,
    write_secret_file,
)
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "crossfed"
DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 825
DEFAULT_SERVER_NAME = "server"
LOCAL_DNS_NAMES: tuple[str, ...] = ("localhost",)
LOCAL_IPS: tuple[str, ...] = ("127.0.0.1", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_RE = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class CertificateError(Exception):
    """Bad certificate input, a missing/invalid file, or a failed verification."""


class Role(str, Enum):
    """Who a certificate is for; decides its extended key usage."""

    SERVER = "server"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class CertKeyPaths:
    """Where one certificate and its private key live."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateLayout:
    """Paths inside a certificates directory (see module docstring)."""

    root: Path

    @property
    def ca(self) -> CertKeyPaths:
        return CertKeyPaths(cert=self.root / "ca.crt", key=self.root / "ca.key")

    def pair(self, role: Role | str, name: str) -> CertKeyPaths:
        """Paths of the certificate/key for ``role``/``name`` (they may not exist yet)."""
        role = parse_role(role)
        validate_name(name)
        folder = self.root / role.value
        return CertKeyPaths(cert=folder / f"{name}.crt", key=folder / f"{name}.key")


def parse_role(role: Role | str) -> Role:
    """``"client"`` -> ``Role.CLIENT``; an unknown role is a CertificateError."""
    if isinstance(role, Role):
        return role
    try:
        return Role(str(role).lower())
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise CertificateError(f"unknown role {role!r}; expected one of: {allowed}") from None


def validate_name(name: str) -> str:
    """Certificate names become file names: letters, digits, '.', '_', '-' only."""
    if not _NAME_RE.match(name or "") or name in (".", ".."):
        raise CertificateError(
            f"invalid name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _validate_days(days: int) -> int:
    if days <= 0:
        raise CertificateError(f"validity must be a positive number of days, got {days}")
    return days


def _parse_ips(values: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    parsed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_address(value))
        except ValueError:
            raise CertificateError(f"invalid IP address {value!r}") from None
    return parsed


def _validate_dns(values: Iterable[str]) -> list[str]:
    names: list[str] = []
    for value in values:
        if len(value) > 253 or not _DNS_RE.match(value):
            raise CertificateError(f"invalid DNS name {value!r}")
        names.append(value)
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_overwrite(paths: CertKeyPaths, what: str, force: bool) -> None:
    if force:
        return
    existing = [p for p in (paths.cert, paths.key) if p.exists()]
    if existing:
        hint = " (certificates issued by a replaced CA stop working)" if what == "CA" else ""
        raise CertificateError(
            f"{what} already exists at {existing[0]}; pass --force to replace it{hint}"
        )


def create_ca(
    root: Path,
    common_name: str = "crossfed project CA",
    valid_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> CertKeyPaths:
    """Create the project CA in ``root`` (self-signed, may sign end-entity certs only)."""
    _validate_days(valid_days)
    if not common_name.strip():
        raise CertificateError("CA common name must not be empty")
    layout = CertificateLayout(Path(root))
    paths = layout.ca
    _refuse_overwrite(paths, "CA", force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        write_secret_file(paths.key, _key_pem(key))
        write_public_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    except (OSError, SecureFileError) as exc:
        raise CertificateError(f"cannot write CA files in {root}: {exc}") from exc
    return paths


def issue_certificate(
    root: Path,
    role: Role | str,
    name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    valid_days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> CertKeyPaths:
    """Issue a ``role`` certificate called ``name`` signed by the CA in ``root``.

    Every certificate's SANs include localhost, 127.0.0.1 and ::1 (so loopback
    deployments and tests just work) plus ``name`` when it is a valid DNS name and any
    extra ``dns_names``/``ip_addresses``.
    """
    role = parse_role(role)
    validate_name(name)
    _validate_days(valid_days)
    extra_dns = _validate_dns(dns_names)
    extra_ips = _parse_ips(ip_addresses)
    layout = CertificateLayout(Path(root))
    ca_cert = load_certificate(layout.ca.cert)
    ca_key = load_private_key(layout.ca.key)
    paths = layout.pair(role, name)
    _refuse_overwrite(paths, f"{role.value} certificate {name!r}", force)

    dns: list[str] = []
    for candidate in [name, *LOCAL_DNS_NAMES, *extra_dns]:
        if _DNS_RE.match(candidate) and candidate not in dns:
            dns.append(candidate)
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in [*_parse_ips(LOCAL_IPS), *extra_ips]:
        if ip not in ips:
            ips.append(ip)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ip) for ip in ips]

    usage = {
        Role.SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
        Role.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
        Role.ADMIN: [ExtendedKeyUsageOID.CLIENT_AUTH],
    }[role]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    try:
        write_secret_file(paths.key, _key_pem(key))
        write_public_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    except (OSError, SecureFileError) as exc:
        raise CertificateError(f"cannot write certificate files for {name!r}: {exc}") from exc
    return paths


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate, with a clear error when it is missing or not a certificate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(
            f"certificate {path} not found (create it with `crossfed certs init|issue`)"
        ) from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate: {exc}") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key; refuses keys readable by group/others."""
    path = Path(path)
    if not path.exists():
        raise CertificateError(
            f"private key {path} not found (create it with `crossfed certs init|issue`)"
        )
    try:
        check_secret_permissions(path)
    except SecureFileError as exc:
        raise CertificateError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} holds a {type(key).__name__}; expected an EC key")
    return key


def certificate_role(cert: x509.Certificate) -> Role:
    """The role recorded in the subject's OU (a CA certificate has none -> error)."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not values:
        raise CertificateError("certificate carries no crossfed role (no OU in subject)")
    return parse_role(str(values[0].value))


def certificate_name(cert: x509.Certificate) -> str:
    """The subject common name (the name it was issued for)."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        raise CertificateError("certificate has no common name")
    return str(values[0].value)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as lowercase hex (for pinning/display)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def verify_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    now: dt.datetime | None = None,
    role: Role | str | None = None,
) -> None:
    """Check that ``cert`` was signed by ``ca_cert``, is within its validity window and
    (optionally) carries ``role``. Raises CertificateError saying which check failed."""
    moment = now or _now()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            f"certificate {certificate_name(cert)!r} was not issued by this CA: {exc or 'bad signature'}"
        ) from None
    if moment < cert.not_valid_before_utc:
        raise CertificateError(
            f"certificate {certificate_name(cert)!r} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}"
        )
    if moment > cert.not_valid_after_utc:
        raise CertificateError(
            f"certificate {certificate_name(cert)!r} expired at "
            f"{cert.not_valid_after_utc.isoformat()}"
        )
    if role is not None:
        expected = parse_role(role)
        actual = certificate_role(cert)
        if actual is not expected:
            raise CertificateError(
                f"certificate {certificate_name(cert)!r} is a {actual.value} certificate; "
                f"expected {expected.value}"
            )
