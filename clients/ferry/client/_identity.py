"""This machine's device identities and the devices it has seen, as files.

Two kinds of file, both under ``$XDG_CONFIG_HOME/ferry`` (default ``~/.config/ferry``)::

    devices/<broker_id>.json   one enrolled device per broker: who it is there, and its two
                               PRIVATE keys (`ferry.protocol.identity.DeviceKeys`)
    known_devices.json         trust on first use: broker_id -> user -> device_id -> fingerprint
                               of every device key this machine has relied on
    taken_offers.json          the offers to a person this machine took: the SHA-256 of each
                               one's signature -> its session and not_after (`TakenOffers`)

Both hold what nobody else on the machine may read or change (a private key; the pins that
stand in for a key exchange): each is written whole to a new file, made with mode 0600 in
a directory made with mode 0700, then renamed over the old one, so a reader never sees half
a file and no moment exists in which the file is readable by others (no chmod after).

A pin is the fingerprint of a device's keys as first seen. A device's keys never change (a
new key pair is a new enrollment, hence a new device_id), so a pinned device that shows
other keys means the broker, or someone in its place, is handing out keys that are not that
device's: `DeviceKeyChanged`, until the person checks and forgets the old pin
(`KnownDevices.forget`, ``ferry peers --forget alice``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.files import shown
from ferry.protocol.identity import DeviceKeys, fingerprint
from ferry.v1 import broker_pb2

__all__ = [
    "Device",
    "DeviceKeyChanged",
    "KnownDevices",
    "OfferReplayed",
    "TakenOffers",
    "config_dir",
    "write_private",
]


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/ferry``, default ``~/.config/ferry``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ferry"


def _make_dirs(folder: Path) -> None:
    """``folder`` and its parents up to the config dir: the ones made here with mode 0700."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            each.mkdir(mode=0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically, readable by its owner only: a new file made with mode
    0600 (in a folder made with 0700), renamed over the old one."""
    _make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DeviceKeyChanged(FerryError):
    """A device this machine knows shows other keys than the ones it had: someone may be
    posing as that device (or the broker lost its data). Nothing is sent or accepted until
    the person checks the new fingerprint and forgets the old pin."""


@dataclass(frozen=True, slots=True)
class Device:
    """This machine's device at one broker: who it is there, and its private keys."""

    broker_id: str
    #: The broker's address when the device enrolled (where it is signed in by default).
    broker: str
    user: str
    organization: str
    device_id: str
    display_name: str
    keys: DeviceKeys

    def __repr__(self) -> str:  # the keys' repr shows only their fingerprint
        return f"Device({self.user}/{self.display_name} {self.device_id} at {self.broker_id})"

    @property
    def fingerprint(self) -> str:
        """This device's key fingerprint, as peers see it."""
        return self.keys.fingerprint

    @staticmethod
    def path(broker_id: str) -> Path:
        """Where the device of ``broker_id`` is kept."""
        if not broker_id or "/" in broker_id or broker_id.startswith("."):
            raise ValueError(f"not a broker id: {shown(broker_id)}")
        return config_dir() / "devices" / f"{broker_id}.json"

    def save(self) -> Path:
        """Write this device (with its private keys) to its file, mode 0600."""
        data = {
            "broker_id": self.broker_id,
            "broker": self.broker,
            "user": self.user,
            "organization": self.organization,
            "device_id": self.device_id,
            "display_name": self.display_name,
            "signing_private": self.keys.signing_private.hex(),
            "encryption_private": self.keys.encryption_private.hex(),
        }
        path = self.path(self.broker_id)
        write_private(path, json.dumps(data, indent=1).encode())
        return path

    @classmethod
    def load(cls, broker_id: str) -> Device | None:
        """The device enrolled at ``broker_id`` on this machine, or None."""
        return cls._read(cls.path(broker_id))

    @classmethod
    def all(cls) -> list[Device]:
        """Every device of this machine, one per broker."""
        folder = config_dir() / "devices"
        found = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            with contextlib.suppress(FerryError):
                device = cls._read(path)
                if device is not None:
                    found.append(device)
        return found

    @classmethod
    def _read(cls, path: Path) -> Device | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FerryError(f"cannot read this device's file {path}: {exc}") from None
        try:
            keys = DeviceKeys(
                bytes.fromhex(data["signing_private"]), bytes.fromhex(data["encryption_private"])
            )
            return cls(
                broker_id=str(data["broker_id"]),
                broker=str(data["broker"]),
                user=str(data["user"]),
                organization=str(data["organization"]),
                device_id=str(data["device_id"]),
                display_name=str(data["display_name"]),
                keys=keys,
            )
        except (KeyError, TypeError, ValueError):
            raise FerryError(f"this device's file {path} is damaged: ferry login again") from None

    def delete(self) -> bool:
        """Remove this device's file; whether there was one."""
        try:
            self.path(self.broker_id).unlink()
        except FileNotFoundError:
            return False
        return True


