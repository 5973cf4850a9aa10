"""gRPC TLS credentials built from a certificates directory (see certificates.py layout):
TLS by default, mTLS when the server requires client certificates."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from crossfed.common.crypto.certificates import (
    DEFAULT_SERVER_NAME,
    CertificateError,
    CertificateLayout,
    Role,
    load_certificate,
    load_private_key,
    parse_role,
    verify_certificate,
)

INSECURE_WARNING = (
    "running WITHOUT TLS (--insecure): traffic, credentials and model updates can be read "
    "and altered on the network; use only for local development"
)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(
            f"{path} not found (create it with `crossfed certs init|issue`)"
        ) from None


def server_credentials(
    certs_dir: Path,
    server_name: str = DEFAULT_SERVER_NAME,
    require_client_auth: bool = False,
) -> grpc.ServerCredentials:
    """TLS server credentials from ``certs_dir/server/<server_name>.{crt,key}``.

    With ``require_client_auth`` (mTLS) the handshake fails for clients that do not
    present a certificate signed by the project CA.
    """
    layout = CertificateLayout(Path(certs_dir))
    paths = layout.pair(Role.SERVER, server_name)
    ca_cert = load_certificate(layout.ca.cert)
    verify_certificate(load_certificate(paths.cert), ca_cert, role=Role.SERVER)
    load_private_key(paths.key)  # permission and format checks with a clear message
    return grpc.ssl_server_credentials(
        [(_read(paths.key), _read(paths.cert))],
        root_certificates=_read(layout.ca.cert),
        require_client_auth=require_client_auth,
    )


def channel_credentials(
    certs_dir: Path,
    client_name: str | None = None,
    role: Role | str = Role.CLIENT,
) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting the project CA in ``certs_dir``.

    With ``client_name`` the client also presents ``certs_dir/<role>/<client_name>``
    (needed when the server runs mTLS).
    """
    layout = CertificateLayout(Path(certs_dir))
    root = _read(layout.ca.cert)
    load_certificate(layout.ca.cert)
    if client_name is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    paths = layout.pair(parse_role(role), client_name)
    verify_certificate(load_certificate(paths.cert), load_certificate(layout.ca.cert), role=role)
    load_private_key(paths.key)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(paths.key),
        certificate_chain=_read(paths.cert),
    )


def warn_insecure(logger: logging.Logger | None = None) -> None:
    """Log the standard warning for an explicitly requested plaintext channel/server."""
    (logger or logging.getLogger("crossfed.security")).warning(INSECURE_WARNING)
