"""The kustomize overlays render, and the broker's manifests keep their safety properties.

Renders ``k8s/overlays/{dev,prod}`` with ``kubectl kustomize`` (kubectl must be on PATH:
a missing kubectl fails the test, it does not skip it) and checks the rendered objects:
pod and container security context, native gRPC probes, requests and limits, the
``app.kubernetes.io/*`` labels and selectors, and that the overlays differ only in
replicas, image and resources. TLS: the certificate comes from a kubernetes.io/tls Secret
mounted read-only as a whole directory (renewals reach the broker without a restart), the
probes use the plaintext health-only port, and the optional cert-manager component issues
exactly the Secret the broker mounts.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ferry.broker import BrokerConfig, config_from_arguments
from ferry.cli.main import _parser

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ["dev", "prod"]
GRPC_PORT = 50051
HEALTH_PORT = 50052
REFLEXIVE_PORT = 3478
TLS_DIR = "/etc/ferry/tls"
TLS_SECRET = "ferry-broker-tls"
SELECTOR = {
    "app.kubernetes.io/name": "ferry",
    "app.kubernetes.io/instance": "ferry",
    "app.kubernetes.io/component": "broker",
}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": "ferry"}

Obj = dict[str, Any]


def render(overlay: str | Path) -> list[Obj]:
    """Render an overlay of k8s/overlays by name, or any kustomization folder."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (with kustomize) is required on PATH for the k8s tests"
    folder = overlay if isinstance(overlay, Path) else REPO / "k8s" / "overlays" / overlay
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def grpc_service(objs: list[Obj]) -> Obj:
    return one(objs, "Service", "ferry-broker")


@pytest.fixture(scope="module", params=OVERLAYS)
def objs(request: pytest.FixtureRequest) -> list[Obj]:
    overlay: str = request.param
    return render(overlay)


@pytest.mark.timeout(60)
def test_expected_objects(objs: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )


@pytest.mark.timeout(60)
def test_every_object_is_labelled(objs: list[Obj]) -> None:
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        assert LABELS.items() <= labels.items(), obj["metadata"]["name"]


@pytest.mark.timeout(60)
def test_pod_security(objs: list[Obj]) -> None:
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        csc = container["securityContext"]
        assert csc["runAsNonRoot"] is True
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["capabilities"]["drop"] == ["ALL"]


@pytest.mark.timeout(60)
def test_writable_paths_are_volumes(objs: list[Obj]) -> None:
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    pvc = one(objs, "PersistentVolumeClaim")
    data = volumes[mounts["/var/lib/ferry"]]
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.timeout(60)
def test_broker_container(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["ferry", "serve"]
    assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in container["ports"]
    health = {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}
    assert health in container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        # The gRPC port speaks TLS, which the kubelet's gRPC probes cannot: they use the
        # plaintext health-only port.
        assert container[probe]["grpc"] == {"port": HEALTH_PORT, "service": ""}, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), kind
    reflexive = {"name": "reflexive", "containerPort": REFLEXIVE_PORT, "protocol": "TCP"}
    assert reflexive in container["ports"]
    config = one(objs, "ConfigMap")
    assert config["data"]["FERRY_LISTEN"] == f"0.0.0.0:{GRPC_PORT}"
    assert config["data"]["FERRY_DATA_DIR"] == "/var/lib/ferry"
    # Every setting in it is one that `ferry serve` really reads: as its environment it
    # gives the config above, and without any one of its keys the config differs.
    env = {k: str(v) for k, v in config["data"].items()}

    def serve_config(environ: dict[str, str]) -> BrokerConfig:
        return config_from_arguments(_parser().parse_args(["serve"]), environ)

    full = serve_config(env)
    assert full.listen == f"0.0.0.0:{GRPC_PORT}"
    assert full.data_dir == Path("/var/lib/ferry")
    assert full.tls_cert == Path(TLS_DIR) / "tls.crt"
    assert full.tls_key == Path(TLS_DIR) / "tls.key"
    assert full.health_listen == f"0.0.0.0:{HEALTH_PORT}"
    assert full.reflexive_listen == f"0.0.0.0:{REFLEXIVE_PORT}"
    assert not full.insecure_plaintext
    for key in env:
        without = {k: v for k, v in env.items() if k != key}
        if key in ("FERRY_TLS_CERT", "FERRY_TLS_KEY"):
            # Half the pair is refused: the broker never falls back to plaintext on 0.0.0.0.
            with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
                serve_config(without)
            continue
        assert serve_config(without) != full, key
    with pytest.raises(ValueError, match=r"refusing plaintext gRPC on --listen 0\.0\.0\.0"):
        serve_config({k: v for k, v in env.items() if not k.startswith("FERRY_TLS_")})
    refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
    assert config["metadata"]["name"] in refs


