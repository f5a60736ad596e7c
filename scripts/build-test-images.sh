#!/usr/bin/env bash
# Build the two local images the Docker tests use, each only if it is missing.
# No registry is reachable here, so images come from Debian packages via `docker import`:
#   process-mcp-test/debian:bookworm-r2  debootstrap minbase + python3, procps (bash, setsid, stty...),
#                                        python3-pip, nodejs, and npm from the npm registry
#   process-mcp-test/debian:bullseye     debootstrap minbase + python3 3.9 (the oldest Python a reachable
#                                        mirror has), procps: the agent on an old interpreter, without splice
#   process-mcp-test/busybox:latest      busybox-static and its applet symlinks, and no bash
# A tag's revision (-rN) goes up whenever what an image holds changes, so machines that cached the
# old one build the new one. Env: DEBIAN_MIRROR overrides the mirror read from apt's sources;
# NPM_REGISTRY the npm registry. Needs root and a running engine (scripts/docker-engine.sh).
set -euo pipefail

log() { echo "build-test-images: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "ERROR: command failed at line $LINENO"' ERR

DEBIAN_IMAGE=process-mcp-test/debian:bookworm-r2
BULLSEYE_IMAGE=process-mcp-test/debian:bullseye
BUSYBOX_IMAGE=process-mcp-test/busybox:latest
LABEL='LABEL process-mcp.test=true'
# Debian's own npm package pulls in ~300 node-* packages that debootstrap cannot resolve; npm's
# registry tarball bundles its dependencies. Checked against the integrity the registry publishes.
NPM_VERSION=10.9.2
NPM_REGISTRY=${NPM_REGISTRY:-https://registry.npmjs.org}

docker info >/dev/null 2>&1 || die "no Docker engine answers; run scripts/docker-engine.sh first"
have() { docker image inspect "$1" >/dev/null 2>&1; }

work=
cleanup() {
    [[ -n $work && -d $work ]] || return 0
    # debootstrap mounts /proc and /sys in the target; unmount leftovers of a failed run
    # (deepest first) and never let rm cross into a mount.
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

ensure_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) -eq 0 ]] || die "need ${missing[*]} installed (run as root or apt-get install them)"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" </dev/null >&2 \
        || { apt-get update -qq </dev/null >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" </dev/null >&2; }
}

# Use the mirror apt already uses (the only one reachable on some machines): the archive
# serving bookworm, else any non-security/updates Debian archive (it serves bookworm too).
debian_mirror() {
    [[ -n ${DEBIAN_MIRROR:-} ]] && { echo "$DEBIAN_MIRROR"; return; }
    # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk '
        $2 == "bookworm" && !exact { exact = $1 }
        $2 !~ /-/ && !other { other = $1 }
        END { print (exact ? exact : other) }'
}

import_dir() { # DIR IMAGE CMD
    tar -C "$1" -c . | docker import --change "CMD [\"$3\"]" --change "$LABEL" - "$2" >/dev/null
}

install_npm() { # ROOT
    local tarball="$work/npm.tgz" integrity
    integrity=$(curl -fsS "$NPM_REGISTRY/npm/$NPM_VERSION" | python3 -c 'import json, sys; print(json.load(sys.stdin)["dist"]["integrity"])') \
        || die "cannot read npm $NPM_VERSION's metadata from $NPM_REGISTRY"
    curl -fsS -o "$tarball" "$NPM_REGISTRY/npm/-/npm-$NPM_VERSION.tgz" || die "cannot download npm $NPM_VERSION"
    [[ $integrity == "sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)" ]] \
        || die "npm $NPM_VERSION's tarball does not match the registry's integrity $integrity"
    mkdir -p "$1/usr/local/lib/node_modules/npm"
    tar -xzf "$tarball" -C "$1/usr/local/lib/node_modules/npm" --strip-components=1 --no-same-owner
    ln -s ../lib/node_modules/npm/bin/npm-cli.js "$1/usr/local/bin/npm"
}

build_debian() {
    ensure_pkgs debootstrap curl openssl
    local mirror start=$SECONDS
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || die "no Debian mirror found in apt sources; set DEBIAN_MIRROR"
    work=$(mktemp -d /var/tmp/process-mcp-debian.XXXXXX)
    log "debootstrap bookworm from $mirror (takes a minute or two)"
    # util-linux (setsid), coreutils (stty) and bash are Essential, so minbase has them.
    debootstrap --variant=minbase --include=python3,procps,python3-pip,nodejs bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    install_npm "$work/root"
    rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
    import_dir "$work/root" "$DEBIAN_IMAGE" /bin/bash
    cleanup; work=
    log "built $DEBIAN_IMAGE in $((SECONDS - start))s"
}

build_bullseye() {
    ensure_pkgs debootstrap
    local mirror start=$SECONDS
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || die "no Debian mirror found in apt sources; set DEBIAN_MIRROR"
    work=$(mktemp -d /var/tmp/process-mcp-bullseye.XXXXXX)
    log "debootstrap bullseye from $mirror"
    debootstrap --variant=minbase --include=python3,procps bullseye "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap bullseye failed"; }
    rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
    import_dir "$work/root" "$BULLSEYE_IMAGE" /bin/bash
    cleanup; work=
    log "built $BULLSEYE_IMAGE in $((SECONDS - start))s"
}

build_busybox() {
    ensure_pkgs busybox-static
    local start=$SECONDS applet
    work=$(mktemp -d /var/tmp/process-mcp-busybox.XXXXXX)
    local root=$work/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"   # statically linked: needs no libc in the image
    for applet in $(/bin/busybox --list-full); do
        [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
    done
    [[ ! -e $root/bin/bash ]] || die "busybox provides bash; the image must have none"
    # Enough for `ps`/`id` to show names and for `--user nobody` to resolve.
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    import_dir "$root" "$BUSYBOX_IMAGE" /bin/sh
    cleanup; work=
    log "built $BUSYBOX_IMAGE in $((SECONDS - start))s"
}

if have "$DEBIAN_IMAGE"; then log "$DEBIAN_IMAGE already present"; else build_debian; fi
if have "$BULLSEYE_IMAGE"; then log "$BULLSEYE_IMAGE already present"; else build_bullseye; fi
if have "$BUSYBOX_IMAGE"; then log "$BUSYBOX_IMAGE already present"; else build_busybox; fi
echo "$DEBIAN_IMAGE"
echo "$BULLSEYE_IMAGE"
echo "$BUSYBOX_IMAGE"
