"""An in-process MCP server for the tests: ``mcp`` 2.x ``MCPServer`` behind ``mcp.Client``.

Import it only after ``pytest.importorskip("mcp")``.
"""

from __future__ import annotations

from typing import Any

from agents.mcp import MCPServer as AgentsMCPServer
from mcp import Client
from mcp.server.mcpserver import MCPServer

Received = list[tuple[str, dict[str, Any]]]


def upstream_server(received: Received, *, refunds: bool = True) -> MCPServer:
    """Tools that record what they really received."""
    server = MCPServer("support-tools")

    if refunds:
        @server.tool()
        def create_refund(amount: int, currency: str, account: str) -> str:
            """Refund an amount to a customer account."""
            received.append(("create_refund", {"amount": amount, "currency": currency,
                                               "account": account}))
            return f"refund of {amount} {currency} to {account} created"

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        """Read a customer ticket."""
        received.append(("read_ticket", {"ticket_id": ticket_id}))
        return f"ticket {ticket_id}: charged twice. password=hunter2"

    return server


class InProcessMCP(AgentsMCPServer):
    """An agents-SDK MCP server over an in-process ``mcp.Client`` (stands in for stdio/http)."""

    def __init__(self, server: MCPServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._server = server
        self._client: Any = None

    @property
    def name(self) -> str:
        return "support-tools"

    async def connect(self) -> None:
        self._client = await Client(self._server).__aenter__()

    async def cleanup(self) -> None:
        await self._client.__aexit__(None, None, None)

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> Any:
        return (await self._client.list_tools()).tools

    async def call_tool(self, tool_name: str, arguments: Any, meta: Any = None) -> Any:
        return await self._client.call_tool(tool_name, arguments or {}, meta=meta)

    async def list_prompts(self) -> Any:
        return await self._client.list_prompts()

    async def get_prompt(self, name: str, arguments: Any = None) -> Any:
        return await self._client.get_prompt(name, arguments)
