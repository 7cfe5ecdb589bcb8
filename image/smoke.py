"""The image's smoke test: run localhost/ferry:<version> with podman, move a file through it.

    bash image/smoke        (after image/build; as root, like the build)

Starts the image the way k8s/base/deployment.yaml runs the pod: its own user (the image's
USER, 10001), a read-only root filesystem with a tmpfs on /tmp, a volume on /var/lib/ferry,
every capability dropped, no new privileges, TLS from a read-only folder readable by group
10001 only, and a plaintext health-only port. The container shares the host's network and
every port is on 127.0.0.1. Then, on the host, the repo's own `ferry send` and `ferry
receive` (as README.md's first command runs them: examples/demo.py) move a random file of a
few MiB through the broker in the container, and the copy's sha256 is compared; then the
operator's `ferry admin` in the container makes two users, two devices on the host log in,
and an offer to a person moves a file the same way. It also
checks that the broker process runs as uid 10001, that the root filesystem refuses writes,
that the broker keeps its state on the volume, and that it stops cleanly on SIGTERM.

Exits 0, or 1 with a one-line reason as its last line (after the container's log).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from demo_ca import make_broker_certificate  # noqa: E402

FERRY_UID = 10001
SIZE_MIB = 8
START_TIMEOUT_S = 60.0
TRANSFER_TIMEOUT_S = 120.0


class SmokeFailure(Exception):
    """One check failed; the message is the one line the run ends with."""


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise SmokeFailure if it does not exit 0."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SmokeFailure(f"{' '.join(args[:3])} ... exited {done.returncode}: {last[0]}")
    return done


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_image(image: str, version: str) -> None:
    """The image's configuration is what k8s and the README expect of it."""
    config = json.loads(run("podman", "image", "inspect", image).stdout)[0]["Config"]
    expected = {
        "User": "10001:10001",
        "Entrypoint": ["/opt/ferry/bin/ferry"],
        "WorkingDir": "/var/lib/ferry",
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise SmokeFailure(f"image {key} is {config.get(key)!r}, expected {value!r}")
    labeled = (config.get("Labels") or {}).get("org.opencontainers.image.version")
    if labeled != version:
        raise SmokeFailure(f"image version label is {labeled!r}, pyproject says {version!r}")
    if "50051/tcp" not in (config.get("ExposedPorts") or {}):
        raise SmokeFailure("image does not expose 50051/tcp")


def wait_listening(name: str) -> str:
    """Wait for the broker's listening line in the container's log; return the line."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        logs = run("podman", "logs", name).stdout
        for line in logs.splitlines():
            if '"event": "listening"' in line:
                return line
        state = run("podman", "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            raise SmokeFailure(f"the container is {state} before the broker listened")
        time.sleep(0.25)
    raise SmokeFailure(f"no listening line from the broker in {START_TIMEOUT_S:g} s")


def check_health(port: int) -> None:
    """grpc.health.v1 on the plaintext health port (what the kubelet's probes ask) says SERVING."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    serving = health_pb2.HealthCheckResponse
    if reply.status != serving.SERVING:
        raise SmokeFailure(f"health says {serving.ServingStatus.Name(reply.status)}")


def check_inside(name: str) -> None:
    """The broker runs as 10001, the root filesystem is read-only, the state is on the volume."""
    pid = run("podman", "inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    for field in ("Uid", "Gid"):
        ids = re.search(rf"^{field}:\s+(.*)$", status, re.MULTILINE)
        if ids is None or set(ids.group(1).split()) != {str(FERRY_UID)}:
            raise SmokeFailure(f"the broker's {field} is {ids and ids.group(1)!r}, not {FERRY_UID}")
    if run("podman", "exec", name, "id", "-u").stdout.strip() != str(FERRY_UID):
        raise SmokeFailure("podman exec does not run as the image's user 10001")
    probe = subprocess.run(
        ["podman", "exec", name, "touch", "/opt/ferry/probe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        raise SmokeFailure(f"the root filesystem took a write: {probe.stderr.strip()!r}")
    # The deployment's `command: [ferry, serve]` finds ferry on PATH.
    where = run("podman", "exec", name, "sh", "-c", "command -v ferry").stdout.strip()
    if where != "/opt/ferry/bin/ferry":
        raise SmokeFailure(f"ferry on the image's PATH is {where!r}")
    # The dev overlay's init container runs `python .../ensure_bucket.py`: the venv's python.
    prefix = run("podman", "exec", name, "python", "-c", "import boto3, sys; print(sys.prefix)")
    if prefix.stdout.strip() != "/opt/ferry":
        raise SmokeFailure(f"python on the image's PATH is in {prefix.stdout.strip()!r}")
    run("podman", "exec", name, "test", "-s", "/var/lib/ferry/broker.sqlite3")


def transfer(root: Path, broker: str, ca: Path) -> None:
    """README's main job, through the containerised broker: ferry send, ferry receive, sha256."""
    ferry = REPO / ".venv" / "bin" / "ferry"
    if not ferry.exists():
        raise SmokeFailure(f"no {ferry}: install the repo into .venv first")
    env = {
        **os.environ,
        "FERRY_BROKER": broker,
        "XDG_STATE_HOME": str(root / "state"),
        "FERRY_ADDRESSES": "127.0.0.1",  # both ends are on this machine
    }
    src = root / "outbox" / "cargo.bin"
    src.parent.mkdir()
    with src.open("wb") as f:
        for _ in range(SIZE_MIB):
            f.write(os.urandom(1 << 20))
    trust = ["--broker-ca", str(ca)]
    sender = subprocess.Popen(
        [str(ferry), "send", str(src), *trust], stderr=subprocess.PIPE, text=True, env=env
    )
    # Bounds the reads below: a sender that never prints its code is killed, ending them.
    watchdog = threading.Timer(TRANSFER_TIMEOUT_S, sender.kill)
    watchdog.start()
    try:
        assert sender.stderr is not None
        code = ""
        for line in sender.stderr:
            print(f"  send: {line}", end="")
            if line.startswith("Code: "):
                code = line.split()[1]
            if line.startswith("On the other machine"):
                break
        if not code:
            raise SmokeFailure("ferry send printed no code")
        dest = root / "inbox"
        received = subprocess.run(
            [str(ferry), "receive", code, "--dest", str(dest), "--yes", *trust],
            env=env,
            capture_output=True,
            text=True,
            timeout=TRANSFER_TIMEOUT_S,
            check=False,
        )
        for line in received.stderr.splitlines():
            print(f"  receive: {line}")
        rest = sender.stderr.read()
        for line in rest.splitlines():
            print(f"  send: {line}")
        if received.returncode != 0:
            raise SmokeFailure(f"ferry receive exited {received.returncode}")
        if sender.wait(timeout=TRANSFER_TIMEOUT_S) != 0:
            raise SmokeFailure(f"ferry send exited {sender.returncode}")
    finally:
        watchdog.cancel()
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    copy = dest / src.name
    if not copy.exists():
        raise SmokeFailure(f"nothing received at {copy}")
    want, got = sha256(src), sha256(copy)
    if want != got:
        raise SmokeFailure(f"sha256 differs: sent {want}, received {got}")
    print(f"sha256 {got} on both sides ({SIZE_MIB} MiB)")


def person_transfer(root: Path, name: str, broker: str, ca: Path) -> None:
    """An offer to a person through the containerised broker: the operator's `ferry admin`
    inside the container (on the broker's own volume, as `kubectl exec` runs it), two
    devices on the host (each its own config dir), bob's `ferry send --to alice` reaching
    alice's `ferry receive --from bob`, and the copy's sha256."""
    ferry = REPO / ".venv" / "bin" / "ferry"
    admin = ["podman", "exec", name, "ferry", "admin", "--data-dir", "/var/lib/ferry"]
    trust = ["--broker-ca", str(ca)]
    envs = {}
    for user in ("alice", "bob"):
        run(*admin, "users", "add", user)
        token = json.loads(run(*admin, "--json", "enroll", user).stdout)["token"]
        envs[user] = {
            **os.environ,
            "FERRY_BROKER": broker,
            "FERRY_ADDRESSES": "127.0.0.1",
            "XDG_CONFIG_HOME": str(root / user / "config"),
            "XDG_STATE_HOME": str(root / user / "state"),
        }
        login = [str(ferry), "login", "--name", f"{user}-host", *trust]
        done = subprocess.run(
            login,
            input=token + "\n",
            env=envs[user],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(f"  login {user}: {done.stderr.strip()}")
        if done.returncode != 0:
            raise SmokeFailure(f"ferry login of {user} exited {done.returncode}")
    src = root / "outbox" / "letter.bin"
    src.write_bytes(os.urandom(1 << 20))
    dest = root / "alice-inbox"
    receiver = subprocess.Popen(
        [str(ferry), "receive", "--from", "bob", "--dest", str(dest), "--yes", *trust],
        env=envs["alice"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sent = subprocess.run(
            [str(ferry), "send", str(src), "--to", "alice", *trust],
            env=envs["bob"],
            capture_output=True,
            text=True,
            timeout=TRANSFER_TIMEOUT_S,
            check=False,
        )
        for line in sent.stderr.splitlines():
            print(f"  send --to alice: {line}")
        if sent.returncode != 0:
            raise SmokeFailure(f"ferry send --to alice exited {sent.returncode}")
        if receiver.wait(timeout=TRANSFER_TIMEOUT_S) != 0:
            raise SmokeFailure(f"ferry receive --from bob exited {receiver.returncode}")
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()
    if not (dest / src.name).exists() or sha256(dest / src.name) != sha256(src):
        raise SmokeFailure("the offer to alice did not arrive intact")
    print("an offer to a person: sha256 the same on both sides")


def smoke(root: Path, image: str, name: str) -> None:
    tls = root / "tls"
    ca, cert, key = make_broker_certificate(tls, "127.0.0.1")
    shutil.move(ca, root / ca.name)  # the clients' trust, not the broker's
    ca = root / ca.name
    # As the deployment's Secret volume: the broker's group may read, nobody else.
    os.chown(tls, 0, FERRY_UID)
    tls.chmod(0o750)
    for path in (cert, key):
        os.chown(path, 0, FERRY_UID)
        path.chmod(0o440)

    grpc_port, health_port, reflexive_port = free_ports(3)
    run("podman", "volume", "create", name)
    run(
        *["podman", "run", "--detach", "--name", name, "--network", "host"],
        # The pod's emptyDir on /tmp (a path inside the container, not a file of ours here).
        *["--read-only", "--tmpfs", "/tmp:rw,size=64m,mode=1777"],  # noqa: S108
        *["--volume", f"{name}:/var/lib/ferry", "--volume", f"{tls}:/etc/ferry/tls:ro"],
        *["--cap-drop", "all", "--security-opt", "no-new-privileges"],
        *["--env", "HOME=/tmp", "--env", "PYTHONDONTWRITEBYTECODE=1"],
        *["--env", f"FERRY_TLS_CERT=/etc/ferry/tls/{cert.name}"],
        *["--env", f"FERRY_TLS_KEY=/etc/ferry/tls/{key.name}"],
        *["--env", f"FERRY_HEALTH_LISTEN=127.0.0.1:{health_port}"],
        *["--env", f"FERRY_REFLEXIVE_LISTEN=127.0.0.1:{reflexive_port}"],
        image,
        *["serve", "--listen", f"127.0.0.1:{grpc_port}", "--data-dir", "/var/lib/ferry"],
    )
    print(f"container {name}: {wait_listening(name)}")
    check_health(health_port)
    print(f"health on 127.0.0.1:{health_port}: SERVING")
    transfer(root, f"grpcs://127.0.0.1:{grpc_port}", ca)
    person_transfer(root, name, f"grpcs://127.0.0.1:{grpc_port}", ca)
    check_inside(name)
    print(f"inside: uid/gid {FERRY_UID}, read-only root, state on the volume, ferry/python on PATH")
    run("podman", "stop", "--time", "20", name, timeout=60)
    code = run("podman", "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    if code != "0":
        raise SmokeFailure(f"the broker exited {code} on SIGTERM, not 0")
    print("stopped: the broker exited 0 on SIGTERM")


def main() -> int:
    with (REPO / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    image = f"localhost/ferry:{version}"
    name = f"ferry-smoke-{os.getpid()}"
    try:
        if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
            raise SmokeFailure(f"no image {image}: run image/build first")
        check_image(image, version)
        with tempfile.TemporaryDirectory(prefix="ferry-smoke-") as tmp:
            root = Path(tmp)
            try:
                smoke(root, image, name)
            except (SmokeFailure, subprocess.TimeoutExpired, grpc.RpcError):
                logs = subprocess.run(
                    ["podman", "logs", "--tail", "30", name],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                print(f"--- the container's log ---\n{logs.stdout}{logs.stderr}", file=sys.stderr)
                raise
            finally:
                for args in (["rm", "--force", "--time", "5", name], ["volume", "rm", name]):
                    subprocess.run(["podman", *args], capture_output=True, check=False)
    except SmokeFailure as e:
        print(f"image/smoke: FAILED: {e}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as e:
        print(f"image/smoke: FAILED: {e.cmd[:3]} ran past {e.timeout:g} s", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"image/smoke: FAILED: health check: {e.code()}", file=sys.stderr)
        return 1
    print(f"image/smoke: ok ({image})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
