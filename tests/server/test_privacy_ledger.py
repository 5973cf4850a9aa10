"""The server's per-client privacy ledger: epsilon from counted releases (Opacus RDP),
persisted before use and reloaded, a damaged file refused (never a fresh zero)."""

from __future__ import annotations

from pathlib import Path

import pytest
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant
from crossfed.server.errors import StateStoreError
from crossfed.server.privacy_ledger import PrivacyLedger


def test_epsilon_is_counted_per_client_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, 1e-5)
    assert ledger.epsilon("a") == 0.0
    after = ledger.record("a", 2.5, 2)
    reference = PrivacyAccountant()
    reference.step(2.5, 1.0, 2)
    assert after == pytest.approx(reference.epsilon(1e-5))
    assert ledger.epsilon_after("a", 2.5, 2) > after > ledger.epsilon("b") == 0.0
    reloaded = PrivacyLedger(path, 1e-5)
    assert reloaded.epsilon("a") == pytest.approx(after) and reloaded.releases("a") == 2


def test_a_damaged_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "clients": {"a": {"version": 99}}}')
    with pytest.raises(StateStoreError, match="unreadable"):
        PrivacyLedger(path, 1e-5)
