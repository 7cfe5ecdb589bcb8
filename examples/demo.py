"""Ferry's main job on one machine: a broker, then a real `ferry send` / `ferry receive`.

    python examples/demo.py [--size MiB]

Makes a throwaway certificate authority and a certificate for 127.0.0.1 (demo_ca.py), starts
`ferry serve` with it (TLS) on a free loopback port with its embedded SQLite store in a
temporary folder, makes a random file, sends it with `ferry send`, receives it with
`ferry receive --yes` into another folder (both reaching the broker at grpcs://... and
trusting the demo CA with --broker-ca), checks the copy byte for byte, and stops the broker.
Everything it prints is the commands' own terminal output.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from demo_ca import make_broker_certificate

print = partial(print, flush=True)  # interleave with the children's output

# The `ferry` command of this very interpreter (works without activating the venv).
FERRY = [sys.executable, "-m", "ferry.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="file size in MiB")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp:
        root = Path(tmp)
        ca, cert, key = make_broker_certificate(root / "tls", "127.0.0.1")
        broker = subprocess.Popen(
            [
                *[*FERRY, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(root / "broker")],
                *["--tls-cert", str(cert), "--tls-key", str(key)],
                *["--log-level", "WARNING"],  # the broker's own log would interleave the story
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert broker.stdout is not None
            listening = broker.stdout.readline()
            match = re.search(r'"address": "([^"]+)"', listening)
            if not match:
                print(f"the broker did not start: {listening!r}", file=sys.stderr)
                return 1
            address = f"grpcs://{match.group(1)}"  # TLS, checked against the demo CA
            print(f"$ ferry serve --listen 127.0.0.1:0 --tls-cert {cert.name} --tls-key {key.name}")
            print(f"  listening on {address}")
            trust = ["--broker-ca", str(ca)]
            env = {
                **os.environ,
                "FERRY_BROKER": address,
                "XDG_STATE_HOME": str(root),
                # Both ends are on this machine: offer the peer only the loopback address.
                "FERRY_ADDRESSES": "127.0.0.1",
            }
            (root / "outbox").mkdir()
            src = root / "outbox" / "holiday.bin"
            with src.open("wb") as f:
                for _ in range(ns.size):
                    f.write(os.urandom(1 << 20))
            print(f"$ ferry send {src.name} --broker-ca {ca.name}")
            sender = subprocess.Popen(
                [*FERRY, "send", str(src), *trust], stderr=subprocess.PIPE, text=True, env=env
            )
            assert sender.stderr is not None
            code = ""
            for line in sender.stderr:
                print(f"  {line}", end="")
                if line.startswith("Code: "):
                    code = line.split()[1]
                if line.startswith("On the other machine"):
                    break
            if not code:
                print("the sender printed no code", file=sys.stderr)
                return 1
            dest = root / "inbox"
            print(f"$ ferry receive {code} --dest inbox --yes --broker-ca {ca.name}")
            received = subprocess.run(
                [*FERRY, "receive", code, "--dest", str(dest), "--yes", *trust],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
            print("".join(f"  {line}\n" for line in received.stderr.splitlines()), end="")
            print("(meanwhile, on the sending side)")
            rest = sender.stderr.read()
            print("".join(f"  {line}\n" for line in rest.splitlines()), end="")
            if received.returncode != 0 or sender.wait(timeout=60) != 0:
                print("the transfer failed", file=sys.stderr)
                return 1
            same = filecmp.cmp(src, dest / src.name, shallow=False)
            print(f"byte-for-byte identical: {same}")
            return 0 if same else 1
        finally:
            broker.terminate()
            broker.wait(timeout=15)


if __name__ == "__main__":
    raise SystemExit(main())
