"""config: defaults, file/env/override precedence, and one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from crossfed.common.config import (
    BuiltinDataConfig,
    ClientConfig,
    ConfigError,
    ManifestDataConfig,
    ServerConfig,
    load_config,
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("config: ") and "\n" not in message
    return message


def test_defaults_are_valid_and_secure() -> None:
    server = load_config(ServerConfig, env={})
    client = load_config(ClientConfig, env={})
    assert server.tls.insecure is False and client.tls.insecure is False
    assert server.transport.chunk_size == 1024 * 1024
    assert server.transport.chunk_size < server.transport.max_message_bytes
    assert isinstance(client.data, BuiltinDataConfig)
    assert server.model.text_dim == 384  # the shared ModelConfig is embedded


def test_yaml_and_toml_files_load_the_same_settings(tmp_path: Path) -> None:
    yaml_path = _write(tmp_path, "server.yaml", "listen: 0.0.0.0:6000\nrounds:\n  min_clients: 4\n")
    toml_path = _write(
        tmp_path, "server.toml", 'listen = "0.0.0.0:6000"\n[rounds]\nmin_clients = 4\n'
    )
    for path in (yaml_path, toml_path):
        config = load_config(ServerConfig, path, env={})
        assert (config.listen, config.rounds.min_clients) == ("0.0.0.0:6000", 4)
        assert config.rounds.rounds == 10  # untouched defaults survive


def test_precedence_is_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.yml", "rounds:\n  min_clients: 2\n  rounds: 7\nlog_json: false\n")
    env = {"CROSSFED_ROUNDS__MIN_CLIENTS": "3", "CROSSFED_LOG_JSON": "true"}
    from_env = load_config(ServerConfig, path, env=env)
    assert (from_env.rounds.min_clients, from_env.rounds.rounds, from_env.log_json) == (3, 7, True)
    overridden = load_config(ServerConfig, path, env=env, overrides={"rounds.min_clients": 5})
    assert (overridden.rounds.min_clients, overridden.rounds.rounds) == (5, 7)


def test_env_prefix_is_configurable_and_unrelated_prefixed_vars_are_ignored() -> None:
    env = {"CROSSFED_VENV": ".venv", "APP_ROUNDS__ROUNDS": "9", "CROSSFED_ROUNDS__ROUNDS": "4"}
    assert load_config(ServerConfig, env=env).rounds.rounds == 4
    assert load_config(ServerConfig, env=env, env_prefix="APP_").rounds.rounds == 9


def test_env_json_values_and_discriminated_data_union() -> None:
    env = {"CROSSFED_DATA__KIND": "manifest", "CROSSFED_DATA__PATH": "rows.csv"}
    client = load_config(ClientConfig, env=env)
    assert isinstance(client.data, ManifestDataConfig) and client.data.path == Path("rows.csv")
    client = load_config(
        ClientConfig, env={"CROSSFED_DATA": '{"seed": 3, "missing": {"mode": "per_client"}}'}
    )
    assert isinstance(client.data, BuiltinDataConfig)  # no kind: the builtin dataset
    assert (client.data.seed, client.data.missing.mode) == (3, "per_client")


def test_the_documented_error_line() -> None:
    message = _error(ServerConfig, env={}, overrides={"rounds.min_clients": -1})
    assert message.startswith("config: rounds.min_clients: Input should be greater than 0 (got -1)")
    assert message.endswith("[from override rounds.min_clients]")


def test_errors_name_field_problem_and_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "train:\n  batch_size: lots\n")
    message = _error(ClientConfig, path, env={})
    assert "train.batch_size: Input should be a valid integer" in message
    assert "(got 'lots')" in message and f"[from file {path}]" in message
    message = _error(ServerConfig, env={"CROSSFED_PRIVACY__DELTA": "2"})
    assert "privacy.delta: Input should be less than 1 (got '2')" in message
    assert "[from env CROSSFED_PRIVACY__DELTA]" in message


def test_unknown_fields_are_rejected_with_a_suggestion() -> None:
    message = _error(ServerConfig, env={}, overrides={"rounds.min_client": 3})
    assert "rounds.min_client: unknown field (did you mean 'min_clients'?)" in message
    message = _error(ClientConfig, env={"CROSSFED_TLS__MTSL": "1"})
    assert "tls.mtsl: unknown field (did you mean 'mtls'?)" in message


def test_union_errors_use_config_keys_not_pydantic_tags() -> None:
    message = _error(ClientConfig, env={}, overrides={"data.num_samples": 0})
    assert "config: data.num_samples: Input should be greater than 0 (got 0)" in message
    message = _error(ClientConfig, env={}, overrides={"data.kind": "manifest"})
    assert "data.path: Field required" in message
    message = _error(ClientConfig, env={}, overrides={"data.kind": "s3"})
    assert "data: kind must be 'builtin' or 'manifest'" in message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"tls.insecure": True, "tls.mtls": True}, "tls: mtls=true needs TLS"),
        ({"transport.chunk_size": 8 * 1024 * 1024}, "exceeds max_message_bytes"),
        ({"listen": "localhost"}, "listen: expected host:port"),
        ({"listen": "localhost:70000"}, "port 0-65535"),
        ({"metrics_port": 0}, "metrics_port: Input should be greater than or equal to 1"),
        ({"rounds.fraction": 1.5}, "rounds.fraction: Input should be less than or equal to 1"),
        ({"rounds.straggler_cutoff": 0}, "rounds.straggler_cutoff: Input should be greater"),
        ({"model.num_classes": 1}, "model.num_classes: Input should be greater than or equal"),
        ({"rounds": 3}, "rounds: Input should be a valid dictionary"),
    ],
)
def test_server_constraints(overrides: dict[str, object], fragment: str) -> None:
    assert fragment in _error(ServerConfig, env={}, overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"data.client_index": 3, "data.num_clients": 3}, "client_index 3 must be below"),
        ({"reconnect.initial_s": 10, "reconnect.max_s": 1}, "max_s 1.0 is below initial_s"),
        ({"data.modality": "audio"}, "data.modality: Input should be 'both'"),
        ({"client_id": "bad id!"}, "client_id: String should match pattern"),
        ({"threads": 0}, "threads: Input should be greater than 0"),
    ],
)
def test_client_constraints(overrides: dict[str, object], fragment: str) -> None:
    assert fragment in _error(ClientConfig, env={}, overrides=overrides)


def test_secrets_are_never_echoed() -> None:
    config = load_config(ClientConfig, env={"CROSSFED_ENROLLMENT_TOKEN": "s3cret-token"})
    assert config.enrollment_token is not None
    assert config.enrollment_token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(config)
    message = _error(ClientConfig, env={}, overrides={"enrollment_token": ["s3cret"]})
    assert "enrollment_token" in message and "s3cret" not in message


def test_file_problems_are_one_line_config_errors(tmp_path: Path) -> None:
    assert "file not found" in _error(ServerConfig, tmp_path / "nope.yaml", env={})
    assert "unsupported file type '.json'" in _error(
        ServerConfig, _write(tmp_path, "s.json", "{}"), env={}
    )
    bad_yaml = _write(tmp_path, "bad.yaml", "rounds:\n  min_clients: [1\n")
    assert "invalid YAML at line" in _error(ServerConfig, bad_yaml, env={})
    bad_toml = _write(tmp_path, "bad.toml", "[rounds\nmin_clients = 1\n")
    assert "invalid TOML" in _error(ServerConfig, bad_toml, env={})
    listing = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping" in _error(ServerConfig, listing, env={})
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    assert "cannot read" in _error(ServerConfig, directory, env={})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "cannot read" in _error(ServerConfig, binary, env={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(ServerConfig, _write(tmp_path, "e.yaml", ""), env={}) == ServerConfig()


def test_override_cannot_descend_into_a_value(tmp_path: Path) -> None:
    message = _error(ServerConfig, env={}, overrides={"listen.port": 1})
    assert "listen: Input should be a valid string [from override listen.port]" in message
    path = _write(tmp_path, "s.yaml", "listen: 0.0.0.0:1\n")
    message = _error(ServerConfig, path, env={}, overrides={"listen.port": 1})
    assert "listen: is a value, not a section; cannot set listen.port" in message


def test_load_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSFED_ROUNDS__ROUNDS", "12")
    assert load_config(ServerConfig).rounds.rounds == 12


def test_image_calibration_gives_the_server_a_calibration_round() -> None:
    """With the flag on the server runs a calibration round (spec of the statistics from the
    model config); the stand-in model has no calibration layers, which is a clear error."""
    import torch
    from crossfed.server.errors import ConfigurationError
    from crossfed.server.server_app import calibration_step_from_config

    config = load_config(
        ServerConfig, None, overrides={"model.calibrate_image_classifier": True}, env={}
    )
    step = calibration_step_from_config(config, "CrossModalNet")
    assert step is not None
    c, h = config.model.num_classes, config.model.hidden_dim
    assert step.spec["head.outer"].shape == (c, h, h)
    assert step.spec["classifier.count"].dtype == torch.float64
    assert calibration_step_from_config(ServerConfig(), "CrossModalNet") is None
    with pytest.raises(ConfigurationError, match="stand-in"):
        calibration_step_from_config(config, "stand-in")


@pytest.mark.parametrize(
    ("model", "key", "value", "belongs"),
    [
        (ServerConfig, "dp_sgd", "true", "the client config's privacy section"),
        (ServerConfig, "dp_sgd_target_epsilon", "3", "the client config's privacy section"),
        (ClientConfig, "central_dp", "true", "the server config's privacy section"),
        (ClientConfig, "central_dp_noise_multiplier", "2", "the server config's privacy section"),
    ],
)
def test_a_privacy_setting_on_the_wrong_side_is_refused_naming_where_it_belongs(
    model: type[ServerConfig | ClientConfig], key: str, value: str, belongs: str
) -> None:
    env_name = f"CROSSFED_PRIVACY__{key.upper()}"
    message = _error(model, env={env_name: value})
    assert message.startswith(f"config: privacy: {key} is a ")
    assert belongs in message and f"[from env {env_name}]" in message
    with pytest.raises(ValueError, match=f"{key} is a .*{belongs}"):
        model.model_validate({"privacy": {key: value}})


def test_each_side_keeps_its_own_privacy_settings(tmp_path: Path) -> None:
    server_yaml = "privacy:\n  central_dp: true\n  noise_multiplier: 2.0\n  clip: 0.5\n"
    server = load_config(ServerConfig, _write(tmp_path, "s.yaml", server_yaml), env={})
    assert server.privacy.central_dp and server.privacy.noise_multiplier == 2.0
    client_yaml = "privacy:\n  dp_sgd: true\n  dp_sgd_target_epsilon: 4.0\n  noise_multiplier: 3\n"
    client = load_config(ClientConfig, _write(tmp_path, "c.yaml", client_yaml), env={})
    assert client.privacy.dp_sgd and client.privacy.dp_sgd_target_epsilon == 4.0
    assert client.privacy.noise_multiplier == 3.0
    assert "central_dp" not in client.privacy.model_dump()
    assert "dp_sgd" not in server.privacy.model_dump()


def test_a_config_written_with_both_sides_defaults_still_loads(tmp_path: Path) -> None:
    """Configs dumped when one privacy section served both sides carry the other side's
    defaults; those never did anything and still load."""
    dumped = (
        "privacy:\n  projection_dp: true\n  noise_multiplier: 4.0\n  dp_sgd: false\n"
        "  dp_sgd_target_epsilon: 8.0\n  dp_sgd_epsilon_budget: null\n  central_dp: false\n"
        "  central_dp_clip: 1.0\n"
    )
    path = _write(tmp_path, "old.yaml", dumped)
    assert load_config(ServerConfig, path, env={}).privacy.noise_multiplier == 4.0
    assert load_config(ClientConfig, path, env={}).privacy.noise_multiplier == 4.0
    assert not load_config(
        ClientConfig, env={"CROSSFED_PRIVACY__CENTRAL_DP": "false"}
    ).privacy.dp_sgd


def test_text_calibration_alone_calibrates_the_text_path_only() -> None:
    from crossfed.server.server_app import calibration_step_from_config

    config = load_config(
        ServerConfig, None, overrides={"model.calibrate_text_classifier": True}, env={}
    )
    step = calibration_step_from_config(config, "CrossModalNet")
    assert step is not None and step.paths == ("text",)
    assert "text_head.outer" in step.spec and "head.outer" not in step.spec
    assert step.wants(rows_with_image=False, rows_with_text=True)
    assert not step.wants(rows_with_image=True, rows_with_text=False)
