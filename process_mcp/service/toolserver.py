"""The MCP server the tools are registered on: a failed call reads ``<code>: <what to do next>``.

Every failed call (a library error, arguments that fail the input schema, an unknown tool) is an
``isError`` result whose text starts with the error code and says what to do next; the code is also in
its ``_meta`` under ERROR_META.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.stdio import stdio_server
from mcp_types import CallToolResult, InputRequiredResult, TextContent
from pydantic import ValidationError

from ..errors import InvalidInput
from .arguments import check_arguments, close_schema
from .stdio import loop_stdio

logger = logging.getLogger(__name__)

ERROR_META = "process-mcp/error"
"""Where a failed call's ``_meta`` holds its error, ``{"code": ...}``, for a client that acts on the code."""


TOOL_NAMES = ("spawn", "ps", "stdin", "stdout", "kill")


_CODED = re.compile(r"([a-z_]+): (.*)", re.DOTALL)
"""An error's text: its code, then what to do next."""


class ToolServer(MCPServer):
    """An MCP server whose failed tool calls read ``<code>: <what to do next>`` (the SDK would start
    them "Error executing tool <name>: "), with the code also in ``_meta``."""

    async def run_stdio_async(self) -> None:
        """Serve on stdin and stdout, read and written on the event loop where they are pipes (see
        ``stdio``), else through the SDK's transport alone."""
        async with loop_stdio() as streams:
            stdin, stdout = streams or (None, None)
            async with stdio_server(stdin, stdout) as (read_stream, write_stream):  # type: ignore[arg-type]
                await self._lowlevel_server.run(
                    read_stream, write_stream, self._lowlevel_server.create_initialization_options()
                )

    def close_schemas(self) -> None:
        """Publish every tool's input schema with ``additionalProperties: false`` (see ``arguments``)."""
        for tool in self._tool_manager.list_tools():
            close_schema(tool.parameters)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        tool = self._tool_manager.get_tool(name)
        if tool is not None:
            try:
                check_arguments(name, tool.parameters, arguments or {})
            except InvalidInput as exc:
                logger.info("tool %r failed: %s", name, exc.code)
                return _failure(exc.code, exc.message)
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise  # a crash: the SDK logs it and tells the caller nothing of it
        except ToolError as exc:
            code, message = _error_of(name, exc)
            logger.info("tool %r failed: %s", name, code)
            return _failure(code, message)


def _failure(code: str, message: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=f"{code}: {message}")], is_error=True, _meta={ERROR_META: {"code": code}}
    )


def _error_of(tool: str, exc: ToolError) -> tuple[str, str]:
    """The code and the message of a failed call, from what the SDK raised (around what the tool raised)."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}" for error in cause.errors()
        )
        return "invalid_input", f"{problems}; see the {tool} tool's input schema"
    text = str(cause if isinstance(cause, ToolError) else exc)
    found = _CODED.match(text)
    if found:
        return found.group(1), found.group(2)
    if tool not in TOOL_NAMES:
        return "invalid_input", f"there is no tool {tool!r}; the tools are {', '.join(TOOL_NAMES)}"
    return "error", text


def error_code(exc: ToolError) -> str:
    """The error code a tool's error text starts with."""
    found = _CODED.match(str(exc))
    return found.group(1) if found else "error"
