"""Attacks on the sandbox and the server, as the agent or a caller would make them."""
