"""The dev overlay's bucket step works against a real S3 server.

The dev overlay's broker pods first run k8s/overlays/dev/ensure_bucket.py (an init container,
the broker's image) so that the in-cluster object store has the bucket the broker is
configured with. Here that script, as the rendered ConfigMap carries it, runs against moto's
S3 server on 127.0.0.1 with dev's bucket and region: it makes the bucket, succeeds again when
the bucket is there, and gives up with an error (bounded attempts) when no server answers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port
from tests.support.s3 import S3Server
from tests.unit.test_k8s import TARGETS, broker_config, one, render

SCRIPT = TARGETS["dev"] / "ensure_bucket.py"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log", kind="moto").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_the_init_container_makes_the_bucket(moto: S3Server, tmp_path: Path) -> None:
    objs = render(TARGETS["dev"])
    script = tmp_path / "ensure_bucket.py"
    script.write_text(one(objs, "ConfigMap", "ferry-dev-ensure-bucket")["data"]["ensure_bucket.py"])
    config = broker_config(objs)
    env = {
        **os.environ,
        **moto.env,
        "FERRY_S3_ENDPOINT": moto.endpoint,  # dev's is http://ferry-s3:9000
        "FERRY_S3_BUCKET": config["FERRY_S3_BUCKET"],
        "FERRY_S3_REGION": config["FERRY_S3_REGION"],
    }
    assert config["FERRY_S3_BUCKET"] not in {
        b["Name"] for b in moto.client().list_buckets()["Buckets"]
    }
    for run in ("creates", "finds"):
        done = subprocess.run(
            [sys.executable, "-u", str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (run, done.stdout, done.stderr)
        assert f"bucket {config['FERRY_S3_BUCKET']} ready" in done.stdout, run
        moto.client().head_bucket(Bucket=config["FERRY_S3_BUCKET"])  # raises if it is not there


@pytest.mark.timeout(120)
def test_it_gives_up_when_no_server_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("ensure_bucket", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ATTEMPTS", 2)
    monkeypatch.setattr(module, "DELAY", 0.0)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in {
        "FERRY_S3_ENDPOINT": closed,
        "FERRY_S3_BUCKET": "ferry-dev",
        "FERRY_S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "ferry-dev-access-key",
        "AWS_SECRET_ACCESS_KEY": "ferry-dev-secret-key",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    assert module.main() == 1
    out, err = capsys.readouterr()
    assert out.count(f"ensure-bucket: {closed} not ready") == 2
    assert f"gave up on {closed} after 2 attempts" in err
