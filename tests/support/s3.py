"""A real S3-protocol server for tests on 127.0.0.1 (moto or s3rver), and helpers.

`S3Server(log, kind="moto").start()` runs `python -m moto.server -H 127.0.0.1 -p PORT`
(moto[server]); `kind="s3rver"` runs s3rver (npm) with a temporary data directory. Either way it
waits until the server answers and creates the bucket with boto3; `stop()` kills it. The dummy
credentials are in `env`, to be given to the broker process (boto3 reads them from the
environment as usual).

s3rver is $FERRY_TEST_S3RVER if set, else the pinned S3RVER_VERSION in .ci/node (git-ignored),
which `s3rver_command()` installs there with npm on first use: under a file lock (overlapping
runs wait for one install), within INSTALL_TIMEOUT seconds, and marked done only once the
launcher answers with the pinned version. tests/conftest.py calls it before the first test, so
the install counts against no test's timeout. Without npm, or if the install fails, every test
that needs s3rver fails (never skips) with the reason; the install is not retried in that run.

What s3rver (3.7.1) does and does not do, as read in its source and checked by hand:
- SigV4 signatures are NOT verified ("Signature version 4 calculation is unimplemented" in its
  authentication middleware): only the access key id must be S3RVER, and a presigned URL is
  refused once X-Amz-Date + X-Amz-Expires has passed (403 AccessDenied). A URL whose key, part
  number or size was altered is accepted, like on moto.
- ListParts and AbortMultipartUpload (GET/DELETE ?uploadId) answer 405 MethodNotAllowed and
  ListMultipartUploads answers 501 NotImplemented; `missing_operations()` probes for them.
  The broker copes: it completes uploads with the
  parts the sender reports and leaves unfinished uploads to the bucket's lifecycle rule, so an
  interrupted upload there starts over instead of resuming.

What moto does NOT check (moto 5): the signature of presigned URLs (nor their expiry, nor the
signed headers). So that a presigned URL is bound to its key, method and Content-Length is
shown with `verify_presigned`, an independent SigV4 query-string verifier (the algorithm AWS
documents, written here with hashlib/hmac): it is what real S3, MinIO and Ceph do on each
request.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import hmac
import http.client
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.support.processes import free_port

__all__ = [
    "S3RVER_VERSION",
    "S3_KINDS",
    "S3Server",
    "S3rverUnavailable",
    "http_request",
    "s3rver_command",
    "verify_presigned",
]

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
S3_KINDS = ("moto", "s3rver")
# s3rver knows one account only, and checks the access key id of every signed request.
_S3RVER_KEY = "S3RVER"
S3RVER_VERSION = "3.7.1"
# The most one `npm install` may take; waiting for another run's install may take as long again.
INSTALL_TIMEOUT = 180.0
_REPO = Path(__file__).resolve().parents[2]
_NODE = _REPO / ".ci" / "node"
_S3RVER_CI = _NODE / "node_modules" / ".bin" / "s3rver"
_STAMP = _NODE / f".s3rver-{S3RVER_VERSION}.installed"
_LOCK = _NODE / ".install.lock"


class S3rverUnavailable(RuntimeError):
    """s3rver could not be found or installed; the message says why and what to do."""


# This run's outcome of the install: the launcher, or why there is none (not retried).
_outcome: Path | S3rverUnavailable | None = None


def s3rver_command(announce: Callable[[str], None] | None = None) -> str:
    """The s3rver launcher: $FERRY_TEST_S3RVER, else .ci/node's, installed there if needed.

    ``announce`` is told (one line) when an install starts. Raises S3rverUnavailable.
    """
    global _outcome
    configured = os.environ.get("FERRY_TEST_S3RVER", "")
    if configured:
        if not Path(configured).is_file():
            raise S3rverUnavailable(f"FERRY_TEST_S3RVER={configured}: no such file")
        return configured
    if _outcome is None:
        try:
            _outcome = _install(announce or (lambda _: None))
        except S3rverUnavailable as exc:
            _outcome = exc
    if isinstance(_outcome, S3rverUnavailable):
        raise S3rverUnavailable(str(_outcome))
    return str(_outcome)


def _install(announce: Callable[[str], None]) -> Path:
    """Install the pinned s3rver into .ci/node unless a finished install is there."""
    if _STAMP.is_file() and _S3RVER_CI.is_file():
        return _S3RVER_CI
    npm = shutil.which("npm")
    if npm is None:
        raise S3rverUnavailable(
            f"the S3 tests need s3rver {S3RVER_VERSION}, which they install with npm into "
            f"{_NODE}, but npm is not on PATH. Install Node.js (>= 18) with npm, or set "
            f"FERRY_TEST_S3RVER to an s3rver {S3RVER_VERSION} launcher."
        )
    _NODE.mkdir(parents=True, exist_ok=True)
    with _LOCK.open("a") as lock:
        _lock(lock.fileno(), deadline=time.monotonic() + INSTALL_TIMEOUT + 30)
        if _STAMP.is_file() and _S3RVER_CI.is_file():
            return _S3RVER_CI  # another run installed it while this one waited
        _STAMP.unlink(missing_ok=True)
        announce(f"installing s3rver {S3RVER_VERSION} with npm into {_NODE} (once) ...")
        command = [
            *[npm, "install", "--prefix", str(_NODE), "--no-save", "--no-audit", "--no-fund"],
            *["--no-update-notifier", f"s3rver@{S3RVER_VERSION}"],
        ]
        _run(command, INSTALL_TIMEOUT)
        version = _run([str(_S3RVER_CI), "--version"], 30).strip()
        if version != S3RVER_VERSION:
            raise S3rverUnavailable(
                f"{_S3RVER_CI} --version says {version!r}, not {S3RVER_VERSION}; "
                f"remove {_NODE} and run the tests again"
            )
        _STAMP.write_text(f"s3rver@{S3RVER_VERSION}\n")
        return _S3RVER_CI


def _lock(fd: int, deadline: float) -> None:
    """Take the install lock, waiting for another run's install until ``deadline``."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise S3rverUnavailable(
                    f"another run has been installing s3rver into {_NODE} for over "
                    f"{INSTALL_TIMEOUT + 30:.0f} s (it holds the lock on {_LOCK.name})"
                ) from None
            time.sleep(0.2)


