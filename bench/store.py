"""Ferry's object-store path against plain boto3, on the same S3-protocol server, in one run.

    python bench/store.py [--size MiB] [--runs N] [--server moto|s3rver|both] [--dir DIR]

Makes a random file (default 1 GiB), starts a local S3-protocol server on loopback (moto's
standalone server, and/or s3rver from npm, installed on first use into
~/.cache/ferry-bench/s3rver) and a real broker (`python -m ferry.broker --s3-*`) pointing at
it. For each run it moves the file with real processes -- `ferry send --via store --json`
(store-and-forward: the sender uploads through presigned URLs and exits after its
``{"event": "stored"}`` line), then `ferry receive --via store --json` -- and with boto3's
`upload_file` + `download_file` (default TransferConfig) of the same file to the same bucket,
alternating so the shared machine's noise hits both alike.

Ferry's rates come from the `seconds` of the sender's "stored" line (upload) and of the
receiver's "completed" line (download: ranged GETs, every chunk verified, fsync, rename);
the wall time of each `ferry` command (process start, imports, broker calls) is printed too.
boto3 is timed around each call. "total" is size / (upload s + download s). Every copy is
checked byte for byte. The clients have no S3 credentials (only the broker and boto3 do).
Ferry's objects are sealed end to end (AES-256-GCM per chunk, always on: the sender seals
every part before its PUT, the receiver opens every chunk before it verifies and writes it);
boto3 moves the plaintext.

moto answers every ranged GET of a large object in ~0.5 s whatever the range, so any client
that downloads with many ranged GETs (Ferry, and boto3's download_file alike) is slow there:
moto's download figures measure moto. s3rver 3.7.1 has no ListParts, AbortMultipartUpload
nor ListMultipartUploads: there the broker completes uploads with the parts the sender
reports. s3rver checks only the access key id (S3RVER), not signatures.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline_copy import make_random_file
from bench.transfer import FERRY, start_broker

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MIB = 1 << 20
REGION = "us-east-1"
BUCKET = "ferry-bench"
S3RVER_DIR = Path.home() / ".cache" / "ferry-bench" / "s3rver"
S3RVER_VERSION = "3.7.1"
_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[Any] | None, grace: float = 10) -> None:
    """Terminate ``proc`` (kill it if it lingers); a process already gone is fine."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def s3rver_bin() -> Path | None:
    """s3rver's launcher, installed with npm into the cache on first use; None if npm fails."""
    launcher = S3RVER_DIR / "node_modules" / ".bin" / "s3rver"
    if launcher.exists():
        return launcher
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    try:
        subprocess.run(
            ["npm", "install", "--prefix", str(S3RVER_DIR), f"s3rver@{S3RVER_VERSION}"],
            capture_output=True,
            timeout=300,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"s3rver: npm install failed ({type(exc).__name__}); skipping it", file=sys.stderr)
        return None
    return launcher if launcher.exists() else None


@dataclass
class Server:
    """One local S3-protocol server process and its bucket."""

    name: str
    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    credentials: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start the server, wait until it answers (<= 30 s), create the bucket."""
        self.port = _free_port()
        key = "S3RVER" if self.name == "s3rver" else "testing"  # s3rver checks the key id
        self.credentials = {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if self.name == "moto":
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            launcher = s3rver_bin()
            if launcher is None:
                raise RuntimeError("s3rver is not available (npm install failed)")
            data = self.root / "s3rver-data"
            data.mkdir(parents=True, exist_ok=True)
            cmd = [str(launcher), "--address", "127.0.0.1", "--port", str(self.port)]
            cmd += ["--directory", str(data), "--silent"]
        log = self.root / f"{self.name}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.credentials}
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {log.read_text(errors='replace')}")
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return self
            except Exception:  # not up yet: connection refused, 5xx while starting
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.name} did not answer within 30 s") from None
                time.sleep(0.2)

    def client(self) -> S3Client:
        """A boto3 client the usual way (path-style addressing, SigV4)."""
        client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        return client

    def broker_args(self) -> list[str]:
        return [
            "--s3-endpoint",
            self.endpoint,
            "--s3-bucket",
            BUCKET,
            "--s3-region",
            REGION,
            "--s3-prefix",
            "ferry/",
        ]

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def broker_for(server: Server, data_dir: Path) -> Iterator[str]:
    """A real broker pointed at ``server`` (the S3 credentials only in its environment)."""
    saved = {k: os.environ.get(k) for k in server.credentials}
    os.environ.update(server.credentials)
    try:
        proc, address = start_broker(data_dir, *server.broker_args())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield address
    finally:
        _stop(proc, 15)


def _last_json(stdout: str, what: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{what} printed no JSON line")
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    return value


def _ferry(args: list[str], env: dict[str, str], timeout: float, what: str) -> tuple[str, float]:
    """Run one `ferry` command to its end (bounded); its stdout and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout, wall


@dataclass
class Timing:
    upload_s: float
    download_s: float
    upload_wall_s: float = 0.0
    download_wall_s: float = 0.0


