"""Server-side exception classes: each names a problem a human can act on and carries the
gRPC status code the Coordinator servicer maps it to (logic stays free of grpc imports)."""

from __future__ import annotations

from enum import Enum


class StatusKind(Enum):
    """The gRPC status an error maps to (names match grpc.StatusCode members)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DATA_LOSS = "DATA_LOSS"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ServerError(Exception):
    """Base class of every error the server reports to a peer or operator."""

    status: StatusKind = StatusKind.INTERNAL


class InvalidUpdateError(ServerError):
    """An uploaded update (or projection payload) failed validation; the model is unchanged."""

    status = StatusKind.INVALID_ARGUMENT


class CorruptPayloadError(ServerError):
    """A streamed payload is truncated, reordered beyond repair, or fails its digest."""

    status = StatusKind.DATA_LOSS


class UnknownClientError(ServerError):
    """The caller's client id is not registered (or was removed)."""

    status = StatusKind.NOT_FOUND


class WrongRoundError(ServerError):
    """The request names a round that is not the open one (late, early or closed)."""

    status = StatusKind.FAILED_PRECONDITION


class NotSelectedError(ServerError):
    """The client is registered but was not selected for the open round."""

    status = StatusKind.FAILED_PRECONDITION


class AlreadyUploadedError(ServerError):
    """The client already has an accepted upload (with another upload_id) in this round."""

    status = StatusKind.ALREADY_EXISTS


class RunNotActiveError(ServerError):
    """The run is not accepting work (idle, paused, stopped, completed or failed)."""

    status = StatusKind.FAILED_PRECONDITION


class PrivacyBudgetExceededError(ServerError):
    """A release would take a client's (server-accounted) epsilon past the budget."""

    status = StatusKind.FAILED_PRECONDITION


class PrivacyMandateError(ServerError):
    """A release does not carry the privacy mechanism the server mandates (e.g. no noise)."""

    status = StatusKind.FAILED_PRECONDITION


class UploadRefusedError(ServerError):
    """The upload's transport policy is not allowed (e.g. unencrypted when encryption is required)."""

    status = StatusKind.PERMISSION_DENIED


class ServerBusyError(ServerError):
    """No room for the request now (upload slots or bytes in flight); retry shortly."""

    status = StatusKind.RESOURCE_EXHAUSTED


class UploadCancelledError(ServerError):
    """The server cancelled the upload stream (it stalled, or a newer one replaced it)."""

    status = StatusKind.CANCELLED


class ModelMismatchError(ServerError):
    """The client's ModelConfig digest does not match the server's."""

    status = StatusKind.FAILED_PRECONDITION


class FederationMismatchError(ServerError):
    """A registering client's class list, labels or encoders do not fit the federation."""

    status = StatusKind.FAILED_PRECONDITION


class StateStoreError(ServerError):
    """The persistent state (SQLite database, checkpoints) is unreadable or inconsistent."""

    status = StatusKind.INTERNAL


class CheckpointError(StateStoreError):
    """A global-model checkpoint is missing, unreadable, or does not match the model."""


class ConfigurationError(ServerError):
    """The server configuration is invalid (caught before anything starts)."""

    status = StatusKind.INVALID_ARGUMENT
