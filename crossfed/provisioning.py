"""Idempotent deployment provisioning: the project CA plus one "startup kit" per service.

A kit is the root of the volume a container mounts at ``/var/lib/crossfed``; it receives only
what that service needs (NVIDIA FLARE-style), so no client ever sees ``ca.key`` or another
client's key::

    <kit>/kit/tls/ca.crt + <role>/<name>.crt|.key   TLS material (`crossfed certs` layout)
    <kit>/kit/client.yaml                          client: client_id + one-time enrollment token
    <kit>/kit/credential.json                      client, --client-auth credential: pre-enrolled
    <kit>/kit/admin-credential.json                admin: the admin credential (HMAC secret)
    <kit>/state/credentials.db                     server: tokens/credentials it will verify

Running it again changes nothing that exists (certificates, tokens, credentials are kept), so a
compose init job or a Kubernetes Job may run on every start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml

from crossfed.client.enrollment import CREDENTIAL_FILE
from crossfed.common.crypto.certificates import (
    CertificateError,
    CertificateLayout,
    Role,
    create_ca,
    issue_certificate,
    validate_name,
)
from crossfed.common.crypto.identity import (
    IdentityError,
    create_admin_credential,
    create_enrollment_token,
    enroll,
    validate_client_id,
)
from crossfed.common.crypto.secure_files import (
    SecureFileError,
    write_public_file,
    write_secret_file,
)
from crossfed.server.credential_store import CREDENTIALS_DB, SqliteCredentialStore
from crossfed.server.errors import StateStoreError

log = logging.getLogger(__name__)

KIT_DIR = "kit"
TLS_DIR = f"{KIT_DIR}/tls"
CLIENT_CONFIG_FILE = f"{KIT_DIR}/client.yaml"
CLIENT_CREDENTIAL_FILE = f"{KIT_DIR}/credential.json"
ADMIN_CREDENTIAL_FILE = f"{KIT_DIR}/admin-credential.json"
STATE_DIR = "state"
CACHE_DIR = "cache"
#: Same name as crossfed.server.server_app.CREDENTIALS_DB (a test keeps them equal; importing
#: server_app would pull torch into a job that only writes files).
#: Same name as crossfed.client.enrollment.CREDENTIAL_FILE: where an enrolled client keeps it.
#: The admin principal the server creates for itself at start (crossfed.server.admin_servicer
#: re-keys it when its own file is missing): a kit must not share that id.
SERVER_OWN_ADMIN_ID = "admin"
#: Client certificate the server's own health probe presents when the server requires mTLS.
PROBE_CERT_NAME = "health-probe"


class ProvisioningError(Exception):
    """Provisioning input or files are unusable; the message names the kit/file and the fix."""


class ClientAuth(str, Enum):
    """How a client kit authenticates: a one-time token (enrolls on first start) or a
    pre-issued credential (for stateless pods that may restart anywhere)."""

    TOKEN = "token"
    CREDENTIAL = "credential"


@dataclass(frozen=True)
class KitSpec:
    """One service's kit: who it is and where its volume root is."""

    name: str
    root: Path

    @classmethod
    def parse(cls, text: str) -> KitSpec:
        """``NAME=DIR`` (command-line form) -> KitSpec; a bad form is a ProvisioningError."""
        name, sep, root = text.partition("=")
        if not sep or not name or not root:
            raise ProvisioningError(f"kit {text!r}: expected NAME=DIR, e.g. edge-text=/kits/text")
        return cls(name=name, root=Path(root))


@dataclass(frozen=True)
class ProvisionPlan:
    """Everything `provision` creates; paths are as the provisioning process sees them."""

    pki_dir: Path
    server: KitSpec
    server_dns: tuple[str, ...] = ()
    server_ips: tuple[str, ...] = ()
    clients: tuple[KitSpec, ...] = ()
    admins: tuple[KitSpec, ...] = ()
    client_auth: ClientAuth = ClientAuth.TOKEN
    token_ttl_s: float | None = None
    owner: tuple[int, int] | None = None  # chown kits to uid:gid (the image's non-root user)


@dataclass
class ProvisionReport:
    """What a run created and what it found already in place (for the job's log)."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per item."""
        return [f"created {item}" for item in self.created] + [
            f"kept    {item}" for item in self.kept
        ]


def parse_owner(text: str) -> tuple[int, int]:
    """``"10001:10001"`` -> (10001, 10001); anything else is a ProvisioningError."""
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise ProvisioningError(f"--chown {text!r}: expected numeric UID:GID, e.g. 10001:10001")
    return int(uid), int(gid)


