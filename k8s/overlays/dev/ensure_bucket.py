"""Create the dev object store's bucket before the broker starts (an init container).

MinIO starts empty and the broker does not create buckets, so each broker pod of the dev
overlay runs this first, with the broker's own image, environment and credentials
(FERRY_S3_ENDPOINT, FERRY_S3_BUCKET, FERRY_S3_REGION, AWS_*). It waits for the server
(at most ATTEMPTS tries, DELAY seconds apart), creates the bucket, and succeeds as well if
the bucket is already there. tests/unit/test_k8s_dev_bucket.py runs it against a real S3
server.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
import botocore.exceptions
from botocore.config import Config

ATTEMPTS = 60
DELAY = 2.0


def main() -> int:
    bucket = os.environ["FERRY_S3_BUCKET"]
    endpoint = os.environ["FERRY_S3_ENDPOINT"]
    # Path-style URLs, as the broker uses with an endpoint: no bucket name in the host.
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ["FERRY_S3_REGION"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            print(f"ensure-bucket: {endpoint} not ready ({attempt}/{ATTEMPTS}): {exc}")
            time.sleep(DELAY)
            continue
        print(f"ensure-bucket: bucket {bucket} ready at {endpoint}")
        return 0
    print(f"ensure-bucket: gave up on {endpoint} after {ATTEMPTS} attempts", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
