"""gRPC glue for identity.py: a client interceptor that signs every call (its request body
included: a unary request, or a client stream's first message), and a server interceptor
that authenticates before any handler runs.

Server side: ``ServerAuthInterceptor(verifier, public_methods, admin_methods)`` aborts
with UNAUTHENTICATED (missing/forged/expired/replayed/revoked credential, or a body other than
the signed one) or PERMISSION_DENIED (client credential on an admin method; under mTLS with
``bind_certificate``, a certificate that is not the signer's); handlers read the caller via
``authenticated_identity(context)``. (A call-credentials plugin cannot see the request body,
so calls are signed by the interceptor only.) Method patterns are full names
("/crossfed.v1.Coordinator/Enroll") or service prefixes ending in "/"
("/crossfed.v1.Admin/"). Anything neither public nor admin needs any valid credential.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from crossfed.common.crypto.identity import (
    HEADER_BODY_SHA256,
    AuthenticationError,
    ClientCredential,
    Identity,
    RequestVerifier,
    body_digest,
    sign_request,
)
from crossfed.common.crypto.nonce_journal import NonceJournalError
from crossfed.common.crypto.peer_certificate import binding_problem

COORDINATOR_PUBLIC_METHODS: tuple[str, ...] = (
    "/crossfed.v1.Coordinator/Enroll",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
ADMIN_METHODS: tuple[str, ...] = ("/crossfed.v1.Admin/",)


class NotAuthenticatedError(Exception):
    """A handler asked for the caller's identity but the request was not authenticated
    (public method, or the server was built without ServerAuthInterceptor)."""


class MethodPatternError(ValueError):
    """A public/admin method pattern is not '/pkg.Service/Method' or '/pkg.Service/'."""


_identities: weakref.WeakKeyDictionary[Any, Identity] = weakref.WeakKeyDictionary()
_identities_lock = threading.Lock()


def authenticated_identity(context: grpc.ServicerContext) -> Identity:
    """The Identity the interceptor verified for this call; raises NotAuthenticatedError."""
    with _identities_lock:
        identity = _identities.get(context)
    if identity is None:
        raise NotAuthenticatedError(
            "this call carries no authenticated identity (public method, or the server "
            "was started without ServerAuthInterceptor)"
        )
    return identity


def _bind_identity(context: grpc.ServicerContext, identity: Identity) -> None:
    with _identities_lock:
        _identities[context] = identity


class _MethodSet:
    """Exact full method names plus service prefixes (patterns ending in '/')."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.prefixes: tuple[str, ...] = ()
        prefixes: list[str] = []
        for pattern in patterns:
            if not pattern.startswith("/") or pattern.count("/") != 2:
                raise MethodPatternError(
                    f"method pattern {pattern!r} must look like '/pkg.Service/Method' "
                    "or '/pkg.Service/'"
                )
            if pattern.endswith("/"):
                prefixes.append(pattern)
            else:
                self.exact.add(pattern)
        self.prefixes = tuple(prefixes)

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and (
            method in self.exact or method.startswith(self.prefixes)
        )


def _abort_handler(
    like: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``like`` that only aborts."""

    def abort(_request: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    request_streaming = bool(like is not None and like.request_streaming)
    response_streaming = bool(like is not None and like.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class _FirstBody:
    """Digest of the first request message of one call, taken where gRPC deserializes it."""

    def __init__(self, deserialize: Callable[[bytes], Any] | None) -> None:
        self._deserialize = deserialize
        self.digest: str | None = None

    def __call__(self, raw: bytes) -> Any:
        if self.digest is None:
            self.digest = body_digest(raw)
        return self._deserialize(raw) if self._deserialize is not None else raw


def _with_identity(
    handler: grpc.RpcMethodHandler,
    identity: Identity,
    signed_body: str,
    bind_certificate: bool,
) -> grpc.RpcMethodHandler:
    """Wrap the real behaviour so authenticated_identity(context) works inside it, after the
    checks that need the call itself: the request body (a client stream's first message)
    must be the one the signature covers, and under mTLS the certificate must match."""
    first = _FirstBody(handler.request_deserializer)

    def check(context: grpc.ServicerContext) -> None:
        if first.digest != signed_body:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the request body is not the one its signature covers (replayed or altered)",
            )
        if bind_certificate:
            problem = binding_problem(context, identity)
            if problem is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        _bind_identity(context, identity)

    def unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behavior(request, context)

        return wrapped

    def streamed(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            head = next(requests, None)
            check(context)
            return behavior(_chain(head, requests), context)

        return wrapped

    kw = {"request_deserializer": first, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary(handler.unary_stream), **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(streamed(handler.stream_unary), **kw)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streamed(handler.stream_stream), **kw)
    return handler


def _chain(head: Any, rest: Iterator[Any]) -> Iterator[Any]:
    if head is not None:
        yield head
    yield from rest


class ServerAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every non-public RPC before its handler runs (default deny)."""

    def __init__(
        self,
        verifier: RequestVerifier,
        public_methods: Iterable[str] = COORDINATOR_PUBLIC_METHODS,
        admin_methods: Iterable[str] = ADMIN_METHODS,
        bind_certificate: bool = False,
    ) -> None:
        self._verifier = verifier
        self._public = _MethodSet(public_methods)
        self._admin = _MethodSet(admin_methods)
        self._bind_certificate = bind_certificate  # mTLS: certificate must match the signer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self._public and method not in self._admin:
            return continuation(handler_call_details)
        metadata: dict[str, str] = {}
        for key, value in handler_call_details.invocation_metadata or ():
            if isinstance(value, str):
                metadata.setdefault(key, value)
        handler = continuation(handler_call_details)
        try:
            identity = self._verifier.verify(method, metadata)
        except AuthenticationError as exc:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except NonceJournalError as exc:  # the server cannot remember the nonce: not now
            return _abort_handler(handler, grpc.StatusCode.UNAVAILABLE, f"retry later: {exc}")
        if method in self._admin and not identity.is_admin:
            return _abort_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} requires an admin credential; {identity.client_id!r} is a "
                f"{identity.role.value}",
            )
        if handler is None:
            return None
        return _with_identity(
            handler, identity, metadata[HEADER_BODY_SHA256], self._bind_certificate
        )


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    """A ClientCallDetails with our metadata appended (grpc's own type is read-only)."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class ClientAuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Signs every outgoing call with a ClientCredential (works on TLS and insecure
    channels alike; use ``authenticated_channel`` to apply it)."""

    def __init__(self, credential: ClientCredential) -> None:
        self._credential = credential

    def _details(self, details: grpc.ClientCallDetails, body: Any) -> grpc.ClientCallDetails:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8")
        signed = sign_request(self._credential, method, _serialized(body))
        metadata = list(details.metadata or ()) + list(signed)
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request), request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        head = next(request_iterator, None)  # the signature covers the first message
        return continuation(self._details(details, head), _chain(head, request_iterator))

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        head = next(request_iterator, None)
        return continuation(self._details(details, head), _chain(head, request_iterator))


def _serialized(body: Any) -> bytes:
    """The bytes gRPC sends for ``body``: as given (pre-serialized frames), else a message's
    serialization (nothing for an empty stream)."""
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return bytes(body.SerializeToString())


def authenticated_channel(channel: grpc.Channel, credential: ClientCredential) -> grpc.Channel:
    """``channel`` with every call signed by ``credential``."""
    return grpc.intercept_channel(channel, ClientAuthInterceptor(credential))
