#!/usr/bin/env bash
# Build the server's image, process-mcp:<version> and process-mcp:latest, without a container registry:
# from the Dockerfile, with a base made here from Debian packages (debootstrap minbase + python3 and
# procps) and, to install the wheel, the test image that has pip (scripts/build-test-images.sh). The
# wheel is built from this checkout and its dependencies' wheels come from PyPI (fetched here, so the
# image build needs no network). Needs root and a running engine.
# Env: PYTHON (builds the wheel; default python3), DEBIAN_MIRROR (as for build-test-images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "build-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

BASE_IMAGE=process-mcp-base/debian:bookworm-r1
BUILD_IMAGE=process-mcp-test/debian:bookworm-r2
python=${PYTHON:-python3}
docker info >/dev/null 2>&1 || die "no Docker engine answers; run scripts/docker-engine.sh first"

work=$(mktemp -d /var/tmp/process-mcp-image.XXXXXX)
cleanup() {
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    # shellcheck disable=SC2016  # $(...) is apt's format syntax
    mirror=${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk '$2 == "bookworm" && !e { e = $1 } $2 !~ /-/ && !o { o = $1 } END { print (e ? e : o) }')}
    [[ -n $mirror ]] || die "no Debian mirror found in apt sources; set DEBIAN_MIRROR"
    log "debootstrap the base from $mirror"
    debootstrap --variant=minbase --include=python3,procps,ca-certificates bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
    tar -C "$work/root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi
docker image inspect "$BUILD_IMAGE" >/dev/null 2>&1 || scripts/build-test-images.sh >/dev/null

version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
log "building the wheels of process-mcp $version and its dependencies"
"$python" -m pip wheel --quiet --wheel-dir "$work/wheels" . >&2
log "building process-mcp:$version"
docker build --quiet \
    --build-arg "BUILD_BASE=$BUILD_IMAGE" --build-arg "BASE=$BASE_IMAGE" \
    --label "org.opencontainers.image.version=$version" \
    -t "process-mcp:$version" -t process-mcp:latest -f Dockerfile "$work/wheels" >/dev/null
echo "process-mcp:$version"