def _device_name(device: broker_pb2.Device) -> str:
    return f"{shown(device.display_name, 64)} ({shown(device.device_id, 64)})"


class KnownDevices:
    """The pins: the fingerprint of every device this machine has relied on, per broker."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else config_dir() / "known_devices.json"

    def load(self) -> dict[str, dict[str, dict[str, str]]]:
        """broker_id -> user -> device_id -> fingerprint (empty if none yet)."""
        try:
            data: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise FerryError(f"cannot read the known devices {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise FerryError(f"the known devices file {self.path} is damaged")
        return data

    def _save(self, pins: dict[str, dict[str, dict[str, str]]]) -> None:
        write_private(self.path, json.dumps(pins, indent=1, sort_keys=True).encode())

    def pin(self, broker_id: str, devices: Iterable[broker_pb2.Device]) -> list[broker_pb2.Device]:
        """Check ``devices`` against the pins of ``broker_id`` and pin the new ones; the new
        ones. DeviceKeyChanged (and nothing pinned) if a known device shows other keys."""
        pins = self.load()
        mine = pins.setdefault(broker_id, {})
        new: list[broker_pb2.Device] = []
        for device in devices:
            seen = fingerprint(device.signing_key, device.encryption_key)
            known = mine.get(device.user, {}).get(device.device_id)
            if known is None:
                if all(d.device_id != device.device_id for d in new):
                    new.append(device)
                mine.setdefault(device.user, {})[device.device_id] = seen
            elif known != seen:
                user = shown(device.user, 64)
                raise DeviceKeyChanged(
                    f"the keys of {user}'s device {_device_name(device)} changed: pinned "
                    f"{known}, now {seen}; if {user} confirms the new fingerprint, accept it "
                    f"with: ferry peers --forget {user}"
                )
        if new:
            self._save(pins)
        return new

    def forget(self, broker_id: str, user: str) -> int:
        """Drop the pins of ``user``'s devices at ``broker_id``; how many there were."""
        pins = self.load()
        dropped = pins.get(broker_id, {}).pop(user, {})
        if dropped:
            self._save(pins)
        return len(dropped)


class OfferReplayed(FerryError):
    """An offer to a person that this machine took before, shown again as another session:
    the sender signed it once; the broker (or someone in its place) made it anew."""


class TakenOffers:
    """The offers to a person this machine took, by the SHA-256 of their signature, until
    their not_after: the same signed offer under another session name is a replay (a broker
    may not make a sender's offer twice), refused with `OfferReplayed`. Expired entries go
    at each write, so the file holds the offers of the longest offer TTL at most."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else config_dir() / "taken_offers.json"

    def _load(self) -> dict[str, list[Any]]:
        try:
            data: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise FerryError(f"cannot read the taken offers {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise FerryError(f"the taken offers file {self.path} is damaged")
        return data

    def check(self, signature: bytes, session: str) -> None:
        """OfferReplayed if this signed offer was taken here as another session."""
        seen = self._load().get(hashlib.sha256(signature).hexdigest())
        if seen is not None and seen[0] != session:
            raise OfferReplayed(
                f"this offer was taken here before (as {shown(str(seen[0]), 64)}): its sender"
                " made it once, and the broker shows it again; refused"
            )

    def add(self, signature: bytes, session: str, not_after: float, now: float) -> None:
        """Note that ``session``, signed ``signature``, was taken here."""
        taken = {k: v for k, v in self._load().items() if float(v[1]) > now}
        taken[hashlib.sha256(signature).hexdigest()] = [session, not_after]
        write_private(self.path, json.dumps(taken, indent=1, sort_keys=True).encode())
