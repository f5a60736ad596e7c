"""The MCP service: tools, stdio and HTTP transports, authentication, principals."""
