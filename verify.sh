#!/usr/bin/env bash
# The project's one test command: set up a virtualenv, install the project with its dev extras,
# then lint, type-check and run the test suite (which also runs the examples).
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "verify.sh: Python 3.11 or newer is required (set PYTHON=...)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== docker engine and test images"
# CI must run the Docker tests; elsewhere they skip loudly when no engine can be had.
docker_setup() {
    if ! { command -v docker >/dev/null && docker info >/dev/null 2>&1; }; then
        [[ $(id -u) -eq 0 && -r /etc/debian_version ]] || return 1
        scripts/docker-engine.sh || return 1
    fi
    scripts/build-test-images.sh >/dev/null
}
if ! docker_setup; then
    [[ ${CI:-} == true ]] && { echo "verify.sh: Docker setup failed in CI" >&2; exit 1; }
    echo "verify.sh: WARNING: no Docker engine or test images; Docker tests will be skipped" >&2
fi
echo "== test tools"
# The sandbox attack suite builds a preload library with a C compiler and makes SysV segments (ipcmk).
if ! command -v cc >/dev/null || ! command -v ipcmk >/dev/null; then
    if [[ $(id -u) -eq 0 && -r /etc/debian_version ]]; then
        apt-get install -y --no-install-recommends gcc libc6-dev util-linux >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends gcc libc6-dev util-linux >/dev/null; }
    else
        echo "verify.sh: WARNING: no C compiler or ipcmk; the sandbox attack tests that need them will fail" >&2
    fi
fi
echo "== Compose"
# The deployment tests bring deploy/compose.yaml up; Debian's docker-compose is Compose v1.
if ! command -v docker-compose >/dev/null && [[ $(id -u) -eq 0 && -r /etc/debian_version ]]; then
    apt-get install -y --no-install-recommends docker-compose >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends docker-compose >/dev/null; } \
        || echo "verify.sh: WARNING: could not install docker-compose; the Compose test will fail" >&2
fi
echo "== MCP clients for the HTTP tests"
# The TypeScript SDK and the Inspector CLI, pinned by tests/js/package-lock.json; they need Node.js 20 or newer.
node_ok() { command -v npm >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' 2>/dev/null; }
if ! node_ok && [[ $(id -u) -eq 0 && -r /etc/debian_version ]]; then
    apt-get install -y --no-install-recommends nodejs npm >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends nodejs npm >/dev/null; } \
        || echo "verify.sh: WARNING: could not install nodejs and npm with apt-get" >&2
fi
if node_ok; then
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null
else
    echo "verify.sh: WARNING: no Node.js 20 or newer; the tests that drive the server with JavaScript clients will fail" >&2
fi
echo "== pytest"
.venv/bin/python -m pytest "$@"
