"""The replay cache across restarts: accepted nonces are journaled, a new cache (a restarted
server) refuses them, a torn last line is skipped, expired entries are dropped, and the
journal is compacted to the live entries."""

from __future__ import annotations

from pathlib import Path

from crossfed.common.crypto.identity import NonceReplayCache
from crossfed.common.crypto.nonce_journal import JournalEntry, NonceJournal

NOW = 1_700_000_000.0
NONCE = "0" * 31 + "1"


def test_a_restarted_cache_refuses_nonces_used_before(tmp_path: Path) -> None:
    path = tmp_path / "nonces.journal"
    before = NonceReplayCache(journal=NonceJournal(path), now=NOW)
    assert before.check_and_add("c1", NONCE, int(NOW * 1000), NOW + 120, NOW) is None
    after = NonceReplayCache(journal=NonceJournal(path), now=NOW + 1)
    refused = after.check_and_add("c1", NONCE, int(NOW * 1000), NOW + 120, NOW + 1)
    assert refused is not None and "already used" in refused
    assert after.check_and_add("c2", NONCE, int(NOW * 1000), NOW + 120, NOW + 1) is None
    later = NonceReplayCache(journal=NonceJournal(path), now=NOW + 200)
    assert len(later) == 0  # past the window: forgotten, and refused by the clock check


def test_torn_lines_are_skipped_and_compaction_keeps_live_entries(tmp_path: Path) -> None:
    path = tmp_path / "nonces.journal"
    journal = NonceJournal(path)
    journal.append(JournalEntry("c1", NONCE, 1, NOW + 60))
    with path.open("a") as handle:
        handle.write("c2 abc")  # a killed process's half line
    assert [e.client_id for e in NonceJournal(path).load(NOW)] == ["c1"]
    live = [JournalEntry(f"c{i}", NONCE, i, NOW + 60) for i in range(3)]
    journal.compact(live)
    assert [e.client_id for e in NonceJournal(path).load(NOW)] == ["c0", "c1", "c2"]
    assert not journal.needs_compaction(3)
    assert path.stat().st_mode & 0o077 == 0  # the journal names clients: owner only