def _check_plan(plan: ProvisionPlan) -> None:
    names = [plan.server.name, *(k.name for k in plan.clients), *(k.name for k in plan.admins)]
    try:
        for kit in (plan.server, *plan.clients, *plan.admins):
            validate_name(kit.name)
        for kit in (*plan.clients, *plan.admins):
            validate_client_id(kit.name)
    except (CertificateError, IdentityError) as exc:
        raise ProvisioningError(f"kit name: {exc}") from None
    reserved = [k.name for k in plan.admins if k.name == SERVER_OWN_ADMIN_ID]
    if reserved:
        raise ProvisioningError(
            f"admin kit name {SERVER_OWN_ADMIN_ID!r} is taken: the server re-keys its own "
            f"{SERVER_OWN_ADMIN_ID!r} principal at start (state/admin.credential.json); "
            "name the kit's admin differently, e.g. operator"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProvisioningError(f"kit names must be unique; repeated: {', '.join(duplicates)}")
    if plan.token_ttl_s is not None and plan.token_ttl_s <= 0:
        raise ProvisioningError(f"token ttl must be positive, got {plan.token_ttl_s}")


def _ensure_pki(plan: ProvisionPlan, report: ProvisionReport) -> CertificateLayout:
    """CA and every certificate in the PKI directory, created only when missing."""
    layout = CertificateLayout(plan.pki_dir)
    if layout.ca.cert.exists() and layout.ca.key.exists():
        report.kept.append(f"CA {layout.ca.cert}")
    else:
        create_ca(plan.pki_dir)
        report.created.append(f"CA {layout.ca.cert}")
    wanted: list[tuple[Role, str, Sequence[str], Sequence[str]]] = [
        (Role.SERVER, plan.server.name, plan.server_dns, plan.server_ips),
        (Role.CLIENT, PROBE_CERT_NAME, (), ()),
        *((Role.CLIENT, kit.name, (), ()) for kit in plan.clients),
        *((Role.ADMIN, kit.name, (), ()) for kit in plan.admins),
    ]
    for role, name, dns, ips in wanted:
        paths = layout.pair(role, name)
        if paths.cert.exists() and paths.key.exists():
            report.kept.append(f"{role.value} certificate {name}")
            continue
        issue_certificate(plan.pki_dir, role, name, dns_names=dns, ip_addresses=ips, force=True)
        report.created.append(f"{role.value} certificate {name}")
    return layout


def _copy_tls(layout: CertificateLayout, kit: KitSpec, pairs: Sequence[tuple[Role, str]]) -> None:
    """Copy ca.crt and the kit's own certificate pairs (keys stay 0600) into kit/tls."""
    target = CertificateLayout(kit.root / TLS_DIR)
    write_public_file(target.ca.cert, layout.ca.cert.read_bytes())
    for role, name in pairs:
        source, dest = layout.pair(role, name), target.pair(role, name)
        write_public_file(dest.cert, source.cert.read_bytes())
        write_secret_file(dest.key, source.key.read_bytes())


def _client_identity(
    store: SqliteCredentialStore, plan: ProvisionPlan, kit: KitSpec, report: ProvisionReport
) -> None:
    """Give a client kit a way to authenticate, unless it already has one."""
    if plan.client_auth is ClientAuth.CREDENTIAL:
        path = kit.root / CLIENT_CREDENTIAL_FILE
        if path.exists():
            report.kept.append(f"credential of {kit.name}")
            return
        issued = create_enrollment_token(store, ttl_s=plan.token_ttl_s, client_id=kit.name)
        enroll(store, issued.token.reveal()).save(path)
        report.created.append(f"credential of {kit.name} ({path})")
        return
    config = kit.root / CLIENT_CONFIG_FILE
    if config.exists():
        report.kept.append(f"enrollment config of {kit.name}")
        return
    if (kit.root / STATE_DIR / CREDENTIAL_FILE).exists():
        report.kept.append(f"{kit.name} is enrolled already (no token minted)")
        return
    issued = create_enrollment_token(store, ttl_s=plan.token_ttl_s, client_id=kit.name)
    body = {"client_id": kit.name, "enrollment_token": issued.token.reveal()}
    write_secret_file(config, yaml.safe_dump(body, sort_keys=True).encode("utf-8"))
    report.created.append(f"one-time enrollment token for {kit.name} ({config})")


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Hand a kit to the image's non-root user (only possible, and only needed, as root)."""
    if os.geteuid() != 0:
        log.info("not root: leaving ownership of %s as it is", root)
        return
    uid, gid = owner
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def provision(plan: ProvisionPlan) -> ProvisionReport:
    """Create what is missing of the PKI, the kits and the server's credential database."""
    _check_plan(plan)
    report = ProvisionReport()
    try:
        layout = _ensure_pki(plan, report)
        _copy_tls(
            layout, plan.server, [(Role.SERVER, plan.server.name), (Role.CLIENT, PROBE_CERT_NAME)]
        )
        for kit in plan.clients:
            _copy_tls(layout, kit, [(Role.CLIENT, kit.name)])
            (kit.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
            (kit.root / CACHE_DIR).mkdir(parents=True, exist_ok=True)
        for kit in plan.admins:
            _copy_tls(layout, kit, [(Role.ADMIN, kit.name)])
        db = plan.server.root / STATE_DIR / CREDENTIALS_DB
        store = SqliteCredentialStore(db)
        try:
            for kit in plan.clients:
                _client_identity(store, plan, kit, report)
            for kit in plan.admins:
                path = kit.root / ADMIN_CREDENTIAL_FILE
                if path.exists():
                    report.kept.append(f"admin credential of {kit.name}")
                    continue
                create_admin_credential(store, kit.name).save(path)
                report.created.append(f"admin credential of {kit.name} ({path})")
        finally:
            store.close()
        if plan.owner is not None:
            for kit in (plan.server, *plan.clients, *plan.admins):
                _chown_tree(kit.root, plan.owner)
    except (CertificateError, IdentityError, SecureFileError, StateStoreError) as exc:
        raise ProvisioningError(str(exc)) from None
    except OSError as exc:
        raise ProvisioningError(f"cannot write {exc.filename or 'a kit file'}: {exc.strerror}")
    return report
