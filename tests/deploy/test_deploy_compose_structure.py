"""Fast structural checks of docker-compose.yml and its overlays, merged the way compose merges
them: commands parse against the real `crossfed` CLI, volumes and depends_on refer to real
things, kits line up with the services that use them, env names are real config fields, and the
provisioning job and the health check actually run (no Docker engine needed)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from crossfed.common.config import ClientConfig, ServerConfig, load_config
from typer._click.exceptions import BadParameter, UsageError

from crossfed.cli import app as crossfed_app
from tests.support.deploy.compose_local_runner import LocalComposeRunner, parse_dockerfile
from tests.support.deploy.compose_project import (
    ComposeError,
    healthcheck_argv,
    interpolate,
    load_project,
    parse_duration_s,
    service_argv,
    volume_target,
)
from tests.support.deploy.crossfed_cli_parsing import parse_crossfed
from tests.support.deploy.deploy_paths import (
    CLIENT_MODALITIES,
    CLIENT_SERVICES,
    COMBINATIONS,
    COMPOSE,
    INSECURE,
    MTLS,
    PERSISTENT,
    TINY_RUN_ENV,
)

ONE_SHOT_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
IMAGE_PROGRAMS = {"crossfed", "python", "sh"}


@pytest.fixture(scope="module", params=sorted(COMBINATIONS))
def project(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_project(COMBINATIONS[request.param], {})


def services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(project["services"])


def mount_sources(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for every volume entry."""
    out = {}
    for entry in service.get("volumes", []):
        source = entry["source"] if isinstance(entry, dict) else str(entry).split(":")[0]
        out[volume_target(entry)] = source
    return out


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


# ------------------------------------------------------------------------------- the files


def test_every_documented_combination_loads_with_defaults_only() -> None:
    for name, files in COMBINATIONS.items():
        project = load_project(files, {})  # no .env: every variable needs a default
        assert {"cert-init", "server", "admin", *CLIENT_SERVICES} <= set(project["services"]), name


def test_services_run_commands_that_the_cli_accepts(project: dict[str, Any]) -> None:
    image = parse_dockerfile(Path(COMPOSE.parent / "deploy" / "Dockerfile"))
    for name, service in services(project).items():
        argv = service_argv(service, image.cmd)
        assert argv and argv[0] in IMAGE_PROGRAMS, f"{name}: {argv[:1]} is not in the image"
        if argv[0] == "crossfed":
            command, _params = parse_crossfed(argv[1:])
            assert command.callback is not None, name
        probe = healthcheck_argv(service)
        if probe is not None:
            assert probe[0] == "crossfed", f"{name}: health check must not need extra binaries"
            parse_crossfed(probe[1:])


def test_parse_crossfed_rejects_a_bad_flag() -> None:
    with pytest.raises(UsageError, match="no-such-flag"):
        parse_crossfed(["client", "start", "--no-such-flag"])
    with pytest.raises(BadParameter, match="audio_only"):
        parse_crossfed(["client", "start", "--modality", "audio_only"])
    with pytest.raises(UsageError):
        parse_crossfed(["deploy", "no-such-command"])


def test_volumes_and_dependencies_refer_to_real_things(project: dict[str, Any]) -> None:
    declared = set(project.get("volumes") or {})
    all_services = services(project)
    for name, service in all_services.items():
        for target, source in mount_sources(service).items():
            assert target.startswith("/"), f"{name}: mount target {target!r} must be absolute"
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source!r} is not declared"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in all_services, f"{name} depends on unknown service {dep!r}"
            condition = spec.get("condition", "service_started")
            assert condition in ONE_SHOT_CONDITIONS, f"{name}: condition {condition!r}"
            if condition == "service_healthy":
                assert healthcheck_argv(all_services[dep]), f"{dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert all_services[dep].get("restart", "no") == "no", f"{dep} is not one-shot"
    # no cycles: a topological order exists
    order: list[str] = []
    pending = dict(all_services)
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += ready
        for n in ready:
            pending.pop(n)
    assert order.index("cert-init") < order.index("server") < order.index("client-text")


