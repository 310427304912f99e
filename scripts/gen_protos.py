#!/usr/bin/env python3
"""Regenerate the Python gRPC stubs from ``protos/`` into ``splitinfer/protocol/``.

Usage::

    python scripts/gen_protos.py          # (re)write the committed stubs
    python scripts/gen_protos.py --check  # generate into a temp dir; exit 1 listing stubs that differ

The protos are compiled with ``-I protos`` so the generated gRPC module imports
``from splitinfer.protocol import grpc_service_pb2``. Needs ``grpcio-tools`` (the ``[dev]`` extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ["splitinfer/protocol/grpc_service.proto"]
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def expected_outputs(proto: str) -> list[str]:
    """The stub files (relative to the repository root) generated from one ``.proto``."""
    stem = proto[: -len(".proto")]
    return [stem + s for s in SUFFIXES]


def generate(out_dir: Path) -> list[str]:
    """Run protoc for every proto into ``out_dir``; returns the generated files' relative paths."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is not installed (pip install -e '.[dev]')")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {proto}")
    return [f for proto in PROTOS for f in expected_outputs(proto)]


def check() -> int:
    """Generate into a temp dir and compare with the committed stubs; 0 when identical."""
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        differing = []
        for rel in files:
            fresh = Path(tmp) / rel
            committed = ROOT / rel
            if not committed.is_file():
                differing.append(f"{rel} (missing)")
            elif committed.read_bytes() != fresh.read_bytes():
                differing.append(f"{rel} (differs)")
    if differing:
        print("generated stubs are out of date; run `python scripts/gen_protos.py`:", file=sys.stderr)
        for line in differing:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"stubs up to date ({len(files)} files)")
    return 0


def write() -> int:
    """Generate and copy the stubs into the source tree."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            dest = ROOT / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, dest)
            print(f"wrote {rel}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed stubs are current")
    args = parser.parse_args(argv)
    return check() if args.check else write()


if __name__ == "__main__":
    sys.exit(main())
