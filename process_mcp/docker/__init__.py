"""Docker mode: the container's lifecycle, and the stream to the agent in it (or one exec per process
where the image has no Python). Imported only in Docker mode, so host mode never loads docker-py."""

from .executor import DockerExecutor

__all__ = ["DockerExecutor"]
