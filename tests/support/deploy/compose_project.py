"""Load docker-compose files the way `docker compose -f a.yml -f b.yml config` does, without a
Docker engine: YAML anchors/merge keys, ${VAR} interpolation, the compose merge rules for
overlays (mappings deep-merged; environment/labels by key; volumes by target; depends_on by
service; ports appended; command/entrypoint/healthcheck.test replaced; !reset / !override).

Only the subset of the compose specification that crossfed's files use is implemented; an
unsupported construct raises ComposeError instead of being silently misread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ComposeError(ValueError):
    """A compose file that compose itself would reject (or that this loader cannot model)."""


@dataclass(frozen=True)
class _Reset:
    """`!reset`: remove the value inherited from earlier files."""


@dataclass(frozen=True)
class _Override:
    """`!override VALUE`: replace instead of merging."""

    value: Any


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus compose's !reset / !override tags."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))  # type: ignore[arg-type]


for _tag, _fn in (("!reset", _reset), ("!override", _override)):
    _ComposeLoader.add_constructor(_tag, _fn)  # type: ignore[arg-type]

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, $$ (literal $).
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str], where: str) -> str:
    """Substitute compose variables in one string (nested defaults are not supported)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in env
        nonempty = present and env[name] != ""
        if op in (":-", "-"):
            use_default = not nonempty if op == ":-" else not present
            return arg if use_default else env[name]
        if op in (":?", "?"):
            missing = not nonempty if op == ":?" else not present
            if missing:
                raise ComposeError(f"{where}: required variable {name} is missing: {arg}")
            return env[name]
        if "${" in arg:
            raise ComposeError(f"{where}: nested interpolation is not supported")
        return env.get(name, "")

    return _VAR.sub(substitute, value)


def _interpolate_tree(node: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, where)
    if isinstance(node, _Override):
        return _Override(_interpolate_tree(node.value, env, where))
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    return node


def _env_mapping(value: Any, where: str) -> dict[str, str | None]:
    """environment/labels: list form ('K=V' or 'K') or mapping form -> mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): None if v is None else _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        out: dict[str, str | None] = {}
        for item in value:
            key, sep, val = str(item).partition("=")
            out[key] = val if sep else None
        return out
    raise ComposeError(f"{where}: expected a mapping or a list, got {type(value).__name__}")


def _scalar(value: Any) -> str:
    """Compose stringifies scalar env values; booleans must be quoted (compose refuses them)."""
    if isinstance(value, bool):
        raise ComposeError(f"boolean {value!r} in environment: quote it ('true'/'false')")
    return str(value)


def volume_target(entry: Any) -> str:
    """Container path of a volume entry (short 'src:dst[:mode]' or long syntax)."""
    if isinstance(entry, dict):
        return str(entry["target"])
    parts = str(entry).split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def _depends_mapping(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {str(name): {"condition": "service_started"} for name in value}
    return {str(k): dict(v or {"condition": "service_started"}) for k, v in value.items()}


_REPLACED = {"command", "entrypoint"}
_BY_KEY = {"environment", "labels"}


def _merge_service(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, _Reset):
            out.pop(key, None)
        elif isinstance(value, _Override):
            out[key] = value.value
        elif key not in out or key in _REPLACED:
            out[key] = value
        elif key in _BY_KEY:
            out[key] = {
                **_env_mapping(out[key], f"{where}.{key}"),
                **_env_mapping(value, f"{where}.{key}"),
            }
        elif key == "volumes":
            merged = {volume_target(v): v for v in out[key]}
            merged.update({volume_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key == "depends_on":
            out[key] = {**_depends_mapping(out[key]), **_depends_mapping(value)}
        elif key == "healthcheck":
            out[key] = {**out[key], **value}  # test is replaced as a whole
        elif isinstance(out[key], list) and isinstance(value, list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_mapping(out[key], value)
        else:
            out[key] = value
    return out


def _merge_mapping(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, _Reset):
            out.pop(key, None)
        elif isinstance(value, _Override):
            out[key] = value.value
        elif isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge_mapping(out[key], value)
        else:
            out[key] = value
    return out


def _strip_tags(node: Any) -> Any:
    if isinstance(node, _Override):
        return _strip_tags(node.value)
    if isinstance(node, dict):
        return {k: _strip_tags(v) for k, v in node.items() if not isinstance(v, _Reset)}
    if isinstance(node, list):
        return [_strip_tags(v) for v in node]
    return node


def _normalize(project: dict[str, Any]) -> dict[str, Any]:
    """Canonical forms: environment as mapping, depends_on as mapping, no x- keys."""
    services = project.get("services") or {}
    for name, service in services.items():
        if "environment" in service:
            service["environment"] = _env_mapping(
                service["environment"], f"services.{name}.environment"
            )
        if "depends_on" in service:
            service["depends_on"] = _depends_mapping(service["depends_on"])
    return {k: v for k, v in project.items() if not str(k).startswith("x-")}


def read_compose_file(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Parse and interpolate one file (anchors and merge keys resolved by YAML)."""
    try:
        data = yaml.load(Path(path).read_text("utf-8"), Loader=_ComposeLoader)
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ComposeError(f"{path}: top level must be a mapping")
    return dict(_interpolate_tree(data, env, str(path)))


def load_project(paths: list[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """`docker compose -f paths[0] -f paths[1] ... config`, as a plain dict."""
    project: dict[str, Any] = {}
    for path in paths:
        layer = read_compose_file(path, env)
        for key, value in layer.items():
            if key == "services":
                services = dict(project.get("services") or {})
                for name, service in (value or {}).items():
                    where = f"{path}:services.{name}"
                    if isinstance(service, _Reset):
                        services.pop(name, None)
                    elif name in services:
                        services[name] = _merge_service(services[name], service or {}, where)
                    else:
                        services[name] = dict(service or {})
                project["services"] = services
            elif isinstance(value, dict) and isinstance(project.get(key), dict):
                project[key] = _merge_mapping(project[key], value)
            else:
                project[key] = value
    return _normalize(_strip_tags(project))


def service_argv(service: Mapping[str, Any], image_cmd: list[str]) -> list[str]:
    """The process a container runs: entrypoint + command (image CMD when no command)."""
    entrypoint = service.get("entrypoint") or []
    command = service.get("command")
    if isinstance(entrypoint, str) or isinstance(command, str):
        raise ComposeError("use list form for command/entrypoint (no shell parsing here)")
    if command is None:
        command = [] if entrypoint else image_cmd
    return [str(x) for x in (*entrypoint, *command)]


def healthcheck_argv(service: Mapping[str, Any]) -> list[str] | None:
    """The health check command ('CMD' form as argv; 'CMD-SHELL' through sh -c)."""
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return None
    test = check.get("test")
    if isinstance(test, str):
        return ["sh", "-c", test]
    if not isinstance(test, list) or not test or test[0] not in ("CMD", "CMD-SHELL", "NONE"):
        raise ComposeError(f"healthcheck.test must be a list starting with CMD, got {test!r}")
    if test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", " ".join(str(t) for t in test[1:])]
    return [str(t) for t in test[1:]]


def parse_duration_s(text: str | float) -> float:
    """Compose durations ('10s', '1m30s', '500ms') in seconds."""
    if isinstance(text, int | float):
        return float(text)
    total, pos = 0.0, 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    for match in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ComposeError(f"invalid duration {text!r}")
    return total
