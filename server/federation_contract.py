"""What every client of a federation must share besides the ModelConfig: the class list in
index order and the frozen encoders' weights (eq. 1). Checked at registration, before a
client trains. The encoders are pinned by the first client that declares them and kept in
the state store, so a restarted server still refuses other weights and a model bundle can
name what its model was trained on."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from crossfed.common.data.class_list import describe_difference, unknown_labels
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.server.errors import FederationMismatchError, InvalidUpdateError
from crossfed.server.state.base import StateStore
from crossfed.v1 import coordinator_pb2

#: Bounds on what a peer may declare (a class list far beyond any real one is an attack).
MAX_CLASS_NAMES = 100_000
MAX_CLASS_NAME_CHARS = 256
ENCODER_KINDS = ("text", "image")


@dataclass(frozen=True)
class ClientFacts:
    """What a client declares at registration about its labels and encoders."""

    class_names: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    text_encoder: EncoderIdentity | None = None
    image_encoder: EncoderIdentity | None = None

    @classmethod
    def from_request(cls, request: coordinator_pb2.RegisterRequest) -> ClientFacts:
        """Read and bound the request's fields; a malformed one is an InvalidUpdateError."""
        names = {"class_names": request.class_names, "label_names": request.label_names}
        for field, values in names.items():
            if len(values) > MAX_CLASS_NAMES:
                raise InvalidUpdateError(f"{field}: {len(values)} names, at most {MAX_CLASS_NAMES}")
            if any(len(v) > MAX_CLASS_NAME_CHARS for v in values):
                raise InvalidUpdateError(f"{field}: a name is over {MAX_CLASS_NAME_CHARS} chars")
        try:
            text = EncoderIdentity.from_proto(request.text_encoder)
            image = EncoderIdentity.from_proto(request.image_encoder)
        except ValueError as exc:
            raise InvalidUpdateError(f"encoder: {exc}") from None
        return cls(tuple(request.class_names), tuple(request.label_names), text, image)

    def encoder(self, kind: str) -> EncoderIdentity | None:
        return self.text_encoder if kind == "text" else self.image_encoder


class FederationContract:
    """The federation's class list and pinned encoders; `admit` refuses a misfit client."""

    def __init__(
        self, class_names: Sequence[str], store: StateStore, configured: bool = True
    ) -> None:
        self.class_names = tuple(class_names)
        self.store = store
        # False: the server named no classes and runs the built-in data's defaults, which a
        # client with labels of its own has no business mapping onto
        self.configured = configured
        self._lock = threading.Lock()

    def encoder(self, kind: str) -> EncoderIdentity | None:
        """The encoder pinned for ``kind`` ('text' or 'image'), None before any client."""
        raw = self.store.get_setting(f"encoder.{kind}")
        return EncoderIdentity.from_json(raw) if raw else None

    def admit(self, client_id: str, facts: ClientFacts) -> None:
        """Raise FederationMismatchError when the client's classes or encoders differ from
        the federation's; otherwise pin the encoders it is the first to declare."""
        self._check_classes(client_id, facts)
        with self._lock:
            for kind in ENCODER_KINDS:
                declared = facts.encoder(kind)
                if declared is None:
                    continue
                pinned = self.encoder(kind)
                if pinned is None:
                    self.store.put_setting(f"encoder.{kind}", declared.to_json())
                elif not pinned.same_weights(declared):
                    raise FederationMismatchError(
                        f"client {client_id!r} encodes {kind} with {declared.describe()}, but "
                        f"this federation uses {pinned.describe()} (spec {pinned.spec!r}); every "
                        f"client must use the same {kind} encoder weights"
                    )

    def _check_classes(self, client_id: str, facts: ClientFacts) -> None:
        ours = self.class_names
        if facts.class_names:
            difference = describe_difference(facts.class_names, ours)
            if difference:
                raise FederationMismatchError(
                    f"client {client_id!r}'s class list {difference} compared with the "
                    f"federation's {len(ours)} classes; give it the server's list, in the same "
                    "order (or no --classes: a manifest's labels are then mapped by name)"
                )
            return
        if facts.label_names and not self.configured:
            shown = ", ".join(repr(n) for n in facts.label_names[:4])
            raise FederationMismatchError(
                f"client {client_id!r} brings labels of its own ({shown}"
                f"{', ...' if len(facts.label_names) > 4 else ''}) but this server runs with "
                "the built-in dataset's classes; start it with the federation's class list "
                "(crossfed server start --classes @classes.txt, or `classes` in its config)"
            )
        unknown = unknown_labels(facts.label_names, ours)
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:6])
            more = f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else ""
            raise FederationMismatchError(
                f"client {client_id!r} has labels {shown}{more} that are not classes of this "
                f"federation ({len(ours)} classes: {', '.join(ours[:6])}"
                f"{', ...' if len(ours) > 6 else ''}); set the server's `classes` "
                "(crossfed server start --classes ...) to the federation's class list"
            )
