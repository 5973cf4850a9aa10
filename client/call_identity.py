"""Who this client is on every RPC: the single place that turns the client's identity into
call metadata in insecure mode (a credentialed client signs its calls instead)."""

from __future__ import annotations

from crossfed.common.crypto.identity import HEADER_CLIENT_ID


def identity_metadata(client_id: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata identifying the caller; empty before the server has assigned an id."""
    if not client_id:
        return ()
    return ((HEADER_CLIENT_ID, client_id),)
