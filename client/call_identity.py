"""Who this client is on every RPC: the single place that turns the client's identity into
call metadata (to be replaced by crossfed.common.crypto.identity's per-call signing)."""

from __future__ import annotations

CLIENT_ID_METADATA_KEY = "x-crossfed-client-id"


def identity_metadata(client_id: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata identifying the caller; empty before the server has assigned an id."""
    if not client_id:
        return ()
    return ((CLIENT_ID_METADATA_KEY, client_id),)
