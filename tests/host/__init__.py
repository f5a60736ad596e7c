"""The host backend: the sandbox's layers, its command line, the egress proxy."""
