"""A container's own network: a bridge network named after the container, for a principal's container.

On Docker's default bridge every container reaches every other one, so one principal's process could
reach a server another principal's process listens on. A user-defined bridge network per container
keeps them apart (the engine drops traffic between bridge networks) and still reaches the outside
through the host, as the default bridge does. The server creates the network with the container's
labels before the container, and removes it after the container. Each network takes an address
range from the engine's pools (by default about 30 networks at once): idle principals' spaces are
reclaimed, and with them their networks.

Each function is blocking (docker-py); callers run it in a worker thread. They raise what docker-py
raises; the executor translates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docker import DockerClient

logger = logging.getLogger(__name__)


def ensure_network(client: DockerClient, name: str, labels: Mapping[str, str]) -> None:
    """Create the bridge network ``name`` with ``labels`` unless it exists (another server's, or ours
    from before a restart, for the same container)."""
    import docker.errors

    try:
        client.networks.get(name)
        return
    except docker.errors.NotFound:
        pass
    try:
        client.networks.create(name, driver="bridge", labels=dict(labels), check_duplicate=True)
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: another server created it first
            raise
    logger.info("created network %s", name)


def remove_network(client: DockerClient, name: str) -> None:
    """Remove the network ``name`` if it exists; log (and keep it) if the engine refuses, e.g. while
    another container still uses it."""
    import docker.errors

    try:
        client.networks.get(name).remove()
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        logger.warning("could not remove network %s: %s", name, exc.explanation or exc)
        return
    logger.info("removed network %s", name)
