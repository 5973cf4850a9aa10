"""Client credentials: load the per-client secret from the state dir, or obtain it once by
exchanging an enrollment token (Enroll RPC) and store it 0600 for every later start."""

from __future__ import annotations

import logging
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
from crossfed.common.crypto.identity import ClientCredential, CredentialFileError
from crossfed.v1 import coordinator_pb2

log = logging.getLogger(__name__)

CREDENTIAL_FILE = "credential.json"


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
