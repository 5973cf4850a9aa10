"""The committed generated code must be exactly what grpcio-tools makes of the .proto files."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GEN = runpy.run_path(str(REPO / "protos" / "generate.py"))


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = GEN["generate"](tmp_path)
    assert fresh, "protoc produced nothing"
    committed_dir = REPO / "protos" / "crossfed" / "v1"
    committed = sorted(
        p.name for p in committed_dir.iterdir() if p.name.endswith(GEN["GENERATED_SUFFIXES"])
    )
    assert committed == [p.name for p in fresh], (
        "generated file set differs: run python protos/generate.py"
    )
    stale = [p.name for p in fresh if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    assert not stale, f"stale generated code {stale}: run python protos/generate.py"


def test_staleness_check_detects_an_edit(tmp_path: Path) -> None:
    """The check above is only worth something if an edited .proto changes the output."""
    root = tmp_path / "src"
    (root / "crossfed" / "v1").mkdir(parents=True)
    for proto in GEN["proto_files"]():
        text = proto.read_text()
        if proto.name == "common.proto":
            text = text.replace("uint64 round = 6;", "uint64 round = 6;\n  uint64 extra = 7;")
        (root / "crossfed" / "v1" / proto.name).write_text(text)
    edited = GEN["generate"](tmp_path / "out", root)
    original = REPO / "protos" / "crossfed" / "v1" / "common_pb2.py"
    edited_common = next(p for p in edited if p.name == "common_pb2.py")
    assert edited_common.read_bytes() != original.read_bytes()


@pytest.mark.parametrize(
    "service,methods",
    [
        (
            "Coordinator",
            {
                "Enroll",
                "Register",
                "Heartbeat",
                "DownloadGlobalModel",
                "UploadUpdate",
                "ExchangeProjections",
            },
        ),
        (
            "Admin",
            {
                "GetStatus",
                "ListClients",
                "ListRounds",
                "StartRun",
                "PauseRun",
                "ResumeRun",
                "StopRun",
                "UpdateConfig",
                "ExportModel",
                "RemoveClient",
                "CreateEnrollmentToken",
                "StreamEvents",
            },
        ),
    ],
)
def test_services_expose_the_contract(service: str, methods: set[str]) -> None:
    from crossfed.v1 import admin_pb2, coordinator_pb2

    module = coordinator_pb2 if service == "Coordinator" else admin_pb2
    desc = module.DESCRIPTOR.services_by_name[service]
    assert {m.name for m in desc.methods} == methods
