"""gRPC glue for identity.py: a client interceptor / call-credentials plugin that sign every
call, and a server interceptor that authenticates before any handler runs.

Server side: ``ServerAuthInterceptor(verifier, public_methods, admin_methods)`` aborts
with UNAUTHENTICATED (missing/forged/expired/replayed/revoked credential) or
PERMISSION_DENIED (client credential on an admin method); handlers read the caller via
``authenticated_identity(context)``. Method patterns are full names
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
    AuthenticationError,
    ClientCredential,
    Identity,
    RequestVerifier,
    sign_request,
)

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


def _with_identity(handler: grpc.RpcMethodHandler, identity: Identity) -> grpc.RpcMethodHandler:
    """Wrap the real behaviour so authenticated_identity(context) works inside it."""

    def wrap(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            _bind_identity(context, identity)
            return behavior(request, context)

        return wrapped

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kw)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kw)
    return handler


class ServerAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every non-public RPC before its handler runs (default deny)."""

    def __init__(
        self,
        verifier: RequestVerifier,
        public_methods: Iterable[str] = COORDINATOR_PUBLIC_METHODS,
        admin_methods: Iterable[str] = ADMIN_METHODS,
    ) -> None:
        self._verifier = verifier
        self._public = _MethodSet(public_methods)
        self._admin = _MethodSet(admin_methods)

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
        if method in self._admin and not identity.is_admin:
            return _abort_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} requires an admin credential; {identity.client_id!r} is a "
                f"{identity.role.value}",
            )
        if handler is None:
            return None
        return _with_identity(handler, identity)


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

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8")
        metadata = list(details.metadata or ()) + list(sign_request(self._credential, method))
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)


def authenticated_channel(channel: grpc.Channel, credential: ClientCredential) -> grpc.Channel:
    """``channel`` with every call signed by ``credential``."""
    return grpc.intercept_channel(channel, ClientAuthInterceptor(credential))


class SigningAuthPlugin(grpc.AuthMetadataPlugin):
    """Call-credentials flavour of the signer, for ``grpc.metadata_call_credentials``.

    gRPC only sends call credentials on secure channels; prefer the interceptor when a
    channel may be insecure (development).
    """

    def __init__(self, credential: ClientCredential) -> None:
        self._credential = credential

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            service = context.service_url.rstrip("/").rsplit("/", 1)[-1]
            method = f"/{service}/{context.method_name}"
            callback(sign_request(self._credential, method), None)
        except Exception as exc:  # noqa: BLE001 - gRPC wants errors via the callback
            callback((), exc)


def signing_call_credentials(credential: ClientCredential) -> grpc.CallCredentials:
    """CallCredentials that sign each call (combine with TLS channel credentials)."""
    return grpc.metadata_call_credentials(SigningAuthPlugin(credential), name="crossfed-hmac")