@pytest.mark.timeout(60)
def test_tls_certificate_from_a_secret(objs: list[Obj]) -> None:
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # a subPath mount would never see a renewed certificate
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == TLS_SECRET
    assert volume["secret"]["defaultMode"] == 0o440  # the broker's group (fsGroup) only
    assert "optional" not in volume["secret"]  # no Secret, no pod: never plaintext
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]
    # The file names are a kubernetes.io/tls Secret's keys (what cert-manager writes).
    data = one(objs, "ConfigMap")["data"]
    assert data["FERRY_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert data["FERRY_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert data["FERRY_HEALTH_LISTEN"] == f"0.0.0.0:{HEALTH_PORT}"
    assert not [o for o in objs if o["kind"] == "Secret"]  # no key material in the manifests
    # Only the TLS port and the reflexive responder are Service ports and open to others.
    assert [p["port"] for p in grpc_service(objs)["spec"]["ports"]] == [GRPC_PORT]
    policy = one(objs, "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [GRPC_PORT, REFLEXIVE_PORT]


@pytest.mark.timeout(60)
def test_cert_manager_component_issues_the_mounted_secret(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths
                "resources": [os.path.relpath(REPO / "k8s" / "overlays" / "prod", overlay)],
                "components": [
                    os.path.relpath(REPO / "k8s" / "components" / "cert-manager", overlay)
                ],
            }
        )
    )
    objs = render(overlay)
    certificate = one(objs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == TLS_SECRET
    assert certificate["spec"]["usages"] == ["server auth"]
    assert LABELS.items() <= certificate["metadata"].get("labels", {}).items()
    service = grpc_service(objs)["metadata"]["name"]
    assert service in certificate["spec"]["dnsNames"]


@pytest.mark.timeout(60)
def test_single_replica_while_store_is_sqlite(objs: list[Obj]) -> None:
    # SQLite on a ReadWriteOnce volume: one pod at a time (k8s/README.md). Lift this
    # together with the HPA's maxReplicas when the Redis store lands.
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 1


@pytest.mark.timeout(60)
def test_selectors_match_the_pods(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert LABELS.items() <= pod_labels.items()

    service = grpc_service(objs)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == SELECTOR
    assert service["spec"]["ports"] == [
        {
            "name": "grpc",
            "port": GRPC_PORT,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        }
    ]

    # The reflexive responder must see the clients' own addresses and ports: a load balancer
    # straight to the pods, no SNAT on the way (externalTrafficPolicy: Local).
    reflexive = one(objs, "Service", "ferry-broker-reflexive")
    assert reflexive["spec"]["type"] == "LoadBalancer"
    assert reflexive["spec"]["externalTrafficPolicy"] == "Local"
    assert reflexive["spec"]["selector"] == SELECTOR
    assert reflexive["spec"]["ports"] == [
        {"name": "reflexive", "port": REFLEXIVE_PORT, "targetPort": "reflexive", "protocol": "TCP"}
    ]

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == SELECTOR

    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == SELECTOR
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert {"protocol": "TCP", "port": GRPC_PORT} in ports

    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def _without_overlay_fields(objs: list[Obj]) -> list[Obj]:
    out = copy.deepcopy(objs)
    for obj in out:
        if obj["kind"] == "Deployment":
            obj["spec"].pop("replicas")
            for container in obj["spec"]["template"]["spec"]["containers"]:
                container.pop("image")
                container.pop("resources")
    return out


@pytest.mark.timeout(60)
def test_overlays_change_only_replicas_image_and_resources() -> None:
    dev, prod = (render(overlay) for overlay in OVERLAYS)
    assert _without_overlay_fields(dev) == _without_overlay_fields(prod)
