"""Where virtual clients run. A `ClientExecutor` holds client data once (`put`), runs a
round's client tasks and yields their outcomes in task order (so the server-side fold is the
same sum in the same order on one machine or a cluster), runs the calibration statistics and
the central references. `RayExecutor` (ray_executor.py) is the real backend; `InlineExecutor`
runs the same functions one after another in this process, for debugging and for tests that
must not need Ray."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from crossfed.client.local_trainer import TrainConfig
from crossfed.simulation.virtual_client import (
    Arrays,
    ClientTask,
    ClientUpdate,
    Scores,
    client_calibration_stats,
    train_central,
    train_client,
)

log = logging.getLogger(__name__)

#: A handle on data an executor holds (an object-store reference, or the arrays themselves).
DataRef = Any
#: What a client task runs: `train_client`'s signature.
ClientFn = Callable[
    [str, ClientTask, Arrays, Arrays, Arrays | None, Arrays | None], tuple[ClientUpdate, Arrays]
]


@dataclass(frozen=True)
class ClientOutcome:
    """A client's round: its update, or why it failed after its retries."""

    client: int
    update: ClientUpdate | None
    error: str | None = None


class Pending(Protocol):
    """A central reference training somewhere: its scores and seconds, when done."""

    def result(self) -> tuple[Scores, float]: ...


@dataclass(frozen=True)
class Done:
    """A result computed already (inline)."""

    value: tuple[Scores, float]

    def result(self) -> tuple[Scores, float]:
        return self.value


class ClientExecutor(Protocol):
    """A backend that runs virtual clients (see the module docstring)."""

    #: clients that can train at the same time
    slots: int

    def put(self, arrays: Arrays) -> DataRef:
        """Hold ``arrays`` (a shard, the test split) for the tasks that read them."""
        ...

    def run_round(
        self,
        config_json: str,
        tasks: Sequence[ClientTask],
        global_state: Arrays,
        shards: Sequence[DataRef],
        memories: dict[int, DataRef],
        prototypes: Arrays | None,
    ) -> Iterator[ClientOutcome]:
        """Train ``tasks`` (``task.client`` indexes ``shards``); outcomes in task order;
        ``memories`` (client -> its VLMR memory) is updated as clients finish."""
        ...

    def calibration_stats(
        self,
        config_json: str,
        global_state: Arrays,
        shards: Sequence[DataRef],
        noise_multiplier: float,
        seeds: Sequence[int],
        prototypes: Arrays | None = None,
    ) -> Iterator[Arrays | None]:
        """Every client's CCVR statistics under ``global_state`` (and the global
        prototypes), in shard order."""
        ...

    def central(
        self, config_json: str, train: DataRef, test: DataRef, cfg: TrainConfig, seed: int
    ) -> Pending:
        """Start a central reference (trained on ``train``, scored on ``test``)."""
        ...

    def close(self) -> None:
        """Release what the executor started."""
        ...


def one_line(exc: BaseException) -> str:
    """An exception as one line (the last line of a remote traceback, its type and text)."""
    text = str(exc).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), "")
    return f"{type(exc).__name__}: {last}"[:300]


class InlineExecutor:
    """Runs every task here, one after another (no Ray, no parallelism). Exceptions are
    retried ``retries`` times; a process that dies takes the simulation with it."""

    slots = 1

    def __init__(self, retries: int = 0, client_fn: ClientFn = train_client) -> None:
        self.retries = retries
        self._client_fn = client_fn

    def put(self, arrays: Arrays) -> DataRef:
        return arrays

    def run_round(
        self,
        config_json: str,
        tasks: Sequence[ClientTask],
        global_state: Arrays,
        shards: Sequence[DataRef],
        memories: dict[int, DataRef],
        prototypes: Arrays | None,
    ) -> Iterator[ClientOutcome]:
        for task in tasks:
            error = ""
            for _attempt in range(self.retries + 1):
                try:
                    update, memory = self._client_fn(
                        config_json,
                        task,
                        global_state,
                        shards[task.client],
                        memories.get(task.client),
                        prototypes,
                    )
                except Exception as exc:  # noqa: BLE001 -- the round policy judges a client failure
                    error = one_line(exc)
                    log.warning("client %d failed: %s", task.client, error)
                    continue
                memories[task.client] = memory
                yield ClientOutcome(task.client, update)
                break
            else:
                yield ClientOutcome(task.client, None, error)

    def calibration_stats(
        self,
        config_json: str,
        global_state: Arrays,
        shards: Sequence[DataRef],
        noise_multiplier: float,
        seeds: Sequence[int],
        prototypes: Arrays | None = None,
    ) -> Iterator[Arrays | None]:
        for shard, seed in zip(shards, seeds, strict=True):
            yield client_calibration_stats(
                config_json, global_state, shard, noise_multiplier, seed, prototypes
            )

    def central(
        self, config_json: str, train: DataRef, test: DataRef, cfg: TrainConfig, seed: int
    ) -> Pending:
        return Done(train_central(config_json, train, test, cfg, seed))

    def close(self) -> None:
        return None


def arrays_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes held by a dict of arrays."""
    return sum(int(a.nbytes) for a in arrays.values())
