"""`python -m ferry.broker --listen 127.0.0.1:0 --data-dir DIR`: run a broker in the foreground.

A broker that cannot start (its port is taken, its data directory unwritable) prints one line,
`ferry-broker: error: cannot listen on 127.0.0.1:50051: address already in use`, on stderr and
exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ferry.broker.config import BrokerConfig, s3_from_environment
from ferry.broker.server import serve


def parse_args(argv: Sequence[str] | None = None) -> BrokerConfig:
    """Build a BrokerConfig from command-line arguments (no secrets are taken here)."""
    d = BrokerConfig()
    p = argparse.ArgumentParser(prog="python -m ferry.broker", description=__doc__)
    p.add_argument("--listen", default=d.listen, help="host:port; port 0 picks a free one")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="where broker.sqlite3 lives")
    p.add_argument("--offer-ttl", type=float, default=d.offer_ttl_default_s, metavar="S")
    p.add_argument("--offer-ttl-min", type=float, default=d.offer_ttl_min_s, metavar="S")
    p.add_argument("--offer-ttl-max", type=float, default=d.offer_ttl_max_s, metavar="S")
    p.add_argument("--session-ttl", type=float, default=d.session_ttl_s, metavar="S")
    p.add_argument("--stream-count", type=int, default=d.stream_count)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s, metavar="S")
    p.add_argument("--sweep-interval", type=float, default=d.sweep_interval_s, metavar="S")
    p.add_argument("--claim-burst-per-ip", type=float, default=d.claim_burst_per_ip)
    p.add_argument("--claim-rate-per-ip", type=float, default=d.claim_refill_per_ip_s)
    p.add_argument("--claim-burst-global", type=float, default=d.claim_burst_global)
    p.add_argument("--claim-rate-global", type=float, default=d.claim_refill_global_s)
    s3 = {**dataclasses.asdict(d), **s3_from_environment()}  # FERRY_S3_* env, then flags
    p.add_argument("--s3-bucket", default=s3["s3_bucket"], help="object-store fallback bucket")
    p.add_argument("--s3-endpoint", default=s3["s3_endpoint"], help="S3 URL; unset: AWS")
    p.add_argument("--s3-region", default=s3["s3_region"])
    p.add_argument("--s3-prefix", default=s3["s3_prefix"], help="prefix of every object key")
    p.add_argument("--s3-url-ttl", type=float, default=s3["s3_url_ttl_s"], metavar="S")
    p.add_argument(
        "--s3-stale-sweep-interval",
        type=float,
        default=d.s3_stale_sweep_interval_s,
        metavar="S",
    )
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return BrokerConfig(
            listen=a.listen,
            data_dir=a.data_dir,
            offer_ttl_default_s=a.offer_ttl,
            offer_ttl_min_s=a.offer_ttl_min,
            offer_ttl_max_s=a.offer_ttl_max,
            session_ttl_s=a.session_ttl,
            stream_count=a.stream_count,
            connect_timeout_s=a.connect_timeout,
            sweep_interval_s=a.sweep_interval,
            claim_burst_per_ip=a.claim_burst_per_ip,
            claim_refill_per_ip_s=a.claim_rate_per_ip,
            claim_burst_global=a.claim_burst_global,
            claim_refill_global_s=a.claim_rate_global,
            s3_bucket=a.s3_bucket or None,
            s3_endpoint=a.s3_endpoint or None,
            s3_region=a.s3_region or None,
            s3_prefix=a.s3_prefix,
            s3_url_ttl_s=a.s3_url_ttl,
            s3_stale_sweep_interval_s=a.s3_stale_sweep_interval,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        sys.stderr.write(f"ferry-broker: error: {' '.join(str(exc).split())}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
