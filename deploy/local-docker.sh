#!/usr/bin/env bash
# A real Docker engine + Compose v2 on a bare Debian 12 (bookworm) machine run as root without
# systemd and without a reachable container registry (this project's CI and dev machines), and
# the crossfed image built on it. On a machine with Docker already set up, use plain `docker`.
#
#   deploy/local-docker.sh up       engine (Debian docker.io + iptables), Compose v2 + buildx
#                                   (Debian trixie .debs, private apt config), dockerd started
#                                   in the background, local Python base image (debootstrap)
#   deploy/local-docker.sh build [--tag crossfed:latest]
#                                   up, then deploy/Dockerfile with the local base image and
#                                   torch from the machine's wheel folder (no PyTorch index)
#   deploy/local-docker.sh down     stop dockerd by its PID (containers stop with it), remove
#                                   docker0 and Docker's iptables chains, restore FORWARD policy
#                                   and net.ipv4.ip_forward as they were before `up`
#   deploy/local-docker.sh status   what is installed / running
#
# Idempotent: every step checks first and says "ok" or what it does. Downloads (the trixie
# .debs, the base image as a `docker save` tarball) are cached in $CROSSFED_DOCKER_CACHE
# (default <repo>/.cache/local-docker, git- and docker-ignored); a fresh machine rebuilds them.
# A failing step ends the script with one line "local-docker: FAILED: <step> ..." (the last
# lines of its log above it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CROSSFED_DOCKER_CACHE:-$REPO/.cache/local-docker}"
RUN_DIR="${CROSSFED_DOCKER_RUN_DIR:-/run/crossfed-local-docker}"
LOG="$RUN_DIR/steps.log"
BASE_IMAGE="${CROSSFED_BASE_IMAGE:-crossfed-local/python:3.11-bookworm}"
WHEELS_IMAGE="crossfed-local/torch-wheels:latest"
TORCH_SPEC="${CROSSFED_TORCH_SPEC:-torch==2.13.0}"
SUITE_ENGINE=bookworm      # engine, iptables, debootstrap and the base image
SUITE_COMPOSE=trixie       # docker-compose (v2) and docker-buildx: static Go, libc6 >= 2.34
DOCKER_SOCK=/var/run/docker.sock

say() { printf 'local-docker: %s\n' "$*"; }

fail() {
    printf 'local-docker: FAILED: %s\n' "$1" >&2
    exit 1
}

# step NAME CMD...: run CMD with its output in the log; on failure end with one line naming NAME.
# CMD runs as a background job: inside `CMD || fail` bash would ignore `set -e` in CMD's body.
step() {
    local name="$1"
    shift
    say "$name"
    printf '\n### %s: %s\n' "$(date -u +%FT%TZ)" "$name" >>"$LOG"
    "$@" >>"$LOG" 2>&1 </dev/null &
    if ! wait "$!"; then
        tail -n 12 "$LOG" | sed 's/^/  | /' >&2
        fail "$name (log: $LOG)"
    fi
}

need_root() {
    [ "$(id -u)" = 0 ] || fail "check: must run as root (installs packages, starts dockerd)"
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        fail "check: needs a Debian machine (apt-get, dpkg)"
    fi
    mkdir -p "$RUN_DIR" "$CACHE"
    touch "$LOG"
}

# The Debian mirror the machine already uses (deb822 or one-line sources), for debootstrap and
# for the private trixie source.
debian_mirror() {
    local uri=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
            /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) {print $i; exit}}' \
            /etc/apt/sources.list)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

apt_install() {
    local opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" \
        || { apt-get -q -o DPkg::Lock::Timeout=300 update \
             && DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@"; }
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

