"""Virtual clients that die: the process of a chosen client exits mid-task (as a worker that
runs out of memory or is killed would), on its first attempt only or on every attempt.
Built as closures so Ray ships them to its workers by value."""

from __future__ import annotations

import os
from pathlib import Path

from crossfed.simulation.client_executor import ClientFn
from crossfed.simulation.virtual_client import (
    Arrays,
    ClientTask,
    ClientUpdate,
    train_client,
)


def dying_client(marker_dir: Path, client: int, always: bool) -> ClientFn:
    """`train_client`, except that ``client``'s process exits hard when it starts a round:
    every time (``always``), or only the first time (a marker file remembers it died)."""
    marker_dir = Path(marker_dir)

    def train_or_die(
        config_json: str,
        task: ClientTask,
        global_state: Arrays,
        shard: Arrays,
        memory: Arrays | None,
        prototypes: Arrays | None,
    ) -> tuple[ClientUpdate, Arrays]:
        if task.client == client:
            marker = marker_dir / f"died-{task.client}-{task.round_no}"
            if always or not marker.exists():
                marker.touch()
                os._exit(17)
        return train_client(config_json, task, global_state, shard, memory, prototypes)

    return train_or_die


def deaths(marker_dir: Path) -> list[str]:
    """Which (client, round) died, from the markers."""
    return sorted(p.name for p in Path(marker_dir).glob("died-*"))
