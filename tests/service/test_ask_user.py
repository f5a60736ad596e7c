"""stdin askUser: a question the user answers in their client (MCP elicitation), typed into the process;
the answer reaches neither the model (replies) nor any record (audit log, server log)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext, ElicitationFnT
from mcp_types import ElicitRequestParams, ElicitResult, ErrorData

from process_mcp import ProcessMcpServer, create_process_mcp
from process_mcp.config import AuditConfig

from ..helpers import WAIT_S, call, error, host_config, text_of

pytestmark = pytest.mark.anyio

SECRET = "correct horse 42"
PROMPT = "import getpass; p = getpass.getpass('Password: '); print('length', len(p)); print('said', p)"


def answering(action: Literal["accept", "decline", "cancel"], asked: list[str]) -> ElicitationFnT:
    """A user who answers every question so (``accept``: with SECRET); each question is noted in ``asked``."""

    async def answer(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult | ErrorData:
        asked.append(params.message)
        return ElicitResult(action=action, content={"answer": SECRET} if action == "accept" else None)

    return answer


def asking(mcp: ProcessMcpServer, callback: ElicitationFnT) -> Client:
    """A client that declares elicitation and answers it with ``callback``."""
    return Client(mcp.server, read_timeout_seconds=WAIT_S, elicitation_callback=callback)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"], ids=["session", "stateless"])
async def test_the_users_answer_is_typed_into_a_password_prompt_and_never_shown_or_recorded(
    workdir: Path, tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = host_config(workdir)
    config.audit = AuditConfig(path=str(tmp_path / "audit.jsonl"), redact=False)  # even unredacted
    mcp = await create_process_mcp(config)
    asked: list[str] = []
    callback = answering("accept", asked)
    async with mcp, Client(mcp.server, read_timeout_seconds=WAIT_S, mode=mode, elicitation_callback=callback) as client:
        prompted = await call(client, "spawn", {"command": f'python3 -c "{PROMPT}"', "tty": True, "timeoutMs": 60000})
        assert (prompted["waitResult"], prompted["secret"]) == ("input", True), prompted
        question = "Password for the test vault?"
        result = await client.call_tool(
            "stdin", {"id": prompted["pid"], "input": "", "askUser": question, "waitFor": "said"}
        )
        assert not result.is_error, text_of(result)
        assert len(asked) == 1
        assert question in asked[0]
        assert prompted["pid"] in asked[0]  # the form says which process asks, not only the model's words
        assert result.structured_content is not None
        assert result.structured_content["asked"] == "answered"
        assert f"length {len(SECRET)}" in result.structured_content["stdout"]
        assert "said [the user's answer]" in result.structured_content["stdout"]  # what the process printed
        later = await call(client, "ps", {})
        await mcp.cleanup()
    replies = [text_of(result), str(result.structured_content), str(later)]
    records = (tmp_path / "audit.jsonl").read_text()
    assert "askUser" in records  # the call is recorded, with its question
    for where, text in (("a reply", "\n".join(replies)), ("the audit log", records), ("the log", caplog.text)):
        assert SECRET not in text, f"the answer is in {where}"


async def test_a_declined_or_cancelled_question_types_nothing_and_says_so(workdir: Path) -> None:
    for action in ("decline", "cancel"):
        mcp = await create_process_mcp(host_config(workdir))
        asked: list[str] = []
        async with (
            mcp,
            Client(mcp.server, read_timeout_seconds=WAIT_S, elicitation_callback=answering(action, asked)) as client,
        ):
            reader = await call(client, "spawn", {"command": "read line; echo got $line", "timeoutMs": 60000})
            result = await client.call_tool("stdin", {"id": reader["pid"], "input": "", "askUser": "Your name?"})
            assert result.structured_content is not None
            assert (result.structured_content["asked"], result.structured_content["bytesSent"]) == (
                f"{action}d" if action == "decline" else "cancelled",
                0,
            )
            assert "nothing was sent" in text_of(result)
            assert (await call(client, "stdout", {"id": reader["pid"]}))["status"] == "running"


async def test_a_client_that_cannot_ask_gets_a_clear_error_and_input_goes_in_a_call_of_its_own(workdir: Path) -> None:
    mcp = await create_process_mcp(host_config(workdir))
    async with mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as client:
        reader = await call(client, "spawn", {"command": "read line", "background": True})
        refused = await error(client, "stdin", {"id": reader["pid"], "input": "", "askUser": "Your name?"})
        assert "invalid_input" in refused
        assert "elicitation" in refused
    asked: list[str] = []
    mcp = await create_process_mcp(host_config(workdir))
    async with (
        mcp,
        Client(mcp.server, read_timeout_seconds=WAIT_S, elicitation_callback=answering("accept", asked)) as client,
    ):
        reader = await call(client, "spawn", {"command": "read line", "background": True})
        both = await error(client, "stdin", {"id": reader["pid"], "input": "x", "askUser": "Your name?"})
        assert "invalid_input" in both
        assert "call of its own" in both


async def test_an_answer_is_typed_only_at_a_prompt_that_does_not_echo(workdir: Path) -> None:
    # Typed where the terminal echoes, the answer would show in every later read of the output.
    mcp = await create_process_mcp(host_config(workdir))
    asked: list[str] = []
    async with mcp, asking(mcp, answering("accept", asked)) as client:
        echoing = await call(client, "spawn", {"command": "python3 -c 'input(\"name: \")'", "tty": True})
        assert (echoing["waitResult"], echoing.get("secret")) == ("input", None), echoing
        refused = await error(client, "stdin", {"id": echoing["pid"], "input": "", "askUser": "Your name?"})
        assert "does not echo" in refused
        assert SECRET not in refused
        output = await call(client, "stdout", {"id": echoing["pid"]})
        assert SECRET not in str(output)
