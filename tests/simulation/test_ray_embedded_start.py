"""Starting the embedded Ray instance, against a stand-in for the ray module (no processes):
Ray's own "node timed out during startup" is retried in a fresh session directory, workers run
at the driver's priority, other errors are not retried, and giving up says so in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crossfed.simulation import ray_executor
from crossfed.simulation.experiment import ExecutionSection
from crossfed.simulation.ray_executor import EMBEDDED_START_ATTEMPTS, RayExecutor
from crossfed.simulation.simulation_errors import SimulationError

RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


class _Remote:
    def options(self, **_kw: Any) -> _Remote:
        return self


class FakeRay:
    """The few calls RayExecutor makes; `init` raises ``failures`` in turn, then starts."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.inits: list[dict[str, Any]] = []
        self.shutdowns = 0
        self.up = False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kw: Any) -> None:
        self.inits.append(kw)
        assert Path(kw["_temp_dir"]).is_dir()  # each try gets a session directory that exists
        if self.failures:
            raise self.failures.pop(0)
        self.up = True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.up = False

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"Alive": True}]

    def remote(self, _fn: Any) -> _Remote:
        return _Remote()


def _start(monkeypatch: pytest.MonkeyPatch, fake: FakeRay) -> RayExecutor:
    monkeypatch.setattr(ray_executor, "import_ray", lambda: fake)
    return RayExecutor(ExecutionSection(num_cpus=2, object_store_mb=100), retries=0)


def test_a_start_that_times_out_is_tried_again_in_a_fresh_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRay([Exception(RAY_TIMEOUT)])
    executor = _start(monkeypatch, fake)
    assert len(fake.inits) == 2 and fake.shutdowns == 1
    first, second = (Path(kw["_temp_dir"]) for kw in fake.inits)
    assert first != second and not first.exists() and second.is_dir()
    assert all(kw["_system_config"] == {"worker_niceness": 0} for kw in fake.inits)
    executor.close()
    assert not second.exists() and fake.shutdowns == 2


def test_giving_up_says_so_and_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay([Exception(RAY_TIMEOUT)] * EMBEDDED_START_ATTEMPTS)
    with pytest.raises(SimulationError, match=f"did not start in {EMBEDDED_START_ATTEMPTS} tries"):
        _start(monkeypatch, fake)
    assert len(fake.inits) == EMBEDDED_START_ATTEMPTS
    assert not any(Path(kw["_temp_dir"]).exists() for kw in fake.inits)


@pytest.mark.parametrize(
    "error", [ValueError("object_store_memory too small"), Exception("something else")]
)
def test_other_start_errors_are_not_retried(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    fake = FakeRay([error])
    with pytest.raises((SimulationError, type(error)), match=str(error)):
        _start(monkeypatch, fake)
    assert len(fake.inits) == 1
    assert not Path(fake.inits[0]["_temp_dir"]).exists()
