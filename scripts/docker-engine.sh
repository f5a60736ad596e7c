#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`, starting Debian's dockerd if needed.
# Idempotent: when an engine already answers (DOCKER_HOST is honoured) it does nothing.
# Env: DOCKERD_LOG (log file), DOCKERD_ARGS (extra dockerd flags), DOCKER_WAIT_SECONDS.
set -euo pipefail

log() { echo "docker-engine: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-process-mcp.log}
WAIT_SECONDS=${DOCKER_WAIT_SECONDS:-60}

answers() { command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; }
# A killed dockerd can linger as a zombie until its parent reaps it: that one does not count.
# shellcheck disable=SC2009  # pgrep cannot leave zombies out
dockerd_alive() { ps -C dockerd -o stat= | grep -v '^Z' >/dev/null; }

if answers; then
    log "engine already answers at ${DOCKER_HOST:-the default socket}; nothing to do"
    exit 0
fi

# Beyond this point we would start our own daemon, which only makes sense for the local socket.
[[ -z ${DOCKER_HOST:-} ]] || die "DOCKER_HOST=$DOCKER_HOST is set but does not answer; start that engine or unset DOCKER_HOST"
[[ $(id -u) -eq 0 ]] || die "no engine answers (or this user may not use its socket) and we are not root; run sudo $0, join the docker group, or set DOCKER_HOST"
if [[ ! -r /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
    die "no engine answers and this is not Debian; install and start Docker by hand"
fi

# docker.io pulls in containerd, runc and tini (docker-init, needed for `--init`);
# the other packages are for scripts/build-test-images.sh.
need=()
for p in docker.io tini debootstrap busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if ((${#need[@]})); then
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >&2
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${need[@]}" </dev/null >&2
fi

# Another run (or the package's own service) may already be starting a daemon: wait for it
# instead of starting a second one that would fight over /var/lib/docker.
if ! dockerd_alive; then
    log "starting dockerd in the background, log: $DOCKERD_LOG"
    # setsid+nohup: the daemon must outlive this script and its session (tests run afterwards).
    # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
    setsid nohup dockerd ${DOCKERD_ARGS:-} </dev/null >>"$DOCKERD_LOG" 2>&1 &
fi

for ((i = 0; i < WAIT_SECONDS; i++)); do
    if answers; then
        log "engine answers (storage driver: $(docker info -f '{{.Driver}}'), cgroup v$(docker info -f '{{.CgroupVersion}}'))"
        exit 0
    fi
    sleep 1
    dockerd_alive || break  # it died: no point waiting the full time
done
tail -n 30 "$DOCKERD_LOG" >&2 || true
die "dockerd exited or did not answer within ${WAIT_SECONDS}s; see $DOCKERD_LOG"
