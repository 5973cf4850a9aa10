"""Kubernetes manifests under deploy/k8s, checked for consistency without a cluster: selectors
match pod labels, Services reach a workload port, probes exist and parse, every referenced
Secret/PVC/ServiceAccount/volume exists (Secrets: the ones the provisioning Job publishes, with
the keys it puts in them), kits and client ids line up, env names are config fields."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from crossfed.common.config import ClientConfig, ServerConfig, load_config
from crossfed.common.crypto.grpc_credentials import channel_credentials, server_credentials
from crossfed.common.crypto.identity import ClientCredential
from crossfed.server.credential_store import SqliteCredentialStore

from crossfed.provisioning import PROBE_CERT_NAME
from tests.support.deploy.crossfed_cli_parsing import parse_crossfed
from tests.support.deploy.deploy_paths import K8S

WORKLOADS = ("Deployment", "StatefulSet", "Job")


def load_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


DOCS = load_documents()


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod template, pod spec) for every workload."""
    for doc in DOCS:
        if doc["kind"] in WORKLOADS:
            template = doc["spec"]["template"]
            yield doc["metadata"]["name"], template, template["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def published_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, parsed from the provisioning Job's `publish NAME KEY=FILE...`."""
    job = of_kind("Job")["crossfed-provision"]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    joined = re.sub(r"\\\n\s*", " ", script)
    secrets: dict[str, set[str]] = {}
    for line in joined.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("publish ") else []
        if words:
            secrets[words[1]] = {w.split("=", 1)[0] for w in words[2:]}
    return secrets


def provision_argv() -> list[str]:
    job = of_kind("Job")["crossfed-provision"]
    return [str(a) for a in job["spec"]["template"]["spec"]["initContainers"][0]["command"]]


def test_every_document_is_namespaced_and_labelled() -> None:
    assert {d["kind"] for d in DOCS} >= {"Namespace", "Job", "StatefulSet", "Deployment"}
    for doc in DOCS:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "crossfed", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "crossfed"


def test_selectors_match_pod_labels_and_services_reach_a_port() -> None:
    templates = {}
    for doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
            templates[doc["metadata"]["name"]] = doc["spec"]["template"]
    # one Deployment per client id: selectors must not overlap
    client_selectors = [
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
        for d in of_kind("Deployment").values()
    ]
    assert len(set(client_selectors)) == len(client_selectors) == 3
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        targets = [
            t for t in templates.values() if selector.items() <= t["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"service {name} selects {len(targets)} workloads"
        port_names = {p.get("name") for c in targets[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (
                f"{name}: no container port {port['targetPort']}"
            )
    statefulset = of_kind("StatefulSet")["crossfed-server"]
    headless = of_kind("Service")[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


def test_server_probes_exist_and_parse() -> None:
    server = of_kind("StatefulSet")["crossfed-server"]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = server[probe]["exec"]["command"]
        assert command[:3] == ["crossfed", "deploy", "health-probe"], probe
        parse_crossfed(command[1:])
        assert server[probe]["timeoutSeconds"] >= 20  # as the compose health check: a busy host


def test_referenced_objects_exist() -> None:
    secrets = published_secrets()
    claims = set(of_kind("PersistentVolumeClaim"))
    accounts = set(of_kind("ServiceAccount"))
    for name, _template, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        owner = next(d for d in DOCS if d["metadata"]["name"] == name and d["kind"] in WORKLOADS)
        templated = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templated, (name, mount)
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert secret in secrets, f"{name}: Secret {secret} is never published"
                # the kit installer reads /secret/<key>: every key must be published
                script = " ".join(
                    str(a) for c in spec.get("initContainers", []) for a in c["command"]
                )
                used = set(re.findall(r"/secret/([\w.-]+)", script))
                assert used and used <= secrets[secret], f"{name}: {used - secrets[secret]}"
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts
    binding = of_kind("RoleBinding")["crossfed-provisioner"]
    assert binding["roleRef"]["name"] in of_kind("Role")
    assert {s["name"] for s in binding["subjects"]} <= accounts


def test_crossfed_commands_parse_and_env_names_are_config_fields() -> None:
    for name, _template, spec in pod_specs():
        for container in containers(spec):
            command = [str(a) for a in container["command"]]
            if command[0] != "crossfed":
                continue
            parse_crossfed(command[1:])
            env = {k: v for k, v in env_of(container).items() if k.startswith("CROSSFED_")}
            model = {"server": ServerConfig, "client": ClientConfig}.get(command[1])
            if model is None:
                continue
            for key in env:
                top = key.removeprefix("CROSSFED_").split("__")[0].lower()
                assert top in model.model_fields, f"{name}: {key}"
            load_config(model, env=env)


def test_kits_client_ids_and_server_name_line_up() -> None:
    argv = provision_argv()
    parse_crossfed(argv[1:])
    kits = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--client")
    assert argv[argv.index("--client-auth") + 1] == "credential"  # pods may move: no tokens
    secrets = published_secrets()
    dns = {argv[i + 1] for i, a in enumerate(argv) if a == "--server-dns"}
    deployments = of_kind("Deployment")
    assert {
        d["spec"]["template"]["metadata"]["labels"]["crossfed.io/client-id"]
        for d in deployments.values()
    } == set(kits)
    for deployment in deployments.values():
        spec = deployment["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        client_id = env["CROSSFED_CLIENT_ID"]
        assert f"crossfed-client-{client_id}" in secrets
        assert {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v} == {
            f"crossfed-client-{client_id}"
        }
        assert env["CROSSFED_SERVER_ADDRESS"].rsplit(":", 1)[0] in dns  # TLS name matches
        limits = spec["containers"][0]["resources"]["limits"]
        assert (str(limits["cpu"]), limits["memory"]) == ("1", "1Gi")
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("name", ["crossfed-server-kit", "crossfed-admin-kit"])
def test_other_kits_are_published(name: str) -> None:
    keys = published_secrets()[name]
    assert {"ca.crt", "tls.crt", "tls.key"} <= keys


# ------------------------------------------------------- the Secret flow, run for real


def published_files() -> dict[str, dict[str, str]]:
    """Secret name -> {key: file inside the Job pod} ($K expanded)."""
    job = of_kind("Job")["crossfed-provision"]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    kits = re.search(r"^\s*K=(\S+)$", script, re.MULTILINE)
    assert kits is not None
    joined = re.sub(r"\\\n\s*", " ", script).replace("$K", kits.group(1))
    out: dict[str, dict[str, str]] = {}
    for line in joined.splitlines():
        if line.strip().startswith("publish "):
            words = shlex.split(line.strip())
            out[words[1]] = dict(w.split("=", 1) for w in words[2:])
    return out


def install_kit(spec: dict[str, Any], secret_dir: Path, data_dir: Path) -> None:
    """Run a pod's install-kit init container with /secret and /var/lib/crossfed mapped."""
    (init,) = spec["initContainers"]
    script = init["command"][-1].replace("/var/lib/crossfed", str(data_dir))
    script = script.replace("/secret/", f"{secret_dir}/")
    subprocess.run([*init["command"][:-1], script], check=True, capture_output=True)


@pytest.mark.integration
def test_provision_publish_install_gives_usable_kits(tmp_path: Path) -> None:
    argv = provision_argv()
    work = tmp_path / "work"
    local = [a.replace("/work", str(work)) for a in argv]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "crossfed"), *local[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for secret, files in published_files().items():  # what `kubectl create secret` would hold
        for key, path in files.items():
            target = tmp_path / "secrets" / secret / key
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path.replace("/work", str(work)), target)
            target.chmod(0o440)  # secret volume under fsGroup: group-readable
    pods = {}
    for name, _template, spec in pod_specs():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                pods[name] = tmp_path / "pods" / name
                install_kit(spec, tmp_path / "secrets" / volume["secret"]["secretName"], pods[name])
                install_kit(spec, tmp_path / "secrets" / volume["secret"]["secretName"], pods[name])
    server = pods["crossfed-server"]
    server_credentials(server / "kit/tls", require_client_auth=True)  # key modes accepted
    channel_credentials(server / "kit/tls", PROBE_CERT_NAME)
    store = SqliteCredentialStore(server / "state/credentials.db")
    try:
        for name, pod in pods.items():
            if name == "crossfed-server":
                continue
            credential = ClientCredential.load(pod / "kit/credential.json")
            stored = store.get_credential(credential.client_id)
            assert stored is not None and stored.secret == credential.secret
            channel_credentials(pod / "kit/tls", credential.client_id)
            assert stat.S_IMODE((pod / "kit/credential.json").stat().st_mode) == 0o600
    finally:
        store.close()
    assert len(pods) == 4
