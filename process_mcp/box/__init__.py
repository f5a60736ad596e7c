"""The agent that runs inside a box (a container, or the host for unsandboxed processes) and the one
protocol both ends of its byte stream speak. ``protocol`` and ``agent`` use only the standard library
and Python 3.8 syntax, since they run with whatever Python the box has."""
