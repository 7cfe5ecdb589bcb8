"""The broker's one command line (ferry.broker.cli): flags, environment, defaults, errors.

`python -m ferry.broker` and `ferry serve` must turn the same argv and environment into the
same BrokerConfig; the expectations here are written out, not read from the module.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ferry.broker import __main__ as entry
from ferry.broker import add_arguments, config_from_arguments, configure_logging
from ferry.broker.config import BrokerConfig

pytestmark = pytest.mark.timeout(60)

# Every flag, the BrokerConfig field it sets and its environment variable, written out.
FLAGS: dict[str, tuple[str, str | None]] = {
    "--listen": ("listen", "FERRY_LISTEN"),
    "--data-dir": ("data_dir", "FERRY_DATA_DIR"),
    "--store": ("store_url", "FERRY_STORE"),
    "--tls-cert": ("tls_cert", "FERRY_TLS_CERT"),
    "--tls-key": ("tls_key", "FERRY_TLS_KEY"),
    "--tls-client-ca": ("tls_client_ca", "FERRY_TLS_CLIENT_CA"),
    "--insecure-plaintext": ("insecure_plaintext", None),
    "--health-listen": ("health_listen", "FERRY_HEALTH_LISTEN"),
    "--offer-ttl": ("offer_ttl_default_s", "FERRY_OFFER_TTL"),
    "--offer-ttl-min": ("offer_ttl_min_s", "FERRY_OFFER_TTL_MIN"),
    "--offer-ttl-max": ("offer_ttl_max_s", "FERRY_OFFER_TTL_MAX"),
    "--session-ttl": ("session_ttl_s", "FERRY_SESSION_TTL"),
    "--stream-count": ("stream_count", "FERRY_STREAM_COUNT"),
    "--connect-timeout": ("connect_timeout_s", "FERRY_CONNECT_TIMEOUT"),
    "--sweep-interval": ("sweep_interval_s", "FERRY_SWEEP_INTERVAL"),
    "--claim-burst-per-ip": ("claim_burst_per_ip", "FERRY_CLAIM_BURST_PER_IP"),
    "--claim-rate-per-ip": ("claim_refill_per_ip_s", "FERRY_CLAIM_RATE_PER_IP"),
    "--claim-burst-global": ("claim_burst_global", "FERRY_CLAIM_BURST_GLOBAL"),
    "--claim-rate-global": ("claim_refill_global_s", "FERRY_CLAIM_RATE_GLOBAL"),
    "--s3-bucket": ("s3_bucket", "FERRY_S3_BUCKET"),
    "--s3-endpoint": ("s3_endpoint", "FERRY_S3_ENDPOINT"),
    "--s3-region": ("s3_region", "FERRY_S3_REGION"),
    "--s3-prefix": ("s3_prefix", "FERRY_S3_PREFIX"),
    "--s3-url-ttl": ("s3_url_ttl_s", "FERRY_S3_URL_TTL"),
    "--s3-stale-sweep-interval": ("s3_stale_sweep_interval_s", "FERRY_S3_STALE_SWEEP_INTERVAL"),
    # Issue 10, findings 1 and 2: watches, offers, retention, disk.
    "--watches-per-party": ("watches_per_party", "FERRY_WATCHES_PER_PARTY"),
    "--watches-per-address": ("watches_per_address", "FERRY_WATCHES_PER_ADDRESS"),
    "--watches-total": ("watches_total", "FERRY_WATCHES_TOTAL"),
    "--watch-bytes-total": ("watch_bytes_total", "FERRY_WATCH_BYTES_TOTAL"),
    "--max-manifest-bytes": ("max_manifest_bytes", "FERRY_MAX_MANIFEST_BYTES"),
    "--offer-burst-per-address": ("offer_burst_per_address", "FERRY_OFFER_BURST_PER_ADDRESS"),
    "--offer-rate-per-address": ("offer_refill_per_address_s", "FERRY_OFFER_RATE_PER_ADDRESS"),
    "--session-retention": ("session_retention_s", "FERRY_SESSION_RETENTION"),
    "--min-free-disk": ("min_free_disk_bytes", "FERRY_MIN_FREE_DISK"),
    "--max-connections": ("max_connections", "FERRY_MAX_CONNECTIONS"),
    "--handshake-timeout": ("handshake_timeout_s", "FERRY_HANDSHAKE_TIMEOUT"),
    "--connection-idle": ("connection_idle_s", "FERRY_CONNECTION_IDLE"),
    "--max-concurrent-calls": ("max_concurrent_calls", "FERRY_MAX_CONCURRENT_CALLS"),
    "--calls-burst-per-address": ("calls_burst_per_address", "FERRY_CALLS_BURST_PER_ADDRESS"),
    "--calls-rate-per-address": ("calls_rate_per_address", "FERRY_CALLS_RATE_PER_ADDRESS"),
    # Issue 10, findings 3 to 6: claims, port leases, object-store quotas.
    "--caller-ipv4-prefix": ("caller_ipv4_prefix", "FERRY_CALLER_IPV4_PREFIX"),
    "--caller-ipv6-prefix": ("caller_ipv6_prefix", "FERRY_CALLER_IPV6_PREFIX"),
    "--claim-flood-cost": ("claim_flood_cost", "FERRY_CLAIM_FLOOD_COST"),
    "--claim-guesses-per-offer": ("claim_guesses_per_offer", "FERRY_CLAIM_GUESSES_PER_OFFER"),
    "--claim-confirm-timeout": ("claim_confirm_timeout_s", "FERRY_CLAIM_CONFIRM_TIMEOUT"),
    "--leases-per-caller": ("leases_per_caller", "FERRY_LEASES_PER_CALLER"),
    "--store-forward": ("store_forward", "FERRY_STORE_FORWARD"),
    "--store-max-bytes-per-offer": ("store_max_bytes_per_offer", "FERRY_STORE_MAX_BYTES_PER_OFFER"),
    "--store-max-bytes-per-address": (
        "store_max_bytes_per_address",
        "FERRY_STORE_MAX_BYTES_PER_ADDRESS",
    ),
    "--store-max-bytes": ("store_max_bytes_total", "FERRY_STORE_MAX_BYTES"),
    # Issue 11: the reflexive responder.
    "--reflexive-listen": ("reflexive_listen", "FERRY_REFLEXIVE_LISTEN"),
    "--reflexive-advertise": ("reflexive_advertise", "FERRY_REFLEXIVE_ADVERTISE"),
    "--reflexive-max-connections": (
        "reflexive_max_connections",
        "FERRY_REFLEXIVE_MAX_CONNECTIONS",
    ),
    "--reflexive-per-address": ("reflexive_per_address", "FERRY_REFLEXIVE_PER_ADDRESS"),
    "--reflexive-hold": ("reflexive_hold_s", "FERRY_REFLEXIVE_HOLD"),
    # Issue 12: operations.
    "--metrics-listen": ("metrics_listen", "FERRY_METRICS_LISTEN"),
    "--max-connection-age": ("max_connection_age_s", "FERRY_MAX_CONNECTION_AGE"),
    "--max-connection-age-grace": (
        "max_connection_age_grace_s",
        "FERRY_MAX_CONNECTION_AGE_GRACE",
    ),
    "--shutdown-grace": ("shutdown_grace_s", "FERRY_SHUTDOWN_GRACE"),
    # Issue 13: people, policy, audit.
    "--anonymous": ("anonymous", "FERRY_ANONYMOUS"),
    "--access-token-ttl": ("access_token_ttl_s", "FERRY_ACCESS_TOKEN_TTL"),
    "--challenge-ttl": ("challenge_ttl_s", "FERRY_CHALLENGE_TTL"),
    "--presence-ttl": ("presence_ttl_s", "FERRY_PRESENCE_TTL"),
    "--user-offers-per-hour": ("user_offers_per_hour", "FERRY_USER_OFFERS_PER_HOUR"),
    "--user-store-bytes": ("user_store_bytes", "FERRY_USER_STORE_BYTES"),
    "--max-offer-bytes": ("max_offer_bytes", "FERRY_MAX_OFFER_BYTES"),
    "--inbox-max-offers": ("inbox_max_offers", "FERRY_INBOX_MAX_OFFERS"),
    "--audit": ("audit", "FERRY_AUDIT"),
    "--audit-retention": ("audit_retention_s", "FERRY_AUDIT_RETENTION"),
}
ENVIRONMENT = sorted(env for _, env in FLAGS.values() if env)

EVERY_FLAG = [
    "--listen", "0.0.0.0:6000",
    "--data-dir", "/var/lib/ferry",
    "--store", "rediss://ferry@redis.example:6380/2",
    "--tls-cert", "/etc/ferry/tls/tls.crt",
    "--tls-key", "/etc/ferry/tls/tls.key",
    "--tls-client-ca", "/etc/ferry/tls/ca.crt",
    "--health-listen", "0.0.0.0:6001",
    "--offer-ttl", "120",
    "--offer-ttl-min", "5",
    "--offer-ttl-max", "3600",
    "--session-ttl", "7200",
    "--stream-count", "3",
    "--connect-timeout", "12.5",
    "--sweep-interval", "0.2",
    "--claim-burst-per-ip", "4",
    "--claim-rate-per-ip", "0.5",
    "--claim-burst-global", "40",
    "--claim-rate-global", "20",
    "--s3-bucket", "bucket",
    "--s3-endpoint", "http://minio:9000",
    "--s3-region", "eu-west-1",
    "--s3-prefix", "t/",
    "--s3-url-ttl", "60",
    "--s3-stale-sweep-interval", "30",
    "--reflexive-listen", "0.0.0.0:3478",
    "--reflexive-advertise", "stun.example.net:3478",
    "--reflexive-max-connections", "100",
    "--reflexive-per-address", "4",
    "--reflexive-hold", "12.5",
    "--log-level", "warning",
]  # fmt: skip
EVERY_FLAG_CONFIG = BrokerConfig(
    listen="0.0.0.0:6000",
    data_dir=Path("/var/lib/ferry"),
    store_url="rediss://ferry@redis.example:6380/2",
    tls_cert=Path("/etc/ferry/tls/tls.crt"),
    tls_key=Path("/etc/ferry/tls/tls.key"),
    tls_client_ca=Path("/etc/ferry/tls/ca.crt"),
    health_listen="0.0.0.0:6001",
    offer_ttl_default_s=120.0,
    offer_ttl_min_s=5.0,
    offer_ttl_max_s=3600.0,
    session_ttl_s=7200.0,
    stream_count=3,
    connect_timeout_s=12.5,
    sweep_interval_s=0.2,
    claim_burst_per_ip=4.0,
    claim_refill_per_ip_s=0.5,
    claim_burst_global=40.0,
    claim_refill_global_s=20.0,
    s3_bucket="bucket",
    s3_endpoint="http://minio:9000",
    s3_region="eu-west-1",
    s3_prefix="t/",
    s3_url_ttl_s=60.0,
    s3_stale_sweep_interval_s=30.0,
    reflexive_listen="0.0.0.0:3478",
    reflexive_advertise="stun.example.net:3478",
    reflexive_max_connections=100,
    reflexive_per_address=4,
    reflexive_hold_s=12.5,
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def _pair(argv: Sequence[str]) -> BrokerConfig:
    """The function pair on a bare parser, as any program embedding the broker would use it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_arguments(parser.parse_args(argv))


