"""Which of its addresses a client offers its peer (FERRY_ADDRESSES or every interface)."""

from __future__ import annotations

import pytest

from ferry.client._candidates import local_candidates

pytestmark = pytest.mark.timeout(30)


def test_chosen_addresses_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_ADDRESSES", " 198.51.100.7, ::1 ,127.0.0.1")
    assert [c.ip for c in local_candidates()] == ["127.0.0.1", "::1", "198.51.100.7"]


def test_a_chosen_address_must_be_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_ADDRESSES", "127.0.0.1,example")
    with pytest.raises(ValueError, match="'example' is not an IP address"):
        local_candidates()


def test_every_interface_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_ADDRESSES", raising=False)
    ips = [c.ip for c in local_candidates()]
    assert "127.0.0.1" in ips
    assert ips[0] in ("127.0.0.1", "::1")  # loopback first
    assert not any(ip.startswith("fe80:") for ip in ips)  # no link-local
