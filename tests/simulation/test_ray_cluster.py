"""A Ray cluster for real: a head node and a second node started with `ray start` on this
machine, `crossfed simulate --ray-address` runs a seeded experiment on it and gets the same
results as the single-node run (an embedded Ray instance); every process of the cluster is
gone afterwards, whatever happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ray_cluster import local_ray_cluster, processes_with
from tests.support.simulation_data import experiment, write_embeddings

pytestmark = pytest.mark.integration  # starts real processes

CROSSFED = str(Path(sys.executable).with_name("crossfed"))


def _simulate(exp: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    proc = subprocess.run(
        [CROSSFED, "simulate", str(exp), "--out", str(out), "--no-progress", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def _runs(doc: Any) -> list[Any]:
    return [
        (r["method"], r["seed"], r["scores"], [(x["round"], x["scores"]) for x in r["rounds"]])
        for r in doc["runs"]
    ]


@pytest.mark.slow
def test_a_two_node_cluster_gives_the_single_node_results(tmp_path: Path) -> None:
    emb = write_embeddings(tmp_path / "emb.safetensors")
    exp = tmp_path / "experiment.yaml"
    doc = experiment(
        emb,
        methods=["ours", "zero_fill", "ceiling_text"],
        seeds=[0, 1],
        rounds={"rounds": 2, "fraction": 0.75},
        execution={"backend": "ray", "num_cpus": 2, "object_store_mb": 200},
    )
    exp.write_text(yaml.safe_dump(doc))
    single = _simulate(exp, tmp_path / "single")
    assert single["execution"]["nodes"] == 1
    marker = ""
    with local_ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        marker = cluster.marker
        assert len(processes_with(marker)) >= 4  # gcs, raylets, ...: the cluster is up
        on_cluster = _simulate(
            exp, tmp_path / "cluster", "--ray-address", cluster.address, env=cluster.env
        )
    assert processes_with(marker) == []  # torn down, every process of it
    assert on_cluster["execution"]["nodes"] == 2 and on_cluster["execution"]["cluster_cpus"] == 2
    assert [r["sampled"] for r in on_cluster["runs"][0]["rounds"]] == [3, 3]
    assert _runs(on_cluster) == _runs(single)
