"""The server's own count of each client's DP releases (projections, eq. 16; calibration
statistics) and the epsilon they spend, with Opacus' RDP accountant: computed from the noise
the server mandated and the releases it received, never from a number a client reports.

Persisted as JSON (``privacy_ledger.json`` in the state dir, written atomically) *before* a
release is used: a crash in between over-counts, never under-counts.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from crossfed.common import atomic_files
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant, PrivacyAccountantError
from crossfed.server.errors import StateStoreError

LEDGER_FILE = "privacy_ledger.json"
_VERSION = 1


class PrivacyLedger:
    """Per-client RDP accountants at one delta; ``path`` None keeps them in memory."""

    def __init__(self, path: Path | None, delta: float = 1e-5) -> None:
        self.path = path
        self.delta = delta
        self._lock = threading.Lock()
        self._clients: dict[str, PrivacyAccountant] = self._load()

    def _load(self) -> dict[str, PrivacyAccountant]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            body = json.loads(self.path.read_text("utf-8"))
            if not isinstance(body, dict) or body.get("version") != _VERSION:
                raise PrivacyAccountantError(f"unsupported ledger version {body!r:.60}")
            clients = body["clients"]
            if not isinstance(clients, dict):
                raise PrivacyAccountantError("'clients' is not an object")
            return {str(cid): PrivacyAccountant.from_dict(state) for cid, state in clients.items()}
        except (OSError, ValueError, KeyError, TypeError, PrivacyAccountantError) as exc:
            # starting from zero would under-report every client's epsilon: refuse instead
            raise StateStoreError(f"privacy ledger {self.path} is unreadable: {exc}") from None

    def _save_locked(self, clients: dict[str, PrivacyAccountant]) -> None:
        if self.path is None:
            return
        body = {"version": _VERSION, "clients": {c: a.to_dict() for c, a in clients.items()}}
        try:
            atomic_files.write_atomic(self.path, json.dumps(body, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            raise StateStoreError(f"cannot write the privacy ledger {self.path}: {exc}") from exc

    def epsilon(self, client_id: str) -> float:
        """Epsilon the client's counted releases spent (0 before any)."""
        with self._lock:
            accountant = self._clients.get(client_id)
            return 0.0 if accountant is None else accountant.epsilon(self.delta)

    def releases(self, client_id: str) -> int:
        """Gaussian releases counted for the client."""
        with self._lock:
            accountant = self._clients.get(client_id)
            return 0 if accountant is None else accountant.total_steps

    def epsilon_after(self, client_id: str, noise_multiplier: float, steps: int) -> float:
        """Epsilon the client would have spent after ``steps`` more releases."""
        with self._lock:
            accountant = self._clients.get(client_id) or PrivacyAccountant()
            return accountant.epsilon_after(self.delta, noise_multiplier, 1.0, steps)

    def record(self, client_id: str, noise_multiplier: float, steps: int) -> float:
        """Count ``steps`` releases at ``noise_multiplier`` (sample rate 1: each release uses
        the client's whole data), persist, and return the client's epsilon after them."""
        with self._lock:
            current = self._clients.get(client_id)
            updated = PrivacyAccountant(current.history if current else None)
            updated.step(noise_multiplier, 1.0, steps)
            clients = {**self._clients, client_id: updated}
            self._save_locked(clients)  # first on disk: a crash over-counts, never under
            self._clients = clients
            return updated.epsilon(self.delta)
