"""The kustomize overlays render, and the broker's manifests keep their properties.

Renders ``k8s/base`` and ``k8s/overlays/{dev,prod}`` with ``kubectl kustomize`` (kubectl must
be on PATH: a missing kubectl fails the test, it does not skip it) and checks the rendered
objects. Scale-out: two or more broker replicas on Redis, a rolling update that never lowers
capacity, an HPA from two replicas up, a PDB that lets a node drain take one pod, replicas
spread over nodes, no volume that ties a pod to a node. Safety: pod and container security
context on every pod (the broker's, and dev's Redis and S3 server), native gRPC probes on the
health-only port, TLS from a kubernetes.io/tls Secret mounted as a whole directory, the Redis
URL and the S3 credentials only by Secret reference, a NetworkPolicy that opens the metrics
port only to the monitoring namespace. Consistency: every FERRY_* name is one the broker
reads, the image is ``ferry:`` + pyproject.toml's version, and dev's broker settings name
dev's own Redis and S3 Services. Schema validation is in test_k8s_validate.py.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from ferry.broker import BrokerConfig, config_from_arguments
from ferry.broker.cli import _FLAGS, _LOG_ENV
from ferry.cli.main import _parser

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod"]
TARGETS = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}
VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ferry:{VERSION}"
GRPC_PORT = 50051
HEALTH_PORT = 50052
REFLEXIVE_PORT = 3478
METRICS_PORT = 9090
TLS_DIR = "/etc/ferry/tls"
TLS_SECRET = "ferry-broker-tls"
STORE_SECRET = "ferry-broker-store"
S3_SECRET = "ferry-broker-s3"
BROKER = "ferry-broker"
SELECTOR = {
    "app.kubernetes.io/name": "ferry",
    "app.kubernetes.io/instance": "ferry",
    "app.kubernetes.io/component": "broker",
}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": "ferry"}
#: The environment variables of the broker's settings (BrokerConfig), and of its logging.
FLAG_ENV = {f.env for f in _FLAGS if f.env}
BROKER_ENV = FLAG_ENV | set(_LOG_ENV.values())

Obj = dict[str, Any]


def render(folder: Path) -> list[Obj]:
    """The objects `kubectl kustomize folder` renders."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (with kustomize) is required on PATH for the k8s tests"
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_component(tmp_path: Path, target: Path, component: str) -> Path:
    """A kustomization in tmp_path: `target` plus k8s/components/`component`."""
    overlay = tmp_path / f"{target.name}-{component}"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths
                "resources": [os.path.relpath(target, overlay)],
                "components": [os.path.relpath(K8S / "components" / component, overlay)],
            }
        )
    )
    return overlay


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    """The one object of `kind` (named `name`, or with a generated name `name`-<hash>)."""
    found = [o for o in objs if o["kind"] == kind and name in (None, base_name(o))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def base_name(obj: Obj) -> str:
    """An object's name without the content hash that kustomize gives generated objects."""
    name: str = obj["metadata"]["name"]
    if obj["kind"] in ("ConfigMap", "Secret"):
        stem, _, suffix = name.rpartition("-")
        if stem and len(suffix) == 10:
            return stem
    return name


def pod_specs(objs: list[Obj]) -> dict[str, Obj]:
    """Every workload's pod spec, by workload name."""
    kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job")
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] in kinds
    }


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def broker_pod(objs: list[Obj]) -> Obj:
    spec: Obj = one(objs, "Deployment", BROKER)["spec"]["template"]["spec"]
    return spec


def broker_container(objs: list[Obj]) -> Obj:
    found: list[Obj] = broker_pod(objs)["containers"]
    assert [c["name"] for c in found] == ["broker"]
    return found[0]


def broker_config(objs: list[Obj]) -> dict[str, str]:
    return {k: str(v) for k, v in one(objs, "ConfigMap", "ferry-broker-config")["data"].items()}


