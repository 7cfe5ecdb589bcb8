"""The device file and the pins of known devices (ferry.client._identity): modes, atomic
writes, and trust on first use (new, same, changed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ferry.client import Device, DeviceKeyChanged, KnownDevices, OfferReplayed, TakenOffers
from ferry.protocol.identity import DeviceKeys, fingerprint
from ferry.v1 import broker_pb2

pytestmark = [pytest.mark.timeout(30)]


@pytest.fixture(autouse=True)
def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def _device(broker_id: str = "b1") -> Device:
    return Device(
        broker_id=broker_id,
        broker="127.0.0.1:50051",
        user="alice",
        organization="default",
        device_id="dev-1",
        display_name="laptop",
        keys=DeviceKeys.generate(),
    )


def _proto(user: str, device_id: str, keys: DeviceKeys) -> broker_pb2.Device:
    return broker_pb2.Device(
        device_id=device_id,
        user=user,
        display_name="phone",
        signing_key=keys.signing_key,
        encryption_key=keys.encryption_key,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_device_round_trip_with_private_modes(tmp_path: Path) -> None:
    device = _device()
    path = device.save()
    assert path == tmp_path / "config" / "ferry" / "devices" / "b1.json"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(path.parent.parent) == 0o700
    loaded = Device.load("b1")
    assert loaded == device
    assert loaded is not None
    assert loaded.keys.signing_key == device.keys.signing_key
    assert Device.load("other") is None
    assert [d.device_id for d in Device.all()] == ["dev-1"]
    assert device.delete() is True
    assert Device.load("b1") is None


def test_device_file_is_never_readable_by_others_even_with_a_loose_umask() -> None:
    old = os.umask(0)
    try:
        path = _device().save()
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


def test_save_replaces_atomically_and_leaves_no_temporary_file() -> None:
    first = _device()
    path = first.save()
    inode = path.stat().st_ino
    second = _device()
    second.save()
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert os.listdir(path.parent) == ["b1.json"]
    loaded = Device.load("b1")
    assert loaded is not None
    assert loaded.keys == second.keys


def test_a_damaged_device_file_is_one_clear_error() -> None:
    path = _device().save()
    path.write_text("{not json")
    with pytest.raises(Exception, match="cannot read this device's file"):
        Device.load("b1")


def test_repr_shows_no_private_key() -> None:
    device = _device()
    assert device.keys.signing_private.hex() not in repr(device)
    assert device.keys.encryption_private.hex() not in repr(device.keys)


def test_a_broker_id_cannot_name_another_path() -> None:
    with pytest.raises(ValueError, match="not a broker id"):
        Device.path("../x")


def test_pins_new_then_same_then_changed(tmp_path: Path) -> None:
    pins = KnownDevices()
    keys = DeviceKeys.generate()
    phone = _proto("alice", "d-phone", keys)
    assert [d.device_id for d in pins.pin("b1", [phone])] == ["d-phone"]
    assert _mode(pins.path) == 0o600
    data = json.loads(pins.path.read_text())
    assert data == {
        "b1": {"alice": {"d-phone": fingerprint(keys.signing_key, keys.encryption_key)}}
    }
    assert pins.pin("b1", [phone]) == []  # same keys: nothing new, no error
    changed = _proto("alice", "d-phone", DeviceKeys.generate())
    laptop = _proto("alice", "d-laptop", DeviceKeys.generate())
    with pytest.raises(DeviceKeyChanged, match=r"alice's device phone \(d-phone\) changed") as err:
        pins.pin("b1", [laptop, changed])
    assert "ferry peers --forget alice" in str(err.value)
    assert "\n" not in str(err.value)
    # Nothing was pinned by the refused call, not even the new laptop.
    assert "d-laptop" not in json.loads(pins.path.read_text())["b1"]["alice"]
    # The same device id at another broker is another device.
    assert [d.device_id for d in pins.pin("b2", [changed])] == ["d-phone"]
    assert pins.forget("b1", "alice") == 1
    assert [d.device_id for d in pins.pin("b1", [changed])] == ["d-phone"]


def test_a_hostile_device_name_is_escaped_in_the_error() -> None:
    pins = KnownDevices()
    pins.pin("b1", [_proto("alice", "d1", DeviceKeys.generate())])
    evil = _proto("alice", "d1", DeviceKeys.generate())
    evil.display_name = "\x1b]52;c;AAAA\x07phone"
    with pytest.raises(DeviceKeyChanged) as err:
        pins.pin("b1", [evil])
    assert "\x1b" not in str(err.value)
    assert "\\x1b" in str(err.value)


def test_taken_offers_refuse_a_replay_keep_the_same_session_and_forget_expired(
    tmp_path: Path,
) -> None:
    taken = TakenOffers()
    taken.add(b"sig-1", "sessions/a", not_after=2000.0, now=1000.0)
    taken.check(b"sig-1", "sessions/a")  # the same session again (a resume): fine
    taken.check(b"sig-2", "sessions/b")  # another offer: fine
    with pytest.raises(OfferReplayed, match="taken here before"):
        taken.check(b"sig-1", "sessions/c")
    path = tmp_path / "config" / "ferry" / "taken_offers.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"sig-1" not in path.read_bytes()  # kept as a hash only
    # Past its not_after an entry goes at the next write (the broker expired the offer).
    taken.add(b"sig-2", "sessions/b", not_after=4000.0, now=3000.0)
    assert len(json.loads(path.read_text())) == 1
    taken.check(b"sig-1", "sessions/c")
