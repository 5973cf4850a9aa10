"""Under mTLS, the TLS client certificate and the signing credential must name the same
principal: a client's certificate (role OU=client) has the client id as its common name, and
an admin credential needs an admin certificate. Otherwise one client's certificate would carry
another client's (stolen) credential, or an admin credential any client's certificate."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from crossfed.common.crypto.certificates import (
    CertificateError,
    Role,
    certificate_name,
    certificate_role,
)
from crossfed.common.crypto.identity import Identity, PrincipalRole
from cryptography import x509


@dataclass(frozen=True)
class PeerCertificate:
    """Who the verified TLS client certificate of a call was issued to."""

    name: str
    role: Role


@functools.lru_cache(maxsize=1024)
def _parse(pem: bytes) -> PeerCertificate | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return PeerCertificate(certificate_name(cert), certificate_role(cert))
    except (ValueError, CertificateError):
        return None


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The call's client certificate (the TLS handshake verified it against the CA), or None
    when the peer presented none or one without a crossfed name and role."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return _parse(bytes(pems[0])) if pems else None


def binding_problem(context: grpc.ServicerContext, identity: Identity) -> str | None:
    """Why the call's certificate does not match its signing ``identity`` (None: it does)."""
    cert = peer_certificate(context)
    if cert is None:
        return "mTLS: the call carries no crossfed client certificate"
    if identity.role is PrincipalRole.ADMIN:
        if cert.role is not Role.ADMIN:
            return (
                f"mTLS: an admin credential needs an admin certificate; the call's "
                f"certificate is {cert.role.value} {cert.name!r}"
            )
        return None
    if cert.role is not Role.CLIENT or cert.name != identity.client_id:
        return (
            f"mTLS: the call is signed as client {identity.client_id!r} but its TLS "
            f"certificate belongs to {cert.role.value} {cert.name!r}"
        )
    return None
