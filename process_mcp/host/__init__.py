"""The host backend: processes in a bubblewrap sandbox on this machine."""
