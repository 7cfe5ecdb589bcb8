"""The broker's domain knows nothing of gRPC; its pure modules do no I/O at all.

Only service.py (the servicer) and server.py may use gRPC: the domain raises the refusals of
errors.py and the servicer maps them to status codes, so another transport (or TLS, or a
Redis store) is a local change. Checked two ways:

- statically (each module's AST, nothing imported, as tests/unit/test_sans_io.py does for
  the peer protocol): the domain modules import no gRPC module, the pure ones no I/O either;
- at run time, in a fresh interpreter: importing the domain modules loads no gRPC module at
  all, so no module they import does it for them.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

#: The broker's domain: everything but the servicer and the server.
GRPC_FREE = (
    "ferry.broker.core",
    "ferry.broker.fallback",
    "ferry.broker.states",
    "ferry.broker.codes",
    "ferry.broker.leases",
    "ferry.broker.validation",
    "ferry.broker.errors",
)
#: Pure: no I/O, no concurrency, no clock (time comes in as arguments).
PURE = (
    "ferry.broker.states",
    "ferry.broker.codes",
    "ferry.broker.leases",
    "ferry.broker.validation",
    "ferry.broker.errors",
    "ferry.broker.ratelimit",
    "ferry.broker.objectlayout",
)

GRPC_MODULES = frozenset(
    {
        "grpc",
        "grpc_status",
        "grpc_health",
        "grpc_reflection",
        "google.rpc",
        "ferry.v1.broker_pb2_grpc",
        "ferry.broker.service",
        "ferry.broker.server",
    }
)
IO_MODULES = frozenset(
    {"asyncio", "boto3", "botocore", "os", "socket", "sqlite3", "ssl", "threading", "time"}
)


def _matches(module: str, banned: frozenset[str]) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in banned)


def imports(source: str) -> list[str]:
    """Every module an import statement in `source` names (`from a import b` gives a, a.b)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    assert spec.origin is not None, module
    return Path(spec.origin).read_text(encoding="utf-8")


@pytest.mark.parametrize("module", GRPC_FREE)
def test_the_domain_imports_no_grpc(module: str) -> None:
    bad = [name for name in imports(_source(module)) if _matches(name, GRPC_MODULES)]
    assert bad == [], f"{module} imports {bad}"


@pytest.mark.parametrize("module", PURE)
def test_the_pure_modules_do_no_io(module: str) -> None:
    bad = [name for name in imports(_source(module)) if _matches(name, GRPC_MODULES | IO_MODULES)]
    assert bad == [], f"{module} imports {bad}"


def test_nothing_the_domain_imports_loads_grpc() -> None:
    code = (
        "import sys\n"
        f"for name in {list(GRPC_FREE)!r}: __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith("
        "('grpc.', 'grpc_', 'google.rpc', 'ferry.broker.service', 'ferry.broker.server')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize(
    "source",
    [
        "import grpc",
        "import grpc.aio as aio",
        "from grpc import StatusCode",
        "from google.rpc import status_pb2",
        "from ferry.v1 import broker_pb2_grpc",
        "from ferry.broker import service",
        "from ferry.broker.server import serve",
    ],
)
def test_the_check_catches(source: str) -> None:
    assert any(_matches(name, GRPC_MODULES) for name in imports(source))


@pytest.mark.parametrize(
    "source",
    [
        "from ferry.v1 import broker_pb2",
        "from google.protobuf.timestamp_pb2 import Timestamp",
        "from ferry.broker import states, validation",
        "from ferry.broker.errors import Reason",
    ],
)
def test_the_check_allows(source: str) -> None:
    assert not any(_matches(name, GRPC_MODULES) for name in imports(source))
