"""Regenerate the Python code for protos/crossfed/v1/*.proto with grpcio-tools.

Run `python protos/generate.py` after editing a .proto file; the test
tests/protos/test_proto_staleness.py fails when the committed code is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources of the contract, in a stable order."""
    return sorted((root / "crossfed" / "v1").glob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (via grpc_tools) into out_dir; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency, imported only when generating

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(root)) for p in proto_files(root)],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(
        p for p in (out_dir / "crossfed" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


if __name__ == "__main__":
    written = generate(PROTO_ROOT)
    print("\n".join(str(p.relative_to(PROTO_ROOT.parent)) for p in written))
    sys.exit(0)
