"""Structured logs: one JSON object per line with time, level, logger, message and extra
fields; secrets never reach the output (JSON or text); bad level -> clear error."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from crossfed.common.crypto.identity import Secret
from crossfed.server.structured_logging import (
    LoggingSetupError,
    configure_logging,
)
from typer.testing import CliRunner

from crossfed.cli import app

TOKEN = "cfe_" + "A1b2C3d4" * 5


@pytest.fixture()
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_fields(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("info", json_lines=True, stream=stream)
    log = logging.getLogger("crossfed.test.json")
    log.info("round %d committed", 3, extra={"round": 3, "clients": ["a", "b"]})
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = _lines(stream)
    assert first["level"] == "INFO" and first["logger"] == "crossfed.test.json"
    assert first["message"] == "round 3 committed"
    assert first["round"] == 3 and first["clients"] == ["a", "b"]
    assert datetime.fromisoformat(str(first["time"])).tzinfo is not None
    assert second["level"] == "ERROR" and "ValueError: boom" in str(second["exc_info"])


@pytest.mark.parametrize("json_lines", [True, False])
def test_secrets_never_logged(restore_root: None, json_lines: bool) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", json_lines=json_lines, stream=stream)
    log = logging.getLogger("crossfed.test.secrets")
    log.info("enrolled with token %s", TOKEN)
    log.info("header x-crossfed-signature=%s", "ab" * 32)
    log.info("ok", extra={"client_secret": "hunter2", "token": TOKEN, "blob": b"\x00" * 9})
    log.info("wrapped %s", Secret("hunter3"))
    out = stream.getvalue()
    for secret in (TOKEN, "ab" * 32, "hunter2", "hunter3"):
        assert secret not in out
    assert "cfe_<redacted>" in out
    if json_lines:
        extra = _lines(stream)[2]
        assert extra["client_secret"] == "<redacted>" and extra["blob"] == "<9 bytes>"


def test_bad_level_is_a_clear_error(restore_root: None) -> None:
    with pytest.raises(LoggingSetupError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")


def test_server_cli_bad_log_level_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["server", "start", "--insecure", "--log-level", "LOUD", "--state-dir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "crossfed server: unknown log level 'LOUD'; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
