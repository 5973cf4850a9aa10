"""Virtual clients as Ray tasks: an embedded Ray instance on this machine by default, or an
existing cluster (``execution.address``). Client data goes into Ray's object store once
(`put`); a round puts the global weights once and every task reads them from there; each
client's VLMR memory stays in the object store between its rounds (the driver holds only a
reference). A task whose worker dies, or that raises, is rerun ``retries`` times by Ray; after
that its outcome is a failure for the round policy to judge.

Outcomes are taken in task order with at most ``max_in_flight`` tasks queued, so the server's
fold sees the same updates in the same order wherever they ran, and the object store holds a
bounded number of updates at a time.

Ray moves Python objects between its processes with pickle: a Ray cluster is one trusted
party (Ray's own security model), never a transport between federation members.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from crossfed.client.local_trainer import TrainConfig
from crossfed.simulation.client_executor import ClientFn, ClientOutcome, DataRef, Pending, one_line
from crossfed.simulation.experiment import ExecutionSection
from crossfed.simulation.simulation_errors import RayMissingError, SimulationError
from crossfed.simulation.virtual_client import (
    Arrays,
    ClientTask,
    Scores,
    client_calibration_stats,
    train_central,
    train_client,
)

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'crossfed[sim]'"
#: Tries to start the embedded Ray instance (see `RayExecutor._start_embedded`).
EMBEDDED_START_ATTEMPTS = 3


def import_ray() -> Any:
    """The ray module, or RayMissingError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayMissingError(
            f"the Ray backend needs Ray, which is not installed: {INSTALL_HINT} "
            "(or execution.backend: inline to run clients one by one in this process)"
        ) from None
    return ray


def _is_start_timeout(exc: BaseException) -> bool:
    """Ray's own "node timed out during startup" (raised as a bare Exception)."""
    return "timed out during startup" in str(exc)


class _RemoteScores:
    """A central reference running as a Ray task."""

    def __init__(self, ray: Any, ref: Any) -> None:
        self._ray, self._ref = ray, ref

    def result(self) -> tuple[Scores, float]:
        try:
            scores, seconds = self._ray.get(self._ref)
        except self._ray.exceptions.RayError as exc:
            raise SimulationError(f"a central reference failed: {one_line(exc)}") from exc
        return scores, float(seconds)