def _ferry_serve(argv: Sequence[str]) -> BrokerConfig:
    from ferry.cli.main import _parser

    return config_from_arguments(_parser().parse_args(["serve", *argv]))


ENTRY_POINTS: list[object] = [
    pytest.param(entry.parse_args, id="python -m ferry.broker"),
    pytest.param(_pair, id="add_arguments + config_from_arguments"),
    pytest.param(_ferry_serve, id="ferry serve"),
]

Parse = Callable[[Sequence[str]], BrokerConfig]


def test_the_flags_are_the_ones_written_here() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    found = {
        action.option_strings[0]: action.dest
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "log_level", "log_format")
    }
    assert found == {flag: field for flag, (field, _) in FLAGS.items()}
    assert set(found.values()) == set(BrokerConfig.__dataclass_fields__)  # every knob
    for flag, (_, env) in FLAGS.items():
        help_text = next(a.help for a in parser._actions if flag in a.option_strings)
        assert help_text is not None
        assert (f"env {env}" in help_text) == (env is not None), flag


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_every_flag(parse: Parse) -> None:
    assert parse(EVERY_FLAG) == EVERY_FLAG_CONFIG


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_nothing_given_is_the_default(parse: Parse) -> None:
    assert parse([]) == BrokerConfig()


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_environment_then_flags(parse: Parse, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "FERRY_LISTEN": "0.0.0.0:50051",
        "FERRY_DATA_DIR": "/data",
        "FERRY_TLS_CERT": "/tls/tls.crt",
        "FERRY_TLS_KEY": "/tls/tls.key",
        "FERRY_S3_BUCKET": "env-bucket",
        "FERRY_S3_ENDPOINT": "http://s3:9000",
        "FERRY_S3_REGION": "us-east-2",
        "FERRY_S3_PREFIX": "env/",
        "FERRY_S3_URL_TTL": "120",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cert, key = Path("/tls/tls.crt"), Path("/tls/tls.key")
    assert parse([]) == BrokerConfig(
        listen="0.0.0.0:50051",
        data_dir=Path("/data"),
        tls_cert=cert,
        tls_key=key,
        s3_bucket="env-bucket",
        s3_endpoint="http://s3:9000",
        s3_region="us-east-2",
        s3_prefix="env/",
        s3_url_ttl_s=120.0,
    )
    given = ["--listen", "127.0.0.1:0", "--s3-bucket", "flag-bucket", "--s3-url-ttl", "30"]
    assert parse(given) == BrokerConfig(
        listen="127.0.0.1:0",
        data_dir=Path("/data"),
        tls_cert=cert,
        tls_key=key,
        s3_bucket="flag-bucket",
        s3_endpoint="http://s3:9000",
        s3_region="us-east-2",
        s3_prefix="env/",
        s3_url_ttl_s=30.0,
    )


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_an_empty_flag_turns_an_optional_setting_off(
    parse: Parse, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_S3_BUCKET", "env-bucket")
    monkeypatch.setenv("FERRY_S3_PREFIX", "env/")
    config = parse(["--s3-bucket", "", "--s3-prefix", ""])
    assert (config.s3_bucket, config.s3_prefix) == (None, "")


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_the_reflexive_responder_from_the_environment_and_off(
    parse: Parse, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse([]).reflexive_listen == "auto"  # on by default, next to --listen
    env = {
        "FERRY_REFLEXIVE_LISTEN": "[::]:3478",
        "FERRY_REFLEXIVE_ADVERTISE": ":3478",
        "FERRY_REFLEXIVE_MAX_CONNECTIONS": "10",
        "FERRY_REFLEXIVE_PER_ADDRESS": "2",
        "FERRY_REFLEXIVE_HOLD": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = BrokerConfig(
        reflexive_listen="[::]:3478",
        reflexive_advertise=":3478",
        reflexive_max_connections=10,
        reflexive_per_address=2,
        reflexive_hold_s=5.0,
    )
    assert parse([]) == expected
    assert expected.reflexive_bind == "[::]:3478"
    off = parse(["--reflexive-listen", "", "--reflexive-advertise", ""])
    assert (off.reflexive_listen, off.reflexive_advertise, off.reflexive_bind) == ("", None, None)
    monkeypatch.setenv("FERRY_REFLEXIVE_LISTEN", "off")  # a blank variable is unset: "off"
    assert parse([]).reflexive_bind is None


@pytest.mark.parametrize("parse", ENTRY_POINTS)
def test_the_store(parse: Parse, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]).store_url is None  # SQLite in --data-dir
    for sqlite in ("sqlite", "SQLite", ""):
        assert parse(["--store", sqlite]) == BrokerConfig()
    url = "redis://127.0.0.1:6379/0"
    assert parse(["--store", url]).store_url == url
    assert parse(["--store", "unix:///run/redis.sock?db=1"]).store_url == (
        "unix:///run/redis.sock?db=1"
    )
    # from the environment, where a password may be; the flag wins, "sqlite" too
    secret = "rediss://ferry:s3cret@redis.example:6380/0"
    monkeypatch.setenv("FERRY_STORE", secret)
    config = parse([])
    assert config.store_url == secret
    assert "s3cret" not in repr(config)
    assert parse(["--store", url]).store_url == url
    assert parse(["--store", "sqlite"]).store_url is None
    monkeypatch.setenv("FERRY_STORE", "sqlite")
    assert parse([]) == BrokerConfig()


@pytest.mark.parametrize(
    "store",
    [
        "redis://:s3cret@127.0.0.1:6379/0",
        "rediss://ferry:s3cret@redis.example/0",
        "unix:///run/redis.sock?db=0&password=s3cret",
    ],
)
def test_no_store_password_on_the_command_line(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    message = (
        "bad broker settings: --store must not carry a password (every user of the host can"
        " read a command line): give that URL in FERRY_STORE"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _pair(["--store", store])
    monkeypatch.setenv("FERRY_STORE", store)
    assert _pair([]).store_url == store


def test_blank_environment_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.setenv(name, "  ")
    assert _pair([]) == BrokerConfig()


def test_an_explicit_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_arguments(parser.parse_args([]), {"FERRY_S3_BUCKET": "b"})
    assert config == BrokerConfig(s3_bucket="b")


def test_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_S3_URL_TTL", "soon")
    with pytest.raises(ValueError, match=r"^FERRY_S3_URL_TTL='soon' is not a number \(it sets"):
        _pair([])
    assert _pair(["--s3-url-ttl", "60"]).s3_url_ttl_s == 60.0  # the flag wins: never read


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--offer-ttl-min", "5", "--offer-ttl", "1"],
            "bad broker settings: need 0 < --offer-ttl-min <= --offer-ttl <= --offer-ttl-max",
        ),
        (["--stream-count", "0"], "bad broker settings: --stream-count must be between 1 and 64"),
        (["--s3-prefix", "/abs"], "bad broker settings: --s3-prefix must not start with '/'"),
        (
            ["--reflexive-listen", "3478"],
            "bad broker settings: --reflexive-listen must be host:port, 'auto' or 'off'",
        ),
        (
            ["--reflexive-per-address", "0"],
            "bad broker settings: --reflexive-max-connections and --reflexive-per-address "
            "must be >= 1",
        ),
        (["--reflexive-hold", "0"], "bad broker settings: --reflexive-hold must be > 0"),
        (
            ["--store", "/var/lib/ferry/broker.sqlite3"],
            "bad broker settings: --store must be sqlite or a redis://, rediss:// or unix:// URL",
        ),
        (
            ["--store", "http://redis:6379"],
            "bad broker settings: --store must be sqlite or a redis://, rediss:// or unix:// URL",
        ),
    ],
)
def test_bad_settings_name_the_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _pair(argv)


def test_python_m_ferry_broker_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        entry.parse_args(["--stream-count", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "python -m ferry.broker: error: bad broker settings: "
        "--stream-count must be between 1 and 64\n"
    )
    with pytest.raises(SystemExit):
        entry.parse_args(["--stream-count", "two"])
    assert "argument --stream-count: invalid int value: 'two'" in capsys.readouterr().err


def test_log_level(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser = entry.parser()
    assert parser.parse_args([]).log_level is None  # INFO, or FERRY_LOG_LEVEL: configure_logging
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud"])
    assert "not a log level: 'loud'" in capsys.readouterr().err
    levels: list[object] = []
    monkeypatch.setattr("logging.basicConfig", lambda **kw: levels.append(kw["level"]))
    configure_logging(parser.parse_args(["--log-level", "error"]))
    assert levels == ["ERROR"]


def test_the_command_line_costs_no_grpc_boto3_or_redis() -> None:
    """`ferry` builds its parser, with these flags, on every run: keep that import light."""
    code = (
        "import sys, ferry.broker.cli, ferry.broker\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules}\n"
        "               & {'grpc', 'boto3', 'botocore', 'redis'})\n"
        "assert not heavy and 'ferry.broker.server' not in sys.modules, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_bad_flags_exit_2_before_any_server_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ferry.broker", "--data-dir", str(tmp_path / "d")),
            *("--offer-ttl-min", "5", "--offer-ttl", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.endswith(
        "error: bad broker settings: need 0 < --offer-ttl-min <= --offer-ttl <= --offer-ttl-max\n"
    )
    assert not (tmp_path / "d").exists()
