"""Virtual clients as Ray tasks on an embedded Ray instance: the same results as running them
one by one in this process, client data put in the object store once (the global weights
once per round), a worker that dies is rerun, and a client that keeps dying is left out of
the round and named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crossfed.simulation.experiment import ExecutionSection, ExperimentConfig
from crossfed.simulation.experiment_run import ExperimentResult, run_experiment
from crossfed.simulation.federation_data import load_data
from crossfed.simulation.ray_executor import RayExecutor
from tests.support.simulation_data import experiment, write_embeddings
from tests.support.simulation_faults import deaths, dying_client

pytestmark = pytest.mark.integration  # starts real processes

EXECUTION = ExecutionSection(num_cpus=2, object_store_mb=200)


@pytest.fixture(scope="module")
def embedded_ray() -> Iterator[RayExecutor]:
    """One embedded Ray instance for the module (it owns it and shuts it down)."""
    executor = RayExecutor(EXECUTION, retries=1)
    try:
        yield executor
    finally:
        executor.close()


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_embeddings(tmp_path_factory.mktemp("sim") / "emb.safetensors")


def _run(cfg: ExperimentConfig, executor: Any = None) -> ExperimentResult:
    return run_experiment(cfg, executor, progress=False)


def _scores(result: ExperimentResult) -> list[tuple[str, int, Any, list[Any]]]:
    return [
        (r.method, r.seed, r.scores, [(x.round, x.scores) for x in r.rounds]) for r in result.runs
    ]


@pytest.fixture(scope="module")
def inline_result(embeddings: Path) -> ExperimentResult:
    cfg = ExperimentConfig.model_validate(
        experiment(
            embeddings,
            methods=["ours", "zero_fill", "ours_calibrated", "fed_ceiling_image", "ceiling_text"],
            seeds=[0, 1],
        )
    )
    return _run(cfg)


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_ray_gives_the_inline_results(
    embedded_ray: RayExecutor, embeddings: Path, inline_result: ExperimentResult
) -> None:
    cfg = inline_result.config.model_copy(
        update={"execution": ExecutionSection(backend="ray", concurrent_runs=2)}
    )
    on_ray = _run(cfg, embedded_ray)
    assert on_ray.execution["backend"] == "ray" and on_ray.execution["slots"] == 2
    assert _scores(on_ray) == _scores(inline_result)
    calibrated = next(r for r in on_ray.runs if r.method == "ours_calibrated")
    assert calibrated.calibration == "image-only last layers fitted"


def test_client_data_is_put_once_and_the_global_model_once_per_round(
    embedded_ray: RayExecutor, embeddings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    puts: list[str] = []
    real_put = ray.put

    def counting_put(value: Any, **kw: Any) -> Any:
        if isinstance(value, dict) and "labels" in value:
            puts.append("shard")
        elif isinstance(value, dict) and "text_sum" in value:
            puts.append("prototypes")
        else:
            puts.append("global")
        return real_put(value, **kw)

    monkeypatch.setattr(ray, "put", counting_put)
    cfg = ExperimentConfig.model_validate(
        experiment(embeddings, rounds={"rounds": 3}, methods=["ours"])
    )
    result = _run(cfg, embedded_ray)
    assert [r.reported for r in result.runs[0].rounds] == [4, 4, 4]
    assert puts.count("shard") == 4  # one per client, for the whole run
    assert puts.count("global") == 3  # one per round, read by every client
    assert puts.count("prototypes") == 2  # rounds 2 and 3 send the last round's


def test_a_worker_that_dies_is_rerun_and_changes_nothing(
    embedded_ray: RayExecutor, tmp_path: Path, inline_result: ExperimentResult
) -> None:
    faulty = RayExecutor(EXECUTION, retries=1, client_fn=dying_client(tmp_path, 1, always=False))
    cfg = inline_result.config.model_copy(update={"methods": ["ours"], "seeds": [0]})
    result = _run(cfg, faulty)
    assert deaths(tmp_path) == ["died-1-0", "died-1-1"]  # client 1 died in both rounds
    assert all(r.failed == [] and r.reported == 4 for r in result.runs[0].rounds)
    expected = next(r for r in inline_result.runs if (r.method, r.seed) == ("ours", 0))
    assert result.runs[0].scores == expected.scores


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_a_client_that_keeps_dying_is_dropped_from_its_rounds(
    embedded_ray: RayExecutor, tmp_path: Path, embeddings: Path
) -> None:
    faulty = RayExecutor(EXECUTION, retries=1, client_fn=dying_client(tmp_path, 2, always=True))
    cfg = ExperimentConfig.model_validate(experiment(embeddings, methods=["zero_fill"]))
    result = _run(cfg, faulty)
    assert [(r.reported, r.failed) for r in result.runs[0].rounds] == [(3, [2]), (3, [2])]
    failing = cfg.model_copy(
        update={"rounds": cfg.rounds.model_copy(update={"on_client_failure": "fail"})}
    )
    from crossfed.simulation.simulation_errors import SimulationError

    with pytest.raises(SimulationError, match="client 2 failed"):
        run_experiment(failing, faulty, load_data(cfg.data), progress=False)
