"""deploy/Dockerfile and .dockerignore without a Docker engine: the build order that keeps torch
CPU-only, a non-root offline runtime, and a package that builds and imports from exactly the
files the Dockerfile copies (a forgotten folder fails here, not in a registry build)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.deploy.compose_local_runner import parse_dockerfile
from tests.support.deploy.deploy_paths import DOCKERFILE, DOCKERIGNORE, REPO

TEXT = DOCKERFILE.read_text("utf-8")
LINES = [
    line.strip()
    for line in re.sub(r"\\\n", " ", TEXT).splitlines()
    if line.strip() and not line.strip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in LINES if line.upper().startswith(keyword + " ")]


def copied_paths() -> list[str]:
    """Sources of COPY instructions that read the build context (not --from=stage)."""
    paths: list[str] = []
    for args in instructions("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        paths += [w for w in words[:-1] if not w.startswith("--")]
    return paths


def ignored(path: str, patterns: list[str]) -> bool:
    """Does .dockerignore exclude ``path`` (last matching pattern wins, ! re-includes)?"""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates) or any(
            fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts
        ):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_torch_cpu_is_installed_before_the_package() -> None:
    assert instructions("ARG")[0].startswith("PYTHON_IMAGE=python:3.11-slim")
    args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0"
    assert args["TORCH_INDEX_URL"].strip('"') == "https://download.pytorch.org/whl/cpu"
    runs = instructions("RUN")
    torch_run = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    assert "--index-url" in runs[torch_run] and "${TORCH_INDEX_URL}" in runs[torch_run]
    package_run = next(i for i, r in enumerate(runs) if re.search(r"pip install (--\S+ )*\.\s", r))
    assert torch_run < package_run


def test_a_registry_less_builder_can_build_it() -> None:
    """No `# syntax=` directive (the builder would fetch that frontend image from a registry);
    torch wheels can come from an image named by a build argument, by default empty (scratch),
    mounted into the torch install as pip --find-links."""
    assert not re.search(r"^#\s*syntax\s*=", TEXT, re.MULTILINE | re.IGNORECASE)
    args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
    assert args["TORCH_WHEELS_IMAGE"] == "scratch"
    assert "${TORCH_WHEELS_IMAGE} AS torch-wheels" in instructions("FROM")
    torch_run = next(r for r in instructions("RUN") if "${TORCH_SPEC}" in r)
    mount = re.search(r"--mount=type=bind,from=torch-wheels,target=(\S+)", torch_run)
    assert mount and f"--find-links {mount.group(1)}" in torch_run


def test_packages_install_without_bytecode_or_cache() -> None:
    """pip would compile ~370 MB of .pyc for modules nothing imports and keep a cache."""
    assert "PIP_NO_CACHE_DIR=1" in TEXT
    installs = [i for r in instructions("RUN") for i in re.findall(r"pip install ([^&]*)", r)]
    assert len(installs) == 3  # pip itself, torch, the package
    for install in installs:
        if "--upgrade pip" not in install:
            assert "--no-compile" in install, install


def test_runtime_is_non_root_offline_and_downloads_nothing() -> None:
    image = parse_dockerfile(DOCKERFILE)
    assert image.user.split(":")[0] not in ("root", "0")
    assert image.env["HF_HUB_OFFLINE"] == "1" and image.env["TRANSFORMERS_OFFLINE"] == "1"
    assert image.workdir == "/var/lib/crossfed"
    runtime = TEXT[TEXT.rindex("FROM ") :]
    assert not re.search(r"\b(curl|wget|ADD\s+https?://)", runtime)
    assert "huggingface-cli" not in TEXT and "snapshot_download" not in TEXT


def test_dockerignore_keeps_secrets_and_venv_out_but_sources_in() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "certs/ca.key", "x/credential.json", "tests/a"):
        assert ignored(path, patterns), path
    for path in copied_paths():
        assert not ignored(path, patterns), f"COPY {path} but .dockerignore excludes it"
        assert (REPO / path).exists(), f"COPY {path}: not in the repository"


@pytest.mark.integration
def test_package_builds_and_imports_from_the_copied_files_only(tmp_path: Path) -> None:
    context = tmp_path / "context"
    patterns = dockerignore_patterns()
    for path in copied_paths():
        source = REPO / path
        if source.is_dir():
            shutil.copytree(
                source,
                context / path,
                ignore=lambda d, names: [
                    n for n in names if ignored(str((Path(d) / n).relative_to(REPO)), patterns)
                ],
            )
        else:
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / path)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, check=False, timeout=180,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("crossfed-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "crossfed/v1/coordinator.proto").is_file()
    code = (
        "import crossfed, crossfed.cli, crossfed.provisioning, crossfed.health_probe, "
        "crossfed.server.server_app, crossfed.client.daemon; print(crossfed.__file__)"
    )
    # -S: no site hooks, so the checkout's editable-install finder cannot shadow the wheel;
    # third-party packages still come from this environment's site-packages.
    packages = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *packages])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(site)), "imported the checkout, not the wheel"
