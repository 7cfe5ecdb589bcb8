"""The CLI is built on the public library only: no private module of another package."""

from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "clients" / "ferry" / "cli"


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "ferry" or parts[1:2] == ["cli"]:
                continue
            if any(p.startswith("_") for p in parts[1:]):
                found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_the_cli_imports_no_private_module_of_another_package() -> None:
    files = sorted(CLI.glob("*.py"))
    assert files
    bad = [hit for path in files for hit in _private_imports(path)]
    assert bad == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from ferry.client._broker import BrokerLink\n"
        "import ferry.client._send\n"
        "from ferry.cli import _state\n"
        "from ferry.client import Client\n"
    )
    assert _private_imports(sample) == [
        "sample.py:1: ferry.client._broker",
        "sample.py:1: ferry.client._broker.BrokerLink",
        "sample.py:2: ferry.client._send",
    ]
