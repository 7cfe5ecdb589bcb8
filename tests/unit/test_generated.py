"""The generated protobuf code committed beside the .proto files is up to date.

Regenerates with ``proto/generate.py --out <tmp>`` (the only sanctioned way) and
requires the result to be byte-identical to what is committed in proto/ferry/v1/.
If this fails, run ``python proto/generate.py`` and commit the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATE = REPO / "proto" / "generate.py"
COMMITTED = REPO / "proto" / "ferry" / "v1"


def _generated_files(root: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(root.iterdir())
        if "_pb2" in p.name and p.name.endswith((".py", ".pyi"))
    }


@pytest.mark.timeout(120)
def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    # protoc finds the mypy plugins on PATH; they live beside this interpreter
    # (a venv's bin/) even when the venv is not activated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, f"generate.py failed:\n{result.stdout}\n{result.stderr}"

    fresh = _generated_files(tmp_path / "ferry" / "v1")
    committed = _generated_files(COMMITTED)
    assert fresh, "generate.py produced no files"
    assert sorted(fresh) == sorted(committed), (
        "generated file set differs from the committed one; run `python proto/generate.py`"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; run `python proto/generate.py` and commit"
