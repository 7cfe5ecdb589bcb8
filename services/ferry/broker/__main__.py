"""`python -m ferry.broker --listen 127.0.0.1:0 --data-dir DIR`: run a broker in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from ferry.broker.config import BrokerConfig
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
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
