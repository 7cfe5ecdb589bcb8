"""The broker's command line, defined once for `python -m ferry.broker` and `ferry serve`.

:func:`add_arguments` adds every broker flag to a parser, :func:`config_from_arguments` turns
the parsed flags into a :class:`BrokerConfig` and :func:`configure_logging` applies
``--log-level`` and ``--log-format``. Each setting is, first match wins:

1. its flag, when given (an empty value turns off an optional one, e.g. ``--s3-bucket ""``);
2. its environment variable, when set and not blank;
3. BrokerConfig's default.

Every flag has an environment variable, ``FERRY_`` and the flag's name in capitals
(``--offer-ttl``: ``FERRY_OFFER_TTL``), --log-level and --log-format included; the one table
of them all, with defaults and meanings, is the README's section "Settings", made by
:func:`settings_table` from the definitions below (a test keeps the two the same).

The exception: ``--insecure-plaintext`` (plaintext gRPC on an address that is not loopback)
is a flag only, never read from the environment: it has to be asked for where the broker is
started.

``--store`` is ``sqlite`` (the default, also when empty: broker.sqlite3 in the data dir) or
the URL of a Redis that broker replicas share (``redis://host:6379/0``, ``rediss://`` for TLS,
``unix:///path/redis.sock?db=0``). A URL with a password is taken from FERRY_STORE only: on
the command line every user of the host could read it.

The environment is read by config_from_arguments, not when the parser is built, so a command
that runs no broker (`ferry send`) neither reads nor checks these variables. This module
imports neither gRPC nor boto3 nor redis-py, since `ferry` builds its parser, these flags
included, on every run. No secret comes from a flag: S3 credentials are found the usual boto3
way (AWS_ACCESS_KEY_ID, ...), the TLS flags name files, the key's never its content, and a
Redis password comes from FERRY_STORE.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

from ferry.broker.config import S3_ENVIRONMENT, BrokerConfig

__all__ = ["add_arguments", "config_from_arguments", "configure_logging", "settings_table"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_LOG_FORMATS = ("text", "json")


@dataclasses.dataclass(frozen=True, slots=True)
class _Flag:
    """One flag: it sets the BrokerConfig field of the same name as its argparse dest."""

    flag: str
    field: str
    kind: Callable[[str], object]
    help: str
    env: str | None = None
    metavar: str | None = None

    @property
    def switch(self) -> bool:
        """A flag that takes no value (it turns its setting on)."""
        return self.kind is bool


def number_or_off(text: str) -> float | str:
    """A number of seconds, or "" for ``off`` (or empty): the setting is turned off."""
    if text.strip().lower() in ("", "off"):
        return ""
    return float(text)


_SECONDS = "S"
_FLAGS: tuple[_Flag, ...] = (
    _Flag("--listen", "listen", str, "host:port; port 0 picks a free one", "FERRY_LISTEN",
          "HOST:PORT"),
    _Flag("--data-dir", "data_dir", Path, "where broker.sqlite3 and the token key live",
          "FERRY_DATA_DIR", "DIR"),
    _Flag("--store", "store_url", str,
          "sqlite: broker.sqlite3 in --data-dir; or the redis://, rediss:// or unix:// URL of a "
          "Redis that broker replicas share (with a password: FERRY_STORE only)",
          "FERRY_STORE", "sqlite|URL"),
    _Flag("--tls-cert", "tls_cert", Path,
          "TLS certificate chain (PEM) of the gRPC port, re-read when it changes",
          "FERRY_TLS_CERT", "FILE"),
    _Flag("--tls-key", "tls_key", Path, "the certificate's private key (PEM)", "FERRY_TLS_KEY",
          "FILE"),
    _Flag("--tls-client-ca", "tls_client_ca", Path,
          "require client certificates issued by these CAs (PEM)", "FERRY_TLS_CLIENT_CA",
          "FILE"),
    _Flag("--insecure-plaintext", "insecure_plaintext", bool,
          "serve plaintext gRPC on an address that is not loopback: party tokens and codes "
          "cross the network in clear"),
    _Flag("--health-listen", "health_listen", str,
          "extra plaintext port serving only grpc.health.v1, for probes that cannot speak TLS",
          "FERRY_HEALTH_LISTEN", "HOST:PORT"),
    _Flag("--offer-ttl", "offer_ttl_default_s", float, "offer lifetime when the offer gives none",
          "FERRY_OFFER_TTL", _SECONDS),
    _Flag("--offer-ttl-min", "offer_ttl_min_s", float, "shortest offer lifetime one may ask for",
          "FERRY_OFFER_TTL_MIN", _SECONDS),
    _Flag("--offer-ttl-max", "offer_ttl_max_s", float, "longest offer lifetime one may ask for",
          "FERRY_OFFER_TTL_MAX", _SECONDS),
    _Flag("--session-ttl", "session_ttl_s", float, "session (and port lease) lifetime",
          "FERRY_SESSION_TTL", _SECONDS),
    _Flag("--stream-count", "stream_count", int, "parallel data streams per session",
          "FERRY_STREAM_COUNT", "N"),
    _Flag("--connect-timeout", "connect_timeout_s", float,
          "time from acceptance until the direct connection must be up", "FERRY_CONNECT_TIMEOUT",
          _SECONDS),
    _Flag("--sweep-interval", "sweep_interval_s", float, "how often overdue sessions expire",
          "FERRY_SWEEP_INTERVAL", _SECONDS),
    _Flag("--claim-burst-per-ip", "claim_burst_per_ip", float,
          "failed code claims one address (IPv6: /64) may make in a burst",
          "FERRY_CLAIM_BURST_PER_IP", "N"),
    _Flag("--claim-rate-per-ip", "claim_refill_per_ip_s", float,
          "failed code claims one address gets back per second", "FERRY_CLAIM_RATE_PER_IP", "N"),
    _Flag("--claim-burst-global", "claim_burst_global", float,
          "failed code claims the broker tolerates in a burst", "FERRY_CLAIM_BURST_GLOBAL", "N"),
    _Flag("--claim-rate-global", "claim_refill_global_s", float,
          "failed code claims the broker gets back per second", "FERRY_CLAIM_RATE_GLOBAL", "N"),
    _Flag("--s3-bucket", "s3_bucket", str, "object-store fallback bucket; unset: no fallback",
          S3_ENVIRONMENT["s3_bucket"], "NAME"),
    _Flag("--s3-endpoint", "s3_endpoint", str, "S3 URL (MinIO, Ceph...); unset: AWS",
          S3_ENVIRONMENT["s3_endpoint"], "URL"),
    _Flag("--s3-region", "s3_region", str, "S3 region; unset: boto3's default",
          S3_ENVIRONMENT["s3_region"], "NAME"),
    _Flag("--s3-prefix", "s3_prefix", str, "prefix of every object key",
          S3_ENVIRONMENT["s3_prefix"], "TEXT"),
    _Flag("--s3-url-ttl", "s3_url_ttl_s", float, "lifetime of each presigned URL",
          S3_ENVIRONMENT["s3_url_ttl_s"], _SECONDS),
    _Flag("--s3-stale-sweep-interval", "s3_stale_sweep_interval_s", float,
          "how often multipart uploads that no session knows are aborted",
          "FERRY_S3_STALE_SWEEP_INTERVAL", _SECONDS),
    # Watches, offers and the data dir under attack (issue 10, findings 1 and 2).
    _Flag("--watches-per-party", "watches_per_party", int,
          "open WatchSession streams per party of a session", "FERRY_WATCHES_PER_PARTY", "N"),
    _Flag("--watches-per-address", "watches_per_address", int,
          "open WatchSession streams per client address (IPv6: per /64)",
          "FERRY_WATCHES_PER_ADDRESS", "N"),
    _Flag("--watches-total", "watches_total", int, "open WatchSession streams on the broker",
          "FERRY_WATCHES_TOTAL", "N"),
    _Flag("--watch-bytes-total", "watch_bytes_total", int,
          "bytes of the sessions watched, summed over all watches", "FERRY_WATCH_BYTES_TOTAL",
          "BYTES"),
    _Flag("--max-manifest-bytes", "max_manifest_bytes", int,
          "largest manifest an offer may carry, serialized", "FERRY_MAX_MANIFEST_BYTES", "BYTES"),
    _Flag("--offer-burst-per-address", "offer_burst_per_address", float,
          "new offers one address (IPv6: /64) may make in a burst",
          "FERRY_OFFER_BURST_PER_ADDRESS", "N"),
    _Flag("--offer-rate-per-address", "offer_refill_per_address_s", float,
          "new offers one address (IPv6: /64) gets back per second",
          "FERRY_OFFER_RATE_PER_ADDRESS", "N"),
    _Flag("--session-retention", "session_retention_s", float,
          "how long an ended session is kept before it is deleted", "FERRY_SESSION_RETENTION",
          _SECONDS),
    _Flag("--min-free-disk", "min_free_disk_bytes", int,
          "refuse new offers while the data dir has less free space than this",
          "FERRY_MIN_FREE_DISK", "BYTES"),
    # Connections (the broker's side of issue 10, finding 8).
    _Flag("--max-connections", "max_connections", int,
          "connections held at once; more are closed as they come", "FERRY_MAX_CONNECTIONS",
          "N"),
    _Flag("--handshake-timeout", "handshake_timeout_s", float,
          "time a new connection has for its TLS handshake and HTTP/2 preface",
          "FERRY_HANDSHAKE_TIMEOUT", _SECONDS),
    _Flag("--connection-idle", "connection_idle_s", float,
          "close a connection without calls after this long", "FERRY_CONNECTION_IDLE",
          _SECONDS),
    _Flag("--max-concurrent-calls", "max_concurrent_calls", int,
          "calls served at once (watches included); beyond: RESOURCE_EXHAUSTED",
          "FERRY_MAX_CONCURRENT_CALLS", "N"),
    _Flag("--calls-burst-per-address", "calls_burst_per_address", float,
          "calls of any kind one address (IPv6: /64) may make in a burst",
          "FERRY_CALLS_BURST_PER_ADDRESS", "N"),
    _Flag("--calls-rate-per-address", "calls_rate_per_address", float,
          "calls one address gets back per second", "FERRY_CALLS_RATE_PER_ADDRESS", "N"),
    # Claims, port leases and the object store under attack (issue 10, findings 3 to 6).
    _Flag("--caller-ipv4-prefix", "caller_ipv4_prefix", int,
          "per-address limits count IPv4 callers per network of this prefix length",
          "FERRY_CALLER_IPV4_PREFIX", "BITS"),
    _Flag("--caller-ipv6-prefix", "caller_ipv6_prefix", int,
          "per-address limits count IPv6 callers per network of this prefix length",
          "FERRY_CALLER_IPV6_PREFIX", "BITS"),
    _Flag("--claim-flood-cost", "claim_flood_cost", float,
          "what one failed claim costs its source while the broker-wide bucket is empty",
          "FERRY_CLAIM_FLOOD_COST", "N"),
    _Flag("--claim-guesses-per-offer", "claim_guesses_per_offer", int,
          "wrong-verifier claims a store-and-forward offer takes before it is given up",
          "FERRY_CLAIM_GUESSES_PER_OFFER", "N"),
    _Flag("--claim-confirm-timeout", "claim_confirm_timeout_s", float,
          "a claimant that has not confirmed the key by then loses the offer to a new claim",
          "FERRY_CLAIM_CONFIRM_TIMEOUT", _SECONDS),
    _Flag("--leases-per-caller", "leases_per_caller", int,
          "live port leases one receiver address (IPv6: /64) may hold on one sender host",
          "FERRY_LEASES_PER_CALLER", "N"),
    _Flag("--store-forward", "store_forward", str,
          "on: senders may upload before the receiver accepts; off: only after",
          "FERRY_STORE_FORWARD", "on|off"),
    _Flag("--store-max-bytes-per-offer", "store_max_bytes_per_offer", int,
          "bytes the object store may hold for one offer", "FERRY_STORE_MAX_BYTES_PER_OFFER",
          "BYTES"),
    _Flag("--store-max-bytes-per-address", "store_max_bytes_per_address", int,
          "bytes the object store may hold for one sender address (IPv6: /64)",
          "FERRY_STORE_MAX_BYTES_PER_ADDRESS", "BYTES"),
    _Flag("--store-max-bytes", "store_max_bytes_total", int,
          "bytes the object store may hold in all", "FERRY_STORE_MAX_BYTES", "BYTES"),
    # The reflexive responder: STUN Binding over TCP for clients behind NATs (issue 11).
    _Flag("--reflexive-listen", "reflexive_listen", str,
          "where the reflexive responder (STUN over TCP) listens; auto: the --listen host, "
          "its port + 1 (0 if it is 0); off or empty: no responder",
          "FERRY_REFLEXIVE_LISTEN", "HOST:PORT"),
    _Flag("--reflexive-advertise", "reflexive_advertise", str,
          "the responder's host:port that GetBrokerInfo gives clients (an empty host: the "
          "broker's, as the client reached it); unset: ':' and the port bound",
          "FERRY_REFLEXIVE_ADVERTISE", "HOST:PORT"),
    _Flag("--reflexive-max-connections", "reflexive_max_connections", int,
          "responder connections held at once; more are closed as they come",
          "FERRY_REFLEXIVE_MAX_CONNECTIONS", "N"),
    _Flag("--reflexive-per-address", "reflexive_per_address", int,
          "responder connections held at once from one address (IPv6: /64)",
          "FERRY_REFLEXIVE_PER_ADDRESS", "N"),
    _Flag("--reflexive-hold", "reflexive_hold_s", float,
          "a responder connection is closed this long after it opened", "FERRY_REFLEXIVE_HOLD",
          _SECONDS),
    # Operations (issue 12): metrics, connection ages, the drain.
    _Flag("--metrics-listen", "metrics_listen", str,
          "plaintext HTTP port serving Prometheus metrics on /metrics (no secrets, no session "
          "ids); unset: none", "FERRY_METRICS_LISTEN", "HOST:PORT"),
    _Flag("--max-connection-age", "max_connection_age_s", number_or_off,
          "send a connection GOAWAY after this long, so its clients (and their watches) "
          "reconnect, perhaps to another replica; off or unset: never",
          "FERRY_MAX_CONNECTION_AGE", _SECONDS),
    _Flag("--max-connection-age-grace", "max_connection_age_grace_s", float,
          "what such a connection has to finish its calls before it is closed",
          "FERRY_MAX_CONNECTION_AGE_GRACE", _SECONDS),
    _Flag("--shutdown-grace", "shutdown_grace_s", float,
          "on SIGTERM: health NOT_SERVING, new calls refused, watches ended; in-flight calls "
          "get this long before they are cancelled", "FERRY_SHUTDOWN_GRACE", _SECONDS),
    # People: devices, sign-in, presence, the operator's policy and audit (issue 13).
    _Flag("--anonymous", "anonymous", str,
          "on: people without an account may use codes; off: both ends must be signed in",
          "FERRY_ANONYMOUS", "on|off"),
    _Flag("--access-token-ttl", "access_token_ttl_s", float,
          "lifetime of a signed-in device's access token", "FERRY_ACCESS_TOKEN_TTL", _SECONDS),
    _Flag("--challenge-ttl", "challenge_ttl_s", float, "lifetime of a sign-in challenge",
          "FERRY_CHALLENGE_TTL", _SECONDS),
    _Flag("--presence-ttl", "presence_ttl_s", float,
          "a device's presence outlives its inbox stream's last renewal by this much",
          "FERRY_PRESENCE_TTL", _SECONDS),
    _Flag("--user-offers-per-hour", "user_offers_per_hour", int,
          "new offers a user may make per hour, unless set for the user",
          "FERRY_USER_OFFERS_PER_HOUR", "N"),
    _Flag("--user-store-bytes", "user_store_bytes", int,
          "bytes the object store may hold for one user's offers, unless set for the user",
          "FERRY_USER_STORE_BYTES", "BYTES"),
    _Flag("--max-offer-bytes", "max_offer_bytes", int,
          "largest offer (its files' sizes summed) the broker takes; 0: no limit",
          "FERRY_MAX_OFFER_BYTES", "BYTES"),
    _Flag("--inbox-max-offers", "inbox_max_offers", int,
          "offers that may wait in one person's inbox at once", "FERRY_INBOX_MAX_OFFERS", "N"),
    _Flag("--audit", "audit", str,
          "what the audit log records: all offers, offers to people and people events only, "
          "or nothing", "FERRY_AUDIT", "all|people|off"),
    _Flag("--audit-retention", "audit_retention_s", float,
          "audit entries older than this are dropped", "FERRY_AUDIT_RETENTION", _SECONDS),
)  # fmt: skip

_DEFAULTS: Mapping[str, object] = {f.name: f.default for f in dataclasses.fields(BrokerConfig)}
_FLAG_OF: Mapping[str, str] = {f.field: f.flag for f in _FLAGS}
_KIND_NAMES: Mapping[object, str] = {
    float: "a number",
    int: "a whole number",
    number_or_off: "a number or off",
}


def _help(f: _Flag) -> str:
    """The flag's help, then where its value comes from when it is not given."""
    default = _DEFAULTS[f.field]
    sources = [f"env {f.env}"] if f.env else []
    if f.switch:
        return f"{f.help} (flag only, no environment variable)"
    if default is not None:
        sources.append(
            f"default {default:g}" if isinstance(default, float) else f"default {default}"
        )
    return f"{f.help} ({', '.join(sources)})"


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"not a log level: {text!r} (one of {_LOG_LEVELS})")
    return level