ensure_engine_packages() {
    local missing=()
    for pkg in docker.io iptables debootstrap; do installed "$pkg" || missing+=("$pkg"); done
    if [ ${#missing[@]} -eq 0 ]; then
        say "engine packages: ok (docker.io $(dpkg-query -W -f='${Version}' docker.io))"
        return
    fi
    # No systemd here: docker.io's post-install starts no daemon; `start_engine` does.
    step "install ${missing[*]} from Debian $SUITE_ENGINE" apt_install "${missing[@]}"
}

# Compose v2 and buildx from Debian trixie, fetched with a private apt configuration (own
# sources list, lists and archive dirs under the cache) so the system's sources stay untouched.
fetch_trixie_debs() {
    local apt_dir="$CACHE/apt-$SUITE_COMPOSE" mirror
    mirror="$(debian_mirror)"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$CACHE/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SUITE_COMPOSE main" \
        >"$apt_dir/sources.list"
    local apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir"
        -o "Dir::Cache::archives=$apt_dir/archives"
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    )
    apt-get -q "${apt_opts[@]}" update
    (cd "$CACHE/debs" && rm -f docker-compose_*.deb docker-buildx_*.deb \
        && apt-get -q "${apt_opts[@]}" download docker-compose docker-buildx)
}

ensure_compose_buildx() {
    if docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
        say "compose + buildx: ok (compose $(docker compose version --short)," \
            "buildx $(docker buildx version | awk '{print $2}'))"
        return
    fi
    if ! ls "$CACHE"/debs/docker-compose_*.deb "$CACHE"/debs/docker-buildx_*.deb >/dev/null 2>&1; then
        step "fetch docker-compose + docker-buildx .debs from Debian $SUITE_COMPOSE (private apt config)" \
            fetch_trixie_debs
    else
        say "compose + buildx .debs: cached in $CACHE/debs"
    fi
    step "install Compose v2 + buildx (dpkg -i)" \
        dpkg -i "$CACHE"/debs/docker-compose_*.deb "$CACHE"/debs/docker-buildx_*.deb
    step "check docker compose / docker buildx" \
        sh -c 'docker compose version && docker buildx version'
}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

our_dockerd_pid() {
    local pid
    [ -f "$RUN_DIR/dockerd.pid" ] || return 1
    pid="$(cat "$RUN_DIR/dockerd.pid")"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# Host network settings dockerd changes, recorded once before our first start.
save_network_settings() {
    [ -f "$RUN_DIR/network.saved" ] && return
    {
        echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
        echo "forward_policy=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
    } >"$RUN_DIR/network.saved"
}

wait_for_engine() {
    for _ in $(seq 1 120); do
        engine_answers && return 0
        if ! our_dockerd_pid >/dev/null; then
            echo "dockerd exited:"
            tail -n 20 "$RUN_DIR/dockerd.log"
            return 1
        fi
        sleep 0.5
    done
    echo "dockerd did not answer within 60 s"
    return 1
}

start_engine() {
    local pid
    if pid="$(our_dockerd_pid)"; then
        say "dockerd: ok (running, pid $pid)"
        return
    fi
    if engine_answers; then
        say "dockerd: an engine not started by this script answers on $DOCKER_SOCK;" \
            "using it (down leaves it alone)"
        return
    fi
    command -v iptables >/dev/null || fail "start dockerd: iptables is missing"
    save_network_settings
    say "start dockerd (overlay2, log $RUN_DIR/dockerd.log)"
    # setsid: its own session, so a caller's Ctrl-C or process-group kill does not hit it.
    setsid dockerd --storage-driver overlay2 --host "unix://$DOCKER_SOCK" \
        >>"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/dockerd.pid"
    step "wait for dockerd to answer (docker info)" wait_for_engine
    say "dockerd: running, pid $(cat "$RUN_DIR/dockerd.pid"), server $(docker version -f '{{.Server.Version}}')"
}

# A python3.11 base image without a registry: debootstrap a minimal bookworm with python3 and
# venv, trust the host's extra CA certificates (package downloads go through a TLS-inspecting
# proxy), and `docker import` it. Cached as a `docker save | gzip` tarball.
make_base_rootfs() {
    local rootfs="$1" mirror
    mirror="$(debian_mirror)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE_ENGINE" "$rootfs" "$mirror"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates
    fi
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* \
        "$rootfs"/tmp/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
}

import_base_image() {
    local rootfs="$CACHE/base-rootfs" tarball="$CACHE/python-3.11-bookworm.tar.gz"
    make_base_rootfs "$rootfs"
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        -c 'CMD ["python3"]' \
        - "$BASE_IMAGE"
    rm -rf "$rootfs"
    docker save "$BASE_IMAGE" | gzip -1 >"$tarball.part"
    mv "$tarball.part" "$tarball"
}

ensure_base_image() {
    local tarball="$CACHE/python-3.11-bookworm.tar.gz"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE: ok"
    elif [ -s "$tarball" ]; then
        step "load base image $BASE_IMAGE from $tarball" docker load -i "$tarball"
    else
        step "make base image $BASE_IMAGE (debootstrap $SUITE_ENGINE minbase + python3, docker import)" \
            import_base_image
    fi
    step "check python 3.11 in $BASE_IMAGE" \
        docker run --rm --network none "$BASE_IMAGE" python -c \
        'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version'
}

# The machine's torch wheel folder: pip's find-links (env or `pip config`), else /opt/wheels.
torch_wheel() {
    local dirs dir wheel
    dirs="${CROSSFED_TORCH_WHEELS:-${PIP_FIND_LINKS:-}}"
    [ -n "$dirs" ] || dirs="$(pip config get global.find-links 2>/dev/null || true)"
    for dir in $dirs /opt/wheels; do
        for wheel in "${dir#file://}"/torch-"${TORCH_SPEC#torch==}"+cpu-*.whl; do
            if [ -f "$wheel" ]; then echo "$wheel"; return 0; fi
        done
    done
    return 1
}

# An image holding only the wheel, at its root: the Dockerfile's TORCH_WHEELS_IMAGE. (The
# engine's built-in BuildKit predates named build contexts, so a build context cannot carry it.)
ensure_wheels_image() {
    local wheel
    if ! wheel="$(torch_wheel)"; then
        fail "find the CPU torch wheel (${TORCH_SPEC}+cpu) in pip's find-links or /opt/wheels"
    fi
    local label
    label="$(basename "$wheel")"
    if [ "$(docker image inspect -f '{{index .Config.Labels "wheel"}}' "$WHEELS_IMAGE" 2>/dev/null)" \
        = "$label" ]; then
        say "torch wheel image $WHEELS_IMAGE: ok ($label)"
        return
    fi
    step "import $label into $WHEELS_IMAGE" import_wheel "$wheel"
}

import_wheel() {
    local name
    name="$(basename "$1")"
    tar -C "$(dirname "$1")" -c "$name" | docker import -c "LABEL wheel=$name" - "$WHEELS_IMAGE"
}

cmd_up() {
    need_root
    ensure_engine_packages
    ensure_compose_buildx
    start_engine
    ensure_base_image
    say "up: docker $(docker version -f '{{.Client.Version}}')," \
        "engine $(docker version -f '{{.Server.Version}}'), compose $(docker compose version --short)"
}

cmd_build() {
    local tag="crossfed:latest"
    while [ $# -gt 0 ]; do
        case "$1" in
            --tag) tag="$2"; shift 2 ;;
            *) fail "build: unknown argument $1 (usage: build [--tag NAME:TAG])" ;;
        esac
    done
    cmd_up
    ensure_wheels_image
    local started=$SECONDS
    step "docker build -f deploy/Dockerfile -t $tag (base $BASE_IMAGE, torch from $WHEELS_IMAGE)" \
        docker build -f "$REPO/deploy/Dockerfile" -t "$tag" \
            --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
            --build-arg "TORCH_WHEELS_IMAGE=$WHEELS_IMAGE" \
            --build-arg "TORCH_SPEC=$TORCH_SPEC+cpu" \
            --build-arg "TORCH_INDEX_URL=https://pypi.org/simple" \
            "$REPO"
    local bytes
    bytes="$(docker image inspect -f '{{.Size}}' "$tag")"
    say "built $tag in $((SECONDS - started)) s:" \
        "$(awk -v b="$bytes" 'BEGIN {printf "%.2f GB (%d bytes)", b / 1e9, b}')"
}

# Docker's iptables rules (jumps to DOCKER* chains, rules on docker0 / br-<id>), then its chains.
remove_docker_iptables() {
    local table rule chain
    command -v iptables >/dev/null || return 0
    for table in filter nat; do
        iptables -t "$table" -S 2>/dev/null | grep -E '^-A ' | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' \
            | while read -r rule; do
                # shellcheck disable=SC2086  # the rule is iptables words
                eval "iptables -t $table ${rule/#-A/-D}" || true
            done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            iptables -t "$table" -F "$chain" || true
            iptables -t "$table" -X "$chain" || true
        done
    done
}

restore_network() {
    local link ip_forward=0 forward_policy=ACCEPT
    if [ -f "$RUN_DIR/network.saved" ]; then
        # shellcheck disable=SC1091
        . "$RUN_DIR/network.saved"
    fi
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
        | grep -E '^(docker0|br-[0-9a-f]{12}|veth)' || true); do
        ip link delete "$link" 2>/dev/null || true
    done
    remove_docker_iptables
    if command -v iptables >/dev/null; then iptables -P FORWARD "${forward_policy:-ACCEPT}"; fi
    echo "${ip_forward:-0}" >/proc/sys/net/ipv4/ip_forward
    rm -f "$RUN_DIR/network.saved"
    say "network restored: no docker0/br-* links, no DOCKER* iptables chains," \
        "FORWARD policy ${forward_policy:-ACCEPT}, ip_forward ${ip_forward:-0}"
}

