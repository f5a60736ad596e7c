"""Shared fixtures: a real executor per backend, a Docker engine and its shared container.

Docker tests use a real engine and the local test images (scripts/docker-engine.sh,
scripts/build-test-images.sh). Without them the tests skip loudly, or fail when CI=true.
Everything they create is labelled ``process-mcp.test=true`` and removed by name afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread
import pytest

from process_mcp import DockerExecutor, ProcessExecutor
from process_mcp.config import DockerConfig

from .helpers import (
    BACKENDS,
    BULLSEYE_IMAGE,
    BUSYBOX_IMAGE,
    DEBIAN_IMAGE,
    NOBODY,
    TEST_LABELS,
    TESTS,
    backend_config,
    backends,
    cannot_run_here,
    executor_for,
    unique_name,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container


@pytest.fixture(autouse=True)
def _box_homes_in_the_tests_own_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The boxes' homes (one per workspace, kept by default in the user's state directory, which outlives
    a test) go to a directory of the test's own: servers started from the environment take it."""
    homes = tmp_path_factory.mktemp("homes")
    before = os.environ.get("SANDBOX_HOMES_DIR")
    os.environ["SANDBOX_HOMES_DIR"] = str(homes)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SANDBOX_HOMES_DIR"]
        else:
            os.environ["SANDBOX_HOMES_DIR"] = before


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=backends())
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a contract test runs against (see ``helpers.BACKENDS``); a test module that needs a
    capability narrows it with ``backends(...)``."""
    return str(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``docker`` every test that needs an engine, so ``-m "not docker"`` runs none of them: the
    tests under tests/docker/, those of a Docker backend, and those using an engine fixture."""
    for item in items:
        if _needs_docker(item):
            item.add_marker(pytest.mark.docker)


def _needs_docker(item: pytest.Item) -> bool:
    if Path(str(item.path)).resolve().parent == TESTS / "docker":
        return True
    if {"docker_client", "engine", "shared_container"} & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    backend = None if callspec is None else callspec.params.get("backend")
    return isinstance(backend, str) and backend in BACKENDS and BACKENDS[backend].mode == "docker"


@pytest.fixture
def workdir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty directory valid for the test's backend (host unless it asks for one)."""
    if "backend" not in request.fixturenames or request.getfixturevalue("backend").startswith("host"):
        return str(tmp_path)
    container: Container = request.getfixturevalue("shared_container")
    path = f"/home/agent/test-{secrets.token_hex(6)}"
    result = container.exec_run(["mkdir", "-p", path])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def docker_client() -> Iterator[DockerClient]:
    """A client for an engine that answers and has the test images; checked once per session."""
    problem = None
    client = None
    import docker
    import requests

    try:
        client = docker.from_env(timeout=30)
        client.ping()
        for image in (DEBIAN_IMAGE, BULLSEYE_IMAGE, BUSYBOX_IMAGE):
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                problem = f"test image {image} is missing; run scripts/build-test-images.sh"
    except (docker.errors.DockerException, requests.RequestException) as exc:
        problem = f"no Docker engine answers ({exc}); run scripts/docker-engine.sh then scripts/build-test-images.sh"
    if problem is not None:
        if client is not None:
            client.close()
        cannot_run_here(f"the Docker tests: {problem}")
    assert client is not None
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def engine(docker_client: DockerClient) -> DockerClient:
    """The checked client, for async tests (the session check ran once, off any event loop)."""
    await anyio.to_thread.run_sync(docker_client.ping)
    return docker_client


@pytest.fixture(scope="session")
def shared_container(docker_client: DockerClient) -> Iterator[Container]:
    """One container for the whole contract suite, made as the server makes its own and running as its
    unprivileged user; each test gets its own directory in it."""
    from process_mcp.docker.engine import container_options

    name = unique_name("shared")
    volume = docker_client.volumes.create(unique_name("shared-vol"), labels=TEST_LABELS)
    container = None
    try:
        # The options the server uses for the container it creates (limits and hardening), so the contract
        # suite runs on that container; the tests use it as an existing one. And with its processes' user
        # (DOCKER_USER's default) as the container's own, owning the volume (given to that user from a
        # second container: the engine makes the working directory root's at start).
        options = container_options(
            DockerConfig(image=DEBIAN_IMAGE, container_name=name, volume_name=str(volume.name)), TEST_LABELS
        )
        options["user"] = DockerConfig().user
        container = docker_client.containers.run(**options, detach=True)
        docker_client.containers.run(
            DEBIAN_IMAGE,
            ["chown", options["user"], "/home/agent"],
            volumes=options["volumes"],
            labels=TEST_LABELS,
            remove=True,
        )
        yield container
    finally:
        if container is not None:
            container.remove(force=True)
        volume.remove(force=True)


@pytest.fixture
async def executor(request: pytest.FixtureRequest, backend: str, workdir: str) -> AsyncIterator[ProcessExecutor]:
    """A started executor of each backend; every process it started is ended afterwards."""
    ex = executor_for(backend_config(request, backend, workdir))
    await ex.start()
    if isinstance(ex, DockerExecutor):
        assert ex.via == ("exec" if backend == "docker-exec" else "agent")
    try:
        yield ex
    finally:
        await ex.cleanup()


@pytest.fixture(params=["root", "unprivileged"])
def user(request: pytest.FixtureRequest) -> int:
    """Whom a server or box runs as: root (as CI runs) or an unprivileged user (nobody, through setpriv,
    when the tests run as root; else the tests' own user)."""
    if request.param == "root":
        if os.getuid() != 0:
            cannot_run_here("the root variant; run the tests as root to play it as root")
        return 0
    return NOBODY if os.getuid() == 0 else os.getuid()
