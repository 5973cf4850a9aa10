"""Client identity on disk: the per-client secret (obtained once by exchanging an enrollment
token through the Enroll RPC, stored 0600) or, on servers without authentication, a stable
generated client id, so a restarted daemon is the same client."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from crossfed.client.backoff import Backoff
from crossfed.client.errors import (
    ClientConfigError,
    ServerUnreachableError,
    TransientTransportError,
)
from crossfed.client.transport import CoordinatorTransport
from crossfed.common.crypto.identity import (
    ClientCredential,
    CredentialFileError,
    IdentityError,
    validate_client_id,
)
from crossfed.common.crypto.secure_files import write_public_file
from crossfed.v1 import coordinator_pb2

log = logging.getLogger(__name__)

CREDENTIAL_FILE = "credential.json"
CLIENT_ID_FILE = "client_id"


def stored_client_id(state_dir: Path, requested: str | None = None) -> str:
    """The client id kept in ``state_dir`` (created from ``requested`` or at random once)."""
    path = Path(state_dir) / CLIENT_ID_FILE
    if path.exists():
        existing = path.read_text("utf-8").strip()
        if requested and requested != existing:
            raise ClientConfigError(
                f"state dir {state_dir} belongs to client {existing!r}, not {requested!r}; "
                "use another --state-dir"
            )
        return validate_id(existing)
    client_id = validate_id(requested or f"client-{secrets.token_hex(6)}")
    write_public_file(path, client_id.encode("utf-8"))
    return client_id


def validate_id(client_id: str) -> str:
    """A client id the server will accept, or a ClientConfigError saying why not."""
    try:
        return validate_client_id(client_id)
    except IdentityError as exc:
        raise ClientConfigError(str(exc)) from exc


def credential_path(state_dir: Path) -> Path:
    """Where the client's secret lives inside its state dir."""
    return Path(state_dir) / CREDENTIAL_FILE


def load_credential(state_dir: Path) -> ClientCredential | None:
    """The stored credential, None if there is none; a bad/unsafe file is a config error."""
    path = credential_path(state_dir)
    if not path.exists():
        return None
    try:
        return ClientCredential.load(path)
    except CredentialFileError as exc:
        raise ClientConfigError(str(exc)) from exc


def enroll_with_token(
    transport: CoordinatorTransport,
    state_dir: Path,
    token: str,
    requested_client_id: str | None,
    backoff: Backoff,
    sleep: Callable[[float], None] | None = None,
) -> ClientCredential:
    """Run Enroll (retrying transient failures) and persist the credential 0600."""
    wait = sleep or threading.Event().wait
    while True:
        try:
            response = transport.enroll(
                coordinator_pb2.EnrollRequest(
                    enrollment_token=token, requested_client_id=requested_client_id or ""
                )
            )
            break
        except TransientTransportError as exc:
            delay = backoff.next_delay()
            backoff.record_wait(delay)
            if backoff.exhausted:
                raise ServerUnreachableError(f"enrollment failed: {exc}") from exc
            log.warning("enrollment failed (%s); retrying in %.2fs", exc, delay)
            wait(delay)
    backoff.reset()
    if not response.client_id or len(response.client_secret) < 16:
        raise ClientConfigError("server answered Enroll without a usable client id/secret")
    credential = ClientCredential(
        client_id=response.client_id, secret=bytes(response.client_secret)
    )
    credential.save(credential_path(state_dir))
    log.info("enrolled as %s; credential stored in %s", credential.client_id, state_dir)
    return credential
