# shellcheck shell=bash
# Shared by image/build and image/smoke (sourced, not run): paths, the version, the apt helper
# and the podman/buildah configuration these machines need.

IMAGE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$IMAGE_DIR")"
# Git-ignored: the cached root filesystems and the generated containers.conf.
CACHE_DIR="$IMAGE_DIR/.cache"

# [project].version of pyproject.toml: the image's tag, as the k8s overlays name it.
ferry_version() {
    python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$REPO_DIR/pyproject.toml"
}

die() {
    echo "image: $*" >&2
    exit 1
}

# Installs the Debian packages named that are not installed yet (a second run asks apt nothing).
apt_ensure() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    local sudo_cmd=()
    ((EUID == 0)) || sudo_cmd=(sudo)
    echo "+ apt-get install ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Points podman and buildah at a containers.conf of our own (CONTAINERS_CONF), so nothing under
# /etc changes. What these machines need, each found by running a container here:
# - runc, not crun (Debian's default): the cgroup hierarchy is hybrid (v1 controllers plus a
#   cgroup2 mount that still holds hugetlb) and crun refuses it ("cgroups in hybrid mode not
#   supported, drop all controllers from cgroupv2"); runc runs there.
# - explicit ulimits: podman asks the runtime for 1048576 open files and processes, above this
#   machine's hard limits, and root here lacks CAP_SYS_RESOURCE to raise them ("setrlimit
#   RLIMIT_NOFILE: Operation not permitted"). podman also lowers its own RLIMIT_NPROC to 32768
#   before it starts the runtime, so no more than that.
podman_setup() {
    mkdir -p "$CACHE_DIR"
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    [[ $nofile == unlimited ]] && nofile=1048576
    if [[ $nproc == unlimited ]] || ((nproc > 32768)); then
        nproc=32768
    fi
    cat >"$CACHE_DIR/containers.conf" <<EOF
# Written by image/lib.sh (podman_setup); see the comment there.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$CACHE_DIR/containers.conf"
}
