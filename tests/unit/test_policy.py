"""The command policy against the bypasses published for other MCP shell servers, and more.

Each attack tries to run ``touch`` (denied, or not allowed) through a real executor; the evidence is a
canary file that must not appear. Each is paired with the same shape running an allowed program,
which must still run and print.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from process_mcp import HostExecutor, PolicyConfig, PolicyDenied, SpawnOptions, load_config
from process_mcp.policy import CommandPolicy

from ..helpers import host_config

pytestmark = pytest.mark.anyio

ALLOWED = ["echo", "ls", "cat", "grep", "printf", "sh", "env", "timeout", "nice", "xargs", "find", "git", "true"]

# (attack running `touch {canary}`, the same shape running an allowed program, which prints "ok")
PAIRS = [
    ("touch {c}", "echo ok"),
    ("'t'ouch {c}", "'e'cho ok"),
    ('"touch" {c}', '"echo" ok'),
    ("t''ouch {c}", "e''cho ok"),
    ("t\\ouch {c}", "e\\cho ok"),
    ("$'\\x74ouch' {c}", "echo ok"),  # bash decodes it to touch; /bin/sh (dash) would not, but it is refused
    ("tou\\\nch {c}", "ec\\\nho ok"),
    ("/usr/bin/touch {c}", "/bin/echo ok"),
    ("/usr/bin/to?ch {c}", "echo ok"),
    ("/usr/bin/tou*h {c}", "echo ok"),
    ("true; touch {c}", "true; echo ok"),
    ("true\ntouch {c}", "true\necho ok"),
    ("true && touch {c}", "true && echo ok"),
    ("false || touch {c}", "false || echo ok"),
    ("true | touch {c}", "true | echo ok"),
    ("true & touch {c}; wait", "true & echo ok; wait"),
    ("(touch {c})", "(echo ok)"),
    ("{{ touch {c}; }}", "{{ echo ok; }}"),
    ("echo $(touch {c})", "echo $(echo ok)"),
    ("echo `touch {c}`", "echo `echo ok`"),
    ('echo "$(touch {c})"', 'echo "$(echo ok)"'),
    ("echo ${{x:-$(touch {c})}}", "echo ${{x:-$(echo ok)}}"),
    ("echo $((1 + $(touch {c}; echo 1)))", "echo $((0 + $(echo 1))) ok"),
    ("cat <(touch {c})", "echo ok"),  # bash syntax: /bin/sh (dash) has no process substitution
    ("x=$(touch {c})", "x=$(echo ok); echo $x"),
    ("cat <<EOF\n$(touch {c})\nEOF", "cat <<EOF\n$(echo ok)\nEOF"),
    ("cat <<EOF\n`touch {c}`\nEOF", "cat <<EOF\n`echo ok`\nEOF"),
    ("f() {{ touch {c}; }}; f", "f() {{ echo ok; }}; f"),
    ("if true; then touch {c}; fi", "if true; then echo ok; fi"),
    ("for i in 1; do touch {c}; done", "for i in 1; do echo ok; done"),
    ("case x in x) touch {c};; esac", "case x in x) echo ok;; esac"),
    ("while true; do touch {c}; break; done", "while true; do echo ok; break; done"),
    ("! touch {c}", "! false && echo ok"),
    ("echo ok > $(touch {c})", "echo ok > /dev/stdout"),
    ("env touch {c}", "env echo ok"),
    ("env -i FOO=1 touch {c}", "env -i FOO=1 echo ok"),
    ("env -u HOME -- touch {c}", "env -u HOME -- echo ok"),
    ("env -S 'touch {c}'", "env -S 'echo ok'"),
    ("nice -n 5 touch {c}", "nice -n 5 echo ok"),
    ("nice -n5 touch {c}", "nice -n5 echo ok"),
    ("timeout 5 touch {c}", "timeout 5 echo ok"),
    ("timeout -k 1 5 touch {c}", "timeout -k 1 5 echo ok"),
    ("timeout --signal=KILL 5 touch {c}", "timeout --signal=KILL 5 echo ok"),
    ("command touch {c}", "command echo ok"),
    ("exec touch {c}", "exec echo ok"),
    ("echo {c} | xargs touch", "echo ok | xargs echo"),
    ("echo {c} | xargs -I F touch F", "echo ok | xargs -I F echo F"),
    ("find /etc/hostname -exec touch {c} \\;", "find /etc/hostname -exec echo ok \\;"),
    ("find /etc/hostname -execdir touch {c} {{}} +", "find /etc/hostname -execdir echo ok {{}} +"),
    ("sh -c 'touch {c}'", "sh -c 'echo ok'"),
    ("sh -ec 'touch {c}'", "sh -ec 'echo ok'"),
    ("sh -c \"sh -c 'touch {c}'\"", "sh -c \"sh -c 'echo ok'\""),
    ("sh -c 'tou\\\nch {c}'", "sh -c 'ec\\\nho ok'"),
    ("eval 'touch {c}'", "eval 'echo ok'"),
    ("eval touch {c}", "eval echo ok"),
    ("trap 'touch {c}' EXIT", "trap 'echo ok' EXIT"),
    ("alias t='touch {c}'\nt", "alias t='echo ok'\nt"),
    ("x=touch; $x {c}", "echo ok"),
    ("$(echo touch) {c}", "echo ok"),
    ("`echo touch` {c}", "echo ok"),
    ("${{x:-touch}} {c}", "echo ok"),
    ('eval "$(echo touch) {c}"', 'eval "echo ok"'),
    ('sh -c "$(echo touch) {c}"', 'sh -c "echo ok"'),
    ("git -c alias.t='!touch {c}' t", "git --version >/dev/null && echo ok"),
]

ATTACK_IDS = [attack.split("{c}")[0][:40] for attack, _ in PAIRS]


@pytest.fixture(params=["deny", "allow"])
def policy(request: pytest.FixtureRequest) -> PolicyConfig:
    if request.param == "deny":
        return PolicyConfig(command_deny=["touch"])
    return PolicyConfig(command_allow=ALLOWED)


@pytest.fixture
async def executor(workdir: str, policy: PolicyConfig) -> AsyncIterator[HostExecutor]:
    config = host_config(workdir)
    config.policy = policy
    executor = HostExecutor(config)
    await executor.start()
    yield executor
    await executor.cleanup()


@pytest.mark.parametrize(("attack", "legit"), PAIRS, ids=ATTACK_IDS)
async def test_a_denied_program_does_not_run_however_it_is_written_and_the_same_shape_with_an_allowed_one_does(
    executor: HostExecutor, workdir: str, attack: str, legit: str
) -> None:
    canary = Path(workdir) / "CANARY"
    with pytest.raises(PolicyDenied) as refused:
        await executor.spawn(SpawnOptions(command=attack.format(c=canary)))
    assert refused.value.code == "policy_denied"
    assert "PROCESS_COMMAND_" in str(refused.value)
    ran = await executor.spawn(SpawnOptions(command=legit.format(c=canary)))
    assert not canary.exists()
    assert ran.exit_code == 0, (ran.stdout, ran.stderr)
    assert "ok" in ran.stdout


def test_the_refusal_names_the_program_and_the_setting() -> None:
    with pytest.raises(PolicyDenied, match=r"'rm' matches 'r\*' in PROCESS_COMMAND_DENY"):
        CommandPolicy(deny=["r*"]).check("ls && /bin/rm -rf x")
    with pytest.raises(PolicyDenied, match=r"'curl' is not in PROCESS_COMMAND_ALLOW \(ls, echo\)"):
        CommandPolicy(allow=["ls", "echo"]).check("ls | curl example.com")
    with pytest.raises(PolicyDenied, match="computed when it runs"):
        CommandPolicy(allow=["ls"]).check('"$CMD" x')
    with pytest.raises(PolicyDenied, match="not a complete shell command line"):
        CommandPolicy(deny=["rm"]).check("echo 'unterminated")


def test_an_allowed_interpreter_runs_its_code_unchecked_and_a_shell_string_is_checked() -> None:
    policy = CommandPolicy(allow=["python3", "sh", "echo"])
    policy.check("python3 -c 'import os; os.system(\"rm -rf x\")'")  # the interpreter is allowed: its code is its own
    policy.check("sh script.sh")
    with pytest.raises(PolicyDenied):
        policy.check("sh -c 'rm -rf x'")
    with pytest.raises(PolicyDenied):
        CommandPolicy(allow=["echo"]).check("python3 -c 'print(1)'")
    with pytest.raises(PolicyDenied):
        CommandPolicy(allow=["echo"]).check(". ./env.sh")


def test_path_patterns_match_the_path_as_written_and_names_match_any_path() -> None:
    policy = CommandPolicy(allow=["/opt/tools/*", "ls"])
    policy.check("/opt/tools/build --fast")
    policy.check("/usr/bin/ls")
    with pytest.raises(PolicyDenied):
        policy.check("build --fast")
    with pytest.raises(PolicyDenied):
        policy.check("/opt/other/build")


def test_no_policy_checks_nothing() -> None:
    CommandPolicy().check("x=rm; $x -rf 'unterminated")


def test_the_policy_is_read_from_the_environment() -> None:
    config = load_config({"PROCESS_COMMAND_ALLOW": "ls, git*,echo", "PROCESS_COMMAND_DENY": "rm"})
    assert config.policy.command_allow == ["ls", "git*", "echo"]
    assert config.policy.command_deny == ["rm"]
