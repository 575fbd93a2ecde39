#!/usr/bin/env python3
"""Generates the Python stubs (messages, gRPC stubs, .pyi types) of proto/ into bluemarble/v1.

It also writes ``descriptors.binpb``: the same files as a FileDescriptorSet with their
comments (``--include_source_info``), which server reflection serves, so that ``grpcurl
describe`` shows what each method and field means.

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs are stale

The stubs are committed so that an installed package needs no protoc; CI runs --check so
they can never drift from the .proto files. Output depends on the grpcio-tools version,
which is pinned in pyproject.toml's dev extra for that reason.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = pathlib.Path("bluemarble") / "v1"
DESCRIPTOR_SET = "descriptors.binpb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", DESCRIPTOR_SET)


def generate(out_root: pathlib.Path) -> None:
    """Runs protoc over every .proto file, writing below ``out_root``."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--descriptor_set_out={out_root / OUT_PACKAGE / DESCRIPTOR_SET}",
        "--include_source_info",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see the messages above)")


def generated_files(root: pathlib.Path) -> list[pathlib.Path]:
    folder = root / OUT_PACKAGE
    return sorted(p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = pathlib.Path(tmp)
        (tmp_root / OUT_PACKAGE).mkdir(parents=True)
        generate(tmp_root)
        fresh = {p.name: p for p in generated_files(tmp_root)}
        committed = {p.name: p for p in generated_files(ROOT)}
        if args.check:
            stale = sorted(
                name
                for name in fresh.keys() | committed.keys()
                if name not in fresh
                or name not in committed
                or not filecmp.cmp(fresh[name], committed[name], shallow=False)
            )
            if stale:
                print("stale generated stubs, run scripts/gen_protos.py: " + ", ".join(stale))
                return 1
            print(f"stubs up to date ({len(fresh)} files)")
            return 0
        for name in committed.keys() - fresh.keys():
            (ROOT / OUT_PACKAGE / name).unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, ROOT / OUT_PACKAGE / name)
        print(f"generated {len(fresh)} files into {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