def _log_format(text: str) -> str:
    kind = text.strip().lower()
    if kind not in _LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"not a log format: {text!r} (one of {_LOG_FORMATS})")
    return kind


#: --log-level and --log-format: flag, parser, metavar, meaning (not BrokerConfig's).
_LOG_FLAGS: tuple[tuple[str, Callable[[str], str], str, str], ...] = (
    ("--log-level", _log_level, "LEVEL", f"one of {', '.join(_LOG_LEVELS)}; logs go to stderr"),
    ("--log-format", _log_format, "text|json",
     "json: one JSON object per line (time, level, logger, message, session, ...)"),
)  # fmt: skip
_LOG_ENV: Mapping[str, str] = {"--log-level": "FERRY_LOG_LEVEL", "--log-format": "FERRY_LOG_FORMAT"}
_LOG_DEST: Mapping[str, str] = {"--log-level": "log_level", "--log-format": "log_format"}
_LOG_DEFAULTS: Mapping[str, str] = {"--log-level": "INFO", "--log-format": "text"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every broker flag, --log-level and --log-format to `parser` (e.g. a `serve`
    subparser).

    Flags not given stay None in the namespace: :func:`config_from_arguments` then takes the
    environment variable or the default, which the help shows.
    """
    for f in _FLAGS:
        if f.switch:
            parser.add_argument(
                f.flag, dest=f.field, action="store_const", const=True, default=None, help=_help(f)
            )
            continue
        parser.add_argument(
            f.flag, dest=f.field, type=f.kind, default=None, metavar=f.metavar, help=_help(f)
        )
    for flag, kind, metavar, meaning in _LOG_FLAGS:
        sources = f"env {_LOG_ENV[flag]}, default {_LOG_DEFAULTS[flag]}"
        parser.add_argument(
            flag, type=kind, default=None, metavar=metavar, help=f"{meaning} ({sources})"
        )


def _from_environment(f: _Flag, environ: Mapping[str, str]) -> object | None:
    value = environ.get(f.env, "").strip() if f.env else ""
    if not value:
        return None
    try:
        return f.kind(value)
    except ValueError:
        what = _KIND_NAMES.get(f.kind, "valid")  # number_or_off: "a number or off"
        raise ValueError(f"{f.env}={value!r} is not {what} (it sets {f.flag})") from None


def config_from_arguments(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> BrokerConfig:
    """The BrokerConfig of parsed flags, the environment (`environ`, default os.environ).

    Raises ValueError, with a message naming the flags or variables at fault, on a value
    BrokerConfig refuses or an environment variable that does not parse.
    """
    env = os.environ if environ is None else environ
    _logging_from_environment(ns, env)
    settings: dict[str, object] = {}
    for f in _FLAGS:
        value = getattr(ns, f.field)
        if value is None:
            value = _from_environment(f, env)
            if value is None:
                continue  # BrokerConfig's default
        if value == "" and _DEFAULTS[f.field] is None:
            value = None  # an empty flag (or "off") turns an optional setting off
        settings[f.field] = value
    if _has_password(ns.store_url):
        raise ValueError(
            "bad broker settings: --store must not carry a password (every user of the host"
            " can read a command line): give that URL in FERRY_STORE"
        )
    try:
        return BrokerConfig(**settings)  # type: ignore[arg-type]
    except ValueError as exc:
        message = re.sub(r"\w+", lambda m: _FLAG_OF.get(m[0], m[0]), str(exc))
        raise ValueError(f"bad broker settings: {message}") from None


def _has_password(url: str | None) -> bool:
    """Whether a store URL carries a password (in its user part, or as a query option)."""
    if not url:
        return False
    parts = urllib.parse.urlsplit(url.strip())
    try:
        password = parts.password
    except ValueError:  # a malformed port: BrokerConfig or the store says what is wrong
        password = None
    return password is not None or "password" in urllib.parse.parse_qs(parts.query)


def _logging_from_environment(ns: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fill --log-level and --log-format in `ns` from FERRY_LOG_LEVEL / FERRY_LOG_FORMAT when
    they were not given (ValueError, naming the variable, if one is not valid)."""
    for flag, kind, _, _ in _LOG_FLAGS:
        dest, env = _LOG_DEST[flag], _LOG_ENV[flag]
        value = environ.get(env, "").strip()
        if getattr(ns, dest, None) is None and value:
            try:
                setattr(ns, dest, kind(value))
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"{env}={value!r}: {exc} (it sets {flag})") from None


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, then the
    record's `extra` fields (e.g. ``session``) and a traceback as ``exc_info``."""
    from pythonjsonlogger.json import JsonFormatter  # only a broker that logs JSON needs it

    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def configure_logging(ns: argparse.Namespace) -> None:
    """Send log records at --log-level and above to stderr (stdout is for the listening line),
    as text or, with --log-format json, one JSON object per line."""
    level = getattr(ns, "log_level", None) or _LOG_DEFAULTS["--log-level"]
    if (getattr(ns, "log_format", None) or _LOG_DEFAULTS["--log-format"]) == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(json_formatter())
        logging.basicConfig(level=level, handlers=[handler])
        return
    logging.basicConfig(level=level, format=_LOG_FORMAT)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_text(f: _Flag) -> str:
    value = _DEFAULTS[f.field]
    if f.field == "store_url":
        return "sqlite"
    if value is None:
        return "unset"
    if f.metavar == "BYTES" and isinstance(value, int) and value >= 1 << 20:
        gib = value >= 1 << 30
        return f"{value} ({value >> (30 if gib else 20)} {'GiB' if gib else 'MiB'})"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:g}"
    return str(value)


def settings_table() -> str:
    """The README's table of settings (section "Settings"), made from the flags defined here:
    flag, environment variable, default, meaning. tests/unit/broker/test_settings_table.py
    checks that the README has it as printed by
    ``python -c 'from ferry.broker.cli import settings_table; print(settings_table())'``."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in _FLAGS:
        flag = f.flag if f.switch else f"{f.flag} {f.metavar}"
        env = f"`{f.env}`" if f.env else "none: flag only, on purpose"
        default = _default_text(f)
        rows.append(f"| `{_cell(flag)}` | {env} | {_cell(default)} | {_cell(f.help)} |")
    for flag, _, metavar, meaning in _LOG_FLAGS:
        cells = (f"`{_cell(f'{flag} {metavar}')}`", f"`{_LOG_ENV[flag]}`", _LOG_DEFAULTS[flag])
        rows.append(f"| {' | '.join(cells)} | {_cell(meaning)} |")
    return "\n".join(rows)
