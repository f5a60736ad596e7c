"""The MCP face of the library: the tools, the server that carries them, its transports and who may call."""
