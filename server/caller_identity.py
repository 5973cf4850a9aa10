"""Who is calling: the ONE place the Coordinator servicer learns a caller's client id.

With authentication on, the id is the one `crossfed.common.crypto.rpc_auth`'s interceptor
verified; in insecure mode (explicit flag only) it is the plain ``x-crossfed-client-id``
metadata header the client sends.
"""

from __future__ import annotations

import grpc
from crossfed.common.crypto.identity import HEADER_CLIENT_ID
from crossfed.common.crypto.rpc_auth import NotAuthenticatedError, authenticated_identity


def caller_client_id(context: grpc.ServicerContext, authenticated: bool) -> str:
    """The caller's client id ("" when an insecure caller sent none)."""
    if authenticated:
        try:
            return authenticated_identity(context).client_id
        except NotAuthenticatedError:
            return ""
    for key, value in context.invocation_metadata() or ():
        if key == HEADER_CLIENT_ID and isinstance(value, str):
            return value
    return ""