def test_server_is_persistent_and_probed(project: dict[str, Any]) -> None:
    server = services(project)["server"]
    assert "/var/lib/crossfed" in mount_sources(server)
    state_dir = server["environment"]["CROSSFED_STATE_DIR"]
    assert state_dir.startswith("/var/lib/crossfed/")
    assert server["restart"] == "unless-stopped"
    assert server["healthcheck"]["test"][:4] == ["CMD", "crossfed", "deploy", "health-probe"]
    assert any(str(p).endswith(":50051") for p in server["ports"])


def test_health_check_runs_on_debian_12_docker_and_a_busy_host(project: dict[str, Any]) -> None:
    """Compose refuses healthcheck.start_interval on engines before v25 (Debian 12's docker.io
    is 20.10), and the probe, a Python process, took over 5 s with three clients training on 2
    cores (found by the real-engine test, tests/deploy/test_deploy_docker_engine.py)."""
    check = services(project)["server"]["healthcheck"]
    assert "start_interval" not in check
    assert parse_duration_s(check["timeout"]) >= 20


def test_clients_are_edge_sized_isolated_and_match_their_kits(project: dict[str, Any]) -> None:
    all_services = services(project)
    init_argv = service_argv(all_services["cert-init"], [])
    init_mounts = {src: target for target, src in mount_sources(all_services["cert-init"]).items()}
    kits = dict(item.split("=", 1) for item in option_values(init_argv, "--client"))  # name->dir
    seen_volumes: set[str] = set()
    for name in CLIENT_SERVICES:
        client = all_services[name]
        limits = client["deploy"]["resources"]["limits"]
        assert (str(limits["cpus"]), str(limits["memory"]).lower()) == ("1", "1g"), name
        env = client["environment"]
        assert env["CROSSFED_DATA__MODALITY"] == CLIENT_MODALITIES[name]
        assert env["CROSSFED_THREADS"] == "1"
        mounts = mount_sources(client)
        volume = mounts["/var/lib/crossfed"]
        assert volume not in seen_volumes, f"{name} shares its volume with another client"
        seen_volumes.add(volume)
        # the cert-init job writes this client's kit into exactly this volume, under its id
        assert kits[env["CROSSFED_CLIENT_ID"]] == init_mounts[volume], name
        assert client["depends_on"]["server"]["condition"] == "service_healthy"
        assert client["restart"] == "on-failure"
    pki = mount_sources(all_services["cert-init"])[option_values(init_argv, "--pki")[0]]
    holders = [n for n, s in all_services.items() if pki in mount_sources(s).values()]
    assert holders == ["cert-init"], f"only the init job may mount the CA ({pki})"
    server_kit = option_values(init_argv, "--server-kit")[0]
    assert init_mounts[mount_sources(all_services["server"])["/var/lib/crossfed"]] == server_kit
    admin_kit = option_values(init_argv, "--admin")[0].split("=", 1)[1]
    assert init_mounts[mount_sources(all_services["admin"])["/var/lib/crossfed"]] == admin_kit


def _config_env(env: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith("CROSSFED_")}


def test_environment_names_are_config_fields(project: dict[str, Any]) -> None:
    all_services = services(project)
    for name, model in [("server", ServerConfig), *((c, ClientConfig) for c in CLIENT_SERVICES)]:
        env = _config_env(all_services[name]["environment"])
        for key in env:
            top = key.removeprefix("CROSSFED_").split("__")[0].lower()
            assert top in model.model_fields, f"{name}: {key} is not a {model.__name__} field"
        load_config(model, env=env)  # deeper typos and bad values raise ConfigError


def test_admin_environment_is_what_the_admin_cli_reads(project: dict[str, Any]) -> None:
    admin = services(project)["admin"]
    group = typer.main.get_command(crossfed_app).commands["admin"]  # type: ignore[attr-defined]
    envvars = {p.envvar for p in group.params if getattr(p, "envvar", None)}
    assert set(admin["environment"]) <= envvars
    assert admin["profiles"] == ["tools"]


