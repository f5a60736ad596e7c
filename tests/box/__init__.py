"""The in-box agent and its protocol, both ends, without Docker."""
