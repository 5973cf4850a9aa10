"""Exceptions of the client daemon: each names what went wrong so the CLI can print one clear
line instead of a stack trace."""

from __future__ import annotations


class ClientError(Exception):
    """Base class for every error the client daemon raises on purpose."""


class TransientTransportError(ClientError):
    """The server could not be reached or the call was cut (UNAVAILABLE, DEADLINE_EXCEEDED,
    connection reset): retry the same step after a backoff."""


class RoundAbandonedError(ClientError):
    """The server no longer accepts work for this round (it moved on, closed or rejected it):
    drop the round's state and ask the server what to do next."""


class NotRegisteredError(ClientError):
    """The server does not know this client (NOT_FOUND, e.g. after losing its state):
    register again."""


class AlreadyUploadedError(ClientError):
    """The server already counted an update of ours for this round (ALREADY_EXISTS)."""


class FatalServerError(ClientError):
    """The server refused us in a way retrying cannot fix (bad credentials, incompatible model
    configuration, malformed request)."""


class ServerUnreachableError(ClientError):
    """The server stayed unreachable for longer than the retry policy allows."""


class PayloadIntegrityError(ClientError):
    """A downloaded payload does not match its announced size or SHA-256 digest."""


class ClientConfigError(ClientError):
    """The client's configuration or command-line input is invalid."""


class PrivacyBudgetExhaustedError(ClientError):
    """Another round of DP-SGD would take the client's epsilon past its configured budget."""
