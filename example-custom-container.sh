#!/usr/bin/env bash
# The existing-container workflow: you create and own the container; process-mcp only runs
# processes in it (DOCKER_USE_EXISTING=true) and never creates, changes, stops or removes it.
# Usage: ./example-custom-container.sh [IMAGE]   (default: process-mcp:custom, see Dockerfile.custom)
set -euo pipefail

IMAGE=${1:-process-mcp:custom}
NAME=${DOCKER_CONTAINER:-process-mcp-custom}
VOLUME=${DOCKER_VOLUME:-process-mcp-custom-home}

if docker container inspect "$NAME" >/dev/null 2>&1; then
    echo "container $NAME already exists; starting it if it is stopped"
    docker start "$NAME" >/dev/null
else
    docker run -d --name "$NAME" --init \
        -v "$VOLUME:/home/agent" -w /home/agent \
        --memory 512m --memory-swap 512m --cpus 1 --pids-limit 4096 \
        "$IMAGE" tail -f /dev/null
fi

cat <<MSG
Container $NAME is running. Start process-mcp on it with:

    PROCESS_MODE=docker DOCKER_USE_EXISTING=true DOCKER_CONTAINER=$NAME process-mcp

or put those variables in your MCP client's config (see mcp-config-example.json).
Remove it when done:  docker rm -f $NAME  (and docker volume rm $VOLUME to drop /home/agent)
MSG
