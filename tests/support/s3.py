"""A real S3-protocol server for tests: moto's standalone server on 127.0.0.1, and helpers.

`S3Server.start()` runs `python -m moto.server -H 127.0.0.1 -p PORT` (moto[server]), waits until
it answers, and creates the bucket; `stop()` kills it. The dummy credentials are in `env`, to
be given to the broker process (boto3 reads them from the environment as usual).

What moto does NOT check (moto 5): the signature of presigned URLs (nor their expiry, nor the
signed headers). So that a presigned URL is bound to its key, method and Content-Length is
shown with `verify_presigned`, an independent SigV4 query-string verifier (the algorithm AWS
documents, written here with hashlib/hmac): it is what real S3, MinIO and Ceph do on each
request.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

__all__ = ["S3Server", "http_request", "verify_presigned"]

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    """One moto server process and its bucket."""

    log_path: Path
    bucket: str = "ferry-test"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        """Start moto, wait until it answers (<= 20 s), create the bucket."""
        self.port = _free_port()
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()}")
            try:
                status, _, _ = http_request("GET", f"{self.endpoint}/moto-api/", timeout=1)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("moto_server did not answer within 20 s")
            time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self) -> Any:
        """A boto3 S3 client for checks from the test (never used by the broker)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
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
