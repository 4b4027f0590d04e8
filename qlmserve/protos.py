"""Generate the gRPC code from proto/ with grpcio-tools, and keep it current.

Generated modules live in qlmserve/v1/ (git-ignored). `ensure_generated()` regenerates
them when a .proto file changed since the last run (a stamp holds their hash), so a
fresh checkout works even before `make proto`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT
STAMP = ROOT / "qlmserve" / "v1" / ".stamp"


def _proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("qlmserve/v1/*.proto"))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    files = _proto_files()
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    from google.rpc import status_pb2

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    # google/rpc/status.proto (per-item errors of SubmitBatch) ships with googleapis-common-protos.
    googleapis = str(Path(status_pb2.__file__).resolve().parents[2])
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"-I{googleapis}", f"--python_out={OUT_DIR}",
            f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}"] + [str(f) for f in files]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    STAMP.write_text(_digest(files))


def ensure_generated() -> None:
    files = _proto_files()
    if not files:  # installed without the source tree: the generated code ships in the wheel
        return
    if STAMP.exists() and STAMP.read_text() == _digest(files):
        return
    generate()


if __name__ == "__main__":
    generate()
    print(f"generated {len(_proto_files())} proto files into {OUT_DIR / 'qlmserve' / 'v1'}", file=sys.stderr)
