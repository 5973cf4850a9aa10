"""Where the deployment files live, and the overlay combinations the tests cover."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yml"
OVERLAYS = REPO / "deploy" / "compose"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = REPO / "deploy" / "k8s"

MTLS = OVERLAYS / "tls-mtls.yml"
PERSISTENT = OVERLAYS / "persistent.yml"
INSECURE = OVERLAYS / "insecure-dev.yml"

#: Every way the README tells people to combine the files.
COMBINATIONS: dict[str, list[Path]] = {
    "base": [COMPOSE],
    "mtls": [COMPOSE, MTLS],
    "persistent": [COMPOSE, PERSISTENT],
    "persistent+mtls": [COMPOSE, PERSISTENT, MTLS],
    "insecure": [COMPOSE, INSECURE],
    "persistent+insecure": [COMPOSE, PERSISTENT, INSECURE],
}

CLIENT_SERVICES = ("client-text", "client-image", "client-both")
CLIENT_MODALITIES = {
    "client-text": "text_only",
    "client-image": "image_only",
    "client-both": "both",
}

#: A run small enough for a test: 2 rounds on a 120-sample builtin dataset.
TINY_RUN_ENV = {
    "CROSSFED_ROUNDS": "2",
    "CROSSFED_NUM_SAMPLES": "120",
    "CROSSFED_ROUND_DEADLINE_S": "120",
    "CROSSFED_START_TIMEOUT_S": "120",
}
