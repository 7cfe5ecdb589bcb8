"""Every rendered manifest is valid against the Kubernetes schemas of one pinned version.

Renders ``k8s/base``, both overlays, and base and prod with the cert-manager component, and
validates every object with kubernetes-validate (pinned in pyproject.toml; it ships the
Kubernetes JSON schemas, so no network is needed) in strict mode: an unknown or misspelled
field is an error, as are a wrong type and a missing required field. Any error fails the
test, with every object's first error listed. A second test feeds deliberately broken
objects and expects each to be refused, so a validator that passes everything cannot hide
here.

kubernetes-validate knows only the built-in kinds. cert-manager's Certificate (a CRD) has no
schema in it, so its required fields and the values the broker depends on are checked by
hand below (cert-manager.io/v1: spec.secretName and spec.issuerRef.name are required, and a
Certificate needs at least one of commonName, dnsNames, uris, ipAddresses, emailAddresses or
otherNames); any other CRD fails the test until it gets such a check.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.unit.test_k8s import K8S, TARGETS, Obj, one, render, with_component

#: The Kubernetes version the manifests are validated for (kubectl on our machines is 1.32).
KUBERNETES_VERSION = "1.32"


def targets(tmp_path: Path) -> dict[str, Path]:
    return {
        **TARGETS,
        "base+cert-manager": with_component(tmp_path, K8S / "base", "cert-manager"),
        "prod+cert-manager": with_component(tmp_path, K8S / "overlays" / "prod", "cert-manager"),
    }


def certificate_errors(obj: Obj) -> list[str]:
    """What is wrong with a cert-manager.io/v1 Certificate, by hand (no schema for CRDs)."""
    spec: dict[str, Any] = obj.get("spec", {})
    known = {
        "secretName", "issuerRef", "commonName", "dnsNames", "ipAddresses", "uris",
        "emailAddresses", "otherNames", "duration", "renewBefore", "privateKey", "usages",
        "isCA", "subject", "secretTemplate", "keystores", "revisionHistoryLimit",
        "literalSubject", "encodeUsagesInRequest", "additionalOutputFormats",
        "nameConstraints", "renewBeforePercentage", "signatureAlgorithm",
    }  # fmt: skip
    errors = [f"spec.{key}: unknown field" for key in sorted(spec.keys() - known)]
    if not isinstance(spec.get("secretName"), str) or not spec["secretName"]:
        errors.append("spec.secretName: required")
    issuer = spec.get("issuerRef", {})
    if not isinstance(issuer.get("name"), str) or not issuer["name"]:
        errors.append("spec.issuerRef.name: required")
    if issuer.get("kind") not in (None, "Issuer", "ClusterIssuer"):
        errors.append(f"spec.issuerRef.kind: {issuer.get('kind')!r} is not a cert-manager issuer")
    names = ("commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "otherNames")
    if not any(spec.get(name) for name in names):
        errors.append("spec: names no subject (commonName, dnsNames, ...)")
    for field in ("duration", "renewBefore"):
        if field in spec and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms))+", str(spec[field])):
            errors.append(f"spec.{field}: {spec[field]!r} is not a Go duration")
    private_key = spec.get("privateKey", {})
    if private_key.get("algorithm") not in (None, "RSA", "ECDSA", "Ed25519"):
        errors.append(f"spec.privateKey.algorithm: {private_key['algorithm']!r}")
    if private_key.get("rotationPolicy") not in (None, "Never", "Always"):
        errors.append(f"spec.privateKey.rotationPolicy: {private_key['rotationPolicy']!r}")
    return errors


def schema_errors(obj: Obj) -> list[str]:
    """What kubernetes-validate (strict) or the hand check finds wrong with `obj`."""
    if obj["apiVersion"] == "cert-manager.io/v1" and obj["kind"] == "Certificate":
        return certificate_errors(obj)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.absolute_path)
        return [f"{path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


@pytest.mark.timeout(120)
def test_every_rendered_object_is_valid(tmp_path: Path) -> None:
    checked: dict[str, int] = {}
    errors: list[str] = []
    for target, folder in targets(tmp_path).items():
        objs = render(folder)
        for obj in objs:
            where = f"{target}: {obj['kind']} {obj['metadata']['name']}"
            errors += [f"{where}: {error}" for error in schema_errors(obj)]
        checked[target] = len(objs)
    assert errors == []
    assert min(checked.values()) >= 7, checked  # every target rendered its objects
    assert checked["prod+cert-manager"] == checked["prod"] + 1


def _broken(objs: list[Obj]) -> dict[str, Obj]:
    """Objects of the prod overlay, each spoiled in one way the validator must catch."""
    deployment = one(objs, "Deployment", "ferry-broker")
    cases: dict[str, Obj] = {}

    def spoil(name: str, obj: Obj) -> Obj:
        cases[name] = copy.deepcopy(obj)
        return cases[name]

    spoil("misspelled field", deployment)["spec"]["template"]["spec"]["containers"][0][
        "imagePullPolicyy"
    ] = "IfNotPresent"
    spoil("unknown top-level field", deployment)["specs"] = {}
    spoil("wrong type", deployment)["spec"]["replicas"] = "two"
    del spoil("missing required field", deployment)["spec"]["selector"]
    probe = spoil("misplaced probe field", deployment)["spec"]["template"]["spec"]
    probe["containers"][0]["readinessProbe"]["grpc"]["path"] = "/healthz"
    spoil("bad enum", one(objs, "Service", "ferry-broker"))["spec"]["ports"][0]["protocol"] = 6
    spoil("unknown kind", deployment)["kind"] = "Deploymnet"
    certificate = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": "x"},
        "spec": {"dnsName": ["x"], "issuerRef": {"kind": "ClusterIssuer"}},
    }
    cases["certificate without its required fields"] = certificate
    return cases


@pytest.mark.timeout(60)
def test_the_validator_refuses_broken_objects() -> None:
    objs = render(TARGETS["prod"])
    assert [schema_errors(o) for o in objs] == [[] for _ in objs]  # the unspoiled pass
    refused = {name: schema_errors(obj) for name, obj in _broken(objs).items()}
    assert [name for name, errors in refused.items() if not errors] == []
    assert "imagePullPolicyy" in refused["misspelled field"][0]
    assert "selector" in refused["missing required field"][0]
    assert len(refused["certificate without its required fields"]) >= 3
