"""`python -m ferry.broker --listen 127.0.0.1:0 --data-dir DIR`: run a broker in the foreground.

The flags, their environment variables and defaults are ferry.broker.cli's, the same as
`ferry serve`'s. A broker that cannot start (its port is taken, its data directory
unwritable) prints one line, `ferry-broker: error: cannot listen on 127.0.0.1:50051: address
already in use`, on stderr and exits with status 1; bad flags or settings exit with status 2
(plaintext on an address that is not loopback is a bad setting: see BrokerConfig).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from ferry.broker.cli import add_arguments, config_from_arguments, configure_logging
from ferry.broker.config import BrokerConfig


def parser() -> argparse.ArgumentParser:
    """The parser of `python -m ferry.broker`."""
    p = argparse.ArgumentParser(prog="python -m ferry.broker", description=__doc__)
    add_arguments(p)
    return p


def _parse(argv: Sequence[str] | None) -> tuple[BrokerConfig, argparse.Namespace]:
    p = parser()
    ns = p.parse_args(argv)
    try:
        return config_from_arguments(ns), ns
    except ValueError as exc:  # one line, like `ferry serve`: the flags were understood
        sys.stderr.write(f"{p.prog}: error: {exc}\n")
        raise SystemExit(2) from None


def parse_args(argv: Sequence[str] | None = None) -> BrokerConfig:
    """The BrokerConfig of a command line and the environment; exits 2 if they are bad."""
    return _parse(argv)[0]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    config, ns = _parse(argv)
    configure_logging(ns)
    # gRPC's C core would log every failed TLS handshake (a scanner, a client without our CA)
    # at INFO on stderr; unless told otherwise, keep its log to errors. Before it is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from ferry.broker.server import serve

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        sys.stderr.write(f"ferry-broker: error: {' '.join(str(exc).split())}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
