"""The experiment file: YAML and TOML give the same experiment, environment variables and
overrides win over the file, and every bad value is one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from crossfed.common.config import ConfigError

from crossfed.simulation.experiment import ExperimentConfig, load_experiment


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_toml_describe_the_same_experiment(tmp_path: Path) -> None:
    doc = {
        "name": "exp",
        "data": {"kind": "manifest", "path": "site.csv", "class_names": ["a", "b"]},
        "federation": {
            "clients": 100,
            "dirichlet_alpha": 0.1,
            "missing": {"mode": "per_client", "rate": 0.7},
        },
        "rounds": {"rounds": 5, "fraction": 0.1, "on_client_failure": "fail"},
        "model": {"hidden_dim": 64, "loss_weights": {"orth": 0.5}},
        "methods": ["ours", "dropout", "ceiling_image"],
        "seeds": [3, 4],
        "execution": {"cpus_per_client": 0.5, "address": "auto"},
    }
    from_yaml = load_experiment(_write(tmp_path, "e.yaml", yaml.safe_dump(doc)), env={})
    toml = """
name = "exp"
methods = ["ours", "dropout", "ceiling_image"]
seeds = [3, 4]
[data]
kind = "manifest"
path = "site.csv"
class_names = ["a", "b"]
[federation]
clients = 100
dirichlet_alpha = 0.1
missing = { mode = "per_client", rate = 0.7 }
[rounds]
rounds = 5
fraction = 0.1
on_client_failure = "fail"
[model]
hidden_dim = 64
loss_weights = { orth = 0.5 }
[execution]
cpus_per_client = 0.5
address = "auto"
"""
    from_toml = load_experiment(_write(tmp_path, "e.toml", toml), env={})
    assert from_yaml == from_toml
    assert from_yaml.data.kind == "manifest" and from_yaml.federation.missing.rate == 0.7
    model = from_yaml.model_config_for(384, 256, 2)
    assert model.hidden_dim == 64 and model.loss_weights.orth == 0.5 and model.num_classes == 2


def test_environment_and_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "e.yaml", "rounds: {rounds: 5}\nexecution: {backend: inline}\n")
    cfg = load_experiment(
        path,
        {"execution.address": "10.0.0.1:6379"},
        env={"CROSSFED_SIM_ROUNDS__ROUNDS": "7", "CROSSFED_SIM_EXECUTION__BACKEND": "ray"},
    )
    assert cfg.rounds.rounds == 7
    assert cfg.execution.backend == "ray" and cfg.execution.address == "10.0.0.1:6379"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rounds: {rounds: 0}", "rounds.rounds: Input should be greater than 0"),
        ("rounds: {fraction: 1.5}", "rounds.fraction: Input should be less than or equal to 1"),
        ("federation: {missing: {mode: sometimes}}", "federation.missing.mode"),
        ("methods: [ours, best_method]", "unknown method(s) ['best_method']"),
        ("methods: [ours, ours]", "methods are listed twice"),
        ("seeds: [1, 1]", "seeds must be distinct"),
        ("model: {num_classes: 3}", "['num_classes'] come from the data"),
        ("model: {hiden_dim: 3}", "model.hiden_dim: unknown field"),
        ("data: {kind: parquet}", "kind must be 'builtin', 'manifest' or 'embeddings'"),
        ("data: {kind: manifest}", "data.manifest.path: Field required"),
        ("strategy: {name: fedprox}", "strategy.name"),
        ("execution: {backend: spark}", "execution.backend"),
        ("roundz: {rounds: 3}", "roundz: unknown field"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, "bad.yaml", text + "\n"), env={})
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_defaults_are_the_design_cards_comparison() -> None:
    cfg = ExperimentConfig()
    assert cfg.methods == ["ours", "zero_fill", "dropout", "ceiling_text", "ceiling_image"]
    assert cfg.execution.backend == "ray" and cfg.strategy.name == "fedavg"


def test_the_readme_experiment_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Simulation", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_experiment(_write(tmp_path, "readme.yaml", block), env={})
    assert cfg.federation.clients == 1000 and cfg.rounds.fraction == 0.1
    assert cfg.methods[:3] == ["ours", "zero_fill", "dropout"] and cfg.seeds == [0, 1, 2]