def _run(command: list[str], timeout: float) -> str:
    """Run one install step; its stdout, or S3rverUnavailable with the tail of its output."""
    shown = " ".join([Path(command[0]).name, *command[1:]])
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise S3rverUnavailable(f"`{shown}` did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise S3rverUnavailable(f"`{shown}` could not run: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise S3rverUnavailable(f"`{shown}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


@dataclass
class S3Server:
    """One S3-protocol server process ("moto" or "s3rver") and its bucket."""

    log_path: Path
    kind: str = "moto"
    bucket: str = "ferry-test"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    _missing: list[str] | None = None
    #: Where it listens; with ``prefix`` (e.g. ``ip netns exec NS``, moto only) it runs, is
    #: waited for and gets its bucket inside that namespace (the network lab's broker host).
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """http://HOST:PORT"""
        return f"http://{self.host}:{self.port}"

    @property
    def access_key(self) -> str:
        return _S3RVER_KEY if self.kind == "s3rver" else ACCESS_KEY

    @property
    def secret_key(self) -> str:
        return _S3RVER_KEY if self.kind == "s3rver" else SECRET_KEY

    def start(self) -> S3Server:
        """Start the server, wait until it answers (<= 20 s), create the bucket."""
        if self.kind not in S3_KINDS:
            raise ValueError(f"unknown S3 server kind {self.kind!r}")
        self.port = free_port()
        self.env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if self.prefix:
            return self._start_in_namespace()
        if self.kind == "moto":
            command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            ready = "/moto-api/"
        else:
            data = self.log_path.parent / "s3rver-data"
            data.mkdir(parents=True, exist_ok=True)
            command = [s3rver_command(), "-d", str(data), "-a", "127.0.0.1", "-p", str(self.port)]
            ready = "/"  # unsigned: lists the buckets
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.log_path.read_text()}")
            try:
                status, _, _ = http_request("GET", f"{self.endpoint}{ready}", timeout=1)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.kind} did not answer within 20 s")
            time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _start_in_namespace(self) -> S3Server:
        """moto inside ``prefix``'s namespace on ``host``: waited for, bucket made, there."""
        if self.kind != "moto":
            raise ValueError("only moto runs in a lab namespace")
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        setup = f"""
import time, urllib.request, boto3
from botocore.config import Config
deadline = time.monotonic() + 20
while True:
    try:
        urllib.request.urlopen("{self.endpoint}/moto-api/", timeout=1).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
boto3.session.Session().client(
    "s3", endpoint_url="{self.endpoint}", region_name="{REGION}",
    config=Config(signature_version="s3v4", s3={{"addressing_style": "path"}}),
).create_bucket(Bucket="{self.bucket}")
"""
        done = subprocess.run(
            [*self.prefix, sys.executable, "-c", setup],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"moto in the lab did not start: {done.stderr[-2000:]}")
        return self

    def missing_operations(self) -> list[str]:
        """The S3 operations the broker uses that this server refuses (s3rver: three)."""
        if self._missing is not None:
            return self._missing
        client, key = self.client(), "ferry-probe/0"
        upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        probes: dict[str, Callable[[], object]] = {
            "ListParts": lambda: client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id),
            "ListMultipartUploads": lambda: client.list_multipart_uploads(Bucket=self.bucket),
            "AbortMultipartUpload": lambda: client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            ),
        }
        missing = []
        for name, probe in probes.items():
            try:
                probe()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("MethodNotAllowed", "NotImplemented"):
                    missing.append(f"{name} ({code})")
                else:
                    raise
        self._missing = missing
        return missing

    def client(self) -> Any:
        """A boto3 S3 client for checks from the test (never used by the broker)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def broker_args(self, prefix: str = "ferry/") -> list[str]:
        """The broker flags that point it at this server."""
        return [
            "--s3-endpoint",
            self.endpoint,
            "--s3-bucket",
            self.bucket,
            "--s3-region",
            REGION,
            "--s3-prefix",
            prefix,
        ]

    def stop(self) -> None:
        """Kill the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes, dict[str, str]]:
    """One plain HTTP request (http.client: it sends exactly the headers given)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify_presigned(
    method: str,
    url: str,
    headers: dict[str, str],
    secret_key: str = SECRET_KEY,
    now: datetime.datetime | None = None,
) -> str | None:
    """Check a SigV4 presigned request as S3 would; None if valid, else why not."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    signature = params.get("X-Amz-Signature", "")
    amz_date = params.get("X-Amz-Date", "")
    signed_time = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.UTC
    )
    expires = int(params.get("X-Amz-Expires", "0"))
    now = now or datetime.datetime.now(datetime.UTC)
    if now > signed_time + datetime.timedelta(seconds=expires):
        return "expired"
    signed_headers = params.get("X-Amz-SignedHeaders", "").split(";")
    lower = {k.lower(): v.strip() for k, v in headers.items()}
    lower.setdefault("host", parts.netloc)
    if any(h not in lower for h in signed_headers):
        return "a signed header is missing"
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(query)
        if k != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        [
            method,
            urllib.parse.quote(urllib.parse.unquote(parts.path), safe="/-_.~"),
            canonical_query,
            "".join(f"{h}:{lower[h]}\n" for h in signed_headers),
            ";".join(signed_headers),
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = _sign(f"AWS4{secret_key}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = _sign(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(expected, signature) else "signature does not match"
