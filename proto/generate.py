"""Regenerate the Python code for the Ferry protobuf API.

This is the only way the files beside the .proto sources are produced:

    python proto/generate.py            # write into proto/
    python proto/generate.py --out DIR  # write into DIR (used by the staleness test)

It runs grpcio-tools' bundled protoc with the mypy-protobuf plugins, whose versions are
pinned in pyproject.toml, so the output is reproducible.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = Path("ferry") / "v1"


def sources() -> list[Path]:
    """The .proto files of the API, relative to the proto root, sorted."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Generate into ``out``; return the generated files, relative to ``out``."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    plugin_dir = Path(shutil.which("protoc-gen-mypy") or "").parent
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(s) for s in sources()),
    ]
    if not plugin_dir.name:
        sys.exit("protoc-gen-mypy not found: pip install -e '.[dev]'")
    code = protoc.main(args)
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")
    return sorted(
        p.relative_to(out)
        for p in (out / PACKAGE_DIR).iterdir()
        if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path)


if __name__ == "__main__":
    main()