def ferry_store_copy(
    src: Path, dest: Path, broker: str, state: Path, chunk_size: int, timeout: float
) -> Timing:
    """`ferry send --via store` (it exits once stored), then `ferry receive --via store`."""
    base = {k: v for k, v in os.environ.items() if k not in _AWS and not k.startswith("AWS_")}
    base |= {"FERRY_BROKER": broker, "FERRY_ADDRESSES": "127.0.0.1"}
    send_env = {**base, "XDG_STATE_HOME": str(state / "sender")}
    recv_env = {**base, "XDG_STATE_HOME": str(state / "receiver")}
    out, send_wall = _ferry(
        [*FERRY, "send", str(src), "--json", "--via", "store", "--chunk-size", str(chunk_size)],
        send_env,
        timeout,
        "ferry send --via store",
    )
    stored = _last_json(out, "ferry send")
    if stored.get("event") != "stored" or stored.get("bytes_uploaded") != src.stat().st_size:
        raise RuntimeError(f"ferry send did not store the whole file: {stored}")
    code = str(_last_json(out.splitlines()[0], "ferry send")["code"])
    out, recv_wall = _ferry(
        [*FERRY, "receive", code, "--dest", str(dest), "--yes", "--json", "--via", "store"],
        recv_env,
        timeout,
        "ferry receive --via store",
    )
    done = _last_json(out, "ferry receive")
    if done.get("event") != "completed" or done.get("path") != "store":
        raise RuntimeError(f"ferry receive did not complete through the store: {done}")
    return Timing(float(stored["seconds"]), float(done["seconds"]), send_wall, recv_wall)


def boto3_copy(src: Path, dst: Path, client: S3Client, key: str) -> Timing:
    """boto3's managed transfers with their defaults (8 MiB parts, 10 threads)."""
    started = time.perf_counter()
    client.upload_file(str(src), BUCKET, key)
    uploaded = time.perf_counter()
    client.download_file(BUCKET, key, str(dst))
    downloaded = time.perf_counter()
    client.delete_object(Bucket=BUCKET, Key=key)
    return Timing(uploaded - started, downloaded - uploaded)


def _check_same(src: Path, copy: Path, who: str) -> None:
    if not filecmp.cmp(src, copy, shallow=False):
        raise RuntimeError(f"{who}'s copy differs from the source")


def bench_server(
    name: str, src: Path, root: Path, runs: int, chunk_size: int
) -> dict[str, list[Timing]]:
    """All runs against one server; the timings of Ferry and of boto3."""
    size = src.stat().st_size
    timeout = 120 + size / 5e6  # bounded even if the server crawls at 5 MB/s
    work = root / name
    work.mkdir()
    server = Server(name, work)
    out: dict[str, list[Timing]] = {"ferry": [], "boto3": []}
    ferry_error: str | None = None
    try:
        server.start()
        client = server.client()
        with broker_for(server, work / "broker") as broker:
            for run in range(runs):
                line = f"{name} run {run + 1}: "
                if ferry_error is None:
                    dest = work / f"ferry-{run}"
                    state = work / f"state-{run}"
                    try:
                        t = ferry_store_copy(src, dest, broker, state, chunk_size, timeout)
                    except RuntimeError as exc:  # reported; boto3 is still measured
                        ferry_error = str(exc)
                        print(f"{name}: Ferry's store path failed: {exc}", flush=True)
                    else:
                        _check_same(src, dest / src.name, "ferry")
                        out["ferry"].append(t)
                        line += (
                            f"ferry up {size / t.upload_s / 1e6:,.0f}"
                            f" down {size / t.download_s / 1e6:,.0f}"
                            f" (wall up {size / t.upload_wall_s / 1e6:,.0f}"
                            f" down {size / t.download_wall_s / 1e6:,.0f})  "
                        )
                    shutil.rmtree(dest, ignore_errors=True)
                dst = work / "boto3.bin"
                b = boto3_copy(src, dst, client, f"boto3/{run}")
                _check_same(src, dst, "boto3")
                dst.unlink()
                out["boto3"].append(b)
                line += (
                    f"boto3 up {size / b.upload_s / 1e6:,.0f} down {size / b.download_s / 1e6:,.0f}"
                )
                print(line + " MB/s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(name: str, size: int, runs: dict[str, list[Timing]]) -> None:
    """Median rates and ratios (per run, then the median of those)."""
    rate: dict[str, Callable[[Timing], float]] = {
        "upload": lambda t: size / t.upload_s / 1e6,
        "download": lambda t: size / t.download_s / 1e6,
        "total": lambda t: size / (t.upload_s + t.download_s) / 1e6,
    }
    print(f"\n{name}: {size / MIB:.0f} MiB, {len(runs['boto3'])} runs, medians (MB/s = 10^6 B/s):")
    if not runs["ferry"]:
        print("  ferry     FAILED (see above)")
    for what, fn in rate.items():
        boto = [fn(t) for t in runs["boto3"]]
        if not runs["ferry"]:
            print(f"  {what:9s} boto3 {statistics.median(boto):7,.0f}")
            continue
        ferry = [fn(t) for t in runs["ferry"]]
        ratios = [a / b for a, b in zip(ferry, boto, strict=True)]
        print(
            f"  {what:9s} ferry {statistics.median(ferry):7,.0f}"
            f"  boto3 {statistics.median(boto):7,.0f}"
            f"  ferry/boto3 {statistics.median(ratios):.2f} (per run {min(ratios):.2f}-"
            f"{max(ratios):.2f})"
        )
    walls = [
        size / (t.upload_wall_s + t.download_wall_s) / 1e6 for t in runs["ferry"] if t.upload_wall_s
    ]
    if walls:
        print(f"  ferry total, wall of both commands: {statistics.median(walls):,.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--server", choices=("moto", "s3rver", "both"), default=None)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    if ns.server is None:
        ns.server = "both" if s3rver_bin() is not None else "moto"
    names = ["moto", "s3rver"] if ns.server == "both" else [ns.server]
    size = ns.size * MIB
    results: dict[str, dict[str, list[Timing]]] = {}
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="ferry-bench-store-") as tmp:
        root = Path(tmp)
        src = root / "src.bin"
        make_random_file(src, size)
        for name in names:
            results[name] = bench_server(name, src, root, ns.runs, ns.chunk_size)
    for name, runs in results.items():
        report(name, size, runs)


if __name__ == "__main__":
    main()
