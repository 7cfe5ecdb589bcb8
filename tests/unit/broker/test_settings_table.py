"""The README's one table of broker settings is the command line's (ferry.broker.cli._FLAGS).

The table is made by `settings_table()`; when a flag is added, renamed or documented anew,
this fails until the README is updated (the message shows the table to paste).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ferry.broker import cli
from ferry.broker.config import BrokerConfig

README = Path(__file__).resolve().parents[3] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_readme_has_the_table_the_flags_make() -> None:
    table = cli.settings_table()
    assert table in _section("Settings"), f"update README.md's Settings table to:\n{table}"


def test_the_table_has_one_row_per_flag_with_its_variable() -> None:
    rows = cli.settings_table().splitlines()[2:]
    flags = [*(f.flag for f in cli._FLAGS), "--log-level", "--log-format"]
    assert [re.match(r"\| `(--[a-z0-9-]+)", row)[1] for row in rows] == flags  # type: ignore[index]
    for f, row in zip(cli._FLAGS, rows, strict=False):
        if f.flag == "--insecure-plaintext":  # never from the environment, on purpose
            assert f.env is None
            assert "flag only, on purpose" in row
        else:
            assert f.env == "FERRY_" + f.flag[2:].upper().replace("-", "_"), f.flag
            assert f"`{f.env}`" in row


def test_every_setting_but_none_has_a_flag() -> None:
    assert {f.field for f in cli._FLAGS} == set(BrokerConfig.__dataclass_fields__)


def test_the_new_operations_settings_from_flags_and_environment() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    env = {
        "FERRY_METRICS_LISTEN": "127.0.0.1:9464",
        "FERRY_MAX_CONNECTION_AGE": "300",
        "FERRY_MAX_CONNECTION_AGE_GRACE": "30",
        "FERRY_SHUTDOWN_GRACE": "20",
        "FERRY_OFFER_TTL": "120",
        "FERRY_LOG_FORMAT": "json",
        "FERRY_LOG_LEVEL": "debug",
    }
    ns = parser.parse_args([])
    config = cli.config_from_arguments(ns, env)
    assert (config.metrics_listen, config.max_connection_age_s) == ("127.0.0.1:9464", 300.0)
    assert (config.max_connection_age_grace_s, config.shutdown_grace_s) == (30.0, 20.0)
    assert config.offer_ttl_default_s == 120.0
    assert (ns.log_format, ns.log_level) == ("json", "DEBUG")
    flags = parser.parse_args(["--max-connection-age", "off", "--log-format", "text"])
    config = cli.config_from_arguments(flags, env)
    assert config.max_connection_age_s is None
    assert flags.log_format == "text"
    assert cli.config_from_arguments(parser.parse_args([]), {}) == BrokerConfig()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FERRY_MAX_CONNECTION_AGE": "soon"}, "is not a number or off"),
        ({"FERRY_MAX_CONNECTION_AGE": "-1"}, "--max-connection-age must be > 0"),
        ({"FERRY_METRICS_LISTEN": "9464"}, "--metrics-listen must be host:port"),
        ({"FERRY_LOG_FORMAT": "xml"}, "FERRY_LOG_FORMAT='xml': not a log format"),
        ({"FERRY_LOG_LEVEL": "loud"}, "FERRY_LOG_LEVEL='loud': not a log level"),
    ],
)
def test_bad_operations_settings_are_one_line_errors(env: dict[str, str], message: str) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        cli.config_from_arguments(parser.parse_args([]), env)
    assert "\n" not in str(caught.value)
