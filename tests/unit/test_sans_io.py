"""The sans-I/O protocol core (``ferry.protocol``) does no I/O and reads no clock.

Every module of the package is found with pkgutil when the test runs and inspected
statically (its AST; nothing is imported), so a module that would open a socket at
import time is still caught. The rules:

- no import of a module that does I/O, concurrency or time (``FORBIDDEN_MODULES``),
  nor of Ferry's own I/O layers (``ferry.client``, ``ferry.cli``);
- no clock read: ``time.*``, ``datetime.now/utcnow/today``, ``date.today``.

Time and randomness come in as arguments (events carrying ``now``), as in h11.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "ferry.protocol"

FORBIDDEN_MODULES = frozenset(
    {
        "aiofiles",
        "asyncio",
        "boto3",
        "botocore",
        "grpc",
        "os",
        "selectors",
        "socket",
        "ssl",
        "subprocess",
        "threading",
        "time",
        # Ferry's I/O layers: importing them would pull the above in transitively.
        "ferry.cli",
        "ferry.client",
    }
)

CLOCK_CALLS = frozenset(
    {
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
    }
)


def _forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_MODULES)


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def violations(source: str, filename: str = "<module>") -> list[str]:
    """The rule breaks in one module's source, as ``file:line: message`` strings."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> fully qualified name

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _forbidden(alias.name):
                    found.append(f"{filename}:{node.lineno}: imports {alias.name}")
                local = alias.asname or alias.name.split(".")[0]
                aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _forbidden(node.module):
                found.append(f"{filename}:{node.lineno}: imports from {node.module}")
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                if _forbidden(qualified):
                    found.append(f"{filename}:{node.lineno}: imports {qualified}")
                aliases[alias.asname or alias.name] = qualified

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        qualified = aliases.get(head, head) + (f".{rest}" if rest else "")
        if qualified.startswith("time.") or qualified in CLOCK_CALLS:
            found.append(f"{filename}:{node.lineno}: reads the clock via {name}()")
        elif qualified in {"__import__", "importlib.import_module"} and node.args:
            arg = node.args[0]
            if (
                isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and _forbidden(arg.value)
            ):
                found.append(f"{filename}:{node.lineno}: imports {arg.value} dynamically")
    return found


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    """(name, source file) of the package and every module below it, without importing."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"package {package} not found"
    locations = list(spec.submodule_search_locations or [])
    if spec.origin and spec.has_location and spec.origin.endswith(".py"):
        yield package, Path(spec.origin)
    for info in pkgutil.iter_modules(locations, prefix=package + "."):
        sub = info.module_finder.find_spec(info.name, None)
        assert sub is not None, info.name
        assert sub.origin is not None, info.name
        if info.ispkg:
            yield from _modules(info.name)
        else:
            yield info.name, Path(sub.origin)


@pytest.mark.timeout(30)
def test_protocol_package_does_no_io() -> None:
    modules = dict(_modules(PACKAGE))
    submodules = [name for name in modules if name != PACKAGE]
    assert submodules, f"{PACKAGE} has no modules: nothing to check (is the package missing?)"
    problems: list[str] = []
    for path in modules.values():
        problems += violations(path.read_text(encoding="utf-8"), str(path))
    assert not problems, "sans-I/O rules broken:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os.path",
        "import socket as s",
        "from grpc import aio",
        "from botocore.client import Config",
        "from ferry.client import _peer",
        "import time",
        "from time import monotonic",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime as dt\nx = dt.datetime.utcnow()",
        "from datetime import date as d\nx = d.today()",
        "import importlib\nm = importlib.import_module('ssl')",
        "m = __import__('threading')",
    ],
)
def test_checker_catches(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        "import dataclasses, enum, struct, hashlib\nfrom collections.abc import Iterator",
        "from datetime import datetime, timedelta\nx = datetime(2024, 1, 1) + timedelta(1)",
        "from . import frames\nfrom .ranges import RangeSet",
        "from ferry.v1 import peer_pb2",
        "import blake3\nd = blake3.blake3(b'x').digest()",
        "def now(clock: object) -> None:\n    clock.now()",
    ],
)
def test_checker_allows(source: str) -> None:
    assert violations(source) == []
