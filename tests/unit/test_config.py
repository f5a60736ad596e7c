from __future__ import annotations

import os
import pwd
import re
import tempfile
from pathlib import Path

import pytest

from process_mcp import InvalidConfig, load_config
from process_mcp.config import environment_variables
from process_mcp.service import environment_help


def test_defaults_match_the_original_server() -> None:
    config = load_config({})
    assert config.mode == "host"
    assert (config.defaults.timeout_ms, config.defaults.max_timeout_ms) == (10_000, 60_000)
    assert config.docker.image == "ubuntu:22.04"
    assert config.docker.container_name == "process-mcp-main"
    assert config.docker.volume_name == "process-mcp-volume"
    assert config.docker.use_existing is False
    assert config.sandbox.allowed_domains == ["*"]
    assert config.sandbox.enabled is True
    assert config.limits.keep_terminated == 20


def test_the_host_workdir_defaults_to_a_workspace_of_its_own_never_the_home_directory() -> None:
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    workdir = load_config({}).workdir
    assert workdir != str(home)
    expected = home / ".local/share/process-mcp/workspace"
    assert workdir == (
        str(expected) if home.is_dir() else f"{tempfile.gettempdir()}/process-mcp-workspace-{os.getuid()}"
    )


def test_the_docker_workdir_defaults_to_home_agent() -> None:
    assert load_config({"PROCESS_MODE": "docker"}).workdir == "/home/agent"


def test_an_existing_containers_workdir_is_left_to_the_container() -> None:
    config = load_config({"PROCESS_MODE": "docker", "DOCKER_USE_EXISTING": "true"})
    assert config.defaults.workdir is None
    assert (
        load_config({"PROCESS_MODE": "docker", "DOCKER_USE_EXISTING": "true", "DEFAULT_WORKDIR": "/w"}).workdir == "/w"
    )


def test_variables_are_read_and_lists_split_on_commas() -> None:
    config = load_config(
        {
            "PROCESS_MODE": "docker",
            "DEFAULT_WORKDIR": "/work",
            "DOCKER_USE_EXISTING": "true",
            "DOCKER_CONTAINER": "dev",
            "SANDBOX_ALLOWED_DOMAINS": "github.com, *.pypi.org,,",
            "SANDBOX_DENY_READ": "/etc/shadow,/root/.ssh",
            "PROCESS_KEEP_TERMINATED": "5",
            "PROCESS_MAX_LIVE": "8",
        }
    )
    assert config.workdir == "/work"
    assert config.docker.use_existing is True
    assert config.docker.container_name == "dev"
    assert config.sandbox.allowed_domains == ["github.com", "*.pypi.org"]
    assert config.sandbox.deny_read == ["/etc/shadow", "/root/.ssh"]
    assert config.limits.keep_terminated == 5
    assert config.limits.max_live == 8


def test_an_empty_domain_list_means_no_network() -> None:
    assert load_config({"SANDBOX_ALLOWED_DOMAINS": ""}).sandbox.allowed_domains == []


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_IMAGE", "python:3.11")
    assert load_config().docker.image == "python:3.11"


def test_the_sandbox_and_docker_hardening_settings_are_read() -> None:
    config = load_config(
        {
            "SANDBOX_ALLOW_READ": "/opt/tools, ~/.pyenv",
            "SANDBOX_ALLOW_PROTECTED": ".vscode",
            "SANDBOX_ALLOW_PRIVATE_ADDRESSES": "true",
            "SANDBOX_MAX_PROCESSES": "64",
            "SANDBOX_MAX_MEMORY_MB": "256",
            "SANDBOX_TMP_SIZE_MB": "16",
            "SANDBOX_SCAN_LIMIT": "500",
            "PROCESS_ENV_PASSTHROUGH": "GH_TOKEN,NPM_CONFIG_REGISTRY",
            "DOCKER_CAP_ADD": "NET_RAW",
            "DOCKER_NETWORK": "none",
            "DOCKER_READ_ONLY": "true",
            "DOCKER_USER": "root",
            "DOCKER_HOST": "tcp://127.0.0.1:2375",
            "DOCKER_AGENT": "false",
        }
    )
    sandbox, docker = config.sandbox, config.docker
    assert sandbox.allow_read == ["/opt/tools", "~/.pyenv"]
    assert (sandbox.allow_protected, sandbox.allow_private_addresses) == ([".vscode"], True)
    assert (sandbox.max_processes, sandbox.max_memory_mb, sandbox.tmp_size_mb, sandbox.scan_limit) == (64, 256, 16, 500)
    assert config.env_passthrough == ["GH_TOKEN", "NPM_CONFIG_REGISTRY"]
    assert (docker.cap_add, docker.network, docker.read_only, docker.user) == (["NET_RAW"], "none", True, "root")
    assert docker.engine == {"DOCKER_HOST": "tcp://127.0.0.1:2375"}
    assert docker.agent is False
    assert load_config({}).docker.engine == {}
    assert load_config({}).docker.agent is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DOCKER_USER", "1000:"),
        ("DOCKER_USER", "a b"),
        ("SANDBOX_MAX_PROCESSES", "2"),
        ("SANDBOX_TMP_SIZE_MB", "0"),
        ("DOCKER_AGENT", "maybe"),
    ],
)
def test_a_malformed_hardening_setting_stops_the_server_naming_it(name: str, value: str) -> None:
    with pytest.raises(InvalidConfig, match=name):
        load_config({name: value})


