#!/usr/bin/env bash
# Build an image for Docker mode (DOCKER_IMAGE) without a container registry: a Debian root made with
# debootstrap from the machine's own apt mirror, imported with `docker import`.
#   scripts/build-box-image.sh TAG [PACKAGE...]
#   e.g. scripts/build-box-image.sh my-box:latest git build-essential nodejs
# The image always has python3 (the agent that drives processes in it) and procps; PACKAGEs are added.
# Env: SUITE (Debian release, default bookworm), DEBIAN_MIRROR (default: the mirror apt already uses).
# Needs root (debootstrap) and a running engine (scripts/docker-engine.sh). Where a registry is
# reachable, Dockerfile.custom is the other way: docker build -t TAG -f Dockerfile.custom .
set -euo pipefail

log() { echo "build-box-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $# -ge 1 && $1 != -* ]] || die "usage: $0 TAG [PACKAGE...]  (e.g. $0 my-box:latest git build-essential)"
tag=$1
shift
suite=${SUITE:-bookworm}
packages=python3,procps
for package in "$@"; do
    [[ $package =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "$package is not a Debian package name"
    packages+=",$package"
done
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
docker info >/dev/null 2>&1 || die "no Docker engine answers; run scripts/docker-engine.sh first"
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap </dev/null >&2 \
    || { apt-get update -qq </dev/null >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap </dev/null >&2; }

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v suite="$suite" '
        $2 == suite && !exact { exact = $1 }
        $2 !~ /-/ && !other { other = $1 }
        END { print (exact ? exact : other) }')
fi
[[ -n $mirror ]] || die "no Debian mirror found in apt's sources; set DEBIAN_MIRROR"

work=$(mktemp -d /var/tmp/process-mcp-box.XXXXXX)
cleanup() {
    # debootstrap mounts /proc and /sys in the target: unmount what a failed run left, never cross a mount.
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

start=$SECONDS
log "debootstrap $suite with $packages from $mirror (a minute or more)"
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
tar -C "$work/root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
log "built $tag in $((SECONDS - start))s; use it with DOCKER_IMAGE=$tag"
echo "$tag"