def test_overlays_change_what_they_claim() -> None:
    base = services(load_project([COMPOSE], {}))
    mtls = services(load_project([COMPOSE, MTLS], {}))
    insecure = services(load_project([COMPOSE, INSECURE], {}))
    persistent = services(load_project([COMPOSE, PERSISTENT], {"CROSSFED_DATA_DIR": "/srv/cf"}))
    for name in ("server", *CLIENT_SERVICES):
        assert base[name]["environment"]["CROSSFED_TLS__MTLS"] == "false"
        assert mtls[name]["environment"]["CROSSFED_TLS__MTLS"] == "true"
        assert insecure[name]["environment"]["CROSSFED_TLS__INSECURE"] == "true"
        # merged by key: the overlay did not drop the rest of the environment
        assert set(base[name]["environment"]) <= set(mtls[name]["environment"])
        mount = mount_sources(persistent[name])["/var/lib/crossfed"]
        assert mount.startswith("/srv/cf/") and len(persistent[name]["volumes"]) == 1
    assert mtls["admin"]["environment"]["CROSSFED_ADMIN_CERT"] == "operator"
    assert insecure["server"]["ports"] == ["127.0.0.1:50051:50051"]  # !override, not appended
    # plaintext on the container's 0.0.0.0 is allowed explicitly, only in this overlay
    assert insecure["server"]["environment"]["CROSSFED_TLS__INSECURE_OFF_LOOPBACK"] == "true"
    assert "CROSSFED_TLS__INSECURE_OFF_LOOPBACK" not in base["server"]["environment"]
    assert "insecure-warning" in insecure["server"]["depends_on"]
    for name in CLIENT_SERVICES:  # an insecure server cannot enroll: no token config
        assert "--config" not in insecure[name]["command"]
    # TLS stays the default: nothing in the base file turns it off
    assert all(
        s.get("environment", {}).get("CROSSFED_TLS__INSECURE") != "true" for s in base.values()
    )


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$HOME", env, "t") == (
        "x d  d $HOME"
    )
    with pytest.raises(ComposeError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", env, "t")
    tiny = services(load_project([COMPOSE], TINY_RUN_ENV))
    assert tiny["server"]["environment"]["CROSSFED_ROUNDS__ROUNDS"] == "2"
    assert tiny["client-both"]["environment"]["CROSSFED_DATA__NUM_SAMPLES"] == "120"


def test_merge_rejects_unquoted_booleans_in_environment(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump({"services": {"s": {"command": ["x"], "environment": {"A": True}}}})
    )
    with pytest.raises(ComposeError, match="quote it"):
        load_project([bad], {})


def test_repository_files_compose_builds_from_exist() -> None:
    base = load_project([COMPOSE], {})
    build = base["services"]["server"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    text = COMPOSE.read_text("utf-8")
    for overlay in (MTLS, PERSISTENT, INSECURE):
        assert overlay.relative_to(COMPOSE.parent).as_posix() in text  # documented in the header


# ------------------------------------------------------------- commands that actually run


@pytest.mark.integration
@pytest.mark.parametrize("combination", ["base", "insecure"])
def test_cert_init_is_idempotent_and_the_health_check_runs(
    tmp_path: Path, combination: str
) -> None:
    project = load_project(COMBINATIONS[combination], {})
    runner = LocalComposeRunner(
        project, parse_dockerfile(COMPOSE.parent / "deploy/Dockerfile"), tmp_path
    )
    first = runner.run("cert-init")
    assert first.returncode == 0, first.stderr
    assert re.search(r"provisioned: \d+ created, 0 already present", first.stdout)
    second = runner.run("cert-init")
    assert second.returncode == 0, second.stderr
    assert re.search(r"provisioned: 0 created, \d+ already present", second.stdout)
    kit = runner.mounts("client-text")["/var/lib/crossfed"]
    assert (kit / "kit/tls/ca.crt").is_file() and not (kit / "kit/tls/ca.key").exists()
    assert oct((kit / "kit/client.yaml").stat().st_mode & 0o777) == "0o600"
    # no server is running: the probe must say "unhealthy" (1), not "bad input" (2)
    probe = healthcheck_argv(project["services"]["server"])
    assert probe is not None
    result = runner.run("server", probe, timeout_s=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert os.environ.get("CROSSFED_LISTEN") is None  # nothing leaked into this process