def secret_values(objs: list[Obj], name: str) -> dict[str, str]:
    data = one(objs, "Secret", name)["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def serve_config(environ: dict[str, str]) -> BrokerConfig:
    """The broker's configuration with no flags and `environ` as its environment."""
    return config_from_arguments(_parser().parse_args(["serve"]), environ)


def has_password(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.password is not None or "password" in urllib.parse.parse_qs(parts.query)


@pytest.fixture(scope="module", params=OVERLAYS)
def objs(request: pytest.FixtureRequest) -> list[Obj]:
    overlay: str = request.param
    return render(TARGETS[overlay])


@pytest.fixture(scope="module")
def dev() -> list[Obj]:
    return render(TARGETS["dev"])


@pytest.fixture(scope="module")
def prod() -> list[Obj]:
    return render(TARGETS["prod"])


BROKER_OBJECTS = [
    ("ConfigMap", "ferry-broker-config"),
    ("Deployment", BROKER),
    ("HorizontalPodAutoscaler", BROKER),
    ("NetworkPolicy", BROKER),
    ("PodDisruptionBudget", BROKER),
    ("Service", BROKER),
    ("Service", "ferry-broker-reflexive"),
]
DEV_OBJECTS = [
    ("ConfigMap", "ferry-dev-ensure-bucket"),
    ("Secret", S3_SECRET),
    ("Secret", STORE_SECRET),
    *[(kind, name) for name in ("ferry-redis", "ferry-s3") for kind in ("Deployment", "Service")],
    ("NetworkPolicy", "ferry-redis"),
    ("NetworkPolicy", "ferry-s3"),
]


@pytest.mark.timeout(60)
def test_expected_objects(dev: list[Obj], prod: list[Obj]) -> None:
    # prod brings no Secret: the operator creates them (k8s/README.md); dev generates them.
    assert sorted((o["kind"], base_name(o)) for o in prod) == sorted(BROKER_OBJECTS)
    assert sorted((o["kind"], base_name(o)) for o in dev) == sorted(BROKER_OBJECTS + DEV_OBJECTS)


@pytest.mark.timeout(60)
def test_every_object_is_labelled(objs: list[Obj]) -> None:
    components = {"ferry-redis": "redis", "ferry-s3": "object-store"}  # dev's own stores
    for obj in objs:
        name = base_name(obj)
        component = components.get(name, "broker")
        expected = {**LABELS, "app.kubernetes.io/component": component}
        assert expected.items() <= obj["metadata"].get("labels", {}).items(), name
    for name in pod_specs(objs):
        workload = one(objs, "Deployment", name)
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == components.get(name, "broker")
        assert selector.items() <= template_labels.items()
        assert LABELS.keys() <= template_labels.keys()


@pytest.mark.timeout(60)
def test_pod_security(objs: list[Obj]) -> None:
    """Every pod, dev's Redis and S3 server too: non-root, seccomp, read-only, no caps."""
    pods = pod_specs(objs)
    assert BROKER in pods
    for name, pod in pods.items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["runAsUser"] > 0, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.keys() & {"hostNetwork", "hostPID", "hostIPC"}, name
        for container in containers(pod):
            where = f"{name}/{container['name']}"
            csc = container["securityContext"]
            assert csc["runAsNonRoot"] is True, where
            assert csc["runAsUser"] == sc["runAsUser"], where
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in csc, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][kind].keys(), where
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert "/tmp" in mounts or container["name"] == "redis", where
    broker = pods[BROKER]
    assert broker["securityContext"]["runAsUser"] == 10001
    assert broker["terminationGracePeriodSeconds"] >= 15  # above the broker's shutdown grace


@pytest.mark.timeout(60)
def test_writable_paths_are_volumes(objs: list[Obj]) -> None:
    """No pod keeps state on a node: the broker's is in Redis, dev's stores are throwaway."""
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    for name, pod in pod_specs(objs).items():
        for volume in pod["volumes"]:
            assert volume.keys() & {"emptyDir", "secret", "configMap"}, (name, volume)
            assert "hostPath" not in volume, name
    volumes = {v["name"]: v for v in broker_pod(objs)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in broker_container(objs)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/var/lib/ferry"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.timeout(60)
def test_broker_container(objs: list[Obj]) -> None:
    container = broker_container(objs)
    assert container["command"] == ["ferry", "serve"]
    expected_ports = {
        "grpc": GRPC_PORT,
        "health": HEALTH_PORT,
        "reflexive": REFLEXIVE_PORT,
        "metrics": METRICS_PORT,
    }
    for name, port in expected_ports.items():
        assert {"name": name, "containerPort": port, "protocol": "TCP"} in container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        # The gRPC port speaks TLS, which the kubelet's gRPC probes cannot: they use the
        # plaintext health-only port.
        assert container[probe]["grpc"] == {"port": HEALTH_PORT, "service": ""}, probe
    env = broker_config(objs)
    refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
    assert one(objs, "ConfigMap", "ferry-broker-config")["metadata"]["name"] in refs
    full = serve_config(env)
    assert full.listen == f"0.0.0.0:{GRPC_PORT}"
    assert full.data_dir == Path("/var/lib/ferry")
    assert full.tls_cert == Path(TLS_DIR) / "tls.crt"
    assert full.tls_key == Path(TLS_DIR) / "tls.key"
    assert full.health_listen == f"0.0.0.0:{HEALTH_PORT}"
    assert full.reflexive_listen == f"0.0.0.0:{REFLEXIVE_PORT}"
    assert not full.insecure_plaintext
    assert env["FERRY_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}"
    assert env["FERRY_LOG_FORMAT"] == "json"
    assert 0 < float(env["FERRY_MAX_CONNECTION_AGE"]) <= 3600
    # Every setting the broker knows changes its configuration: none is a dead letter.
    # (Names it does not know fail test_ferry_settings_are_ones_the_broker_reads.)
    for key in env.keys() & FLAG_ENV:
        without = {k: v for k, v in env.items() if k != key}
        if key in ("FERRY_TLS_CERT", "FERRY_TLS_KEY"):
            # Half the pair is refused: the broker never falls back to plaintext on 0.0.0.0.
            with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
                serve_config(without)
            continue
        assert serve_config(without) != full, key
    with pytest.raises(ValueError, match=r"refusing plaintext gRPC on --listen 0\.0\.0\.0"):
        serve_config({k: v for k, v in env.items() if not k.startswith("FERRY_TLS_")})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_ferry_settings_are_ones_the_broker_reads(target: str) -> None:
    """Every FERRY_* name in a ConfigMap, a Secret or a container's env is in cli.py's _FLAGS."""
    objs = render(TARGETS[target])
    names: set[str] = set()
    for obj in objs:
        if obj["kind"] in ("ConfigMap", "Secret"):
            names |= set(obj.get("data", {}))
    for pod in pod_specs(objs).values():
        for container in containers(pod):
            names |= {e["name"] for e in container.get("env", [])}
    ferry = {name for name in names if name.startswith("FERRY_")}
    assert {"FERRY_LISTEN", "FERRY_STORE"} <= ferry
    assert ferry - BROKER_ENV == set(), (
        "names the broker does not read (services/ferry/broker/cli.py)"
    )


@pytest.mark.timeout(60)
def test_secrets_only_by_reference(objs: list[Obj]) -> None:
    """The Redis URL and the S3 keys come from Secrets; no URL with a password is a literal."""
    for name, pod in pod_specs(objs).items():
        for container in containers(pod):
            literal = [*container.get("command", []), *container.get("args", [])]
            literal += [e["value"] for e in container.get("env", []) if "value" in e]
            for text in literal:
                assert "redis://" not in text, (name, text)
                assert "rediss://" not in text, (name, text)
                assert "AWS_SECRET" not in text, (name, text)
            for entry in container.get("env", []):
                if entry["name"] in ("FERRY_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert entry.keys() == {"name", "valueFrom"}, (name, entry)
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            assert "FERRY_STORE" not in obj["data"]
            assert not [v for v in obj["data"].values() if "redis://" in v or "rediss://" in v]
            assert not [k for k in obj["data"] if k.startswith("AWS_")]
    env = {e["name"]: e for e in broker_container(objs)["env"]}
    expected = {
        "FERRY_STORE": (STORE_SECRET, "FERRY_STORE"),
        "AWS_ACCESS_KEY_ID": (S3_SECRET, "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": (S3_SECRET, "AWS_SECRET_ACCESS_KEY"),
    }
    secrets = {base_name(o): o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    for variable, (secret, key) in expected.items():
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        # prod: the operator's Secret by its plain name; dev: the generated one, hash and all.
        assert ref == {"name": secrets.get(secret, secret), "key": key, "optional": False}


@pytest.mark.timeout(60)
def test_tls_certificate_from_a_secret(objs: list[Obj]) -> None:
    pod = broker_pod(objs)
    container = broker_container(objs)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # a subPath mount would never see a renewed certificate
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == TLS_SECRET
    assert volume["secret"]["defaultMode"] == 0o440  # the broker's group (fsGroup) only
    assert "optional" not in volume["secret"]  # no Secret, no pod: never plaintext
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]
    # The file names are a kubernetes.io/tls Secret's keys (what cert-manager writes).
    data = broker_config(objs)
    assert data["FERRY_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert data["FERRY_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert data["FERRY_HEALTH_LISTEN"] == f"0.0.0.0:{HEALTH_PORT}"
    # No key material in the manifests: dev's generated Secrets are a Redis URL and dev keys.
    for obj in objs:
        if obj["kind"] == "Secret":
            assert obj.get("type", "Opaque") == "Opaque"
            assert base_name(obj) in (STORE_SECRET, S3_SECRET)
    assert [p["port"] for p in one(objs, "Service", BROKER)["spec"]["ports"]] == [GRPC_PORT]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["base", "prod"])
def test_cert_manager_component_issues_the_mounted_secret(target: str, tmp_path: Path) -> None:
    objs = render(with_component(tmp_path, TARGETS[target], "cert-manager"))
    certificate = one(objs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == TLS_SECRET
    assert certificate["spec"]["usages"] == ["server auth"]
    assert LABELS.items() <= certificate["metadata"].get("labels", {}).items()
    assert BROKER in certificate["spec"]["dnsNames"]
    tls = [v for v in broker_pod(objs)["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in tls] == [TLS_SECRET]


def pdb_allowed_disruptions(pdb: Obj, replicas: int) -> int:
    """Pods the PDB lets an eviction take out of `replicas` healthy ones (integers only)."""
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        value = spec["maxUnavailable"]
        assert isinstance(value, int), "use an integer: a percentage rounds"
        return max(0, value)
    value = spec["minAvailable"]
    assert isinstance(value, int), "use an integer: a percentage rounds"
    return max(0, replicas - value)


@pytest.mark.timeout(60)
def test_scaled_out(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment", BROKER)
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    # A rollout adds a pod before it removes one, and never leaves fewer ready than asked.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= spec["replicas"] < hpa["spec"]["maxReplicas"]
    # CPU: negotiations are CPU work; idle watch streams are memory (k8s/README.md).
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["type"] == "Utilization"
    # With two replicas a node drain may take one; never both.
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb_allowed_disruptions(pdb, 2) == 1
    assert pdb_allowed_disruptions(pdb, spec["replicas"]) < spec["replicas"]
    # Spread over nodes: one lost node loses one replica's connections, not all of them.
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    by_node = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert len(by_node) == 1
    assert by_node[0]["maxSkew"] == 1
    assert by_node[0]["labelSelector"]["matchLabels"] == SELECTOR
    assert by_node[0]["matchLabelKeys"] == ["pod-template-hash"]


@pytest.mark.timeout(60)
def test_metrics_port_is_scraped_and_closed_to_others(objs: list[Obj]) -> None:
    template = one(objs, "Deployment", BROKER)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    # Not a Service port: Prometheus scrapes each pod.
    for service in (o for o in objs if o["kind"] == "Service"):
        assert METRICS_PORT not in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.timeout(60)
def test_network_policy(objs: list[Obj]) -> None:
    policy = one(objs, "NetworkPolicy", BROKER)
    assert policy["spec"]["podSelector"]["matchLabels"] == SELECTOR
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    open_ports: list[int] = []
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule["ports"]]
        assert all(p["protocol"] == "TCP" for p in rule["ports"])
        if "from" not in rule:
            open_ports += ports
            continue
        # Metrics only from the monitoring namespace.
        assert ports == [METRICS_PORT]
        assert rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
    assert open_ports == [GRPC_PORT, REFLEXIVE_PORT]  # not the health port, not metrics
    egress = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]
    }
    assert {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)} <= egress
    assert not [rule for rule in policy["spec"]["egress"] if "ports" not in rule]  # no open egress


@pytest.mark.timeout(60)
def test_selectors_match_the_pods(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment", BROKER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert LABELS.items() <= pod_labels.items()

    service = one(objs, "Service", BROKER)
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
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == SELECTOR


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_image_is_the_one_the_build_makes(target: str) -> None:
    """Every container running ferry runs ``ferry:<pyproject version>`` (what image/build tags)."""
    images = [
        container["image"]
        for pod in pod_specs(render(TARGETS[target])).values()
        for container in containers(pod)
    ]
    ferry = [image for image in images if image.split(":")[0].rsplit("/", 1)[-1] == "ferry"]
    assert ferry, images
    assert set(ferry) == {IMAGE}
    for image in images:  # the others pinned too
        assert ":" in image, image
        assert not image.endswith((":latest", ":dev")), image


@pytest.mark.timeout(60)
def test_dev_brings_its_redis_and_object_store(dev: list[Obj]) -> None:
    """dev's broker settings name dev's own Redis and S3 Services, with dev credentials."""
    store_url = secret_values(dev, STORE_SECRET)["FERRY_STORE"]
    s3_keys = secret_values(dev, S3_SECRET)
    env = {**broker_config(dev), "FERRY_STORE": store_url}
    config = serve_config(env)
    assert config.store_url == store_url
    assert not has_password(store_url)  # dev's Redis has none; prod's URL is the operator's

    def service_port(name: str) -> int:
        (port,) = one(dev, "Service", name)["spec"]["ports"]
        value: int = port["port"]
        return value

    redis = urllib.parse.urlsplit(store_url)
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "ferry-redis", 6379)
    assert service_port("ferry-redis") == redis.port
    s3 = urllib.parse.urlsplit(config.s3_endpoint or "")
    assert (s3.hostname, s3.port) == ("ferry-s3", service_port("ferry-s3"))
    assert config.s3_bucket
    assert config.s3_region
    # Obviously dev values, shared by MinIO and the broker.
    assert all("dev" in value for value in s3_keys.values())
    (minio,) = pod_specs(dev)["ferry-s3"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    s3_secret = one(dev, "Secret", S3_SECRET)["metadata"]["name"]
    assert refs["MINIO_ROOT_USER"]["name"] == refs["MINIO_ROOT_PASSWORD"]["name"] == s3_secret
    assert refs["MINIO_ROOT_USER"]["key"] == "AWS_ACCESS_KEY_ID"
    assert refs["MINIO_ROOT_PASSWORD"]["key"] == "AWS_SECRET_ACCESS_KEY"
    # The broker may reach both; Redis admits nobody else.
    egress = [
        p["port"] for r in one(dev, "NetworkPolicy", BROKER)["spec"]["egress"] for p in r["ports"]
    ]
    assert {6379, service_port("ferry-s3")} <= set(egress)
    (rule,) = one(dev, "NetworkPolicy", "ferry-redis")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]
    # The bucket is made before the broker starts, by the broker's image.
    (init,) = broker_pod(dev)["initContainers"]
    assert init["image"] == IMAGE
    assert init["command"][-1] == "/etc/ferry/dev/ensure_bucket.py"
    # Probes on both stores.
    for name in ("ferry-redis", "ferry-s3"):
        (container,) = pod_specs(dev)[name]["containers"]
        assert {"readinessProbe", "livenessProbe"} <= container.keys(), name


@pytest.mark.timeout(60)
def test_prod_leaves_the_external_services_to_the_operator(dev: list[Obj], prod: list[Obj]) -> None:
    config = broker_config(prod)
    # The placeholders the operator replaces (k8s/README.md, "What prod needs").
    assert {k for k, v in config.items() if "CHANGE-ME" in v} == {
        "FERRY_S3_BUCKET",
        "FERRY_S3_REGION",
    }
    assert "FERRY_S3_ENDPOINT" not in config  # AWS unless the operator names another S3
    readme = (K8S / "README.md").read_text()
    for name in (STORE_SECRET, S3_SECRET, TLS_SECRET, "FERRY_S3_BUCKET", "FERRY_S3_REGION"):
        assert name in readme, name
    # Larger pods, hard spreading over nodes.
    prod_resources = broker_container(prod)["resources"]
    dev_resources = broker_container(dev)["resources"]
    assert prod_resources != dev_resources
    assert prod_resources["requests"]["memory"] == "512Mi"
    spread = broker_pod(prod)["topologySpreadConstraints"]
    (by_node,) = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule"
    assert one(prod, "Deployment", BROKER)["spec"]["replicas"] >= 3