class RayExecutor:
    """`ClientExecutor` over Ray tasks (see the module docstring). Joins the Ray instance this
    process is already connected to, if any (and leaves it running on `close`); ``client_fn``
    is what a client task runs (`train_client`; tests wrap it to inject faults)."""

    def __init__(
        self,
        execution: ExecutionSection,
        retries: int,
        client_fn: ClientFn = train_client,
    ) -> None:
        ray = import_ray()
        self._ray = ray
        self._owned_temp: Path | None = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            self._connect(execution)
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        per_client = execution.cpus_per_client
        if cpus < per_client:
            self.close()
            raise SimulationError(
                f"the Ray cluster has {cpus:g} CPUs, fewer than execution.cpus_per_client "
                f"({per_client:g}): no client could ever start"
            )
        self.slots = max(1, int(cpus // per_client))
        self.max_in_flight = execution.max_in_flight or max(8, 4 * self.slots)
        self.cluster_cpus = cpus
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        options = {
            "num_cpus": per_client,
            "max_retries": retries,
            "retry_exceptions": retries > 0,
        }
        self._train = ray.remote(client_fn).options(num_returns=2, **options)
        self._stats = ray.remote(client_calibration_stats).options(**options)
        self._central = ray.remote(train_central).options(**options)

    def _connect(self, execution: ExecutionSection) -> None:
        """ray.init: join ``execution.address``, or start an embedded instance."""
        ray = self._ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
        common: dict[str, Any] = {
            "namespace": "crossfed-simulate",
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        where = execution.address or "an embedded Ray instance"
        try:
            if execution.address is not None:
                ray.init(address=execution.address, **common)
            else:
                self._start_embedded(execution, common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._remove_temp()
            raise SimulationError(f"cannot start Ray ({where}): {one_line(exc)}") from exc
        except BaseException:
            self._remove_temp()
            raise

    def _start_embedded(self, execution: ExecutionSection, common: dict[str, Any]) -> None:
        """Start Ray on this machine, trying ``EMBEDDED_START_ATTEMPTS`` times.

        Ray gives its raylet a fixed 30 s to register, and the raylet first waits for two
        Python agents to start: on a machine busy with other work that can run out, so a
        timed-out start is shut down and tried again in a fresh session directory. Workers
        run at the driver's priority (Ray's default niceness 15 lets any other process on
        the machine starve the clients this simulation is waiting for)."""
        ray = self._ray
        for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
            temp = execution.temp_dir
            if temp is None:  # short: Ray's socket paths must fit in 107 bytes
                temp = self._owned_temp = Path(tempfile.mkdtemp(prefix="crossfed-ray-"))
            try:
                ray.init(
                    num_cpus=execution.num_cpus,
                    object_store_memory=execution.object_store_mb * 2**20,
                    include_dashboard=False,
                    _temp_dir=str(temp.resolve()),
                    _system_config={"worker_niceness": 0},
                    **common,
                )
                return
            except Exception as exc:
                ray.shutdown()  # whatever this try started
                if not _is_start_timeout(exc):
                    raise
                self._remove_temp()
                if attempt == EMBEDDED_START_ATTEMPTS:
                    raise RuntimeError(
                        f"Ray's node did not start in {attempt} tries (this machine is too "
                        f"busy?): {one_line(exc)}"
                    ) from exc
                log.warning("Ray's node timed out during startup; starting it again")

    def put(self, arrays: Arrays) -> DataRef:
        return self._ray.put(arrays)

    def run_round(
        self,
        config_json: str,
        tasks: Sequence[ClientTask],
        global_state: Arrays,
        shards: Sequence[DataRef],
        memories: dict[int, DataRef],
        prototypes: Arrays | None,
    ) -> Iterator[ClientOutcome]:
        ray = self._ray
        global_ref = ray.put(global_state)  # once per round, read by every client
        proto_ref = None if prototypes is None else ray.put(prototypes)
        queue = iter(tasks)
        running: deque[tuple[ClientTask, Any, Any]] = deque()

        def submit() -> None:
            task = next(queue, None)
            if task is not None:
                memory = memories.get(task.client)
                update_ref, memory_ref = self._train.remote(
                    config_json, task, global_ref, shards[task.client], memory, proto_ref
                )
                running.append((task, update_ref, memory_ref))

        for _ in range(self.max_in_flight):
            submit()
        while running:
            task, update_ref, memory_ref = running.popleft()
            try:
                update = ray.get(update_ref)
            except ray.exceptions.RayError as exc:
                log.warning("client %d failed after its retries: %s", task.client, one_line(exc))
                yield ClientOutcome(task.client, None, one_line(exc))
            else:
                memories[task.client] = memory_ref
                yield ClientOutcome(task.client, update)
            submit()

    def calibration_stats(
        self,
        config_json: str,
        global_state: Arrays,
        shards: Sequence[DataRef],
        noise_multiplier: float,
        seeds: Sequence[int],
        prototypes: Arrays | None = None,
    ) -> Iterator[Arrays | None]:
        ray = self._ray
        global_ref = ray.put(global_state)
        refs = [
            self._stats.remote(config_json, global_ref, shard, noise_multiplier, seed, prototypes)
            for shard, seed in zip(shards, seeds, strict=True)
        ]
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:
                log.warning("a client's calibration statistics failed: %s", one_line(exc))
                yield None

    def central(
        self, config_json: str, train: DataRef, test: DataRef, cfg: TrainConfig, seed: int
    ) -> Pending:
        return _RemoteScores(self._ray, self._central.remote(config_json, train, test, cfg, seed))

    def close(self) -> None:
        """Disconnect if this executor connected (an embedded instance stops with it) and
        remove the temp dir it made."""
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._owned_temp is not None:
            shutil.rmtree(self._owned_temp, ignore_errors=True)
            self._owned_temp = None