@pytest.mark.parametrize(
    ("environ", "network"),
    [
        ({}, "bridge"),
        ({"SANDBOX_ALLOWED_DOMAINS": "github.com"}, "none"),
        ({"SANDBOX_ALLOWED_DOMAINS": ""}, "none"),
        ({"SANDBOX_ALLOWED_DOMAINS": "github.com", "DOCKER_NETWORK": "bridge"}, "bridge"),
        ({"DOCKER_NETWORK": "my-net"}, "my-net"),
    ],
)
def test_a_domain_list_takes_the_created_container_off_the_network_unless_one_is_named(
    environ: dict[str, str], network: str
) -> None:
    assert load_config(environ).docker_network == network


@pytest.mark.parametrize(
    ("environ", "network"),
    [
        ({}, "box-alice"),
        ({"DOCKER_NETWORK": "bridge"}, "box-alice"),
        ({"SANDBOX_ALLOWED_DOMAINS": "github.com"}, "none"),
        ({"DOCKER_NETWORK": "none"}, "none"),
    ],
)
def test_a_principals_container_gets_a_network_of_its_own_instead_of_the_shared_bridge(
    environ: dict[str, str], network: str
) -> None:
    config = load_config(environ)
    config.docker.container_name = "box-alice"
    config.docker.own_network = True
    assert config.docker_network == network


def test_the_help_lists_every_variable_as_declared() -> None:
    """--help reads rows kept beside the CLI so it needs no pydantic; they must be the declaration's."""
    declared = tuple(environment_variables())
    if declared != environment_help.ROWS:
        rows = "".join(f"    {row!r},\n" for row in declared)
        pytest.fail(f"process_mcp/service/environment_help.py is stale; set ROWS to:\n(\n{rows})")


def test_the_readme_configuration_table_lists_every_variable_with_its_declared_default() -> None:
    """The environment variables are declared once (config.py); the README's table must agree with it."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("\n## Configuration\n")[1].split("\n## ")[0]
    documented: dict[str, str | None] = {}
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        name_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", name_cell)
        defaults = re.findall(r"`([^`]*)`", default_cell)
        for i, name in enumerate(names):
            documented[name] = defaults[i] if len(defaults) == len(names) else None
    declared = {name: default for name, default, _ in environment_variables()}
    assert sorted(set(declared) - set(documented)) == [], "declared but not in the README's table"
    assert sorted(set(documented) - set(declared)) == [], "in the README's table but not declared"
    for name, default in declared.items():
        shown = documented[name]
        if shown is None or not default:
            continue
        try:
            assert float(shown) == float(default), name
        except ValueError:
            assert shown == default, name


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"PROCESS_MODE": "vm"}, "PROCESS_MODE"),
        ({"DEFAULT_TIMEOUT_MS": "soon"}, "DEFAULT_TIMEOUT_MS"),
        ({"DOCKER_USE_EXISTING": "maybe"}, "DOCKER_USE_EXISTING"),
        ({"PROCESS_KEEP_TERMINATED": "-1"}, "PROCESS_KEEP_TERMINATED"),
        ({"PROCESS_MAX_LIVE": "0"}, "PROCESS_MAX_LIVE"),
        ({"DEFAULT_WORKDIR": "relative/dir"}, "DEFAULT_WORKDIR"),
        ({"DEFAULT_WORKDIR": "/nonexistent/process-mcp-workspace"}, "DEFAULT_WORKDIR"),
        ({"SANDBOX_ALLOWED_DOMAINS": "example.com,!!!"}, "'!!!'"),
        ({"SANDBOX_ALLOWED_DOMAINS": "http://x/y"}, "'http://x/y'"),
        ({"SANDBOX_ALLOWED_DOMAINS": "exa mple.com"}, "'exa mple.com'"),
        ({"SANDBOX_ALLOWED_DOMAINS": "*.*"}, "'*.*'"),
        ({"MAX_TIMEOUT_MS": "0"}, "MAX_TIMEOUT_MS"),
        ({"DEFAULT_TIMEOUT_MS": "70000"}, "DEFAULT_TIMEOUT_MS 70000 is above MAX_TIMEOUT_MS 60000"),
    ],
)
def test_a_setting_that_cannot_work_stops_the_server_at_start_naming_it(environ: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidConfig) as refused:
        load_config(environ)
    assert named in str(refused.value)


def test_settings_that_can_work_are_taken_as_written(tmp_path: Path) -> None:
    config = load_config(
        {
            "PROCESS_MODE": "HOST",
            "DEFAULT_WORKDIR": str(tmp_path),
            "SANDBOX_ALLOWED_DOMAINS": "example.com,*.npmjs.org,10.0.0.1,localhost",
            "PROCESS_LOG_LEVEL": "debug",
        }
    )
    assert config.mode == "host"
    assert config.sandbox.allowed_domains == ["example.com", "*.npmjs.org", "10.0.0.1", "localhost"]
    assert config.service.log_level == "DEBUG"
    assert (
        load_config({"PROCESS_MODE": "docker", "DEFAULT_WORKDIR": "/in/the/container"}).workdir == "/in/the/container"
    )


def test_a_blank_variable_is_unset_and_a_given_mapping_is_all_there_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_WORKDIR", "")
    monkeypatch.setenv("PROCESS_MODE", "docker")
    assert load_config().defaults.workdir == "/home/agent"  # blank: the mode's default
    assert load_config({}).mode == "host"  # the process environment does not leak into a given mapping
