"""Hostile inputs to the commands and the configuration: a state dir that is a file or cannot
be created, a manifest image whose header declares 100000 x 100000 pixels, `export-model` to an
over-long name, an unwritable place, a directory or a device node (`--force`), an infinite
budget or deadline, plaintext on a non-loopback address, and prototype files piling up. Each
answer is one readable line (no traceback) and leaves what is on disk intact."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import pytest
from attack_harness import AttackServer, attack_server, record_attack, wait_for, wait_train
from crossfed.common.config import ConfigError, ServerConfig, load_config
from crossfed.server.admin_servicer import ADMIN_CREDENTIAL_FILE
from reliability_harness import projection_payload
from typer.testing import CliRunner, Result

from crossfed.cli import app

runner = CliRunner()


def _one_line(result: Result) -> str:
    """The command failed with exactly one readable line and no traceback."""
    text = (result.output or "").strip()
    assert result.exit_code not in (0, None), text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_a_state_dir_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    answers = []
    for state in (blocker, blocker / "sub"):
        result = runner.invoke(app, ["server", "start", "--insecure", "--state-dir", str(state)])
        answers.append(_one_line(result))
    assert blocker.read_text() == "not a directory"
    record_attack(
        "state_dir_unusable",
        "`crossfed server start --state-dir` naming a file, then a path below a file",
        "exit 2 with one line naming the path",
        " / ".join(answers),
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (RGB) and whose pixel data is a stub."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_in_a_manifest_is_a_bad_row(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text,label\nbomb.png,a red square,0\n")
    result = runner.invoke(
        app,
        [
            "client", "start", "--insecure", "--server", "127.0.0.1:1",
            "--data", str(manifest), "--state-dir", str(tmp_path / "client"),
            "--cache-dir", str(tmp_path / "cache"),
        ],
    )  # fmt: skip
    line = _one_line(result)
    assert "100000x100000" in line or "too many pixels" in line
    record_attack(
        "manifest_decompression_bomb",
        "a manifest row's PNG header declares 100000 x 100000 pixels (PIL decompression bomb)",
        "the row is reported as unusable before any pixel is decoded; one line, exit 2",
        line,
    )


def _export(srv_args: list[str], target: Path, *flags: str) -> Result:
    return runner.invoke(app, ["admin", *srv_args, "export-model", str(target), *flags])


def test_export_model_writes_only_where_it_safely_can(tmp_path: Path) -> None:
    with attack_server(tmp_path) as srv:
        args = [
            "--server", srv.target, "--certs-dir", str(srv.certs),
            "--credential", str(srv.state_dir / ADMIN_CREDENTIAL_FILE),
        ]  # fmt: skip
        out = tmp_path / "out"
        out.mkdir()
        long_name = _one_line(_export(args, out / ("m" * 300 + ".safetensors")))
        unwritable = _one_line(_export(args, Path("/proc/crossfed-model.safetensors")))
        a_dir = out / "a-directory"
        a_dir.mkdir()
        onto_dir = _one_line(_export(args, a_dir, "--force"))
        fifo = out / "a-fifo"
        os.mkfifo(fifo)
        onto_fifo = _one_line(_export(args, fifo, "--force"))
        device = out / "a-device"
        try:
            os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
        except PermissionError:
            device = fifo  # no CAP_MKNOD: the FIFO stands for every non-regular file
        onto_device = _one_line(_export(args, device, "--force"))
        regular = out / "model.safetensors"
        regular.write_bytes(b"old")
        assert _export(args, regular, "--force").exit_code == 0  # a regular file: replaced
        assert regular.stat().st_size > 3
    assert a_dir.is_dir() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not stat.S_ISREG(os.lstat(device).st_mode)  # the node is still a node
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    record_attack(
        "export_model_paths",
        "`crossfed admin export-model` to a 300-character name, into /proc, and with --force "
        "onto a directory, a FIFO and a character device (as root)",
        "one line each, nothing written or replaced; --force replaces regular files only",
        f"{long_name} | {unwritable} | {onto_dir} | {onto_fifo} | {onto_device}",
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"privacy.epsilon_budget": float("inf")}, "privacy.epsilon_budget"),
        ({"rounds.round_deadline_s": float("1e400")}, "rounds.round_deadline_s"),
        ({"privacy.noise_multiplier": float("nan")}, "privacy.noise_multiplier"),
    ],
)
def test_infinite_or_nan_settings_are_refused(overrides: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as refused:
        load_config(ServerConfig, env={}, overrides=overrides)
    record_attack(
        f"config_{field.split('.')[-1]}_not_finite",
        f"server config {field} = {next(iter(overrides.values()))!r}",
        "refused with one line naming the field",
        str(refused.value),
    )


def test_plaintext_off_loopback_needs_an_explicit_flag() -> None:
    with pytest.raises(ConfigError, match="not a loopback address") as refused:
        load_config(
            ServerConfig, env={}, overrides={"tls.insecure": True, "listen": "0.0.0.0:50051"}
        )
    meant = load_config(
        ServerConfig,
        env={},
        overrides={
            "tls.insecure": True,
            "listen": "0.0.0.0:50051",
            "tls.insecure_off_loopback": True,
        },
    )
    assert meant.tls.insecure_off_loopback
    record_attack(
        "insecure_off_loopback",
        "`crossfed server start --insecure --listen 0.0.0.0:50051`",
        "refused unless --insecure-off-loopback is given as well",
        str(refused.value),
    )


def _wait_committed(srv: AttackServer, round_no: int) -> None:
    wait_for(lambda: srv.engine.run.last_committed_round >= round_no, 30, f"round {round_no}")
    assert srv.engine.wait_idle(30.0)  # the committer prunes after recording the commit


def test_prototype_files_are_pruned_like_checkpoints(tmp_path: Path) -> None:
    with attack_server(tmp_path, {"keep_checkpoints": 1}, rounds=3, min_clients=2) as srv:
        a, b = srv.client("a", 1), srv.client("b", 2)
        for c in (a, b):
            c.register()
        for round_no in (1, 2, 3):
            for c in (a, b):
                wait_train(c, round_no)
            start = a.download(round_no)
            for c in (a, b):
                c.exchange(round_no, projection_payload(c.index))
                assert c.upload(round_no, start).accepted
            _wait_committed(srv, round_no)
        kept = sorted(p.name for p in (srv.state_dir / "checkpoints").glob("prototypes-*"))
    assert kept == ["prototypes-000003.safetensors"]
    record_attack(
        "prototype_files_pile_up",
        "a run of 3 rounds with projection exchange and keep_checkpoints = 1",
        "prototype files pruned with the checkpoints: only the newest kept",
        f"left: {kept}",
    )