# Exit 0: dockerd stopped on SIGTERM; 3: it had to be SIGKILLed after 120 s.
stop_dockerd() {
    local pid="$1"
    kill -TERM "$pid"
    # dockerd stops its containers (each gets its stop timeout, 10-30 s) before it exits.
    for _ in $(seq 1 240); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.5
    done
    echo "dockerd (pid $pid) still running after 120 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
    return 3
}

# What a dockerd that had to be SIGKILLed leaves: the containerd it started (its own socket
# under /var/run/docker), that containerd's shims, and mounts under Docker's directories.
remove_leftovers() {
    local pid mnt sock=/var/run/docker/containerd/containerd
    for pid in $(pgrep -f "containerd-shim.* -address $sock.sock" || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in $(pgrep -f "containerd --config $sock.toml" || true); do
        kill -TERM "$pid" 2>/dev/null || true
    done
    awk '$2 ~ "^/(var/lib|run)/docker/" {print $2}' /proc/mounts | sort -r | while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done
}

cmd_down() {
    need_root
    local pid
    if pid="$(our_dockerd_pid)"; then
        say "stop dockerd (pid $pid; its containers stop with it)"
        if ! stop_dockerd "$pid" >>"$LOG" 2>&1; then
            say "dockerd did not stop on SIGTERM within 120 s: killed; removing its leftovers"
            remove_leftovers
        fi
    elif engine_answers; then
        say "dockerd: the running engine was not started by this script; leaving it alone"
        return
    else
        say "dockerd: not running"
    fi
    rm -f "$RUN_DIR/dockerd.pid"
    restore_network
}

cmd_status() {
    local pid
    for pkg in docker.io iptables debootstrap docker-compose docker-buildx; do
        if installed "$pkg"; then
            say "package $pkg: $(dpkg-query -W -f='${Version}' "$pkg")"
        else
            say "package $pkg: not installed"
        fi
    done
    if pid="$(our_dockerd_pid)"; then
        say "dockerd: running (pid $pid)"
    elif engine_answers; then
        say "dockerd: an engine not started by this script answers"
    else
        say "dockerd: not running"
        return 3
    fi
    docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | sed 's/^/local-docker: image /'
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    build) shift; cmd_build "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    *)
        echo "usage: deploy/local-docker.sh up|build [--tag NAME:TAG]|down|status" >&2
        exit 2
        ;;
esac
